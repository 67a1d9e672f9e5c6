"""Publishing inside the caller's transaction, and refusing bad input before any SQL."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import Connection, create_engine, event, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from outboxer import (
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
from tests.helpers import isolated_settings, make_outbox


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
