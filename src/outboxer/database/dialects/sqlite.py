"""SQLite: the embedded default.

Outboxer's own engines run in WAL mode with ``synchronous=NORMAL`` and a busy
timeout, and every writing transaction starts with ``BEGIN IMMEDIATE``: writers are
serialised up front, so a read-then-write transaction never fails with a busy
snapshot, and the claim needs no ``SKIP LOCKED``. Read-only transactions use a
plain ``BEGIN`` so they never wait for the write lock. Timestamps are ISO-8601 text
``YYYY-MM-DD HH:MM:SS.SSS`` (UTC), which compares correctly as text.

Switching a file to WAL is a write that SQLite's busy handler does not cover (the
others start with ``BEGIN IMMEDIATE``, which it does): the switch reads the file
header, then upgrades its read lock to the write lock, and
SQLite answers such an upgrade "database is locked" at once instead of waiting (a
wait could deadlock). Processes that open a fresh file together (workers started by
one supervisor, two ``outboxer migrate``) meet exactly that, so each connection that
loses the race waits for the writer with ``BEGIN IMMEDIATE`` (which does wait, up to
the busy timeout) and switches again; by then the file is in WAL mode, and the switch
only reads.
"""

from __future__ import annotations

import sqlite3
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Insert, Integer, Select, String, Table, event
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import URL
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.types import TypeEngine

from outboxer.database.dialects.base import READ_ONLY_OPTION, Dialect
from outboxer.errors import ConfigurationError

BUSY_TIMEOUT_S = 30.0
TS_FORMAT = "%Y-%m-%d %H:%M:%f"
"""strftime format of a stored timestamp (``%f`` is seconds with milliseconds)."""
PY_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
WAL_SWITCH_TRIES = 100
"""Tries to switch a file to WAL (each after waiting for the writer that was in the
way), within the busy timeout."""


class SQLiteDialect(Dialect):
    family = "sqlite"
    backends = ("sqlite",)
    django_engine = "django.db.backends.sqlite3"
    sync_driver = "pysqlite"
    async_driver = "aiosqlite"
    async_drivers = frozenset({"aiosqlite"})
    skip_locked = False  # one writer at a time: nothing to skip
    single_writer = True
    pre_ping = False  # a file: no server closes an idle connection
    # outboxer's connection settings (BEGIN IMMEDIATE, WAL) are needed: an
    # application's engine only lends its URL.
    borrows_engines = False
    # Its transactions are opened by outboxer (BEGIN IMMEDIATE), and cost no round trip.
    autocommit_single_statements = False

    def check_url(self, url: URL) -> None:
        if url.database in (None, "", ":memory:"):
            raise ConfigurationError(
                "an in-memory SQLite database cannot be shared between outboxer's "
                "connections; use a file, e.g. sqlite:///outbox.db"
            )

    def engine_options(self, url: URL) -> dict[str, Any]:
        return {"connect_args": {"timeout": BUSY_TIMEOUT_S}}

    def tune(self, engine: Engine) -> None:
        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
            # Take transaction control from the driver so SAVEPOINT and BEGIN IMMEDIATE work.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
                switch_to_wal(cursor)
                cursor.execute("PRAGMA synchronous=NORMAL")
            finally:
                cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            # Writers take the lock up front; read-only work must not block them.
            read_only = conn.get_execution_options().get(READ_ONLY_OPTION, False)
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    def in_transaction(self, driver_connection: Any) -> bool | None:
        state = getattr(driver_connection, "in_transaction", None)  # sqlite3 and aiosqlite
        return state if isinstance(state, bool) else None

    def lock_rows(
        self, stmt: Select[Any], *, skip_locked: bool = False, read: bool = False
    ) -> Select[Any]:
        return stmt  # no row locks: the one writer (BEGIN IMMEDIATE) holds the database

    def insert_ignoring_duplicates(self, table: Table, unique: str) -> Insert:
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=[unique])

    def now_sql(self) -> str:
        return f"strftime('{TS_FORMAT}', 'now')"

    def now_plus_sql(self, seconds: str) -> str:
        return f"strftime('{TS_FORMAT}', 'now', printf('%+.3f seconds', {seconds}))"

    def minute_sql(self, timestamp: str) -> str:
        # Stored as TS_FORMAT text: the minute is its first 16 characters.
        return f"substr({timestamp}, 1, 16)"

    def timestamp_type(self) -> TypeEngine[Any]:
        return String(23)

    def to_db_timestamp(self, value: datetime) -> Any:
        return value.astimezone(UTC).strftime(PY_FORMAT)[:23]

    def from_db_timestamp(self, value: Any) -> datetime:
        return (
            parse_timestamp(value) if isinstance(value, str) else super().from_db_timestamp(value)
        )

    def id_type(self) -> TypeEngine[int] | None:
        # SQLite only auto-increments an INTEGER PRIMARY KEY (the rowid alias).
        return Integer()

    @contextmanager
    def scratch_database(self, admin_url: str | URL, name: str) -> Iterator[str]:
        with tempfile.TemporaryDirectory(prefix="outboxer-") as tmp:
            yield f"sqlite:///{Path(tmp) / name}.db"


def switch_to_wal(cursor: Any) -> None:
    """``PRAGMA journal_mode=WAL`` on a DB-API cursor (sqlite3 or SQLAlchemy's aiosqlite
    adapter), waiting for another connection that holds the write lock meanwhile
    (see the module's docstring) instead of failing."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    for attempt in range(1, WAL_SWITCH_TRIES + 1):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or attempt == WAL_SWITCH_TRIES or time.monotonic() > deadline:
                raise
        # Waits under the busy timeout until the writer in the way has committed;
        # the write lock is released at once (a journal mode cannot change inside a
        # transaction).
        cursor.execute("BEGIN IMMEDIATE")
        cursor.execute("ROLLBACK")


def is_busy(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` is SQLite's "database is locked" (``SQLITE_BUSY``)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return int(code) & 0xFF == sqlite3.SQLITE_BUSY
    return "database is locked" in str(exc)


def parse_timestamp(text: str) -> datetime:
    """A stored SQLite timestamp as an aware UTC datetime."""
    return datetime.strptime(text if "." in text else text + ".000", PY_FORMAT).replace(tzinfo=UTC)
