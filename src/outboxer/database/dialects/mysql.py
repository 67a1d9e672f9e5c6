"""MariaDB >= 10.6 (PyMySQL / aiomysql; asyncmy when the URL names it), tested; MySQL 8
shares the SQL but is not tested and lacks the ``INSERT ... RETURNING`` that
``publish_many`` uses.

Outboxer's engines run at ``READ COMMITTED``, so the claim's ``SKIP LOCKED`` scan
takes no gap locks that would block concurrent publishers. Timestamps are
``DATETIME(6)`` holding UTC, from ``UTC_TIMESTAMP(6)``. There is no ``UPDATE ...
RETURNING`` and no ``LIMIT`` in an ``IN`` sub-select of the updated table, so the
claim locks the rows with ``SELECT ... FOR UPDATE SKIP LOCKED`` and then updates
exactly those (two statements in one transaction). Single-instance work takes a
named lock (``GET_LOCK(name, 0)``), held by the session and released when it ends;
lock names are server-wide, so callers include the database name in them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Insert, Row, Table, bindparam, func, select, update
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import URL
from sqlalchemy.sql import ColumnElement, Executable
from sqlalchemy.types import TypeEngine

from outboxer.database.dialects.base import CONNECT_TIMEOUT, Dialect, transport_socket_fd
from outboxer.database.instructions import Execute, Op

_SERVER_STATUS_IN_TRANS = 1
# Statements after which MySQL/MariaDB commit the open transaction themselves
# ("Statements That Cause an Implicit Commit"); temporary tables are the exception.
_IMPLICIT_COMMIT = re.compile(
    r"(CREATE|ALTER|DROP|TRUNCATE|RENAME|LOCK|UNLOCK|GRANT|REVOKE|ANALYZE|OPTIMIZE|REPAIR)\b"
    r"(?!\s+TEMPORARY\b)",
    re.IGNORECASE,
)

MAX_LOCK_NAME = 64
_CONNECTION_ERRORS = frozenset({2002, 2003, 2006, 2013, 2055})
"""Client errors of a connection not made or lost: can't connect (socket, TCP),
server gone away, lost connection during query, lost connection (system error)."""


class MySQLDialect(Dialect):
    family = "mysql"
    backends = ("mysql", "mariadb")
    django_engine = "django.db.backends.mysql"
    sync_driver = "pymysql"
    async_driver = "aiomysql"
    async_drivers = frozenset({"aiomysql", "asyncmy"})
    single_statement_claim = False  # lock, then update

    def driver_url(self, url: URL, driver: str) -> URL:
        # mysql or mariadb, as the URL says: SQLAlchemy's MariaDB dialect knows more.
        return url.set(drivername=f"{url.get_backend_name()}+{driver}")

    def engine_options(self, url: URL) -> dict[str, Any]:
        # PyMySQL and aiomysql turn keepalive on for their TCP sockets themselves
        # (SO_KEEPALIVE, the kernel's intervals); connect_timeout bounds the connect.
        return {
            "isolation_level": "READ COMMITTED",
            "pool_recycle": 3600,
            "connect_args": {"connect_timeout": CONNECT_TIMEOUT},
        }

    def connection_failed(self, error: BaseException) -> bool:
        code = error.args[0] if error.args else None
        return code in _CONNECTION_ERRORS

    def socket_of(self, driver_connection: Any) -> int | None:
        sock = getattr(driver_connection, "_sock", None)  # PyMySQL
        if sock is not None:
            return int(sock.fileno())
        writer = getattr(driver_connection, "_writer", None)  # aiomysql, asyncmy
        return transport_socket_fd(getattr(writer, "transport", None))

    def in_transaction(self, driver_connection: Any) -> bool | None:
        status = getattr(driver_connection, "server_status", None)  # PyMySQL, aiomysql
        return bool(status & _SERVER_STATUS_IN_TRANS) if isinstance(status, int) else None

    def implicitly_commits(self, statement: str) -> bool:
        return _IMPLICIT_COMMIT.match(statement) is not None

    def insert_ignoring_duplicates(self, table: Table, unique: str) -> Insert:
        # ON DUPLICATE KEY UPDATE with a no-op, not INSERT IGNORE (which would turn
        # other errors, a value too long say, into warnings).
        stmt = mysql.insert(table)
        return stmt.on_duplicate_key_update({unique: stmt.inserted[unique]})

    snapshot_reads = True

    def inserted_id(self, result: Any) -> int | None:
        # The driver reports a found row as one affected row (CLIENT_FOUND_ROWS), so
        # the row count cannot tell; the last insert id is 0 when nothing was inserted.
        return int(result.lastrowid) or None

    def now_sql(self) -> str:
        return "UTC_TIMESTAMP(6)"

    def now_plus_sql(self, seconds: str) -> str:
        micros = f"CAST(ROUND({seconds} * 1000000) AS SIGNED)"
        return f"TIMESTAMPADD(MICROSECOND, {micros}, UTC_TIMESTAMP(6))"

    def minute_sql(self, timestamp: str) -> str:
        # Stored as UTC DATETIME(6), whose text is 'YYYY-MM-DD HH:MM:SS.ffffff' (no
        # DATE_FORMAT: its '%' would meet the drivers' pyformat parameters).
        return f"SUBSTRING(CAST({timestamp} AS CHAR), 1, 16)"

    def timestamp_type(self) -> TypeEngine[Any]:
        return mysql.DATETIME(fsp=6)

    def to_db_timestamp(self, value: datetime) -> Any:
        return value.astimezone(UTC).replace(tzinfo=None)

    def text_type(self, long: bool) -> TypeEngine[Any] | None:
        # TEXT holds 64 KiB; envelopes may be up to the configured limit (1 MB).
        return mysql.LONGTEXT() if long else None

    def claim(
        self,
        table: Table,
        cond: ColumnElement[bool],
        order: Sequence[ColumnElement[Any]],
        limit: int,
        values: dict[str, Any],
        context: dict[str, Any],
        columns: Sequence[ColumnElement[Any]] | None = None,
        *,
        params: dict[str, Any] | None = None,
        built: dict[str, Any] | None = None,
        relaxed: bool = False,  # no per-statement switch here
    ) -> Op[list[tuple[Row[Any], dict[str, Any]]]]:
        # Read the new values with the locked rows (the clock once), then write them.
        labels = {f"_new_{k}": k for k in values}
        built = {} if built is None else built
        locked = built.get("claim")
        if locked is None:
            locked = built["claim"] = (
                select(
                    *(table.c if columns is None else columns),
                    *(values[k].label(label) for label, k in labels.items()),
                )
                .where(cond)
                .order_by(*order)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            built["set"] = (
                update(table)
                .where(table.c.id.in_(bindparam("claimed_ids", expanding=True)))
                .values(
                    **{k: bindparam(label, type_=table.c[k].type) for label, k in labels.items()}
                )
            )
        result = yield Execute(locked, params, what="claim", context=context)
        rows = result.all()
        if not rows:
            return []
        first = rows[0]._mapping
        concrete = {label: first[label] for label in labels}
        yield Execute(
            built["set"],
            {"claimed_ids": [r.id for r in rows], **concrete},
            what="claim",
            context=context,
        )
        return [(row, {k: concrete[label] for label, k in labels.items()}) for row in rows]

    def lock_statement(self, name: str) -> Executable | None:
        return select(func.get_lock(lock_name(name), 0))

    def unlock_statement(self, name: str) -> Executable | None:
        return select(func.release_lock(lock_name(name)))

    def create_database_sql(self, quoted: str) -> str:
        return f"CREATE DATABASE {quoted} CHARACTER SET utf8mb4"


def lock_name(name: str) -> str:
    """``name`` within MySQL's 64-character limit (a hash keeps long names distinct)."""
    if len(name) <= MAX_LOCK_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return f"{name[: MAX_LOCK_NAME - 17]}~{digest}"
