"""Statement budgets: how many SQL statements publishing, relaying and consuming cost.

Every statement the outbox's engines send is counted with SQLAlchemy's
``after_cursor_execute`` event. The budgets are today's counts, not ceilings with
slack: a change that adds one statement per event (or per batch) fails here.

The worker's run is made deterministic by counting only statements that did work:
a statement that matched no row (an empty claim of an idle poll) and a bare
``BEGIN`` are left out, so the number of idle polls does not matter. The wait for
the end of the run reads the table through an engine of its own, not counted.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from outboxer import Envelope, Outbox, Status
from outboxer.testing import InMemoryTransport
from tests.integration.engine_helpers import App, build_app, drop_app

BATCH = 100
BACKLOG = 200

# Statements per batch of the relay and the consumer's fast path (the handler's
# own statements are not in it): the claim (MariaDB: SELECT ... FOR UPDATE, then
# UPDATE), the handling mark, the read(s) of the rows' state, the consumed mark; an
# ordered service on SQLite adds the key-order read. The same for a batch handler.
PER_BATCH = {
    ("sqlite", "handler"): 5,
    ("sqlite", "sync"): 5,
    ("sqlite", "batch"): 5,
    ("sqlite", "ordered"): 6,
    ("postgresql", "handler"): 4,
    ("postgresql", "sync"): 4,
    ("postgresql", "batch"): 4,
    ("postgresql", "ordered"): 4,
    ("mariadb", "handler"): 6,
    ("mariadb", "sync"): 6,
    ("mariadb", "batch"): 6,
    ("mariadb", "ordered"): 6,
}
# Once per run, not per event: the worker's start-up table listing.
PER_RUN = 1


class Counter:
    def __init__(self) -> None:
        self.statements: list[str] = []
        self.on = True

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if not self.on:
            return
        head = statement.lstrip().split(None, 1)[0].upper()
        if head == "BEGIN":
            return
        if head in ("SELECT", "UPDATE", "DELETE", "WITH") and cursor.rowcount == 0:
            return  # matched nothing: an idle poll's empty claim
        self.statements.append(statement)

    def take(self) -> list[str]:
        got, self.statements = self.statements, []
        return got


@contextmanager
def counting(ob: Outbox) -> Iterator[Counter]:
    counter = Counter()
    engines = [ob.db.sync_engine, ob.db.async_engine.sync_engine]
    for engine in engines:
        event.listen(engine, "after_cursor_execute", counter)
    try:
        yield counter
    finally:
        for engine in engines:
            event.remove(engine, "after_cursor_execute", counter)


def backend(ob: Outbox) -> str:
    name = ob.db.sync_engine.dialect.name
    return "mariadb" if name == "mysql" else name


def make_app(db_url: str, *, ordered: bool = False) -> App:
    app = build_app(db_url, "local", handlers=False, batch_size=BATCH, poll_interval=0.05)
    if ordered:
        app.outbox.register_service(app.services[0], ordered=True)
    return app


@pytest.fixture
def app(db_url: str) -> Iterator[App]:
    a = make_app(db_url)
    yield a
    drop_app(a)


def test_publish_one_event_is_one_statement(app: App) -> None:
    ob, svc = app.outbox, app.services[0]
    with counting(ob) as counter, ob.db.sync_engine.connect() as conn, conn.begin():
        ob.publish(conn, app.event(svc), {"n": 0}, key="k")
        got = counter.take()
    # One INSERT (on PostgreSQL its NOTIFY rides in the same statement).
    assert len(got) == 1, got


@pytest.mark.parametrize("n", [5, 50])
def test_publish_many_does_not_grow_with_events(app: App, n: int) -> None:
    ob, svc = app.outbox, app.services[0]
    with counting(ob) as counter, ob.db.sync_engine.connect() as conn, conn.begin():
        ids = ob.publish_many(conn, [(app.event(svc), {"n": i}) for i in range(n)])
        got = counter.take()
    assert len(ids) == n
    # One INSERT for all; PostgreSQL adds one NOTIFY. SQLite gets no multi-row
    # INSERT ... RETURNING that keeps the order of the rows from SQLAlchemy, so
    # there it is one INSERT per event (in process: no round trip).
    expected = {"sqlite": n, "postgresql": 2, "mariadb": 1}[backend(ob)]
    assert len(got) == expected, got


def _publish_backlog(app: App, count: int) -> None:
    ob, svc = app.outbox, app.services[0]
    with ob.db.sync_engine.connect() as conn, conn.begin():
        ob.publish_many(conn, [(app.event(svc), {"n": i}) for i in range(count)])


async def _run_until_consumed(app: App, count: int, observer: Engine) -> None:
    ob = app.outbox
    table = ob.table_for(app.services[0])
    consumed = select(func.count()).where(table.c.status == Status.CONSUMED.value)
    runner = asyncio.create_task(ob.run_async())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    try:
        while loop.time() < deadline:
            if runner.done():
                runner.result()
                raise AssertionError("the worker stopped before its work was done")
            with observer.connect() as conn:
                if conn.execute(consumed).scalar_one() >= count:
                    return
            await asyncio.sleep(0.02)
        raise TimeoutError(f"{count} events not consumed in 60 s")
    finally:
        ob.stop()
        await asyncio.wait({runner}, timeout=30)


def _observer(ob: Outbox) -> Engine:
    return create_engine(ob.db.sync_engine.url.render_as_string(hide_password=False))


async def _consume_counted(app: App) -> list[str]:
    _publish_backlog(app, BACKLOG)
    observer = _observer(app.outbox)
    try:
        with counting(app.outbox) as counter:
            await _run_until_consumed(app, BACKLOG, observer)
            return counter.take()
    finally:
        observer.dispose()


def _register(app: App, kind: str) -> None:
    svc = app.services[0]

    if kind == "sync":

        @app.outbox.handler(app.event(svc))
        def handle_sync(event: Envelope, tx: Session) -> None:
            n = event.payload["n"]
            tx.execute(app.effects.insert().values(outbox_id=event.outbox_id, service=svc, n=n))

        return

    if kind == "batch":

        @app.outbox.batch_handler(app.event(svc))
        async def handle_batch(events: list[Envelope], tx: AsyncSession) -> None:
            rows = [{"outbox_id": e.outbox_id, "service": svc, "n": e.payload["n"]} for e in events]
            await tx.execute(app.effects.insert(), rows)

        return

    @app.outbox.handler(app.event(svc))
    async def handle(event: Envelope, tx: AsyncSession) -> None:
        n = event.payload["n"]
        await tx.execute(app.effects.insert().values(outbox_id=event.outbox_id, service=svc, n=n))


@pytest.mark.parametrize("kind", ["handler", "sync", "batch", "ordered"])
async def test_worker_statements_per_batch(db_url: str, kind: str) -> None:
    app = make_app(db_url, ordered=kind == "ordered")
    try:
        _register(app, kind)
        got = await _consume_counted(app)
    finally:
        drop_app(app)
    handler = [s for s in got if app.effects.name in s]
    worker = [s for s in got if app.effects.name not in s]
    batches = math.ceil(BACKLOG / BATCH)
    # The handler's INSERTs: one per event, one per batch for a batch handler.
    assert len(handler) == (batches if kind == "batch" else BACKLOG)
    # 200 events, batches of 100: 9 to 13 statements in all. One more statement per
    # event would add 200.
    budget = PER_BATCH[backend(app.outbox), kind] * batches + PER_RUN
    assert len(worker) <= budget, "\n".join(s[:120] for s in worker)


async def test_an_idle_worker_marks_in_its_claim(db_url: str) -> None:
    """One event reaching an idle in-process worker: on PostgreSQL the relay's claim
    also marks it as being handled (its consumer was idle), so the consumer writes
    no mark of its own: one statement fewer than a batch of a backlog."""
    app = make_app(db_url)
    observer = _observer(app.outbox)
    try:
        _register(app, "handler")
        ob, svc = app.outbox, app.services[0]
        table = ob.table_for(svc)
        runner = asyncio.create_task(ob.run_async())
        try:
            await asyncio.sleep(0.5)  # started, idle
            assert not runner.done()
            with counting(ob) as counter:
                # On outboxer's engine (SQLite's busy timeout); not the worker's.
                with ob.db.sync_engine.connect() as conn, conn.begin():
                    ob.publish(conn, app.event(svc), {"n": 0}, key="k")
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 30
                consumed = select(func.count()).where(table.c.status == Status.CONSUMED.value)
                while loop.time() < deadline:
                    with observer.connect() as conn:
                        if conn.execute(consumed).scalar_one() == 1:
                            break
                    await asyncio.sleep(0.02)
                got = counter.take()
        finally:
            ob.stop()
            await asyncio.wait({runner}, timeout=30)
        with observer.connect() as conn:
            row = conn.execute(select(table.c.status, table.c.handling)).one()
        assert (row.status, row.handling) == (Status.CONSUMED.value, 0)
    finally:
        observer.dispose()
        drop_app(app)
    handler = [s for s in got if app.effects.name in s]
    published = [
        s
        for s in got
        if app.effects.name not in s and s.lstrip().upper().startswith(("INSERT", "WITH INS"))
    ]
    worker = [s for s in got if app.effects.name not in s and s not in published]
    assert len(handler) == 1
    assert len(published) == 1
    saved = 1 if backend(ob) == "postgresql" else 0
    assert len(worker) == PER_BATCH[backend(ob), "handler"] - saved, "\n".join(
        s[:120] for s in worker
    )


# The inbox, per batch of messages from the broker, in two transactions. The start:
# store the batch (one INSERT ignoring duplicates; SQLite first reads which event ids
# are there), read back their row ids, read their state, mark them as being handled
# (PostgreSQL: its relaxed commit is one SET LOCAL). The batch: the same INSERT again
# (it stores nothing when the start committed; it exists so the batch never depends
# on the start's relaxed commit), the row ids, the state, the consumed mark.
INBOX_PER_BATCH = {"sqlite": 9, "postgresql": 9, "mariadb": 8}


async def _run_until(ob: Outbox, service: str, status: Status, count: int) -> None:
    observer = _observer(ob)
    table = ob.table_for(service)
    done = select(func.count()).where(table.c.status == status.value)
    runner = asyncio.create_task(ob.run_async())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    try:
        while loop.time() < deadline:
            if runner.done():
                runner.result()
                raise AssertionError("the worker stopped before its work was done")
            with observer.connect() as conn:
                if conn.execute(done).scalar_one() >= count:
                    return
            await asyncio.sleep(0.02)
        raise TimeoutError(f"{count} rows of {service} not {status.value} in 60 s")
    finally:
        ob.stop()
        await asyncio.wait({runner}, timeout=30)
        observer.dispose()


async def test_inbox_statements_per_batch(db_url: str, tmp_path: Path) -> None:
    broker = InMemoryTransport()
    prefix = f"b{uuid.uuid4().hex[:8]}"
    settings = {"batch_size": BATCH, "poll_interval": 0.05}
    producer = build_app(
        f"sqlite:///{tmp_path}/producer.db", broker, handlers=False, prefix=prefix, **settings
    )
    consumer = build_app(
        db_url, broker, handlers=False, prefix=f"{prefix}c", topic_prefix=prefix, **settings
    )
    service = producer.services[0]
    try:
        consumer.outbox.register_inbox(service, consumer=f"{prefix}_billing")
        consumer.outbox.register_event(producer.event(service), service)
        consumer.outbox.migrate()

        @consumer.outbox.handler(producer.event(service))
        async def bill(event: Envelope, tx: AsyncSession) -> None:
            n = event.payload["n"]
            await tx.execute(consumer.effects.insert().values(outbox_id=0, service=service, n=n))

        _publish_backlog(producer, BACKLOG)
        await _run_until(producer.outbox, service, Status.PUBLISHED, BACKLOG)
        with counting(consumer.outbox) as counter:
            await _run_until(consumer.outbox, service, Status.CONSUMED, BACKLOG)
            got = counter.take()
    finally:
        drop_app(consumer)
        drop_app(producer)
    handler = [s for s in got if consumer.effects.name in s]
    worker = [s for s in got if consumer.effects.name not in s]
    assert len(handler) == BACKLOG
    batches = math.ceil(BACKLOG / BATCH)
    budget = INBOX_PER_BATCH[backend(consumer.outbox)] * batches + PER_RUN
    assert len(worker) <= budget, "\n".join(s[:120] for s in worker)
