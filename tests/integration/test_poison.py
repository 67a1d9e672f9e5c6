"""Poison protection: a delivery is recorded before its handler runs, so a worker
that dies in a handler has spent an attempt (on SQLite, PostgreSQL and MariaDB).

These tests stop where the worker would die: they mark messages as being handled
(:meth:`Store.start_handling_async`) and never settle them, then start again as the
next delivery would. tests/faults/test_poison.py kills real worker processes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.pool import NullPool

from outboxer import Envelope, Outbox, Status
from outboxer.consumer import Dispatcher
from outboxer.database.ops.handling import HANDLING_ALONE, HANDLING_IN_BATCH, crash_reason
from outboxer.hooks import Stats
from outboxer.testing import InMemoryTransport, drain
from tests.helpers import backdate, drop_tables, isolated_settings


def _make(url: str, service: str, *, inbox: bool = False) -> Outbox:
    settings = isolated_settings(retry_unit=0.01, poll_interval=0.05)
    ob = Outbox(url, transport=InMemoryTransport(), settings=settings)
    if inbox:
        ob.register_inbox(service, consumer="here")
    else:
        ob.register_event(f"{service}.e", service)
    ob.migrate()
    return ob


@pytest.fixture
async def ob(db_url: str, service: str):  # type: ignore[no-untyped-def]
    outbox = _make(db_url, service)
    yield outbox
    drop_tables(outbox)
    await outbox.aclose()


def _publish(ob: Outbox, service: str, n: int, max_retry: int | None = None) -> list[int]:
    with ob.db.sync_engine.begin() as conn:
        return [
            ob.publish(conn, f"{service}.e", {"n": i}, key=f"k{i}", max_retry=max_retry)
            for i in range(n)
        ]


def _row(ob: Outbox, service: str, oid: int):  # type: ignore[no-untyped-def]
    msg = ob.store(service).get_by_id(oid)
    assert msg is not None
    return msg


async def test_a_mark_left_by_a_delivery_alone_is_a_crash_of_that_message(
    ob: Outbox, service: str
) -> None:
    (oid,) = _publish(ob, service, 1)
    store = ob.store(service)
    first = await store.start_handling_async([oid])
    assert first.ready == [oid]
    assert _row(ob, service, oid).handling == HANDLING_ALONE
    # The worker dies here. The next delivery finds the mark:
    second = await store.start_handling_async([oid])
    assert second.ready == []  # not run in this delivery: retried after its backoff
    assert [(o.outbox_id, o.attempts) for o in second.crashed] == [(oid, 1)]
    assert second.dead == []
    row = _row(ob, service, oid)
    assert row.status is Status.PENDING
    assert (row.retry_count, row.crashes, row.handling) == (1, 1, 0)
    assert row.last_error == crash_reason(1) == "the worker process died while handling it (once)"
    assert row.next_retry_at is not None
    assert row.next_retry_at > row.updated_at


async def test_a_message_that_kills_its_worker_max_retry_times_is_dead(
    ob: Outbox, service: str
) -> None:
    (oid,) = _publish(ob, service, 1, max_retry=3)
    store = ob.store(service)
    for crash in (1, 2):
        assert (await store.start_handling_async([oid])).ready == [oid]
        again = await store.start_handling_async([oid])
        assert [o.attempts for o in again.crashed] == [crash]
        assert again.dead == []
    assert (await store.start_handling_async([oid])).ready == [oid]
    last = await store.start_handling_async([oid])
    assert [o.outbox_id for o in last.dead] == [oid]
    row = _row(ob, service, oid)
    assert row.status is Status.DEAD
    assert (row.retry_count, row.crashes, row.handling) == (3, 3, 0)
    assert row.next_retry_at is None
    assert row.last_error == "the worker process died while handling it (3 times)"
    # dead letters list it with that reason; a requeue gives it a fresh start
    page = ob.admin.dead_letters(services=[service])
    assert [(m.id, m.last_error) for m in page.messages] == [(oid, row.last_error)]
    assert ob.admin.requeue([oid], services=[service]) == {service: 1}
    row = _row(ob, service, oid)
    assert (row.status, row.retry_count, row.crashes, row.handling) == (Status.PENDING, 0, 0, 0)


async def test_a_batch_whose_worker_died_runs_one_at_a_time_without_a_charge(
    ob: Outbox, service: str
) -> None:
    ids = _publish(ob, service, 3)
    store = ob.store(service)
    first = await store.start_handling_async(ids)
    assert first.ready == ids
    assert not first.suspect
    assert {_row(ob, service, i).handling for i in ids} == {HANDLING_IN_BATCH}
    # The worker dies; which message killed it is unknown.
    second = await store.start_handling_async(ids)
    assert second.suspect
    assert second.ready == ids
    assert second.crashed == []
    for i in ids:
        row = _row(ob, service, i)
        assert (row.retry_count, row.crashes, row.handling) == (0, 0, 0)
    # One at a time from here: each mark pins a crash on its own message.
    alone = await store.start_handling_async([ids[0]], alone=True)
    assert alone.ready == [ids[0]]
    assert _row(ob, service, ids[0]).handling == HANDLING_ALONE


async def test_marks_of_this_worker_are_not_crashes(ob: Outbox, service: str) -> None:
    """A batch transaction that failed (the database, not the process) is tried again
    by the same worker: its own marks are not crashes."""
    (oid,) = _publish(ob, service, 1)
    store = ob.store(service)
    await store.start_handling_async([oid])
    again = await store.start_handling_async([oid], own={oid})
    assert again.ready == [oid]
    assert again.crashed == []
    assert _row(ob, service, oid).retry_count == 0


async def test_settling_clears_the_mark(ob: Outbox, service: str) -> None:
    ids = _publish(ob, service, 5)
    failed = {ids[1]}

    @ob.handler(f"{service}.e")
    async def handle(event: Envelope, tx: object) -> None:
        if event.outbox_id in failed:
            failed.discard(event.outbox_id)
            raise RuntimeError("once")

    await drain(ob)
    for i in ids:
        row = _row(ob, service, i)
        assert (row.status, row.handling, row.crashes) == (Status.CONSUMED, 0, 0)
    assert _row(ob, service, ids[1]).retry_count == 1


async def test_the_consumer_pins_a_crash_and_lets_the_rest_through(
    ob: Outbox, service: str
) -> None:
    """What a restarted worker does with a batch its predecessor died in: the
    innocent messages are consumed at once, one at a time; the one left marked alone
    is charged and retried after its backoff."""
    ids = _publish(ob, service, 4)
    store = ob.store(service)
    await store.start_handling_async(ids)  # a batch, then the worker died
    await store.start_handling_async(ids)  # its successor: suspect, one at a time ...
    await store.start_handling_async([ids[0]], alone=True)  # ... and died again on ids[0]
    stats = Stats()
    ob.add_observer(stats)
    handled: list[int] = []

    @ob.handler(f"{service}.e")
    async def handle(event: Envelope, tx: object) -> None:
        handled.append(event.outbox_id)

    await drain(ob)
    assert sorted(handled) == ids  # each once
    row = _row(ob, service, ids[0])
    assert (row.status, row.retry_count, row.crashes) == (Status.CONSUMED, 1, 1)
    for i in ids[1:]:
        assert _row(ob, service, i).retry_count == 0
    assert stats.get("crashes", service) == 1
    assert stats.get("retried", service) == 1


async def test_a_dispatcher_retrying_its_own_batch_charges_nothing(
    ob: Outbox, service: str
) -> None:
    ids = _publish(ob, service, 2)
    calls: list[int] = []

    async def handle(event: Envelope, tx: object) -> None:
        calls.append(event.outbox_id)

    stats = Stats()
    dispatcher = Dispatcher(ob.storage, ob.store(service).route, {f"{service}.e": handle}, stats)
    started, suspect = await dispatcher._start([_env(ob, service, i) for i in ids], alone=False)
    assert not suspect
    assert len(started) == 2
    # Its batch transaction failed (the database went away); it tries again:
    started, suspect = await dispatcher._start([_env(ob, service, i) for i in ids], alone=False)
    assert not suspect
    assert len(started) == 2
    assert stats.get("crashes", service) == 0


def _env(ob: Outbox, service: str, oid: int) -> Envelope:
    return _row(ob, service, oid).envelope()


async def test_a_message_a_live_worker_holds_is_busy_and_never_waited_for(
    server_url: str, service: str
) -> None:
    ob = _make(server_url, service)
    try:
        ids = _publish(ob, service, 3)
        store = ob.store(service)
        await store.start_handling_async([ids[0]])  # a live worker started it ...
        holder = create_engine(server_url, poolclass=NullPool)
        with holder.connect() as conn, conn.begin():
            table = ob.table_for(service)
            # ... and holds its row in its batch transaction while the handler runs.
            conn.execute(select(table.c.id).where(table.c.id == ids[0]).with_for_update())
            begun = time.monotonic()
            second = await asyncio.wait_for(store.start_handling_async(ids), 20)
            assert time.monotonic() - begun < 10
            assert second.busy == [ids[0]]
            assert second.ready == ids[1:]
            assert second.crashed == []
            assert not second.suspect
            waiting = await asyncio.wait_for(
                store.start_handling_async([ids[0]], skip_busy=False), 20
            )
            assert waiting.ready == [ids[0]]
            assert waiting.unmarked == [ids[0]]
        holder.dispose()
        assert _row(ob, service, ids[0]).retry_count == 0
    finally:
        drop_tables(ob)
        await ob.aclose()


async def test_a_short_lock_on_an_unmarked_row_is_waited_for(server_url: str, service: str) -> None:
    """The relay's mark holds a row for a moment: the start waits for it (the row is
    not being handled) and marks it."""
    ob = _make(server_url, service)
    try:
        ids = _publish(ob, service, 2)
        table = ob.table_for(service)
        holder = create_engine(server_url, poolclass=NullPool)
        locked = threading.Event()

        def hold() -> None:
            with holder.connect() as conn, conn.begin():
                conn.execute(select(table.c.id).where(table.c.id == ids[1]).with_for_update())
                locked.set()
                time.sleep(1.0)
                conn.execute(table.update().where(table.c.id == ids[1]).values(updated_at=_now()))

        thread = threading.Thread(target=hold)
        thread.start()
        assert await asyncio.to_thread(locked.wait, 20)
        started = await ob.store(service).start_handling_async(ids)
        thread.join(20)
        holder.dispose()
        assert started.ready == ids
        assert started.busy == []
        assert {_row(ob, service, i).handling for i in ids} == {HANDLING_IN_BATCH}
    finally:
        drop_tables(ob)
        await ob.aclose()


def _now() -> datetime:
    return datetime.now(UTC)


async def test_inbox_start_stores_once_and_pins_crashes(db_url: str, service: str) -> None:
    ob = _make(db_url, service, inbox=True)
    route = ob.store(service).route
    try:
        store = ob.storage.store(route)
        row = ob.storage.rows.received(
            route,
            event_id="evt-1",
            event_type=f"{service}.e",
            key="k",
            payload={"n": 1},
            version="v1",
            aggregate_id=None,
        )
        row_of, first = await store.inbox_start_async([row, row], lease=30)
        oid = row_of["evt-1"]
        assert first.ready == [oid]
        msg = await store.get_by_id_async(oid)
        assert msg is not None
        assert msg.handling == HANDLING_ALONE
        # Leased: the inbox's retry loop leaves it to the consumer handling it.
        assert msg.next_retry_at is not None
        assert msg.next_retry_at > msg.created_at
        again, second = await store.inbox_start_async([row], lease=30)
        assert again == row_of
        assert [o.outbox_id for o in second.crashed] == [oid]
        with ob.db.sync_engine.connect() as conn:
            table = ob.storage.tables.table(route)
            count = conn.execute(select(text("count(*)")).select_from(table)).scalar_one()
        assert count == 1
    finally:
        drop_tables(ob)
        await ob.aclose()


async def test_backdated_crash_is_retried_and_consumed(ob: Outbox, service: str) -> None:
    (oid,) = _publish(ob, service, 1)
    store = ob.store(service)
    await store.start_handling_async([oid])

    @ob.handler(f"{service}.e")
    async def handle(event: Envelope, tx: object) -> None:
        return None

    await store.start_handling_async([oid])  # the crash is charged: due after backoff
    backdate(ob, service, oid, "next_retry_at", 3600)
    await drain(ob)
    row = _row(ob, service, oid)
    assert (row.status, row.retry_count, row.crashes) == (Status.CONSUMED, 1, 1)


async def test_after_a_batch_crash_each_message_runs_alone(ob: Outbox, service: str) -> None:
    """Each handler of a batch its predecessor died in runs with its message marked
    alone (so a crash in it is pinned on it), not with the batch's mark."""
    ids = _publish(ob, service, 3)
    await ob.store(service).start_handling_async(ids)  # a batch, then the worker died
    table = ob.table_for(service)
    seen: dict[int, int] = {}

    @ob.handler(f"{service}.e")
    async def handle(event: Envelope, tx: AsyncSession) -> None:
        mark = await tx.execute(select(table.c.handling).where(table.c.id == event.outbox_id))
        seen[event.outbox_id] = int(mark.scalar_one())

    await drain(ob)
    assert seen == dict.fromkeys(ids, HANDLING_ALONE)
    for i in ids:
        row = _row(ob, service, i)
        assert (row.status, row.retry_count, row.handling) == (Status.CONSUMED, 0, 0)
