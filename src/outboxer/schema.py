"""The outbox table (one per service route), its indexes, and the database clock.

Every table is built from one column template. Timestamps are always taken from the
database's clock (:func:`db_now`, :func:`db_now_plus`) so many processes on many
hosts agree on what is due, and are stored as UTC:

- PostgreSQL: ``timestamptz`` and ``statement_timestamp()``;
- MySQL/MariaDB: ``DATETIME(6)`` holding UTC and ``UTC_TIMESTAMP(6)``;
- SQLite: ISO-8601 text ``YYYY-MM-DD HH:MM:SS.SSS`` (UTC) from ``strftime('%f')``,
  which sorts and compares correctly as text.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
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
)
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import ColumnElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import TypeDecorator, TypeEngine

from outboxer.routing import index_name, validate_table_name

SQLITE_TS_FORMAT = "%Y-%m-%d %H:%M:%f"
_SQLITE_PY_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
MAX_ERROR_CHARS = 2000


class UtcDateTime(TypeDecorator[datetime]):
    """A UTC timestamp with sub-second precision on every supported database.

    Values read back are timezone-aware (UTC). Naive datetimes given to it are taken
    to be UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(23))
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.TIMESTAMP(timezone=True))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime, got {type(value).__name__}")
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.strftime(_SQLITE_PY_FORMAT)[:23]
        if dialect.name in ("mysql", "mariadb"):
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            text = value if "." in value else value + ".000"
            return datetime.strptime(text, _SQLITE_PY_FORMAT).replace(tzinfo=UTC)
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


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


@compiles(db_now, "postgresql")
def _now_pg(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    # Not now(): that is the transaction's start, and a consumer batch can run long
    # enough for a backoff computed from it to be in the past at commit. Not
    # clock_timestamp() either: it is volatile, so the claim could not use its index.
    return "statement_timestamp()"


@compiles(db_now, "mysql")
@compiles(db_now, "mariadb")
def _now_mysql(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "UTC_TIMESTAMP(6)"


@compiles(db_now, "sqlite")
def _now_sqlite(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    return f"strftime('{SQLITE_TS_FORMAT}', 'now')"


def _seconds_arg(element: db_now_plus, compiler: SQLCompiler, **kw: Any) -> str:
    (arg,) = element.clauses
    return compiler.process(arg, **kw)


@compiles(db_now_plus, "postgresql")
def _plus_pg(element: db_now_plus, compiler: SQLCompiler, **kw: Any) -> str:
    seconds = _seconds_arg(element, compiler, **kw)
    return f"(statement_timestamp() + make_interval(secs => {seconds}))"


@compiles(db_now_plus, "mysql")
@compiles(db_now_plus, "mariadb")
def _plus_mysql(element: db_now_plus, compiler: SQLCompiler, **kw: Any) -> str:
    micros = f"CAST(ROUND({_seconds_arg(element, compiler, **kw)} * 1000000) AS SIGNED)"
    return f"TIMESTAMPADD(MICROSECOND, {micros}, UTC_TIMESTAMP(6))"


@compiles(db_now_plus, "sqlite")
def _plus_sqlite(element: db_now_plus, compiler: SQLCompiler, **kw: Any) -> str:
    modifier = f"printf('%+.3f seconds', {_seconds_arg(element, compiler, **kw)})"
    return f"strftime('{SQLITE_TS_FORMAT}', 'now', {modifier})"


def _id_type() -> TypeEngine[int]:
    # SQLite only auto-increments an INTEGER PRIMARY KEY (the rowid alias).
    return BigInteger().with_variant(Integer(), "sqlite")


def _payload_type() -> TypeEngine[str]:
    # MySQL's TEXT holds 64 KiB; envelopes may be up to the configured limit (1 MB).
    return Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")


def outbox_table(name: str, metadata: MetaData) -> Table:
    """Build (or return the already built) outbox table ``name`` in ``metadata``."""
    validate_table_name(name)
    existing = metadata.tables.get(name)
    if existing is not None:
        return existing
    return Table(
        name,
        metadata,
        Column("id", _id_type(), primary_key=True, autoincrement=True),
        Column("event_type", String(255), nullable=False),
        Column("service_name", String(64), nullable=False),
        Column("topic", String(249), nullable=False),
        Column("message_key", String(255), nullable=False),
        Column("payload", _payload_type(), nullable=False),
        Column("status", String(16), nullable=False),
        Column("retry_count", Integer, nullable=False),
        Column("max_retry", Integer, nullable=False),
        Column("next_retry_at", UtcDateTime(), nullable=True),
        Column("published_at", UtcDateTime(), nullable=True),
        Column("consumed_at", UtcDateTime(), nullable=True),
        Column("last_error", Text, nullable=True),
        Column("created_at", UtcDateTime(), nullable=False),
        Column("updated_at", UtcDateTime(), nullable=False),
        # The claim: status = 'pending' AND next_retry_at <= now ORDER BY next_retry_at, id.
        Index(index_name(name, "due"), "status", "next_retry_at", "id"),
        # Operations: listing/purging by status and age, status counts.
        Index(index_name(name, "status_updated"), "status", "updated_at"),
    )


COLUMNS = (
    "id",
    "event_type",
    "service_name",
    "topic",
    "message_key",
    "payload",
    "status",
    "retry_count",
    "max_retry",
    "next_retry_at",
    "published_at",
    "consumed_at",
    "last_error",
    "created_at",
    "updated_at",
)
