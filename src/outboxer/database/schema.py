"""The outbox table (one per service route), its indexes, and the database clock.

Every table is built from one column template. Timestamps are always taken from the
database's clock (:class:`db_now`, :class:`db_now_plus`, compiled by each dialect)
so many processes on many hosts agree on what is due, and are stored as UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Dialect,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    literal,
    text,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import ColumnElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import TypeDecorator, TypeEngine

from outboxer.database.dialects import dialect_for, id_type
from outboxer.routing import ServiceRoute, index_name, validate_table_name

MAX_ERROR_CHARS = 2000
MAX_KEY_CHARS = 255
MAX_EVENT_TYPE_CHARS = 255
MAX_EVENT_ID_CHARS = 255
MAX_COORDINATES_CHARS = 255


class UtcDateTime(TypeDecorator[datetime]):
    """A UTC timestamp with sub-second precision on every supported database.

    Values read back are timezone-aware (UTC). Naive datetimes given to it are taken
    to be UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        return dialect.type_descriptor(dialect_for(dialect.name).timestamp_type())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime, got {type(value).__name__}")
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return dialect_for(dialect.name).to_db_timestamp(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return dialect_for(dialect.name).from_db_timestamp(value)


class db_now(FunctionElement[datetime]):
    """The database's current UTC time."""

    type = UtcDateTime()
    inherit_cache = True
    name = "db_now"


class db_now_plus(FunctionElement[datetime]):
    """The database's current UTC time plus ``seconds`` (a number or SQL expression)."""

    type = UtcDateTime()
    inherit_cache = True
    name = "db_now_plus"

    def __init__(self, seconds: float | ColumnElement[Any]) -> None:
        arg = seconds if isinstance(seconds, ColumnElement) else literal(float(seconds), Float())
        super().__init__(arg)


@compiles(db_now)
def _compile_now(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    return dialect_for(compiler.dialect.name).now_sql()


@compiles(db_now_plus)
def _compile_now_plus(element: db_now_plus, compiler: SQLCompiler, **kw: Any) -> str:
    (arg,) = element.clauses
    return dialect_for(compiler.dialect.name).now_plus_sql(compiler.process(arg, **kw))


class db_minute(FunctionElement[str]):
    """The UTC minute of a timestamp as text, ``YYYY-MM-DD HH:MM``."""

    type = String()
    inherit_cache = True
    name = "db_minute"


@compiles(db_minute)
def _compile_minute(element: db_minute, compiler: SQLCompiler, **kw: Any) -> str:
    (arg,) = element.clauses
    return dialect_for(compiler.dialect.name).minute_sql(compiler.process(arg, **kw))


class _Payload(TypeDecorator[str]):
    """Text large enough for an envelope of the configured size on every database."""

    impl = Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        special = dialect_for(dialect.name).text_type(long=True)
        return dialect.type_descriptor(special if special is not None else Text())


def outbox_table(name: str, metadata: MetaData) -> Table:
    """Build (or return the already built) outbox table ``name`` in ``metadata``."""
    validate_table_name(name)
    existing = metadata.tables.get(name)
    if existing is not None:
        return existing
    return Table(
        name,
        metadata,
        Column("id", id_type(), primary_key=True, autoincrement=True),
        Column("event_type", String(MAX_EVENT_TYPE_CHARS), nullable=False),
        Column("service_name", String(64), nullable=False),
        Column("topic", String(249), nullable=False),
        Column("message_key", String(MAX_KEY_CHARS), nullable=False),
        Column("payload", _Payload(), nullable=False),
        Column("status", String(16), nullable=False),
        Column("retry_count", Integer, nullable=False),
        Column("max_retry", Integer, nullable=False),
        Column("next_retry_at", UtcDateTime(), nullable=True),
        Column("published_at", UtcDateTime(), nullable=True),
        Column("consumed_at", UtcDateTime(), nullable=True),
        Column("last_error", Text, nullable=True),
        Column("created_at", UtcDateTime(), nullable=False),
        Column("updated_at", UtcDateTime(), nullable=False),
        # Schema version 2 (added by `outboxer migrate`; see database/migrations.py).
        # Nullable or with a server default, so code of the previous version keeps
        # inserting while the new columns exist.
        Column("headers", Text, nullable=True),
        Column("requeue_count", Integer, nullable=False, server_default=text("0")),
        Column("requeued_at", UtcDateTime(), nullable=True),
        # Schema version 4: the publisher's event id (unique per table, NULL when the
        # event has none: every database lets a unique index hold many NULLs) and
        # the due time a scheduled event was published with.
        Column("event_id", String(MAX_EVENT_ID_CHARS), nullable=True),
        Column("deliver_at", UtcDateTime(), nullable=True),
        # Schema version 5: poison protection. ``handling`` is set in a short
        # transaction of its own before a consumer runs the handler (1: in a batch,
        # 2: alone) and cleared by the commit that settles the message, so a marker
        # found set by the next delivery means the worker died while handling it;
        # ``crashes`` counts the deaths pinned on this message.
        Column("handling", Integer, nullable=False, server_default=text("0")),
        Column("crashes", Integer, nullable=False, server_default=text("0")),
        # Schema version 6: lineage. Where the broker put the message when it
        # acknowledged it (Kafka: topic/partition@offset), written with the published
        # mark; in an inbox, where the message was read and by which consumer group.
        Column("coordinates", String(MAX_COORDINATES_CHARS), nullable=True),
        Column("consumer_group", String(255), nullable=True),
        # The claim: status = 'pending' AND next_retry_at <= now ORDER BY next_retry_at, id.
        Index(index_name(name, "due"), "status", "next_retry_at", "id"),
        # Operations: listing/purging by status and age, status counts.
        Index(index_name(name, "status_updated"), "status", "updated_at"),
        # Schema version 3: ordered services look up the open rows of a key.
        Index(index_name(name, "key"), "message_key", "id"),
        # Schema version 4: publishing an event id twice writes one row.
        Index(index_name(name, "event"), "event_id", unique=True),
    )


def inbox_table(name: str, metadata: MetaData) -> Table:
    """Build (or return) inbox table ``name``: the outbox template with the event id
    of the producer required (its unique index is the template's), so a message
    received twice is stored once."""
    existing = metadata.tables.get(name)
    if existing is not None:
        return existing
    table = outbox_table(name, metadata)
    table.c.event_id.nullable = False
    return table


VERSION_TABLE = "outboxer_schema"
"""Which migration steps were applied to which outbox table (one row per step)."""


def version_table(metadata: MetaData) -> Table:
    """The version table in ``metadata`` (built on first use)."""
    existing = metadata.tables.get(VERSION_TABLE)
    if existing is not None:
        return existing
    return Table(
        VERSION_TABLE,
        metadata,
        Column("table_name", String(63), primary_key=True),
        Column("version", Integer, primary_key=True, autoincrement=False),
        Column("description", String(200), nullable=False),
        Column("applied_at", UtcDateTime(), nullable=False),
    )


AUDIT_TABLE = "outboxer_audit"
"""Every operator action (requeue, purge, edit, ...): who, when, what, which rows."""


def audit_table(metadata: MetaData) -> Table:
    """The audit table in ``metadata`` (built on first use). Retention never deletes
    from it; ``Admin.purge_audit`` does, when asked."""
    existing = metadata.tables.get(AUDIT_TABLE)
    if existing is not None:
        return existing
    return Table(
        AUDIT_TABLE,
        metadata,
        Column("id", id_type(), primary_key=True, autoincrement=True),
        Column("at", UtcDateTime(), nullable=False),
        Column("actor", String(200), nullable=False),
        Column("action", String(32), nullable=False),
        Column("service_name", String(64), nullable=False),
        # The rows acted on as a JSON list of outbox ids ("[]": none matched).
        Column("outbox_ids", Text, nullable=False),
        # What the action was given (filters, reason, counts), as a JSON object.
        Column("detail", Text, nullable=False),
        Column("payload_before", _Payload(), nullable=True),
        Column("payload_after", _Payload(), nullable=True),
        Index("ix_outboxer_audit_at", "at"),
    )


PARKED_TABLE = "outboxer_parked_keys"
"""Keys of ordered services an operator parked: their events wait until released."""


def parked_table(metadata: MetaData) -> Table:
    """The parked keys table in ``metadata`` (built on first use)."""
    existing = metadata.tables.get(PARKED_TABLE)
    if existing is not None:
        return existing
    return Table(
        PARKED_TABLE,
        metadata,
        Column("service_name", String(64), primary_key=True),
        Column("message_key", String(MAX_KEY_CHARS), primary_key=True),
        Column("parked_at", UtcDateTime(), nullable=False),
        Column("actor", String(200), nullable=False),
        Column("reason", Text, nullable=True),
    )


class Tables:
    """The outbox tables of one application, the schema version table, the audit
    table and the parked keys, in one ``MetaData`` (give it to Alembic)."""

    def __init__(self, metadata: MetaData | None = None) -> None:
        self.metadata = metadata if metadata is not None else MetaData()
        self.versions = version_table(self.metadata)
        self.audit = audit_table(self.metadata)
        self.parked = parked_table(self.metadata)

    def own(self, name: str) -> bool:
        """Whether ``name`` is one of outboxer's own tables (not an outbox table)."""
        return name in (VERSION_TABLE, AUDIT_TABLE, PARKED_TABLE)

    def table(self, route: ServiceRoute) -> Table:
        """The table of ``route`` (built on first use): an outbox table, or an inbox
        table for a service consumed here from another database."""
        if route.inbox:
            return inbox_table(route.table_name, self.metadata)
        return outbox_table(route.table_name, self.metadata)

    def forget(self, name: str) -> None:
        """Drop table ``name`` from the metadata (a default route that was replaced)."""
        table = self.metadata.tables.get(name)
        if table is not None and not self.own(name):
            self.metadata.remove(table)
