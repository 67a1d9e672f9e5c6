"""Network faults between outboxer and its database, through the loopback fault proxy
(tests/faults/proxy.py), on PostgreSQL and MariaDB.

- A COMMIT whose answer is lost (the proxy forwards it, waits for the server's
  answer, throws it away and closes the connection; or drops it, so it never took
  effect: the client cannot tell which): the publish caller gets
  ``CommitOutcomeUnknownError``; the relay's mark, the consumer's consume-and-mark
  and the inbox's insert are safe either way (nothing twice, nothing lost, no
  attempt).
- A connection cut under a handler: tried again without spending an attempt, up to
  ``LOSSES_PER_ATTEMPT`` losses in a row.
- A connection that goes silent (a vanished peer, no FIN): every statement and
  COMMIT answers within ``database_timeout`` (the watchdog cuts it), and the engine
  goes on with a new connection once the network is back.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from outboxer import CommitOutcomeUnknownError, Envelope, Outbox, Status
from outboxer.consumer import LOSSES_PER_ATTEMPT
from outboxer.database.connections import connection_lost
from outboxer.testing import InMemoryTransport, drain
from tests.faults.proxy import COMMIT, FaultProxy
from tests.helpers import isolated_settings
from tests.integration.engine_helpers import run_until

DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}
COMMITTED = [True, False]
IDS = ["answer-lost", "commit-dropped"]


@pytest.fixture
def proxied(server_url: str) -> Iterator[tuple[str, FaultProxy]]:
    """``server_url`` through a fault proxy of this test's own."""
    url = make_url(server_url)
    port = url.port or DEFAULT_PORTS[url.get_backend_name()]
    with FaultProxy(port) as proxy:
        yield url.set(port=proxy.port).render_as_string(hide_password=False), proxy


def _direct(server_url: str) -> Engine:
    return create_engine(server_url, poolclass=NullPool)


def _effects(prefix: str) -> Table:
    return Table(
        f"{prefix}_fx",
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("ref", String(64), nullable=False),
    )


class App:
    """An outbox reaching its database through the proxy, a handler (sync or async)
    writing one effect row per event, and checks made on a direct connection."""

    def __init__(self, url: str, direct_url: str, *, handled: bool = True, **settings: Any):
        self.prefix = f"n{uuid.uuid4().hex[:8]}"
        self.service = f"{self.prefix}_orders"
        values = {"retry_unit": 0.01, "poll_interval": 0.05, "error_delay": 0.05, **settings}
        self.broker = InMemoryTransport()
        self.outbox = Outbox(url, transport=self.broker, settings=isolated_settings(**values))
        self.outbox.register_event("order.placed", self.service)
        self.direct = _direct(direct_url)
        self.fx = _effects(self.prefix)
        with self.direct.begin() as conn:
            self.fx.metadata.create_all(conn)
        self.outbox.migrate()
        self.table = self.outbox.table_for(self.service)
        self.on_handle: Any = None
        if handled:

            @self.outbox.handler("order.placed")
            def handle(event: Envelope, tx: Any) -> None:
                tx.execute(insert(self.fx).values(ref=str(event.outbox_id)))
                if self.on_handle is not None:
                    self.on_handle(event)

    def publish(self, count: int) -> list[int]:
        with self.direct.begin() as conn:
            return [
                self.outbox.publish(conn, "order.placed", {"n": n}, key=f"k{n}")
                for n in range(count)
            ]

    def rows(self) -> list[Any]:
        with self.direct.connect() as conn:
            return list(conn.execute(select(self.table).order_by(self.table.c.id)))

    def effects(self) -> dict[str, int]:
        with self.direct.connect() as conn:
            query = select(self.fx.c.ref, func.count()).group_by(self.fx.c.ref)
            return {str(ref): int(n) for ref, n in conn.execute(query)}

    def close(self) -> None:
        with self.direct.begin() as conn:
            self.fx.drop(conn)
            self.outbox.metadata.drop_all(conn)
        self.outbox.close()
        self.direct.dispose()


@pytest.fixture
def app_factory(proxied: tuple[str, FaultProxy], server_url: str) -> Iterator[Any]:
    apps: list[App] = []

    def make(**kw: Any) -> App:
        app = App(proxied[0], server_url, **kw)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


def _insert_into(table: Table) -> re.Pattern[bytes]:
    return re.compile(rb"INSERT INTO `?" + table.name.encode() + rb"\b", re.IGNORECASE)


# ------------------------------------------------------------------ publish


@pytest.mark.parametrize("committed", COMMITTED, ids=IDS)
def test_publish_commit_answer_lost_is_an_unknown_outcome(
    proxied: tuple[str, FaultProxy], app_factory: Any, committed: bool
) -> None:
    _, proxy = proxied
    app: App = app_factory(handled=False)
    proxy.lose_answer(COMMIT, after=_insert_into(app.table), forward=committed)
    with pytest.raises(CommitOutcomeUnknownError) as info, app.outbox.transaction() as tx:
        tx.publish("order.placed", {"n": 1}, event_id="order-1")
    assert proxy.answers_lost == 1
    error = info.value
    assert error.event_ids == ["order-1"]
    assert len(error.outbox_ids) == 1
    assert connection_lost(error)
    rows = app.rows()
    assert [r.id for r in rows] == (error.outbox_ids if committed else [])
    # The caller's way out: the same event again, with its event id.
    with app.outbox.transaction() as tx:
        again = tx.publish("order.placed", {"n": 1}, event_id="order-1")
    rows = app.rows()
    assert len(rows) == 1
    assert rows[0].event_id == "order-1"
    if committed:
        assert again == error.outbox_ids[0]


async def test_publish_async_commit_answer_lost_is_an_unknown_outcome(
    proxied: tuple[str, FaultProxy], app_factory: Any
) -> None:
    _, proxy = proxied
    app: App = app_factory(handled=False)
    proxy.lose_answer(COMMIT, after=_insert_into(app.table))

    async def two_events() -> None:
        async with app.outbox.transaction_async() as tx:
            await tx.publish("order.placed", {"n": 1}, event_id="order-1")
            await tx.publish("order.placed", {"n": 2})

    try:
        with pytest.raises(CommitOutcomeUnknownError) as info:
            await two_events()
        assert info.value.event_ids == ["order-1", None]
        assert [r.id for r in app.rows()] == info.value.outbox_ids
    finally:
        await app.outbox.db.dispose_async_only()


def test_a_transaction_that_raises_is_rolled_back(app_factory: Any) -> None:
    app: App = app_factory(handled=False)

    def refused() -> None:
        with app.outbox.transaction() as tx:
            tx.publish("order.placed", {"n": 1})
            raise RuntimeError("business rule")

    with pytest.raises(RuntimeError):
        refused()
    assert app.rows() == []


# ------------------------------------------------------------------ consumer


@pytest.mark.parametrize("committed", COMMITTED, ids=IDS)
async def test_consume_and_mark_commit_answer_lost_applies_once(
    proxied: tuple[str, FaultProxy], app_factory: Any, committed: bool
) -> None:
    _, proxy = proxied
    app: App = app_factory()
    ids = app.publish(20)
    proxy.lose_answer(COMMIT, after=_insert_into(app.fx), forward=committed)
    await drain(app.outbox, timeout=60)
    assert proxy.answers_lost == 1
    rows = app.rows()
    assert {r.status for r in rows} == {Status.CONSUMED.value}
    assert max(r.retry_count for r in rows) == 0
    assert app.effects() == {str(i): 1 for i in ids}


MARK_HANDLING = re.compile(rb"SET handling=", re.IGNORECASE)
"""The consumer's handling marks, set before any handler runs (poison protection)."""


@pytest.mark.parametrize("committed", COMMITTED, ids=IDS)
async def test_handling_marks_answer_lost_are_not_a_crash(
    proxied: tuple[str, FaultProxy], app_factory: Any, committed: bool
) -> None:
    """The marks of a message delivered alone, committed without the worker hearing
    it: its own marks, not the trace of a worker that died (no attempt)."""
    _, proxy = proxied
    app: App = app_factory()
    (oid,) = app.publish(1)
    if app.outbox.db.dialect.one_statement_marks:  # one statement in autocommit
        proxy.lose_answer(MARK_HANDLING, forward=committed)
    else:
        proxy.lose_answer(COMMIT, after=MARK_HANDLING, forward=committed)
    await drain(app.outbox, timeout=60)
    assert proxy.answers_lost == 1
    (row,) = app.rows()
    assert row.status == Status.CONSUMED.value
    assert row.retry_count == 0
    assert app.effects() == {str(oid): 1}


async def test_a_connection_cut_under_a_handler_spends_no_attempt(
    proxied: tuple[str, FaultProxy], app_factory: Any
) -> None:
    """Cut in the batch and again when the message runs alone: tried again after a
    pause, not counted (the guard: ``LOSSES_PER_ATTEMPT``)."""
    _, proxy = proxied
    app: App = app_factory(lease=2.0)
    calls: dict[int, int] = {}

    def cut_twice(event: Envelope) -> None:
        calls[event.outbox_id] = calls.get(event.outbox_id, 0) + 1
        if calls[event.outbox_id] <= 2:
            proxy.cut()

    app.on_handle = cut_twice
    (oid,) = app.publish(1)
    await drain(app.outbox, timeout=60)
    (row,) = app.rows()
    assert row.status == Status.CONSUMED.value
    assert row.retry_count == 0
    assert calls[oid] == 3
    assert app.effects() == {str(oid): 1}


async def test_a_message_that_always_breaks_its_connection_ends_dead(
    proxied: tuple[str, FaultProxy], app_factory: Any
) -> None:
    _, proxy = proxied
    # A cut also breaks the relay's claims in flight: their rows come back after the lease.
    app: App = app_factory(max_retry=1, error_delay_max=0.5, lease=2.0)
    calls = 0

    def always_cut(event: Envelope) -> None:
        nonlocal calls
        calls += 1
        proxy.cut()

    app.on_handle = always_cut
    app.publish(1)
    await drain(app.outbox, timeout=90)
    (row,) = app.rows()
    assert row.status == Status.DEAD.value
    assert row.retry_count == 1
    assert calls >= LOSSES_PER_ATTEMPT
    assert app.effects() == {}


# ------------------------------------------------------------------ relay

MARK_PUBLISHED = re.compile(rb"UPDATE \S+ SET status=[\s\S]{0,200}?published_at=", re.IGNORECASE)
"""The relay's published mark (one statement, run in autocommit)."""


@pytest.mark.parametrize("committed", COMMITTED, ids=IDS)
async def test_relay_mark_answer_lost_sends_once(
    proxied: tuple[str, FaultProxy], app_factory: Any, committed: bool
) -> None:
    """Without the mark made again at once, the rows would be sent again after the
    lease."""
    _, proxy = proxied
    app: App = app_factory(handled=False, lease=2.0)
    ids = app.publish(10)
    proxy.lose_answer(MARK_PUBLISHED, forward=committed)
    await drain(app.outbox, timeout=60)
    await asyncio.sleep(3.0)  # past the lease: a row left claimed would be sent again
    await drain(app.outbox, timeout=60)
    assert proxy.answers_lost == 1
    rows = app.rows()
    assert {r.status for r in rows} == {Status.PUBLISHED.value}
    assert max(r.retry_count for r in rows) == 0
    sent = [
        m.envelope().outbox_id
        for m in app.broker.messages(app.outbox.routes.route_for_service(app.service).topic)
    ]
    assert sorted(sent) == ids


# ------------------------------------------------------------------ inbox


@pytest.mark.parametrize("committed", COMMITTED, ids=IDS)
async def test_inbox_insert_commit_answer_lost_applies_once(
    proxied: tuple[str, FaultProxy], server_url: str, tmp_path: Any, committed: bool
) -> None:
    url, proxy = proxied
    prefix = f"b{uuid.uuid4().hex[:8]}"
    settings = isolated_settings(
        retry_unit=0.01, poll_interval=0.05, error_delay=0.05, topic_prefix=prefix
    )
    broker = InMemoryTransport()
    producer = Outbox(f"sqlite:///{tmp_path}/producer.db", transport=broker, settings=settings)
    producer.register_event("order.placed", "orders")
    producer.migrate()
    consumer = Outbox(url, transport=broker, settings=settings)
    consumer.register_inbox("orders", consumer=f"{prefix}_billing")
    consumer.register_event("order.placed", "orders")
    fx = _effects(prefix)
    direct = _direct(server_url)
    with direct.begin() as conn:
        fx.metadata.create_all(conn)
    consumer.migrate()
    inbox = consumer.table_for("orders")

    @consumer.handler("order.placed")
    def bill(event: Envelope, tx: Any) -> None:
        tx.execute(insert(fx).values(ref=event.event_id))

    def settled() -> bool:
        counts = consumer.store("orders").status().counts
        return counts[Status.CONSUMED.value] >= 10 and broker.pending() == 0

    try:
        with producer.db.sync_engine.begin() as conn:
            for n in range(10):
                producer.publish(conn, "order.placed", {"n": n}, key=f"k{n}")
        proxy.lose_answer(COMMIT, after=_insert_into(inbox), forward=committed)
        await drain(producer)
        await run_until([consumer], settled, timeout=60)
        assert proxy.answers_lost == 1
        with direct.connect() as conn:
            rows = list(conn.execute(select(inbox)))
            applied = dict(conn.execute(select(fx.c.ref, func.count()).group_by(fx.c.ref)).all())
        assert len(rows) == 10
        assert {r.status for r in rows} == {Status.CONSUMED.value}
        assert max(r.retry_count for r in rows) == 0
        assert sorted(applied.values()) == [1] * 10
    finally:
        with direct.begin() as conn:
            fx.drop(conn)
            consumer.metadata.drop_all(conn)
        direct.dispose()
        consumer.close()
        producer.close()


# ------------------------------------------------------------------ a silent peer

TIMEOUT = 2.0


@pytest.mark.timeout(60)  # without the watchdog: no answer, ever
def test_a_silent_connection_fails_within_database_timeout(
    proxied: tuple[str, FaultProxy],
) -> None:
    """The watchdog: without it the statement would wait for ever (the test's own
    bound, pytest-timeout, would fail it)."""
    url, proxy = proxied
    ob = Outbox(url, settings=isolated_settings(database_timeout=TIMEOUT))
    engine = ob.db.sync_engine
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            proxy.black_hole()
            started = time.monotonic()
            with pytest.raises(DBAPIError) as info:
                conn.execute(text("SELECT 1"))
            took = time.monotonic() - started
        assert info.value.connection_invalidated
        assert TIMEOUT <= took < TIMEOUT + 3
        assert ob.db.watchdog is not None
        assert ob.db.watchdog.fired == 1
        proxy.restore()
        with engine.connect() as conn:  # a new connection: the pool was invalidated
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
    finally:
        ob.close()


@pytest.mark.timeout(60)  # without the watchdog: no answer, ever
async def test_a_silent_connection_fails_within_database_timeout_async(
    proxied: tuple[str, FaultProxy],
) -> None:
    url, proxy = proxied
    ob = Outbox(url, settings=isolated_settings(database_timeout=TIMEOUT))
    engine = ob.db.async_engine
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            proxy.black_hole()
            started = time.monotonic()
            with pytest.raises(DBAPIError) as info:
                await conn.execute(text("SELECT 1"))
            took = time.monotonic() - started
            assert info.value.connection_invalidated
            assert TIMEOUT <= took < TIMEOUT + 3
        proxy.restore()
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
    finally:
        await ob.db.dispose_async()


@pytest.mark.timeout(60)  # without the watchdog: no answer, ever
def test_a_silent_commit_fails_within_database_timeout(
    proxied: tuple[str, FaultProxy], app_factory: Any
) -> None:
    """A COMMIT that never answers is cut too, and is an unknown outcome."""
    _, proxy = proxied
    app: App = app_factory(handled=False, database_timeout=TIMEOUT)

    def silent_commit() -> None:
        with app.outbox.transaction() as tx:
            tx.publish("order.placed", {"n": 1})
            proxy.black_hole()  # the COMMIT goes into the black hole

    started = time.monotonic()
    with pytest.raises(CommitOutcomeUnknownError):
        silent_commit()
    assert time.monotonic() - started < TIMEOUT + 3
