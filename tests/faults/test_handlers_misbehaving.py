"""Handlers that break the rules: each case ends in a typed error or a safe outcome.

- A handler that ends its transaction with raw SQL (COMMIT, ROLLBACK, BEGIN, or DDL
  that MySQL commits implicitly) is refused before the statement reaches the
  database: its effect is never applied, its message fails for retry and ends dead.
- A handler that commits through the driver itself is detected and the batch is
  abandoned.
- Sync handlers never run on the event loop thread, whatever the batch mixes.
- A sync handler that blocks does not hold a stop past ``shutdown_timeout``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from outboxer import Envelope, Outbox, Status
from outboxer.database.runner import ends_transaction
from outboxer.testing import InMemoryTransport, drain
from tests.helpers import isolated_settings

pytestmark = pytest.mark.faults


def _app(url: str, service: str, **settings: Any) -> tuple[Outbox, Table]:
    values: dict[str, Any] = {"retry_unit": 0.01, "poll_interval": 0.05, **settings}
    ob = Outbox(url, transport=InMemoryTransport(), settings=isolated_settings(**values))
    ob.register_event(f"{service}.e", service)
    ob.register_event(f"{service}.a", service)
    md = MetaData()
    fx = Table(
        f"{service}_fx",
        md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("outbox_id", Integer, nullable=False),
        Column("thread", String(100), nullable=False),
    )
    with ob.db.sync_engine.begin() as conn:
        md.create_all(conn)
    ob.migrate()
    return ob, fx


def _publish(ob: Outbox, event_type: str, n: int, **kw: Any) -> list[int]:
    with ob.db.sync_engine.begin() as conn:
        return [ob.publish(conn, event_type, {"n": i}, key=f"k{i}", **kw) for i in range(n)]


def _effects(ob: Outbox, fx: Table) -> int:
    with ob.db.sync_engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(fx)).scalar_one())


async def _close(ob: Outbox, fx: Table) -> None:
    with ob.db.sync_engine.begin() as conn:
        fx.drop(conn)
        ob.metadata.drop_all(conn)
    await ob.aclose()


RAW_ENDINGS = ["COMMIT", "ROLLBACK", "commit work", "END", "BEGIN", "START TRANSACTION"]


@pytest.mark.parametrize("statement", RAW_ENDINGS)
async def test_raw_transaction_control_is_refused(
    db_url: str, service: str, statement: str
) -> None:
    ob, fx = _app(db_url, service, max_retry=3)

    @ob.handler(f"{service}.e")
    def handler(event: Envelope, tx: Session) -> None:
        tx.execute(insert(fx).values(outbox_id=event.outbox_id, thread="x"))
        tx.execute(text(statement))

    try:
        (oid,) = _publish(ob, f"{service}.e", 1, max_retry=3)
        await drain(ob)
        row = ob.store(service).get_by_id(oid)
        assert row is not None
        assert row.status is Status.DEAD
        assert row.retry_count == 3
        assert row.last_error is not None
        assert "tried to end the transaction" in row.last_error
        # Before the guard, the effect committed with the raw statement on every attempt.
        assert _effects(ob, fx) == 0
    finally:
        await _close(ob, fx)


async def test_ddl_that_commits_implicitly_is_refused_on_mysql(
    mysql_database: Any, service: str
) -> None:
    ob, fx = _app(mysql_database.url, service, max_retry=2)

    @ob.handler(f"{service}.e")
    def handler(event: Envelope, tx: Session) -> None:
        tx.execute(insert(fx).values(outbox_id=event.outbox_id, thread="x"))
        tx.execute(text(f"CREATE TABLE {service}_oops (id INTEGER)"))

    try:
        (oid,) = _publish(ob, f"{service}.e", 1, max_retry=2)
        await drain(ob)
        row = ob.store(service).get_by_id(oid)
        assert row is not None
        assert row.status is Status.DEAD
        assert _effects(ob, fx) == 0
        assert f"{service}_oops" not in ob.db.table_names()
    finally:
        await _close(ob, fx)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_commit_through_the_driver_is_detected(
    request: pytest.FixtureRequest, backend: str, tmp_path: Any, service: str
) -> None:
    url = (
        f"sqlite:///{tmp_path}/driver.db"
        if backend == "sqlite"
        else request.getfixturevalue("pg_database").url
    )
    ob, fx = _app(url, service, max_retry=2)

    @ob.handler(f"{service}.e")
    def handler(event: Envelope, tx: Session) -> None:
        tx.execute(insert(fx).values(outbox_id=event.outbox_id, thread="x"))
        tx.connection().connection.driver_connection.commit()  # type: ignore[union-attr]

    try:
        (oid,) = _publish(ob, f"{service}.e", 1, max_retry=2)
        await drain(ob)
        row = ob.store(service).get_by_id(oid)
        assert row is not None
        assert row.status is Status.DEAD
        assert row.last_error is not None
        assert "ended the database transaction" in row.last_error
    finally:
        await _close(ob, fx)


async def test_sync_handlers_never_run_on_the_event_loop(db_url: str, service: str) -> None:
    ob, fx = _app(db_url, service)
    loop_thread = threading.current_thread().name

    @ob.handler(f"{service}.e")
    def sync_handler(event: Envelope, tx: Session) -> None:
        tx.execute(
            insert(fx).values(outbox_id=event.outbox_id, thread=threading.current_thread().name)
        )

    @ob.handler(f"{service}.a")
    async def async_handler(event: Envelope, tx: AsyncSession) -> None:
        await tx.execute(insert(fx).values(outbox_id=event.outbox_id, thread="async"))

    try:
        with ob.db.sync_engine.begin() as conn:  # one batch mixing both kinds
            for i in range(40):
                ob.publish(conn, f"{service}.{'e' if i % 3 else 'a'}", {"n": i})
        await drain(ob)
        with ob.db.sync_engine.connect() as conn:
            threads = conn.execute(select(fx.c.thread)).scalars().all()
        assert len(threads) == 40
        sync_threads = {t for t in threads if t != "async"}
        assert sync_threads
        assert loop_thread not in sync_threads
    finally:
        await _close(ob, fx)


async def test_a_blocked_sync_handler_in_a_mixed_batch_does_not_hold_the_stop(
    tmp_path: Any, service: str
) -> None:
    ob, fx = _app(f"sqlite:///{tmp_path}/blocked.db", service, shutdown_timeout=2.0)
    release = threading.Event()
    started = threading.Event()

    @ob.handler(f"{service}.e")
    def blocked(event: Envelope, tx: Session) -> None:
        started.set()
        release.wait(120)  # a handler stuck on a call without a timeout

    @ob.handler(f"{service}.a")
    async def fine(event: Envelope, tx: AsyncSession) -> None:
        return None

    try:
        with ob.db.sync_engine.begin() as conn:
            ob.publish(conn, f"{service}.a", {"n": 0})
            ob.publish(conn, f"{service}.e", {"n": 1})
        task = asyncio.create_task(ob.run_async())
        assert await asyncio.to_thread(started.wait, 60), "the handler never started"
        stop_at = time.monotonic()
        ob.stop()
        await asyncio.wait_for(task, 60)
        # shutdown_timeout is 2 s; a handler on the loop would have held it for 120 s.
        assert time.monotonic() - stop_at < 30
    finally:
        release.set()
        await _close(ob, fx)


@pytest.mark.parametrize(
    ("sql", "dialect", "ends"),
    [
        ("COMMIT", "postgresql", True),
        ("  commit;", "sqlite", True),
        ("ROLLBACK", "postgresql", True),
        ("ROLLBACK TO SAVEPOINT sa_1", "postgresql", False),
        ("rollback work to sa_1", "mysql", False),
        ("ROLLBACK AND CHAIN", "mysql", True),
        ("END", "postgresql", True),
        ("BEGIN IMMEDIATE", "sqlite", True),
        ("SET autocommit = 1", "mysql", True),
        ("INSERT INTO t VALUES ('commit')", "postgresql", False),
        ("INSERT INTO t VALUES (1); COMMIT", "sqlite", True),
        ("-- COMMIT\nSELECT 1", "postgresql", False),
        ("SELECT 1 /* ; rollback */", "mysql", False),
        ("CREATE TABLE x (id int)", "mysql", True),
        ("CREATE TEMPORARY TABLE x (id int)", "mysql", False),
        ("CREATE TABLE x (id int)", "postgresql", False),
        ("UPDATE t SET v = 1", "mysql", False),
    ],
)
def test_which_statements_end_a_transaction(sql: str, dialect: str, ends: bool) -> None:
    assert ends_transaction(sql, dialect) is ends
