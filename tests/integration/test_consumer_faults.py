"""Consumer batches when the database, not the handler, breaks the transaction."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from outboxer import Envelope, Outbox, Status, TransactionAbortedError
from outboxer.consumer import Dispatcher, consume_loop
from outboxer.database.schema import db_now
from outboxer.hooks import Stats
from outboxer.transports.base import IncomingMessage
from outboxer.transports.local import LocalSubscription
from tests.helpers import make_outbox


def _batch(ob: Outbox, service: str, ids: list[int]) -> list[IncomingMessage]:
    st = ob.store(service)
    route = st.route
    out = []
    for i in ids:
        msg = st.get_by_id(i)
        assert msg is not None
        out.append(IncomingMessage(route=route, value=msg.envelope().to_json(), position=i))
    return out


def _setup(url: str, service: str, retry_unit: float = 1.0) -> tuple[Outbox, list[int]]:
    ob = make_outbox(url, retry_unit=retry_unit)
    ob.register_event(f"{service}.e", service)
    ob.migrate()
    with ob.db.sync_engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {service}_fx (n INTEGER PRIMARY KEY)"))
        conn.execute(text(f"CREATE TABLE {service}_res (id INTEGER PRIMARY KEY, v INTEGER)"))
        conn.execute(text(f"INSERT INTO {service}_res VALUES (1, 0), (2, 0)"))
    with ob.db.sync_engine.begin() as conn:
        ids = [ob.publish(conn, f"{service}.e", {"n": n}) for n in (1, 2)]
    return ob, ids


async def _teardown(ob: Outbox, service: str) -> None:
    with ob.db.sync_engine.begin() as conn:
        conn.execute(text(f"DROP TABLE {service}_fx"))
        conn.execute(text(f"DROP TABLE {service}_res"))
        ob.metadata.drop_all(conn)
    await ob.aclose()


def _effects(ob: Outbox, service: str) -> list[int]:
    with ob.db.sync_engine.connect() as conn:
        return [r[0] for r in conn.execute(text(f"SELECT n FROM {service}_fx ORDER BY n"))]


async def test_handler_that_kills_the_transaction_marks_nothing_wrongly(
    db_url: str, service: str
) -> None:
    ob, (first, second) = _setup(db_url, service)
    calls: list[int] = []

    def handler(event: Envelope, tx: Session) -> None:
        n = event.payload["n"]
        calls.append(n)
        tx.execute(text(f"INSERT INTO {service}_fx (n) VALUES (:n)"), {"n": n})
        if n == 2:
            tx.rollback()  # forbidden: it ends the batch transaction, not just this message

    try:
        dispatcher = Dispatcher(
            ob.storage, ob.store(service).route, {f"{service}.e": handler}, Stats()
        )
        batch = _batch(ob, service, [first, second])
        with pytest.raises(Exception):  # noqa: B017 - whatever the driver says
            await dispatcher.dispatch(batch)
        st = ob.store(service)
        # Nothing was marked consumed without its effect.
        assert _effects(ob, service) == []
        assert {st.get_by_id(i).status for i in (first, second)} == {Status.PENDING}  # type: ignore[union-attr]
        # The loop falls back to one message per transaction: the good one is consumed,
        # the bad one gets a failed attempt of its own.
        stop = asyncio.Event()
        sub = _OneBatch(st.route, batch, stop)
        await asyncio.wait_for(consume_loop(sub, dispatcher, stop, ob.settings), 30)
        assert _effects(ob, service) == [1]
        ok, bad = st.get_by_id(first), st.get_by_id(second)
        assert ok is not None
        assert ok.status is Status.CONSUMED
        assert bad is not None
        assert bad.status is Status.PENDING
        assert bad.retry_count == 1
        assert sub.acked == batch
    finally:
        await _teardown(ob, service)


class _OneBatch(LocalSubscription):
    """Hands out one batch, records the ack, then stops the loop."""

    def __init__(self, route: Any, batch: list[IncomingMessage], stop: asyncio.Event) -> None:
        super().__init__(route, asyncio.Queue())
        self.batch: list[IncomingMessage] | None = batch
        self.acked: list[IncomingMessage] = []
        self.stop = stop

    async def receive(self, max_messages: int, timeout: float) -> list[IncomingMessage]:
        batch, self.batch = self.batch, None
        if batch is None:
            self.stop.set()
            return []
        return batch

    async def ack(self, messages: Any) -> None:
        self.acked = list(messages)


async def test_mariadb_deadlock_in_one_handler_loses_no_effect(
    mysql_database: Any, service: str
) -> None:
    ob, (first, second) = _setup(mysql_database.url, service)
    handler_has_1 = threading.Event()
    other_has_2 = threading.Event()
    other_result: list[str] = []

    def other() -> None:
        # A second transaction takes the rows in the opposite order; it writes more,
        # so InnoDB picks the consumer's transaction as the deadlock victim.
        with ob.db.sync_engine.connect() as conn:
            for _ in range(30):
                conn.execute(text(f"UPDATE {service}_res SET v = v + 1 WHERE id = 2"))
            other_has_2.set()
            handler_has_1.wait(10)
            time.sleep(0.5)
            conn.execute(text(f"UPDATE {service}_res SET v = v + 1 WHERE id = 1"))
            conn.commit()
            other_result.append("committed")

    def handler(event: Envelope, tx: Session) -> None:
        n = event.payload["n"]
        if n == 1:
            tx.execute(text(f"INSERT INTO {service}_fx (n) VALUES (1)"))
            return
        if not handler_has_1.is_set():
            tx.execute(text(f"UPDATE {service}_res SET v = v + 1 WHERE id = 1"))
            other_has_2.wait(10)
            handler_has_1.set()
            tx.execute(text(f"UPDATE {service}_res SET v = v + 1 WHERE id = 2"))  # deadlock
        tx.execute(text(f"INSERT INTO {service}_fx (n) VALUES (2)"))

    try:
        # Isolated from the start: the deadlock must hit a handler inside its savepoint.
        dispatcher = Dispatcher(
            ob.storage, ob.store(service).route, {f"{service}.e": handler}, Stats(), isolate=True
        )
        batch = _batch(ob, service, [first, second])
        thread = threading.Thread(target=other)
        thread.start()
        with pytest.raises(TransactionAbortedError):
            await dispatcher.dispatch(batch)
        thread.join(30)
        assert other_result == ["committed"]
        st = ob.store(service)
        assert _effects(ob, service) == []
        assert {st.get_by_id(i).status for i in (first, second)} == {Status.PENDING}  # type: ignore[union-attr]
        # Retrying the batch (the deadlock is over) applies both, once.
        await dispatcher.dispatch(batch)
        assert _effects(ob, service) == [1, 2]
        assert {st.get_by_id(i).status for i in (first, second)} == {Status.CONSUMED}  # type: ignore[union-attr]
    finally:
        await _teardown(ob, service)


async def test_backoff_counts_from_the_failure_not_the_batch_start(
    db_url: str, service: str
) -> None:
    ob, (first, second) = _setup(db_url, service, retry_unit=60.0)

    def handler(event: Envelope, tx: Session) -> None:
        if event.payload["n"] == 1:
            time.sleep(1.5)  # a slow first message in the batch
            return
        raise RuntimeError("second fails")

    try:
        dispatcher = Dispatcher(
            ob.storage, ob.store(service).route, {f"{service}.e": handler}, Stats()
        )
        with ob.db.sync_engine.connect() as conn:
            batch_start = conn.execute(select(db_now())).scalar_one()
        await dispatcher.dispatch(_batch(ob, service, [first, second]))
        st = ob.store(service)
        failed = st.get_by_id(second)
        assert failed is not None
        assert failed.status is Status.PENDING
        assert failed.next_retry_at is not None
        assert (failed.next_retry_at - failed.updated_at).total_seconds() == pytest.approx(
            60.0, abs=0.01
        )
        # Backoff 60 s from the failure, which came after the 1.5 s handler: a clock
        # read at the transaction's start would give less than 61.5 s.
        assert (failed.next_retry_at - batch_start).total_seconds() >= 61.4
    finally:
        await _teardown(ob, service)


async def _one_pass(ob: Outbox, service: str, handler: Any, ids: list[int]) -> Dispatcher:
    """Process ``ids`` once through consume_loop (batch, then the one-by-one fallback)."""
    st = ob.store(service)
    dispatcher = Dispatcher(ob.storage, st.route, {f"{service}.e": handler}, Stats())
    stop = asyncio.Event()
    sub = _OneBatch(st.route, _batch(ob, service, ids), stop)
    await asyncio.wait_for(consume_loop(sub, dispatcher, stop, ob.settings), 30)
    return dispatcher


async def test_handler_that_commits_applies_nothing_and_fails(db_url: str, service: str) -> None:
    ob, (first, second) = _setup(db_url, service)

    def handler(event: Envelope, tx: Session) -> None:
        n = event.payload["n"]
        tx.execute(text(f"INSERT INTO {service}_fx (n) VALUES (:n)"), {"n": n})
        if n == 2:
            tx.commit()  # forbidden: its writes must commit with the consumed mark

    try:
        for _ in range(2):  # a second delivery must not apply it either
            await _one_pass(ob, service, handler, [first, second])
        assert _effects(ob, service) == [1]
        bad = ob.store(service).get_by_id(second)
        assert bad is not None
        assert bad.status is Status.PENDING
        assert bad.retry_count == 2  # one failed attempt per delivery, no effect from either
        assert bad.last_error is not None
        assert "committed or rolled back" in bad.last_error
    finally:
        await _teardown(ob, service)


async def test_sync_handler_returning_a_coroutine_is_not_marked_consumed(
    db_url: str, service: str
) -> None:
    ob, (first, _) = _setup(db_url, service)

    async def real(event: Envelope, tx: Any) -> None:
        await tx.execute(text(f"INSERT INTO {service}_fx (n) VALUES (1)"))

    def wrapper(event: Envelope, tx: Any) -> Any:  # a decorator that lost `async`
        return real(event, tx)

    try:
        await _one_pass(ob, service, wrapper, [first])
        assert _effects(ob, service) == []
        row = ob.store(service).get_by_id(first)
        assert row is not None
        assert row.status is Status.PENDING
        assert row.retry_count == 1
        assert "returned an awaitable" in (row.last_error or "")
    finally:
        await _teardown(ob, service)


async def test_handler_raising_cancelled_error_is_a_handler_failure(
    db_url: str, service: str
) -> None:
    ob, (first, second) = _setup(db_url, service)

    async def handler(event: Envelope, tx: Any) -> None:
        if event.payload["n"] == 2:
            raise asyncio.CancelledError  # e.g. a client library's cancelled request
        await tx.execute(text(f"INSERT INTO {service}_fx (n) VALUES (1)"))

    try:
        dispatcher = Dispatcher(
            ob.storage, ob.store(service).route, {f"{service}.e": handler}, Stats()
        )
        out = await dispatcher.dispatch(_batch(ob, service, [first, second]))
        assert out.consumed == [first]
        assert [o.outbox_id for o in out.retried] == [second]
        row = ob.store(service).get_by_id(second)
        assert row is not None
        assert "CancelledError" in (row.last_error or "")
    finally:
        await _teardown(ob, service)


async def test_unparseable_message_is_skipped_not_retried(db_url: str, service: str) -> None:
    ob, (first, _) = _setup(db_url, service)
    try:
        st = ob.store(service)
        nested = IncomingMessage(route=st.route, value=b"[" * 200_000, position="deep")
        good = _batch(ob, service, [first])[0]
        stats = Stats()

        def handler(event: Envelope, tx: Session) -> None:
            tx.execute(text(f"INSERT INTO {service}_fx (n) VALUES (:n)"), {"n": event.payload["n"]})

        dispatcher = Dispatcher(ob.storage, st.route, {f"{service}.e": handler}, stats)
        stop = asyncio.Event()
        sub = _OneBatch(st.route, [nested, good], stop)
        await asyncio.wait_for(consume_loop(sub, dispatcher, stop, ob.settings), 30)
        assert sub.acked == [nested, good]
        assert stats.get("undecodable") == 1
        assert _effects(ob, service) == [1]
    finally:
        await _teardown(ob, service)
