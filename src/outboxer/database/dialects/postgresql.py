"""PostgreSQL (psycopg 3 for both faces; asyncpg when the URL names it).

Timestamps are ``timestamptz`` from ``statement_timestamp()``: not ``now()`` (the
transaction's start, which made a backoff computed late in a long consumer batch
already due at commit) and not ``clock_timestamp()`` (volatile, so the claim could
not use its index). The claim is one ``UPDATE ... RETURNING`` over a ``FOR UPDATE
SKIP LOCKED`` sub-select.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects import postgresql
from sqlalchemy.types import TypeEngine

from outboxer.database.dialects.base import Dialect

_PQ_TRANS_IDLE = 0
"""libpq's PQTRANS_IDLE: connected, not in a transaction block."""


class PostgreSQLDialect(Dialect):
    family = "postgresql"
    backends = ("postgresql", "postgres")
    sync_driver = "psycopg"
    async_driver = "psycopg"
    async_drivers = frozenset({"asyncpg"})

    def in_transaction(self, driver_connection: Any) -> bool | None:
        info = getattr(driver_connection, "info", None)  # psycopg, sync and async
        status = getattr(info, "transaction_status", None)
        if status is not None:
            return int(status) != _PQ_TRANS_IDLE
        probe = getattr(driver_connection, "is_in_transaction", None)  # asyncpg
        return bool(probe()) if callable(probe) else None

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
