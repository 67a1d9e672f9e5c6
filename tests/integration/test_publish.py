"""Publishing inside the caller's transaction, and refusing bad input before any SQL."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Connection,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    func,
    select,
    text,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from outboxer import (
    DuplicateEventError,
    Envelope,
    Event,
    EventNotRegisteredError,
    InvalidEventError,
    Outbox,
    OutboxError,
    PayloadNotSerializableError,
    PayloadTooLargeError,
    Status,
    TransactionRequiredError,
)
from outboxer.database.engines import sync_url
from outboxer.database.ops.tools import RowFilter
from outboxer.testing import InMemoryTransport, drain, drain_sync
from tests.helpers import backdate, drop_tables, isolated_settings, make_outbox


def _rows(ob: Outbox, service: str) -> int:
    table = ob.table_for(service)
    with ob.db.sync_engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def test_commit_leaves_one_row_rollback_none(outbox: Outbox, service: str) -> None:
    engine = outbox.db.sync_engine
    with Session(engine) as session, session.begin():
        outbox.publish(session, f"{service}.created", {"n": 1})
        session.rollback()
    assert _rows(outbox, service) == 0
    with Session(engine) as session:
        with session.begin():
            oid = outbox.publish(session, f"{service}.created", {"n": 2})
        assert _rows(outbox, service) == 1
    msg = outbox.store(service).get_by_id(oid)
    assert msg is not None
    assert msg.status is Status.PENDING


def test_publish_on_connection(outbox: Outbox, service: str) -> None:
    with outbox.db.sync_engine.connect() as conn:
        with conn.begin():
            outbox.publish(conn, f"{service}.created", {"n": 1})
            outbox.publish(conn, f"{service}.created", {"n": 2})
        with conn.begin() as tx:
            outbox.publish(conn, f"{service}.created", {"n": 3})
            tx.rollback()
    assert _rows(outbox, service) == 2


def test_publish_never_commits(outbox: Outbox, service: str) -> None:
    with Session(outbox.db.sync_engine) as session:
        session.begin()
        outbox.publish(session, f"{service}.created", {"n": 1})
        assert session.in_transaction()
        session.close()  # closing without commit discards the event
    assert _rows(outbox, service) == 0


async def test_publish_async_session_and_connection(aoutbox: Outbox, service: str) -> None:
    engine = aoutbox.db.async_engine
    async with AsyncSession(engine) as session:
        async with session.begin():
            a = await aoutbox.publish_async(session, f"{service}.created", {"n": 1})
        async with session.begin():
            await aoutbox.publish_async(session, f"{service}.created", {"n": 2})
            await session.rollback()
    async with engine.connect() as conn, conn.begin():
        b = await aoutbox.publish_async(conn, f"{service}.created", {"n": 3}, key="kk")
    assert b > a
    assert _rows(aoutbox, service) == 2


async def test_publish_kinds_mismatch(aoutbox: Outbox, service: str) -> None:
    async with AsyncSession(aoutbox.db.async_engine) as session:
        with pytest.raises(TransactionRequiredError):
            aoutbox.publish(session, f"{service}.created", {})  # type: ignore[arg-type]
    with Session(aoutbox.db.sync_engine) as s, pytest.raises(TransactionRequiredError):
        await aoutbox.publish_async(s, f"{service}.created", {})  # type: ignore[arg-type]


def _stored(ob: Outbox, service: str, oid: int) -> dict[str, Any]:
    msg = ob.store(service).get_by_id(oid)
    assert msg is not None
    return dict(json.loads(msg.payload))


def test_envelope_defaults(outbox: Outbox, service: str) -> None:
    et = f"{service}.created"
    with Session(outbox.db.sync_engine) as s, s.begin():
        plain = outbox.publish(s, et, {"a": 1})
        with_id = outbox.publish(s, et, {"a": 2}, event_id="evt-9")
        with_key = outbox.publish(s, et, [1, 2], key=" order-1 ", event_id="evt-10")
        full = outbox.publish(s, et, "text", key="k", aggregate_id="agg", version="v3", max_retry=4)
    st = outbox.store(service)
    m = st.get_by_id(plain)
    assert m is not None
    assert m.message_key == et
    assert m.max_retry == 20
    assert _stored(outbox, service, plain) == {
        "event_id": None,
        "event_type": et,
        "event_version": "v1",
        "aggregate_id": et,
        "payload": {"a": 1},
    }
    env = m.envelope()
    assert env == Envelope(plain, str(plain), et, "v1", et, {"a": 1})
    m2 = st.get_by_id(with_id)
    assert m2 is not None
    assert m2.message_key == "evt-9"
    assert m2.envelope().event_id == "evt-9"
    assert m2.envelope().aggregate_id == "evt-9"
    m3 = st.get_by_id(with_key)
    assert m3 is not None
    assert m3.message_key == "order-1"
    assert m3.envelope().aggregate_id == "order-1"
    assert m3.envelope().payload == [1, 2]
    m4 = st.get_by_id(full)
    assert m4 is not None
    assert m4.max_retry == 4
    assert m4.envelope() == Envelope(full, str(full), et, "v3", "agg", "text")


@contextmanager
def _no_sql(conn: Connection) -> Iterator[list[str]]:
    seen: list[str] = []

    def record(*args: Any) -> None:
        seen.append(str(args[2]))

    event.listen(conn, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(conn, "before_cursor_execute", record)
    assert seen == [], f"SQL ran before the error: {seen}"


class _Opaque:
    pass


@dataclass
class _Point:
    x: int


BAD_INPUTS: list[tuple[str, dict[str, Any], type[OutboxError]]] = [
    ("unregistered", {"event_type": "nobody.owns.this"}, EventNotRegisteredError),
    ("blank type", {"event_type": "   "}, InvalidEventError),
    ("empty type", {"event_type": ""}, InvalidEventError),
    ("none payload", {"payload": None}, PayloadNotSerializableError),
    ("set payload", {"payload": {1, 2}}, PayloadNotSerializableError),
    ("bytes payload", {"payload": b"raw"}, PayloadNotSerializableError),
    ("nan payload", {"payload": {"x": math.nan}}, PayloadNotSerializableError),
    ("inf payload", {"payload": [math.inf]}, PayloadNotSerializableError),
    ("object payload", {"payload": {"o": _Opaque()}}, PayloadNotSerializableError),
    ("too large", {"payload": "x" * 5000}, PayloadTooLargeError),
    ("max_retry zero", {"max_retry": 0}, InvalidEventError),
    ("max_retry negative", {"max_retry": -1}, InvalidEventError),
    ("max_retry bool", {"max_retry": True}, InvalidEventError),
    ("max_retry over the column", {"max_retry": 10**12}, InvalidEventError),
    ("max_retry just over the column", {"max_retry": 2**31}, InvalidEventError),
    ("key not str", {"key": 12}, InvalidEventError),
    ("key too long", {"key": "k" * 300}, InvalidEventError),
    ("key with NUL", {"key": "a\x00b"}, InvalidEventError),
    ("key with DEL", {"key": "a\x7fb"}, InvalidEventError),
    ("key with C1 control", {"key": "a\x85b"}, InvalidEventError),
    ("event id with control", {"event_id": "e\x9f1"}, InvalidEventError),
    ("event id not str", {"event_id": 5}, InvalidEventError),
    ("lone surrogate", {"payload": {"s": "\ud800"}}, PayloadNotSerializableError),
]


@pytest.mark.parametrize(("case", "kwargs", "error"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_typed_and_writes_nothing(
    db_url: str, service: str, case: str, kwargs: dict[str, Any], error: type[OutboxError]
) -> None:
    ob = make_outbox(db_url, max_payload_bytes=4096)
    ob.register_event(f"{service}.created", service)
    ob.migrate()
    try:
        args = {"event_type": f"{service}.created", "payload": {"ok": True}, **kwargs}
        with ob.db.sync_engine.connect() as conn, conn.begin():
            with _no_sql(conn), pytest.raises(error) as info:
                ob.publish(conn, args.pop("event_type"), args.pop("payload"), **args)
            assert isinstance(info.value, ValueError)
            # The transaction is still usable.
            ob.publish(conn, f"{service}.created", {"after": case})
        assert _rows(ob, service) == 1
    finally:
        with ob.db.sync_engine.begin() as conn:
            ob.metadata.drop_all(conn)
        ob.close()


def test_error_messages_name_the_value(outbox: Outbox, service: str) -> None:
    with Session(outbox.db.sync_engine) as s:
        with pytest.raises(EventNotRegisteredError, match=r"ghost\.event"):
            outbox.publish(s, "ghost.event", {})
        with pytest.raises(InvalidEventError, match="max_retry"):
            outbox.publish(s, f"{service}.created", {}, max_retry=0)
        with pytest.raises(PayloadNotSerializableError, match="set"):
            outbox.publish(s, f"{service}.created", {1})


def test_pydantic_like_and_dataclass_payloads(outbox: Outbox, service: str) -> None:
    class Model:
        def model_dump(self, mode: str) -> dict[str, Any]:
            return {"mode": mode}

    with Session(outbox.db.sync_engine) as s, s.begin():
        a = outbox.publish(s, f"{service}.created", Model())
        b = outbox.publish(s, f"{service}.created", _Point(3))
    assert _stored(outbox, service, a)["payload"] == {"mode": "json"}
    assert _stored(outbox, service, b)["payload"] == {"x": 3}


def test_non_strict_json_allows_nan(db_url: str, service: str) -> None:
    ob = make_outbox(db_url, strict_json=False)
    ob.register_event(f"{service}.created", service)
    ob.migrate()
    try:
        with Session(ob.db.sync_engine) as s, s.begin():
            oid = ob.publish(s, f"{service}.created", {"x": math.nan})
        assert "NaN" in _stored_text(ob, service, oid)
    finally:
        with ob.db.sync_engine.begin() as conn:
            ob.metadata.drop_all(conn)
        ob.close()


def _stored_text(ob: Outbox, service: str, oid: int) -> str:
    msg = ob.store(service).get_by_id(oid)
    assert msg is not None
    return msg.payload


def test_large_payload_round_trips(outbox: Outbox, service: str) -> None:
    big = {"blob": "é" * 400_000}  # ~800 KB of UTF-8: over MySQL's TEXT, under the 1 MB limit
    with Session(outbox.db.sync_engine) as s, s.begin():
        oid = outbox.publish(s, f"{service}.created", big)
    msg = outbox.store(service).get_by_id(oid)
    assert msg is not None
    assert msg.envelope().payload == big


def test_outbox_from_application_engine(db_url: str, service: str) -> None:
    app_engine = create_engine(sync_url(db_url))
    ob = Outbox(app_engine, settings=isolated_settings())
    ob.register_event(f"{service}.created", service)
    ob.migrate()
    try:
        with Session(app_engine) as s, s.begin():
            oid = ob.publish(s, f"{service}.created", {"a": 1})
        assert ob.store(service).get_by_id(oid) is not None
        assert (ob.db.sync_engine is app_engine) == (app_engine.dialect.name != "sqlite")
    finally:
        with ob.db.sync_engine.begin() as conn:
            ob.metadata.drop_all(conn)
        ob.close()
        app_engine.dispose()


def test_publish_many_writes_all_in_order(db_url: str, service: str) -> None:
    ob = make_outbox(db_url)
    other = f"{service}_b"
    ob.register_event(f"{service}.created", service)
    ob.register_event(f"{other}.created", other)
    ob.migrate()
    try:
        events = [
            Event(f"{service}.created", {"n": 0}, key="k0"),
            (f"{other}.created", {"n": 1}),
            Event(f"{service}.created", {"n": 2}, event_id="e-2", max_retry=3),
        ]
        with ob.db.sync_engine.connect() as conn, conn.begin():
            ids = ob.publish_many(conn, events)
        assert len(ids) == 3
        first, second, third = (
            ob.store(service).get_by_id(ids[0]),
            ob.store(other).get_by_id(ids[1]),
            ob.store(service).get_by_id(ids[2]),
        )
        assert first is not None
        assert second is not None
        assert third is not None
        assert first.envelope().payload == {"n": 0}
        assert first.message_key == "k0"
        assert second.envelope().payload == {"n": 1}
        assert third.envelope().event_id == "e-2"
        assert third.max_retry == 3
        assert ids[0] < ids[2]
    finally:
        with ob.db.sync_engine.begin() as conn:
            ob.metadata.drop_all(conn)
        ob.close()


def test_publish_many_checks_everything_before_any_sql(db_url: str, service: str) -> None:
    ob = make_outbox(db_url)
    ob.register_event(f"{service}.created", service)
    ob.migrate()
    try:
        with ob.db.sync_engine.connect() as conn, conn.begin():
            with _no_sql(conn), pytest.raises(PayloadNotSerializableError):
                ob.publish_many(
                    conn, [(f"{service}.created", {"ok": 1}), (f"{service}.created", {1, 2})]
                )
            ob.publish_many(conn, [])  # nothing to do, nothing written
        assert _rows(ob, service) == 0
        with ob.db.sync_engine.connect() as conn, conn.begin() as tx:
            ob.publish_many(conn, [(f"{service}.created", {"n": i}) for i in range(5)])
            tx.rollback()
        assert _rows(ob, service) == 0
    finally:
        with ob.db.sync_engine.begin() as conn:
            ob.metadata.drop_all(conn)
        ob.close()


async def test_publish_many_async(db_url: str, service: str) -> None:
    ob = make_outbox(db_url)
    ob.register_event(f"{service}.created", service)
    ob.migrate()
    try:
        async with AsyncSession(ob.db.async_engine) as session, session.begin():
            ids = await ob.publish_many_async(
                session, [(f"{service}.created", {"n": i}) for i in range(300)]
            )
        assert ids == sorted(ids)
        assert len(set(ids)) == 300
        assert _rows(ob, service) == 300
    finally:
        with ob.db.sync_engine.begin() as conn:
            ob.metadata.drop_all(conn)
        await ob.aclose()


# --------------------------------------------------------------------------- event ids


def _effects(prefix: str) -> Table:
    return Table(
        f"{prefix}_fx",
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("event_id", String(64), nullable=False),
    )


def _count_rows(ob: Outbox, table: Table) -> int:
    with ob.db.sync_engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def test_an_event_id_published_again_writes_nothing(outbox: Outbox, service: str) -> None:
    et = f"{service}.created"
    engine = outbox.db.sync_engine
    with Session(engine) as s, s.begin():
        first = outbox.publish(s, et, {"id": 1, "lines": [1, 2]}, event_id="evt-1")
    # The business operation retried by its caller: a new transaction, the same event.
    with Session(engine) as s, s.begin():
        again = outbox.publish(s, et, {"lines": [1, 2], "id": 1}, event_id=" evt-1 ")
        twice_in_one_tx = outbox.publish(s, et, {"id": 1, "lines": [1, 2]}, event_id="evt-1")
    assert again == twice_in_one_tx == first
    with engine.connect() as conn, conn.begin():
        ids = outbox.publish_many(
            conn,
            [
                Event(et, {"id": 1, "lines": [1, 2]}, event_id="evt-1"),
                Event(et, {"id": 2}, event_id="evt-2"),
                Event(et, {"id": 2}, event_id="evt-2"),
                (et, {"no": "id"}),
            ],
        )
    assert ids[0] == first
    assert ids[1] == ids[2] != first
    assert _rows(outbox, service) == 3
    row = outbox.store(service).get_by_id(first)
    assert row is not None
    assert row.event_id == "evt-1"
    # Events without an id keep today's behaviour: each publish is a row.
    with Session(engine) as s, s.begin():
        outbox.publish(s, et, {"no": "id"})
    assert _rows(outbox, service) == 4


def test_publish_many_keeps_the_order_of_a_tables_rows(outbox: Outbox, service: str) -> None:
    """Events with an id (written one by one) and plain ones (written together) get
    outbox ids in the order given: the order ordered services handle them in."""
    et = f"{service}.created"
    events = [
        Event(et, {"n": 0}, key="k"),
        Event(et, {"n": 1}, key="k", event_id="one"),
        Event(et, {"n": 2}, key="k"),
        Event(et, {"n": 3}, key="k", delay=60),
        Event(et, {"n": 4}, key="k"),
    ]
    with Session(outbox.db.sync_engine) as s, s.begin():
        ids = outbox.publish_many(s, events)
    assert ids == sorted(ids)
    assert len(set(ids)) == 5


async def test_an_event_id_published_again_async(aoutbox: Outbox, service: str) -> None:
    et = f"{service}.created"
    async with AsyncSession(aoutbox.db.async_engine) as s, s.begin():
        first = await aoutbox.publish_async(s, et, {"n": 1}, event_id="evt-a")
    async with AsyncSession(aoutbox.db.async_engine) as s, s.begin():
        again = await aoutbox.publish_async(s, et, {"n": 1}, event_id="evt-a")
        [many] = await aoutbox.publish_many_async(s, [Event(et, {"n": 1}, event_id="evt-a")])
        with pytest.raises(DuplicateEventError):
            await aoutbox.publish_async(s, et, {"n": 2}, event_id="evt-a")
    assert first == again == many
    assert _rows(aoutbox, service) == 1


def test_another_event_with_a_used_id_is_refused(outbox: Outbox, service: str) -> None:
    et = f"{service}.created"
    other = f"{service}.renamed"
    outbox.register_event(other, service)
    engine = outbox.db.sync_engine
    with Session(engine) as s, s.begin():
        first = outbox.publish(s, et, {"id": 1}, event_id="evt-1")
    with engine.connect() as conn, conn.begin():
        with pytest.raises(DuplicateEventError) as info:
            outbox.publish(conn, et, {"id": 2}, event_id="evt-1")
        assert isinstance(info.value, ValueError)
        assert info.value.outbox_id == first
        assert "evt-1" in str(info.value)
        with pytest.raises(DuplicateEventError):
            outbox.publish(conn, other, {"id": 1}, event_id="evt-1")  # another type
        with pytest.raises(DuplicateEventError):
            outbox.publish_many(conn, [Event(et, {"id": 3}, event_id="evt-1")])
        # The caller's transaction is still usable (PostgreSQL aborts a transaction on
        # any failed statement: none failed) and commits what follows.
        after = outbox.publish(conn, et, {"id": 2}, event_id="evt-2")
    assert _rows(outbox, service) == 2
    assert after != first


def _lock_waiters(ob: Outbox) -> int:
    """Sessions of this database waiting for a row lock (PostgreSQL, MariaDB)."""
    family = ob.db.family
    query = {
        "postgresql": "SELECT count(*) FROM pg_stat_activity "
        "WHERE wait_event_type = 'Lock' AND datname = current_database()",
        "mysql": "SELECT count(*) FROM information_schema.innodb_trx t "
        "JOIN information_schema.processlist p ON p.id = t.trx_mysql_thread_id "
        "WHERE t.trx_state = 'LOCK WAIT' AND p.db = DATABASE()",
    }[family]
    with ob.db.sync_engine.connect() as conn:
        return int(conn.execute(text(query)).scalar_one())


def test_two_transactions_publish_one_event_id_at_once(outbox: Outbox, service: str) -> None:
    """One row, one effect, and both callers get the same outbox id: the second
    waits at the unique index for the first to commit, then reads its row."""
    et = f"{service}.created"
    fx = _effects(service)
    with outbox.db.sync_engine.begin() as conn:
        fx.metadata.create_all(conn)

    @outbox.handler(et)
    def apply(event: Envelope, tx: Session) -> None:
        tx.execute(fx.insert().values(event_id=event.event_id))

    results: dict[str, int] = {}
    errors: list[BaseException] = []
    first = Session(outbox.db.sync_engine)
    first.begin()
    results["first"] = outbox.publish(first, et, {"order": 7}, event_id="evt-race")

    def second() -> None:
        try:
            with Session(outbox.db.sync_engine) as s, s.begin():
                results["second"] = outbox.publish(s, et, {"order": 7}, event_id="evt-race")
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    racer = threading.Thread(target=second)
    racer.start()
    try:
        if outbox.db.family != "sqlite":
            # The second publisher is inside its INSERT, blocked on the first one's row.
            deadline = time.monotonic() + 30
            while _lock_waiters(outbox) < 1:
                assert time.monotonic() < deadline, "the second publisher never waited"
                assert racer.is_alive(), errors
                time.sleep(0.05)
        # SQLite: the second transaction waits for the single writer (BEGIN IMMEDIATE).
        first.commit()
    finally:
        # A failed wait must not leave the first transaction open: it would hold the
        # row (and the racer) and the teardown's DROP would wait on its locks.
        first.close()
    racer.join(60)
    assert not racer.is_alive()
    assert not errors, errors
    assert results["first"] == results["second"]
    assert _rows(outbox, service) == 1
    drain_sync(outbox)
    assert _count_rows(outbox, fx) == 1
    with outbox.db.sync_engine.begin() as conn:
        fx.metadata.drop_all(conn)


async def test_one_effect_in_every_consumer_mode(db_url: str, service: str) -> None:
    """The same event id published three times: one effect where the consumer shares
    the producer's database (through a broker, and in-process), and one where it has
    an inbox of its own."""
    transport = InMemoryTransport()
    settings = isolated_settings(retry_unit=0.02, poll_interval=0.05, topic_prefix=service)
    producer = Outbox(db_url, transport=transport, settings=settings)
    producer.register_event("order.placed", "orders")
    consumer = Outbox(db_url, transport=transport, settings=settings)
    consumer.register_inbox("orders", consumer=f"{service}_billing")
    consumer.register_event("order.placed", "orders")
    local = Outbox(db_url, settings=settings)
    local.register_service("shop", table=f"{service}_shop")
    local.register_event("cart.closed", "shop")
    fx = _effects(service)
    for ob in (producer, consumer, local):
        ob.migrate()
    with local.db.sync_engine.begin() as conn:
        fx.metadata.create_all(conn)

    def apply(event: Envelope, tx: Session) -> None:
        tx.execute(fx.insert().values(event_id=f"{event.event_type}:{event.event_id}"))

    def apply_at_producer(event: Envelope, tx: Session) -> None:
        tx.execute(fx.insert().values(event_id=f"producer:{event.event_id}"))

    producer.register_handler("order.placed", apply_at_producer)
    consumer.register_handler("order.placed", apply)
    local.register_handler("cart.closed", apply)
    try:
        for _ in range(3):
            with Session(producer.db.sync_engine) as s, s.begin():
                producer.publish(s, "order.placed", {"order": 1}, event_id="evt-o")
            async with AsyncSession(local.db.async_engine) as a, a.begin():
                await local.publish_async(a, "cart.closed", {"cart": 1}, event_id="evt-c")
        await drain(producer)
        await drain(consumer)
        await drain(local)
        with local.db.sync_engine.connect() as conn:
            effects = sorted(conn.execute(select(fx.c.event_id)).scalars())
        assert effects == ["cart.closed:evt-c", "order.placed:evt-o", "producer:evt-o"]
    finally:
        for ob in (producer, consumer, local):
            drop_tables(ob)
        with local.db.sync_engine.begin() as conn:
            fx.metadata.drop_all(conn)
        for ob in (producer, consumer, local):
            await ob.aclose()
            ob.close()


# --------------------------------------------------------------------------- scheduled


async def test_a_delayed_event_waits_for_its_time(aoutbox: Outbox, service: str) -> None:
    et = f"{service}.created"
    handled: list[Any] = []
    aoutbox.register_handler(et, lambda event, tx: handled.append(event.payload))
    async with AsyncSession(aoutbox.db.async_engine) as s, s.begin():
        later = await aoutbox.publish_async(s, et, {"cart": 7}, delay=1800)
        await aoutbox.publish_async(s, et, {"now": True})
    store = aoutbox.store(service)
    row = store.get_by_id(later)
    assert row is not None
    assert row.deliver_at is not None
    assert row.next_retry_at == row.deliver_at
    ahead = (row.deliver_at - row.created_at).total_seconds()
    assert 1790 < ahead < 1810
    status = store.status()
    assert (status.scheduled, status.due, status.counts["pending"]) == (1, 1, 2)
    await drain(aoutbox)  # sends what is due; the delayed event waits
    assert handled == [{"now": True}]
    row = store.get_by_id(later)
    assert row is not None
    assert row.status is Status.PENDING
    status = store.status()
    assert (status.scheduled, status.due, status.oldest_due_seconds) == (1, 0, None)
    # Time travel: its time comes (no sleeping for half an hour).
    backdate(aoutbox, service, later, "next_retry_at", 1800)
    backdate(aoutbox, service, later, "deliver_at", 1800)
    status = store.status()
    assert (status.scheduled, status.due) == (0, 1)
    assert status.oldest_due_seconds is not None
    assert status.oldest_due_seconds < 60  # overdue since its time, not since its publish
    await drain(aoutbox)
    assert handled == [{"now": True}, {"cart": 7}]
    row = store.get_by_id(later)
    assert row is not None
    assert row.status is Status.CONSUMED


def test_deliver_at_an_aware_time(outbox: Outbox, service: str) -> None:
    et = f"{service}.created"
    at = datetime.now(timezone(timedelta(hours=-5))) + timedelta(days=2)
    with Session(outbox.db.sync_engine) as s, s.begin():
        oid = outbox.publish(s, et, {"report": 1}, deliver_at=at)
        past = outbox.publish(s, et, {"report": 2}, deliver_at=at - timedelta(days=3))
        zero = outbox.publish(s, et, {"report": 3}, delay=timedelta(0))
        [many] = outbox.publish_many(s, [Event(et, {"report": 4}, delay=timedelta(hours=2))])
    store = outbox.store(service)
    row = store.get_by_id(oid)
    assert row is not None
    assert row.deliver_at is not None
    assert abs((row.deliver_at - at).total_seconds()) < 0.01
    assert row.next_retry_at == row.deliver_at
    for due_now in (past, zero):  # a time already past (or no delay) means now
        m = store.get_by_id(due_now)
        assert m is not None
        assert m.deliver_at is None
    m = store.get_by_id(many)
    assert m is not None
    assert m.deliver_at is not None
    assert store.status().scheduled == 2
    assert [r.id for r in store.list_due_messages(10)] == [past, zero]


SCHEDULE_ERRORS: list[tuple[str, dict[str, Any], str]] = [
    ("naive deliver_at", {"deliver_at": datetime(2030, 1, 1)}, "aware"),
    ("deliver_at not a datetime", {"deliver_at": "2030-01-01"}, "datetime"),
    ("negative delay", {"delay": -1}, "zero or more"),
    ("negative timedelta", {"delay": timedelta(seconds=-5)}, "zero or more"),
    ("nan delay", {"delay": math.nan}, "zero or more"),
    ("bool delay", {"delay": True}, "seconds or a timedelta"),
    ("text delay", {"delay": "30m"}, "seconds or a timedelta"),
    ("delay past the horizon", {"delay": 366 * 86400}, "horizon"),
    (
        "deliver_at past the horizon",
        {"deliver_at": datetime.now(UTC) + timedelta(days=400)},
        "horizon",
    ),
    ("both", {"delay": 5, "deliver_at": datetime.now(UTC)}, "not both"),
]


@pytest.mark.parametrize(
    ("case", "kwargs", "words"), SCHEDULE_ERRORS, ids=[c[0] for c in SCHEDULE_ERRORS]
)
def test_bad_schedules_are_typed_and_write_nothing(
    outbox: Outbox, service: str, case: str, kwargs: dict[str, Any], words: str
) -> None:
    with outbox.db.sync_engine.connect() as conn, conn.begin():
        with _no_sql(conn), pytest.raises(InvalidEventError, match=words):
            outbox.publish(conn, f"{service}.created", {"x": 1}, **kwargs)
        with _no_sql(conn), pytest.raises(InvalidEventError, match=words):
            outbox.publish_many(conn, [Event(f"{service}.created", {"x": 1}, **kwargs)])
    assert _rows(outbox, service) == 0


def test_the_horizon_is_a_setting(db_url: str, service: str) -> None:
    ob = make_outbox(db_url, settings=isolated_settings(schedule_horizon="1h"))
    ob.register_event(f"{service}.created", service)
    ob.migrate()
    try:
        with Session(ob.db.sync_engine) as s, s.begin():
            ob.publish(s, f"{service}.created", {}, delay=3600)
            with pytest.raises(InvalidEventError, match="horizon"):
                ob.publish(s, f"{service}.created", {}, delay=3601)
        assert _rows(ob, service) == 1
    finally:
        drop_tables(ob)
        ob.close()


@pytest.mark.parametrize("mode", ["skip", "block"])
async def test_ordered_services_and_scheduled_events(db_url: str, service: str, mode: str) -> None:
    """By default a scheduled event does not hold back the later events of its key;
    ``ordered_scheduled = "block"`` makes them wait for it."""
    ob = make_outbox(
        db_url,
        settings=isolated_settings(retry_unit=0.02, poll_interval=0.05, ordered_scheduled=mode),
    )
    ob.register_service(service, ordered=True)
    ob.register_event(f"{service}.step", service)
    handled: list[int] = []
    ob.register_handler(f"{service}.step", lambda event, tx: handled.append(event.payload))
    ob.migrate()
    try:
        async with AsyncSession(ob.db.async_engine) as s, s.begin():
            later = await ob.publish_async(s, f"{service}.step", 1, key="k", delay=600)
            await ob.publish_async(s, f"{service}.step", 2, key="k")
        store = ob.store(service)
        if mode == "skip":
            await drain(ob)
            assert handled == [2]
        else:
            # Event 2 is sent and held back behind event 1 (pending, deferred): the
            # work is not done until event 1's time comes.
            with pytest.raises(TimeoutError):
                await drain(ob, timeout=3)
            assert handled == []
        backdate(ob, service, later, "next_retry_at", 600)
        backdate(ob, service, later, "deliver_at", 600)
        await drain(ob)
        assert handled == ([2, 1] if mode == "skip" else [1, 2])
        assert store.status().counts["consumed"] == 2
    finally:
        drop_tables(ob)
        await ob.aclose()


# --------------------------------------------------------------------------- cancel


async def test_cancel_before_and_after_sending(aoutbox: Outbox, service: str) -> None:
    et = f"{service}.created"
    handled: list[Any] = []
    aoutbox.register_handler(et, lambda event, tx: handled.append(event.payload))
    engine = aoutbox.db.sync_engine
    with Session(engine) as s, s.begin():
        aoutbox.publish(s, et, {"n": 1}, event_id="evt-now")
        aoutbox.publish(s, et, {"n": 2}, event_id="evt-later", delay=3600)
        aoutbox.publish(s, et, {"n": 3}, event_id="evt-sent")
    # Cancelled on the caller's transaction: it takes effect with the commit.
    with Session(engine) as s:
        with s.begin():
            assert aoutbox.cancel(s, "evt-now", service=service)
            s.rollback()
        with s.begin():
            assert aoutbox.cancel(s, "evt-now")  # the only service
    async with AsyncSession(aoutbox.db.async_engine) as a, a.begin():
        assert await aoutbox.cancel_async(a, "evt-later", service=service)
        assert not await aoutbox.cancel_async(a, "evt-unknown", service=service)
    await drain(aoutbox)
    assert handled == [{"n": 3}]
    store = aoutbox.store(service)
    status = store.status()
    assert status.counts["cancelled"] == 2
    assert (status.scheduled, status.due) == (0, 0)
    # Sent and consumed, or already cancelled: nothing to take back.
    with Session(engine) as s, s.begin():
        assert not aoutbox.cancel(s, "evt-sent", service=service)
        assert not aoutbox.cancel(s, "evt-now", service=service)
    assert {m.status for m in store.find(RowFilter(), 10)} == {Status.CANCELLED, Status.CONSUMED}
    # A cancelled row is no dead letter, and keeps its event id: publishing the same
    # event again returns it (idempotent) rather than sending it after all.
    assert aoutbox.admin.dead_letters(services=[service]).messages == []
    with Session(engine) as s, s.begin():
        again = aoutbox.publish(s, et, {"n": 1}, event_id="evt-now")
    row = store.get_by_id(again)
    assert row is not None
    assert row.status is Status.CANCELLED
    with Session(engine) as s, pytest.raises(InvalidEventError):
        aoutbox.cancel(s, "  ", service=service)


def test_publish_runs_its_insert_as_driver_sql_and_events_still_see_it(
    pg_database: Any, service: str
) -> None:
    """On PostgreSQL the publish INSERT (with its notice) runs as the driver's SQL,
    compiled once: cursor events (statement guards, tracing) still see it,
    ``before_execute`` (for constructs) does not, on a Connection, a Session and an
    AsyncSession alike; a connection with a
    ``schema_translate_map`` takes SQLAlchemy's own path."""
    from outboxer.database.ops.writes import _insert_and_notify  # noqa: PLC0415
    from outboxer.database.runner import driver_form  # noqa: PLC0415

    ob = make_outbox(pg_database.url)
    ob.register_event(f"{service}.created", service)
    ob.migrate()
    app = create_engine(sync_url(pg_database.url))
    seen: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "INSERT INTO" in statement and "pg_notify" in statement:
            seen.append(statement)

    kinds: list[type] = []

    def kind(conn: Any, clause: Any, *args: Any) -> None:
        kinds.append(type(clause))

    event.listen(app, "before_cursor_execute", note)
    event.listen(app, "before_execute", kind)
    try:
        with app.begin() as conn:
            ob.publish(conn, f"{service}.created", {"n": 1})
        with Session(app) as session, session.begin():
            ob.publish(session, f"{service}.created", {"n": 2})

        async def publish_async() -> None:
            async with AsyncSession(ob.db.async_engine) as session, session.begin():
                await ob.publish_async(session, f"{service}.created", {"n": 3})
            await ob.db.dispose_async_only()  # its connections belong to this loop

        import asyncio  # noqa: PLC0415

        asyncio.run(publish_async())
        assert len(seen) == 2, seen
        assert len(set(seen)) == 1  # one text: compiled once, prepared by the driver
        # Driver SQL: no before_execute (SQLAlchemy fires it for constructs only).
        assert kinds == []
        assert _rows(ob, service) == 3
        route = ob.routes.route_for_service(service)
        context = ob.storage.op_context(route)
        assert context.channel is not None
        statement = _insert_and_notify(context, context.channel)
        form = driver_form(statement, app.dialect, {})
        assert form is not None
        assert form[0] == seen[0]
        assert driver_form(statement, app.dialect, {"schema_translate_map": {None: "x"}}) is None
    finally:
        event.remove(app, "before_cursor_execute", note)
        event.remove(app, "before_execute", kind)
        app.dispose()
        drop_tables(ob)
        ob.close()
