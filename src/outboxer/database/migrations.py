"""Versioned schema migrations of the outbox tables.

Each outbox table has a schema version, recorded step by step in the version table
(``outboxer_schema``: table name, version, description, applied at). A step says
what it adds (columns, indexes); applying it adds only what is missing, so every
step is idempotent, and a table changed by hand or by Alembic to the same shape is
simply recorded. A table that does not exist is created at the latest version (all
steps recorded at once); an outbox table that exists without any record was created
before versions existed: version 1.

``plan`` computes the DDL and the version rows without changing anything (what
``outboxer migrate --sql`` prints for a DBA), ``migrate`` applies them, one table at a
time, under the database's single-instance lock so two processes never migrate at
once. SQLite has no such lock: each table is planned and changed inside one write
transaction (``BEGIN IMMEDIATE``), so a second process waits for the first and then
finds the table done (the journal-mode switch that precedes it on a fresh file waits
too; see :mod:`outboxer.database.dialects.sqlite`).

Version history:

1. The table as ``Outbox.migrate()`` created it before versions (id ... updated_at,
   the claim index and the status/updated_at index).
2. ``headers`` (propagation headers such as the W3C ``traceparent``, as JSON),
   ``requeue_count`` (``NOT NULL DEFAULT 0``) and ``requeued_at``: columns that old
   code ignores and new rows of old code fill by default, so migrating before
   deploying the new version needs no downtime.
3. An index on ``(message_key, id)``: services with ordered delivery look up the
   open rows of a key (the publish path pays one more index entry per row).
4. ``event_id`` (the id given to ``publish``, nullable) with a unique index, and
   ``deliver_at`` (the due time of a scheduled event). Before the index is built,
   the explicit event ids already stored inside the rows' envelopes are copied into
   the column: the earliest row of each id gets it; a later row with the same id
   keeps an empty column (it was published before ids were unique) and the
   migration reports those rows (``TablePlan.notes``, a warning in the log) rather
   than failing or deleting anything.
5. ``handling`` and ``crashes`` (``NOT NULL DEFAULT 0``): a consumer marks a message
   as being handled in a short transaction before its handler runs; the commit that
   settles it clears the mark. A mark found by the next delivery means the worker
   process died while handling it (poison protection, docs/semantics.md).
6. ``coordinates`` and ``consumer_group`` (nullable): lineage. An outbox row keeps
   where the broker put it (written by the published mark's UPDATE); an inbox row
   where it was read and by which consumer group.

Inbox tables (a service consumed here from another database) are the outbox template
plus a unique ``event_id``; they were introduced at version 3, so they are always
created at the latest version and migrated with the same steps from then on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Column, Connection, Index, MetaData, Table, inspect
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.schema import CreateIndex, CreateTable, ExecutableDDLElement
from sqlalchemy.sql.compiler import DDLCompiler
from sqlalchemy.sql.elements import ClauseElement

from outboxer.database.dialects import dialect_for
from outboxer.database.engines import Database
from outboxer.database.instructions import Execute
from outboxer.database.locks import single_instance
from outboxer.database.ops.maintenance import (
    op_copy_event_ids,
    op_record_versions,
    op_schema_versions,
)
from outboxer.database.runner import SyncRunner
from outboxer.database.schema import Tables, outbox_table, version_table
from outboxer.errors import StoreError
from outboxer.routing import index_name

logger = logging.getLogger(__name__)

MIGRATE_LOCK = "outboxer.migrate"

Fill = Callable[[Connection, Table], list[str]]
"""Data work of a step, run after its columns exist and before its indexes are
built; returns notes for the person migrating."""


@dataclass(frozen=True, slots=True)
class Step:
    """One schema version: what it adds to an outbox table."""

    version: int
    description: str
    columns: tuple[str, ...] = ()
    indexes: tuple[str, ...] = ()
    """Index name suffixes (``due`` for ``ix_<table>_due``)."""
    fill: Fill | None = None
    """Run when this step builds one of its indexes (see :class:`FillStep`)."""


def _copy_event_ids(conn: Connection, table: Table) -> list[str]:
    duplicates = SyncRunner(conn).run(op_copy_event_ids(table))
    if not duplicates:
        return []
    rows = sum(len(ids) - 1 for _, ids in duplicates)
    shown = "; ".join(
        f"{event_id!r}: rows {', '.join(map(str, ids))}" for event_id, ids in duplicates[:5]
    )
    more = f"; and {len(duplicates) - 5} more ids" if len(duplicates) > 5 else ""
    note = (
        f"{table.name}: {rows} row(s) repeat the event id of an earlier row ({shown}{more}); "
        f"the earliest row of each id holds it, the later ones keep an empty event_id "
        f"(publishing that id again returns the earliest row)"
    )
    logger.warning(note, extra={"table": table.name, "duplicate_event_ids": len(duplicates)})
    return [note]


STEPS: tuple[Step, ...] = (
    Step(1, "outbox table with the claim and status indexes"),
    Step(
        2,
        "headers (trace context), requeue_count, requeued_at",
        columns=("headers", "requeue_count", "requeued_at"),
    ),
    Step(3, "index on (message_key, id) for ordered delivery", indexes=("key",)),
    Step(
        4,
        "event_id (unique: idempotent publish) and deliver_at (scheduled events)",
        columns=("event_id", "deliver_at"),
        indexes=("event",),
        fill=_copy_event_ids,
    ),
    Step(
        5,
        "handling, crashes (deliveries started and never settled: the worker died)",
        columns=("handling", "crashes"),
    ),
    Step(
        6,
        "coordinates, consumer_group (lineage: where a message went or came from)",
        columns=("coordinates", "consumer_group"),
    ),
)
LATEST = STEPS[-1].version


def _added_after(version: int) -> tuple[set[str], set[str]]:
    columns: set[str] = set()
    indexes: set[str] = set()
    for step in STEPS:
        if step.version > version:
            columns.update(step.columns)
            indexes.update(step.indexes)
    return columns, indexes


def table_at(name: str, version: int, metadata: MetaData | None = None) -> Table:
    """Outbox table ``name`` as version ``version`` defined it (tests, and the history
    of what each step adds)."""
    latest = outbox_table(name, MetaData())
    if version >= LATEST:
        return latest.to_metadata(metadata if metadata is not None else MetaData())
    columns, indexes = _added_after(version)
    later = {index_name(name, suffix) for suffix in indexes}
    kept_indexes = [i for i in latest.indexes if i.name not in later]
    return Table(
        name,
        metadata if metadata is not None else MetaData(),
        *(c._copy() for c in latest.columns if c.name not in columns),
        *(
            Index(i.name, *(c.name for c in i.columns), unique=i.unique)
            for i in sorted(kept_indexes, key=lambda i: str(i.name))
        ),
    )


class AddColumn(ExecutableDDLElement):
    """``ALTER TABLE t ADD COLUMN <spec>`` (SQLAlchemy Core has no construct for it)."""

    def __init__(self, table: Table, column: Column[Any]) -> None:
        self.table = table
        self.column = column


@compiles(AddColumn)
def _compile_add_column(element: AddColumn, compiler: DDLCompiler, **kw: Any) -> str:
    table = compiler.preparer.format_table(element.table)
    spec = compiler.get_column_specification(element.column)
    return str(dialect_for(compiler.dialect.name).add_column_sql(table, spec))


class FillStep(ExecutableDDLElement):
    """The data work of a step in a plan: ``migrate`` runs it; in the SQL script it is
    a comment (the copy reads JSON in Python, so only ``outboxer migrate`` does it)."""

    def __init__(self, table: Table, step: Step) -> None:
        self.table = table
        self.step = step

    def run(self, conn: Connection) -> list[str]:
        assert self.step.fill is not None
        return self.step.fill(conn, self.table)


@compiles(FillStep)
def _compile_fill(element: FillStep, compiler: DDLCompiler, **kw: Any) -> str:
    return (
        f"-- version {element.step.version}: existing rows are filled by `outboxer migrate` "
        f"only ({element.step.description})"
    )


@dataclass
class TablePlan:
    """What ``migrate`` does to one outbox table."""

    table: str
    current: int
    """0 when the table does not exist."""
    statements: list[ExecutableDDLElement] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    """Steps to record (everything after ``current``)."""
    notes: list[str] = field(default_factory=list)
    """What ``migrate`` found worth telling (rows a step could not fill as asked)."""

    @property
    def target(self) -> int:
        return self.steps[-1].version if self.steps else self.current

    @property
    def up_to_date(self) -> bool:
        return not self.steps


def _plan_table(table: Table, present: dict[str, Any] | None, recorded: int) -> TablePlan:
    if present is None:
        statements: list[ExecutableDDLElement] = [CreateTable(table)]
        statements += [CreateIndex(i) for i in sorted(table.indexes, key=lambda i: str(i.name))]
        return TablePlan(table.name, 0, statements, list(STEPS))
    current = recorded or 1  # existed before versions were recorded
    plan = TablePlan(table.name, current)
    columns = present["columns"]
    indexes = present["indexes"]
    for step in STEPS:
        if step.version <= current:
            continue
        plan.steps.append(step)
        for name in step.columns:
            if name not in columns:
                plan.statements.append(AddColumn(table, table.c[name]))
        wanted = {index_name(table.name, suffix) for suffix in step.indexes}
        missing = [
            index
            for index in sorted(table.indexes, key=lambda i: str(i.name))
            if index.name in wanted and index.name not in indexes
        ]
        if missing and step.fill is not None:
            plan.statements.append(FillStep(table, step))
        plan.statements += [CreateIndex(index) for index in missing]
    return plan


def _inspect(conn: Connection, names: Iterable[str]) -> dict[str, dict[str, Any] | None]:
    insp = inspect(conn)
    existing = set(insp.get_table_names())
    found: dict[str, dict[str, Any] | None] = {}
    for name in names:
        if name not in existing:
            found[name] = None
            continue
        found[name] = {
            "columns": {c["name"] for c in insp.get_columns(name)},
            "indexes": {i["name"] for i in insp.get_indexes(name)},
        }
    return found


def plan_on(conn: Connection, tables: Tables, outbox: Sequence[Table]) -> list[TablePlan]:
    """The plan of every table in ``outbox`` on ``conn`` (reads only)."""
    present = _inspect(conn, [t.name for t in outbox] + [tables.versions.name])
    recorded: dict[str, int] = {}
    if present[tables.versions.name] is not None:
        recorded = SyncRunner(conn).run(op_schema_versions(tables.versions))
    return [_plan_table(t, present[t.name], recorded.get(t.name, 0)) for t in outbox]


def outbox_tables(tables: Tables) -> list[Table]:
    """The services' tables (outbox and inbox), by name; not outboxer's own (the
    versions, the audit trail, the parked keys)."""
    return sorted(
        (t for t in tables.metadata.tables.values() if not tables.own(t.name)),
        key=lambda t: t.name,
    )


def plan(database: Database, tables: Tables) -> list[TablePlan]:
    """What :func:`migrate` would do to each outbox table in ``tables``."""
    try:
        with database.sync_engine.connect() as conn:
            return plan_on(conn, tables, outbox_tables(tables))
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot read the schema: {_orig(exc)}", url=database.safe_url) from exc


def migrate(database: Database, tables: Tables) -> list[TablePlan]:
    """Bring every outbox table in ``tables`` to the latest version; returns what was
    done per table (idempotent: a second run does nothing)."""
    outbox = outbox_tables(tables)
    try:
        with single_instance(database, MIGRATE_LOCK, wait=True):
            with database.sync_engine.begin() as conn:
                tables.versions.create(conn, checkfirst=True)
                # The audit and parked keys tables have no versions yet: created
                # when missing, so an existing database gains them on its next
                # `outboxer migrate`.
                tables.audit.create(conn, checkfirst=True)
                tables.parked.create(conn, checkfirst=True)
            plans = []
            for table in outbox:
                with database.sync_engine.begin() as conn:
                    [table_plan] = plan_on(conn, tables, [table])
                    for statement in table_plan.statements:
                        if isinstance(statement, FillStep):
                            table_plan.notes += statement.run(conn)
                        else:
                            conn.execute(statement)
                    if table_plan.steps:
                        SyncRunner(conn).run(
                            op_record_versions(tables.versions, table.name, table_plan.steps)
                        )
                plans.append(table_plan)
            return plans
    except SQLAlchemyError as exc:
        raise StoreError(f"migration failed: {_orig(exc)}", url=database.safe_url) from exc


def sql_script(plans: Sequence[TablePlan], tables: Tables, dialect: Any) -> str:
    """The DDL and version rows of ``plans`` as one SQL script for ``dialect`` (a
    SQLAlchemy dialect), for a DBA to review and run."""
    lines: list[str] = []
    for statement in sql_statements(plans, tables, dialect):
        if statement.startswith("-- "):
            lines.append("")
            lines.append(statement)
        else:
            lines.append(statement + ";")
    return "\n".join(lines) + "\n"


def sql_statements(plans: Sequence[TablePlan], tables: Tables, dialect: Any) -> list[str]:
    """The statements of :func:`sql_script`, one by one without their ``;`` (each
    table's first line is a ``-- table: version a -> b`` comment), for a tool that
    runs them itself (a Django migration operation)."""
    out: list[str] = []
    versions_ddl = str(CreateTable(tables.versions, if_not_exists=True).compile(dialect=dialect))
    out.append(versions_ddl.strip())
    audit_ddl = str(CreateTable(tables.audit, if_not_exists=True).compile(dialect=dialect))
    out.append(audit_ddl.strip())
    for index in sorted(tables.audit.indexes, key=lambda i: str(i.name)):
        out.append(str(CreateIndex(index, if_not_exists=True).compile(dialect=dialect)).strip())
    parked_ddl = str(CreateTable(tables.parked, if_not_exists=True).compile(dialect=dialect))
    out.append(parked_ddl.strip())
    for table_plan in plans:
        if table_plan.up_to_date:
            continue
        out.append(f"-- {table_plan.table}: version {table_plan.current} -> {table_plan.target}")
        for statement in table_plan.statements:
            out.append(str(statement.compile(dialect=dialect)).strip())
        op = op_record_versions(tables.versions, table_plan.table, table_plan.steps)
        for instruction in op:
            assert isinstance(instruction, Execute)
            stmt = instruction.statement
            for params in instruction.params or [{}]:
                out.append(_literal(stmt, params, dialect))
    return out


def fresh_plans(tables: Tables) -> list[TablePlan]:
    """What :func:`migrate` does on a database without outbox tables (reads nothing)."""
    return [_plan_table(t, None, 0) for t in outbox_tables(tables)]


def _literal(stmt: Any, params: dict[str, Any], dialect: Any) -> str:
    bound: ClauseElement = stmt.values(**params)
    return str(bound.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))


def _orig(exc: SQLAlchemyError) -> object:
    return getattr(exc, "orig", None) or exc


__all__ = [
    "LATEST",
    "STEPS",
    "AddColumn",
    "FillStep",
    "Step",
    "TablePlan",
    "migrate",
    "plan",
    "plan_on",
    "fresh_plans",
    "sql_script",
    "sql_statements",
    "table_at",
    "version_table",
]
