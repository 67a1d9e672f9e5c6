"""Versioned migrations: from every earlier version to the latest, idempotent steps,
the reviewed SQL script, and two processes migrating at once."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import queue
import sqlite3
import threading
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from sqlalchemy import Index, MetaData, Table, event, insert, inspect, select
from sqlalchemy.engine import AdaptedConnection, make_url
from sqlalchemy.orm import Session
from sqlalchemy.util import await_only

from outboxer import Outbox
from outboxer.database.migrations import LATEST, STEPS, sql_script, table_at
from outboxer.database.ops.tools import RowFilter
from outboxer.database.schema import db_now
from tests.helpers import drop_tables, make_outbox, unique_service


def _describe(ob: Outbox, table: str) -> dict[str, Any]:
    insp = inspect(ob.db.sync_engine)
    return {
        "columns": [
            (c["name"], c["nullable"], type(c["type"]).__name__) for c in insp.get_columns(table)
        ],
        "indexes": sorted((i["name"], tuple(i["column_names"])) for i in insp.get_indexes(table)),
        "pk": insp.get_pk_constraint(table)["constrained_columns"],
    }


def _versions(ob: Outbox, table: str) -> list[int]:
    v = ob.tables.versions
    with ob.db.sync_engine.connect() as conn:
        rows = conn.execute(select(v.c.version).where(v.c.table_name == table)).scalars()
        return sorted(rows)


def _create_at(ob: Outbox, name: str, version: int) -> None:
    """Table ``name`` as outboxer ``version`` created it, holding one row."""
    md = MetaData()
    old = table_at(name, version, md)
    with ob.db.sync_engine.begin() as conn:
        md.create_all(conn)
        now = db_now()
        conn.execute(
            insert(old).values(
                event_type="old.event",
                service_name="old",
                topic="t.old",
                message_key="k",
                payload='{"event_type":"old.event","payload":{}}',
                status="dead",
                retry_count=3,
                max_retry=3,
                created_at=now,
                updated_at=now,
            )
        )


@pytest.fixture
def fresh(db_url: str, service: str) -> Any:
    """The schema a fresh install gets (the model), for comparison."""
    ob = make_outbox(db_url)
    ob.register_service(service, table=f"{service}_model")
    ob.migrate()
    yield _describe(ob, f"{service}_model")
    drop_tables(ob)
    ob.close()


@pytest.mark.parametrize("start", range(1, LATEST))
def test_from_every_earlier_version(db_url: str, service: str, fresh: Any, start: int) -> None:
    ob = make_outbox(db_url)
    route = ob.register_service(service, table=f"{service}_old")
    _create_at(ob, route.table_name, start)
    [before] = ob.migration_plan()
    assert (before.current, before.target) == (1, LATEST)  # unrecorded tables are version 1
    assert before.statements  # something to do

    [done] = ob.migrate()
    assert done.target == LATEST
    model = dict(fresh)
    assert _describe(ob, route.table_name)["columns"] == model["columns"]
    assert [c for _, c in _describe(ob, route.table_name)["indexes"]] == [
        c for _, c in model["indexes"]
    ]
    assert _versions(ob, route.table_name) == [s.version for s in STEPS if s.version > 1]
    # The old row is intact and readable by the new code.
    [row] = ob.admin.dead_letters(services=[service]).messages
    assert (row.event_type, row.retry_count, row.requeue_count, row.headers) == (
        "old.event",
        3,
        0,
        None,
    )
    [again] = ob.migrate()
    assert again.up_to_date
    assert not again.statements
    drop_tables(ob)
    ob.close()


def test_fresh_install_records_every_version(db_url: str, service: str) -> None:
    ob = make_outbox(db_url)
    route = ob.register_service(service)
    [plan] = ob.migration_plan()
    assert (plan.current, plan.target) == (0, LATEST)
    ob.migrate()
    assert _versions(ob, route.table_name) == [s.version for s in STEPS]
    drop_tables(ob)
    ob.close()


def test_steps_are_idempotent(db_url: str, service: str, fresh: Any) -> None:
    # A table already at the latest shape but with no record (changed by hand or by
    # Alembic): every step runs again and finds nothing to add.
    ob = make_outbox(db_url)
    route = ob.register_service(service, table=f"{service}_byhand")
    _create_at(ob, route.table_name, LATEST)
    [plan] = ob.migration_plan()
    assert plan.current == 1
    assert plan.target == LATEST
    assert plan.statements == []
    ob.migrate()
    assert _describe(ob, route.table_name)["columns"] == fresh["columns"]
    assert _versions(ob, route.table_name) == [s.version for s in STEPS if s.version > 1]
    drop_tables(ob)
    ob.close()


def test_half_applied_step_is_completed(db_url: str, service: str, fresh: Any) -> None:
    ob = make_outbox(db_url)
    route = ob.register_service(service, table=f"{service}_half")
    _create_at(ob, route.table_name, 1)
    # A DBA ran the first statement of step 2 only.
    [plan] = ob.migration_plan()
    with ob.db.sync_engine.begin() as conn:
        conn.execute(plan.statements[0])
    [plan] = ob.migration_plan()
    # Each step's columns and indexes, and the data work of a step that has some.
    later = sum(
        len(step.columns) + len(step.indexes) + (step.fill is not None) for step in STEPS[1:]
    )
    assert len(plan.statements) == later - 1
    ob.migrate()
    assert _describe(ob, route.table_name)["columns"] == fresh["columns"]
    drop_tables(ob)
    ob.close()


def test_the_sql_script_does_what_migrate_does(db_url: str, service: str, fresh: Any) -> None:
    ob = make_outbox(db_url)
    old = ob.register_service(service, table=f"{service}_script_old")
    new = ob.register_service(service + "_n", table=f"{service}_script_new")
    _create_at(ob, old.table_name, 1)
    plans = ob.migration_plan()
    script = sql_script(plans, ob.tables, ob.db.sync_engine.dialect)
    assert "ALTER TABLE" in script
    assert "CREATE TABLE" in script
    assert "INSERT INTO outboxer_schema" in script
    # Run by hand, statement by statement, as a DBA would.
    with ob.db.sync_engine.begin() as conn:
        for statement in script.split(";\n"):
            body = "\n".join(
                line for line in statement.splitlines() if not line.startswith("--")
            ).strip()
            if body:
                conn.exec_driver_sql(body)
    for table in (old.table_name, new.table_name):
        assert _describe(ob, table)["columns"] == fresh["columns"]
    assert _versions(ob, new.table_name) == [s.version for s in STEPS]
    assert all(p.up_to_date for p in ob.migration_plan())
    drop_tables(ob)
    ob.close()


PROCESSES = 6
ROUNDS = 3
"""Rounds on SQLite, each on a fresh file."""
PROCESS_WAIT = 120.0
"""Bound (seconds) of every wait between the test and its processes."""


class _Gate:
    """A ``connect`` listener that runs before outboxer's own: the first connection of
    an engine waits at ``barrier`` (every process is released at the same moment, right
    before the journal-mode switch), then reports to ``tried`` once its first switch to
    WAL is over: on SQLite when the connection runs any statement after it (or fails)."""

    def __init__(self, barrier: Any, tried: Any) -> None:
        self.barrier = barrier
        self.tried = tried
        self.released = False
        self.reported = False

    def __call__(self, dbapi_connection: Any, record: Any) -> None:
        if self.released:
            return
        self.released = True
        self.barrier.wait()
        switched: list[str] = []

        def trace(statement: str) -> None:
            if switched:
                self.report()
            elif "journal_mode" in statement:
                switched.append(statement)

        if isinstance(dbapi_connection, sqlite3.Connection):
            dbapi_connection.set_trace_callback(trace)
        elif isinstance(dbapi_connection, AdaptedConnection) and isinstance(
            dbapi_connection.driver_connection, aiosqlite.Connection
        ):  # the async engine's connect event runs where it may await the driver
            await_only(dbapi_connection.driver_connection.set_trace_callback(trace))
        else:
            self.report()  # a server: nothing to switch

    def report(self) -> None:
        if not self.reported:
            self.reported = True
            self.tried.put(os.getpid())


def _migrating_process(rounds: list[tuple[str, str]], barrier: Any, tried: Any, out: Any) -> None:
    """One process of :func:`test_processes_migrating_at_once`: per round, an Outbox on
    the round's database whose first connection waits at ``barrier``, then migrate."""
    for url, prefix in rounds:
        gate = _Gate(barrier, tried)
        try:
            ob = make_outbox(url)
            for i in range(3):
                ob.register_service(f"{prefix}_{i}")
            event.listen(ob.db.sync_engine, "connect", gate, insert=True)
            try:
                ob.migrate()
            finally:
                ob.close()
            out.put(None)
        except BaseException as exc:
            out.put(f"{type(exc).__name__}: {exc}")
        finally:
            gate.report()


def test_processes_migrating_at_once(db_url: str, tmp_path: Path) -> None:
    """Many processes released together migrate the same tables; each round succeeds.

    On SQLite each round is a fresh file, and the test holds its write lock while the
    processes switch it to WAL, releasing it only once every process is past its first
    try: every process meets, each round, what the process that first switches a fresh
    file does to the others (SQLite refuses their switch at once, without waiting), so
    the race of processes starting together on a fresh file is reproduced every time,
    not by luck."""
    sqlite = db_url.startswith("sqlite")
    rounds = [
        (f"sqlite:///{tmp_path / f'round{r}.db'}" if sqlite else db_url, unique_service())
        for r in range(ROUNDS if sqlite else 1)  # servers: one round under their lock
    ]
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES + 1, timeout=PROCESS_WAIT)
    tried = ctx.Queue()
    out = ctx.Queue()
    processes = [
        ctx.Process(target=_migrating_process, args=(rounds, barrier, tried, out))
        for _ in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    try:
        for url, prefix in rounds:
            holder = None
            if sqlite:
                holder = sqlite3.connect(make_url(url).database or "", isolation_level=None)
                holder.execute("BEGIN IMMEDIATE")  # a writer on a file in rollback mode
            try:
                barrier.wait()
                for _ in processes:
                    tried.get(timeout=PROCESS_WAIT)
            finally:
                if holder is not None:
                    holder.execute("COMMIT")
                    holder.close()
            errors = [out.get(timeout=PROCESS_WAIT) for _ in processes]
            assert [e for e in errors if e is not None] == []
            ob = make_outbox(url)
            for i in range(3):
                table = ob.register_service(f"{prefix}_{i}").table_name
                assert _versions(ob, table) == [s.version for s in STEPS]
            if sqlite:
                with ob.db.sync_engine.connect() as conn:
                    assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            drop_tables(ob)
            ob.close()
        for process in processes:
            process.join(PROCESS_WAIT)
            assert process.exitcode == 0
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()


@pytest.mark.parametrize("face", ["sync", "async"])
async def test_a_connection_waits_for_another_writer_to_switch_a_fresh_file_to_wal(
    tmp_path: Path, face: str
) -> None:
    """The cause of the race, in one process: a connection opened while another holds
    the write lock of a file in rollback mode cannot switch it to WAL (SQLite refuses
    the lock upgrade at once, without its busy handler); it waits and succeeds, on the
    sync engine (the CLI, migrations) and the async one (the loops)."""
    path = tmp_path / "fresh.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("CREATE TABLE held (x INTEGER)")
    ob = make_outbox(f"sqlite:///{path}")
    tried = queue.Queue[int]()
    gate = _Gate(threading.Barrier(1), tried)

    async def connect() -> str:
        try:
            if face == "sync":
                event.listen(ob.db.sync_engine, "connect", gate, insert=True)
                with ob.db.sync_engine.connect() as conn:
                    return str(conn.exec_driver_sql("PRAGMA journal_mode").scalar())
            event.listen(ob.db.async_engine.sync_engine, "connect", gate, insert=True)
            async with ob.db.async_engine.connect() as aconn:
                return str((await aconn.exec_driver_sql("PRAGMA journal_mode")).scalar())
        finally:
            tried.put(0)

    task = asyncio.ensure_future(
        asyncio.to_thread(asyncio.run, connect()) if face == "sync" else connect()
    )
    try:
        # Released once its first switch is over (refused: the file was locked).
        await asyncio.to_thread(tried.get, timeout=PROCESS_WAIT)
    finally:
        holder.execute("COMMIT")
        holder.close()
    assert await asyncio.wait_for(task, PROCESS_WAIT) == "wal"
    assert ob.db.table_names() == {"held"}
    await ob.db.dispose_async()


def _envelope(event_id: str | None, n: int) -> str:
    return json.dumps(
        {
            "event_id": event_id,
            "event_type": "old.event",
            "event_version": "v1",
            "aggregate_id": "k",
            "payload": {"n": n},
        },
        separators=(",", ":"),
    )


def test_version_4_copies_event_ids_and_reports_repeats(db_url: str, service: str) -> None:
    """Rows written before event ids were unique: the earliest row of each id gets
    it, a repeat keeps the column empty, and the migration says which rows."""
    ob = make_outbox(db_url)
    route = ob.register_service(service, table=f"{service}_ids")
    ob.register_event("old.event", service)
    md = MetaData()
    old = table_at(route.table_name, 3, md)
    payloads = [
        _envelope("evt-dup", 1),
        _envelope("evt-solo", 2),
        _envelope("evt-dup", 1),  # the same event published twice
        _envelope(None, 4),  # no explicit id: stays empty
        "not json",
        _envelope("evt-dup", 5),
    ]
    with ob.db.sync_engine.begin() as conn:
        md.create_all(conn)
        now = db_now()
        for payload in payloads:
            conn.execute(
                insert(old).values(
                    event_type="old.event",
                    service_name=service,
                    topic="t.old",
                    message_key="k",
                    payload=payload,
                    status="consumed",
                    retry_count=0,
                    max_retry=20,
                    created_at=now,
                    updated_at=now,
                )
            )
        ids = list(conn.execute(select(old.c.id).order_by(old.c.id)).scalars())
    script = sql_script(ob.migration_plan(), ob.tables, ob.db.sync_engine.dialect)
    assert "filled by `outboxer migrate` only" in script
    [done] = ob.migrate()
    [note] = done.notes
    assert f"2 row(s) repeat the event id of an earlier row ('evt-dup': rows {ids[0]}, " in note
    assert f"{ids[2]}, {ids[5]})" in note
    rows = {m.id: m.event_id for m in ob.store(service).find(RowFilter(), 10)}
    assert rows == {
        ids[0]: "evt-dup",
        ids[1]: "evt-solo",
        ids[2]: None,
        ids[3]: None,
        ids[4]: None,
        ids[5]: None,
    }
    # Publishing a copied id again is idempotent from now on.
    with Session(ob.db.sync_engine) as s, s.begin():
        assert ob.publish(s, "old.event", {"n": 2}, event_id="evt-solo") == ids[1]
        assert ob.publish(s, "old.event", {"n": 1}, event_id="evt-dup") == ids[0]
    [again] = ob.migrate()
    assert again.up_to_date
    assert again.notes == []
    drop_tables(ob)
    ob.close()


def test_an_inbox_table_of_version_3_gets_deliver_at_only(db_url: str, service: str) -> None:
    """Inbox tables had a required, unique event_id since version 3: version 4 adds
    only deliver_at to them (same index name, nothing to copy)."""
    ob = make_outbox(db_url)
    ob.register_inbox(service, consumer="shop")
    latest = ob.table_for(service)
    md = MetaData()
    Table(
        latest.name,
        md,
        *(c._copy() for c in latest.columns if c.name != "deliver_at"),
        *(Index(i.name, *(c.name for c in i.columns), unique=i.unique) for i in latest.indexes),
    )
    with ob.db.sync_engine.begin() as conn:
        md.create_all(conn)
    [plan] = ob.migration_plan()
    assert [type(s).__name__ for s in plan.statements] == ["AddColumn"]
    [done] = ob.migrate()
    assert done.target == LATEST
    columns = {
        c["name"]: c["nullable"] for c in inspect(ob.db.sync_engine).get_columns(latest.name)
    }
    assert columns["deliver_at"] is True
    assert columns["event_id"] is False
    drop_tables(ob)
    ob.close()
