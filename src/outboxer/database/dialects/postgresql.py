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

import asyncio
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import (
    BigInteger,
    Insert,
    Table,
    Text,
    any_,
    bindparam,
    case,
    cast,
    func,
    literal,
    select,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL
from sqlalchemy.sql import ColumnElement, Executable
from sqlalchemy.sql.elements import Grouping
from sqlalchemy.types import TypeEngine

from outboxer.database.dialects.base import (
    CONNECT_TIMEOUT,
    KEEPALIVE_COUNT,
    KEEPALIVE_IDLE,
    KEEPALIVE_INTERVAL,
    TCP_USER_TIMEOUT_MS,
    Dialect,
    transport_socket_fd,
)

LIBPQ_TIMEOUTS: dict[str, Any] = {
    "connect_timeout": CONNECT_TIMEOUT,
    "keepalives": 1,
    "keepalives_idle": KEEPALIVE_IDLE,
    "keepalives_interval": KEEPALIVE_INTERVAL,
    "keepalives_count": KEEPALIVE_COUNT,
    "tcp_user_timeout": TCP_USER_TIMEOUT_MS,
}
"""Connection parameters of psycopg's connections (libpq's names)."""

_CHANNEL_MAX = 63
"""PostgreSQL identifiers (channel names) hold at most 63 bytes."""
_PQ_TRANS_IDLE = 0
"""libpq's PQTRANS_IDLE: connected, not in a transaction block."""


class PostgreSQLDialect(Dialect):
    family = "postgresql"
    backends = ("postgresql", "postgres")
    django_engine = "django.db.backends.postgresql"
    sync_driver = "psycopg"
    async_driver = "psycopg"
    async_drivers = frozenset({"asyncpg"})
    relaxed_commit = "SET LOCAL synchronous_commit TO OFF"
    one_statement_marks = True

    def engine_options(self, url: URL) -> dict[str, Any]:
        if url.get_driver_name() == "asyncpg":
            return {"connect_args": {"timeout": CONNECT_TIMEOUT}}
        # libpq's parameters: a bounded connect, and a silent peer noticed by the
        # kernel (keepalive when idle, TCP_USER_TIMEOUT while data waits for an ACK).
        return {"connect_args": dict(LIBPQ_TIMEOUTS)}

    def connection_failed(self, error: BaseException) -> bool:
        # psycopg: an OperationalError without a SQLSTATE comes from the client side
        # (connect failed, timed out, connection closed), not from the server.
        # (ConnectionTimeout included: a subclass).
        operational = any(c.__name__ == "OperationalError" for c in type(error).__mro__)
        return operational and getattr(error, "sqlstate", "") is None

    def socket_of(self, driver_connection: Any) -> int | None:
        pgconn = getattr(driver_connection, "pgconn", None)  # psycopg, sync and async
        if pgconn is not None:
            return int(pgconn.socket)
        return transport_socket_fd(getattr(driver_connection, "_transport", None))  # asyncpg

    def in_transaction(self, driver_connection: Any) -> bool | None:
        info = getattr(driver_connection, "info", None)  # psycopg, sync and async
        status = getattr(info, "transaction_status", None)
        if status is not None:
            return int(status) != _PQ_TRANS_IDLE
        probe = getattr(driver_connection, "is_in_transaction", None)  # asyncpg
        return bool(probe()) if callable(probe) else None

    def notify(self, channel: str) -> Executable:
        return select(func.pg_notify(literal(channel), ""))

    def with_notice(
        self, insert: Insert, id_column: ColumnElement[int], channel: str
    ) -> Executable:
        # WITH ins AS (INSERT ... RETURNING id) SELECT id, pg_notify(channel, '') FROM
        # ins: the row and the notice in one round trip. The database sends one notice
        # per channel per transaction however many rows it inserted, at commit (none on
        # rollback); a skipped row returns nothing and notifies nobody.
        ins = insert.returning(id_column).cte("ins")
        return select(ins.c[str(id_column.key)], func.pg_notify(literal(channel), ""))

    def notify_channel(self, table: str) -> str | None:
        channel = f"outboxer_{table}"
        if len(channel.encode()) <= _CHANNEL_MAX:
            return channel
        digest = hashlib.sha1(table.encode(), usedforsecurity=False).hexdigest()[:12]
        return f"outboxer_{table[: _CHANNEL_MAX - 22]}_{digest}"

    async def listen(
        self,
        url: URL,
        channels: Sequence[str],
        on_notify: Callable[[str], None],
        on_connected: Callable[[], None],
    ) -> None:
        import psycopg  # noqa: PLC0415 - the postgres extra; asked for only when listening
        from psycopg import sql  # noqa: PLC0415

        conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        connect = psycopg.AsyncConnection.connect(conninfo, autocommit=True, **LIBPQ_TIMEOUTS)
        async with await connect as conn:
            for channel in channels:
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            on_connected()
            while True:
                # A bounded wait, so a connection the server dropped is noticed.
                async for notice in conn.notifies(timeout=10.0):
                    on_notify(notice.channel)
                # A peer that vanished answers nothing: bounded (psycopg cancels the
                # query on timeout, itself bounded), then the caller reconnects.
                await asyncio.wait_for(conn.execute("SELECT 1"), CONNECT_TIMEOUT)

    def in_lock_order(self, table: Table, cond: ColumnElement[bool]) -> ColumnElement[bool]:
        # An UPDATE locks rows in the order it finds them; lock them first, by id.
        locked = select(table.c.id).where(cond).order_by(table.c.id).with_for_update()
        return table.c.id.in_(locked.scalar_subquery())

    def relaxed_condition(self) -> ColumnElement[bool]:
        # set_config(..., true) makes this statement's own transaction commit without
        # waiting for the WAL flush (synchronous_commit is read at commit time).
        return func.set_config("synchronous_commit", "off", True).is_not(None)

    def claim_marking(
        self,
        table: Table,
        cond: ColumnElement[bool],
        order: Sequence[ColumnElement[Any]],
        limit: int,
        values: dict[str, Any],
        columns: Sequence[ColumnElement[Any]],
        marks: tuple[int, int],
    ) -> Executable | None:
        # WITH picked AS (SELECT id, handling ... FOR UPDATE SKIP LOCKED) UPDATE ...
        # FROM picked: the CTE keeps each row's mark from before the UPDATE.
        picked = (
            select(table.c.id, table.c.handling)
            .where(cond)
            .order_by(*order)
            .limit(limit)
            .with_for_update(skip_locked=True)
            .cte("picked")
        )
        alone, in_batch = marks
        count = select(func.count()).select_from(picked).scalar_subquery()
        mark = case((count == 1, alone), else_=in_batch)
        return (
            update(table)
            .where(table.c.id == picked.c.id, self.relaxed_condition())
            .values(**values, handling=case((picked.c.handling == 0, mark), else_=table.c.handling))
            .returning(*columns, picked.c.handling.label("was_handling"))
        )

    def mark_clean(
        self, table: Table, cond: ColumnElement[bool], values: dict[str, Any]
    ) -> Executable | None:
        relaxed = self.relaxed_condition()
        return (
            update(table)
            .where(self.in_lock_order(table, cond), relaxed)
            .values(**values)
            .returning(table.c.id)
        )

    def ids_in(self, column: ColumnElement[int], ids: Sequence[int]) -> ColumnElement[bool]:
        # One array parameter, not one per id: the statement's text is the same for
        # every batch, so the driver converts it once (an IN list of 100 ids was a new
        # statement per batch for psycopg: 9 % of a relay's busy time).
        return column == any_(bindparam(None, list(ids), type_=postgresql.ARRAY(BigInteger)))

    def ids_param(self, column: ColumnElement[int], name: str) -> ColumnElement[bool]:
        return column == any_(bindparam(name, type_=postgresql.ARRAY(BigInteger)))

    def value_by_id(
        self, column: ColumnElement[int], ids: str, values: str, otherwise: ColumnElement[Any]
    ) -> ColumnElement[Any] | None:
        # (values)[array_position(ids, id)], NULL -> otherwise: one text for any batch
        # (a CASE with a branch per row made every batch a new statement for psycopg).
        at = func.array_position(bindparam(ids, type_=postgresql.ARRAY(BigInteger)), column)
        # In parentheses: "$1::TEXT[][i]" would not parse.
        texts = Grouping(cast(bindparam(values), postgresql.ARRAY(Text)))
        return func.coalesce(texts[at], otherwise)

    def insert_ignoring_duplicates(self, table: Table, unique: str) -> Insert:
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=[unique])

    def now_sql(self) -> str:
        return "statement_timestamp()"

    def now_plus_sql(self, seconds: str) -> str:
        return f"(statement_timestamp() + make_interval(secs => {seconds}))"

    def minute_sql(self, timestamp: str) -> str:
        return f"to_char({timestamp} AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI')"

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
