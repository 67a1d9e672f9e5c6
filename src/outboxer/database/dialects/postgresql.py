"""PostgreSQL (psycopg 3 for both faces; asyncpg when the URL names it).

Timestamps are ``timestamptz`` from ``statement_timestamp()``: not ``now()`` (the
transaction's start, which made a backoff computed late in a long consumer batch
already due at commit) and not ``clock_timestamp()`` (volatile, so the claim could
not use its index). The claim is one ``UPDATE ... RETURNING`` over a ``FOR UPDATE
SKIP LOCKED`` sub-select. Single-instance work (the retention sweep, migrations)
takes a session-level advisory lock, keyed by a hash of its name; it is released
when the session ends, so a crashed holder never keeps it.
"""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql import Executable
from sqlalchemy.types import TypeEngine

from outboxer.database.dialects.base import Dialect


class PostgreSQLDialect(Dialect):
    family = "postgresql"
    backends = ("postgresql", "postgres")
    sync_driver = "psycopg"
    async_driver = "psycopg"
    async_drivers = frozenset({"asyncpg"})

    def now_sql(self) -> str:
        return "statement_timestamp()"

    def now_plus_sql(self, seconds: str) -> str:
        return f"(statement_timestamp() + make_interval(secs => {seconds}))"

    def timestamp_type(self) -> TypeEngine[Any]:
        return postgresql.TIMESTAMP(timezone=True)

    def scratch_options(self) -> dict[str, Any]:
        return {"isolation_level": "AUTOCOMMIT"}

    def drop_database_sql(self, quoted: str) -> str:
        return f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"

    def lock_statement(self, name: str) -> Executable | None:
        return select(func.pg_try_advisory_lock(advisory_key(name)))

    def unlock_statement(self, name: str) -> Executable | None:
        return select(func.pg_advisory_unlock(advisory_key(name)))


def advisory_key(name: str) -> int:
    """A stable signed 64-bit key for an advisory lock name."""
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)
