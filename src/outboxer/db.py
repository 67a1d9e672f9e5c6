"""Database URLs, drivers and the engines outboxer opens for itself.

One URL is enough: outboxer derives the synchronous and the asynchronous driver
from it.

=============  ==========================================  =====================
database       URL forms accepted                           drivers used
=============  ==========================================  =====================
SQLite         ``sqlite:///path.db``,                       sqlite3 / aiosqlite
               ``sqlite+aiosqlite:///path.db``
PostgreSQL     ``postgresql://``, ``postgresql+psycopg://``, psycopg 3 (both),
               ``postgresql+psycopg2://``,                  or asyncpg when named
               ``postgresql+asyncpg://``
MySQL/MariaDB  ``mysql://``, ``mariadb://``,                PyMySQL / aiomysql,
               ``mysql+pymysql://``, ``mysql+aiomysql://``, or asyncmy when named
               ``mysql+asyncmy://`` (and the same with
               ``mariadb+``)
=============  ==========================================  =====================

Engines outboxer creates are tuned for the outbox: SQLite runs in WAL mode and
every transaction starts with ``BEGIN IMMEDIATE`` (writers are serialised, so a
read-then-write transaction never fails with a busy snapshot); MySQL/MariaDB run at
``READ COMMITTED`` so the claim's ``SKIP LOCKED`` does not take gap locks that
block concurrent publishers.
"""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from outboxer.errors import ConfigurationError, StoreError

SQLITE_BUSY_TIMEOUT_S = 30.0
READ_ONLY = {"outboxer_read_only": True}
"""Execution options of a transaction that only reads (SQLite: no write lock)."""

_SYNC_DRIVERS = {"sqlite": "pysqlite", "postgresql": "psycopg", "mysql": "pymysql"}
_ASYNC_DRIVERS = {"sqlite": "aiosqlite", "postgresql": "psycopg", "mysql": "aiomysql"}
_KNOWN_ASYNC = {"aiosqlite", "asyncpg", "psycopg", "aiomysql", "asyncmy", "psycopg_async"}


def _family(url: URL) -> str:
    backend = url.get_backend_name()
    if backend in ("mysql", "mariadb"):
        return "mysql"
    if backend in ("postgresql", "postgres"):
        return "postgresql"
    if backend == "sqlite":
        return "sqlite"
    raise ConfigurationError(
        f"unsupported database {backend!r}: use sqlite, postgresql, mysql or mariadb",
        url=url.render_as_string(hide_password=True),
    )


def parse_url(url: str | URL) -> URL:
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise ConfigurationError(f"invalid database URL: {exc}") from exc
    family = _family(parsed)
    if family == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ConfigurationError(
            "an in-memory SQLite database cannot be shared between outboxer's "
            "connections; use a file, e.g. sqlite:///outbox.db"
        )
    return parsed


def _with_driver(url: URL, driver: str) -> URL:
    backend = url.get_backend_name()
    if backend == "postgres":
        backend = "postgresql"
    return url.set(drivername=f"{backend}+{driver}")


def sync_url(url: str | URL) -> URL:
    """The URL with a synchronous driver outboxer supports."""
    parsed = parse_url(url)
    return _with_driver(parsed, _SYNC_DRIVERS[_family(parsed)])


def async_url(url: str | URL) -> URL:
    """The URL with an asynchronous driver (asyncpg/asyncmy kept when named)."""
    parsed = parse_url(url)
    driver = parsed.get_driver_name()
    if driver in ("asyncpg", "asyncmy", "aiosqlite", "aiomysql"):
        return _with_driver(parsed, driver)
    return _with_driver(parsed, _ASYNC_DRIVERS[_family(parsed)])


def safe_url(url: str | URL) -> str:
    """The URL as text with the password masked, for logs and CLI output."""
    return make_url(url).render_as_string(hide_password=True)


def family_of(dialect_name: str) -> str:
    """``sqlite``, ``postgresql`` or ``mysql`` (MariaDB included)."""
    return "mysql" if dialect_name in ("mysql", "mariadb") else dialect_name


def _engine_kwargs(url: URL) -> dict[str, Any]:
    family = _family(url)
    if family == "sqlite":
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    if family == "mysql":
        return {"isolation_level": "READ COMMITTED", "pool_pre_ping": True, "pool_recycle": 3600}
    return {"pool_pre_ping": True}


def _tune_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        # Take transaction control from the driver so SAVEPOINT and BEGIN IMMEDIATE work.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Writers take the lock up front; read-only work must not block them.
        read_only = conn.get_execution_options().get("outboxer_read_only", False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def create_sync_engine(url: str | URL, **kwargs: Any) -> Engine:
    """A synchronous engine for ``url`` with outboxer's tuning."""
    target = sync_url(url)
    engine = create_engine(target, **{**_engine_kwargs(target), **kwargs})
    if engine.dialect.name == "sqlite":
        _tune_sqlite(engine)
    return engine


def create_async(url: str | URL, **kwargs: Any) -> AsyncEngine:
    """An asynchronous engine for ``url`` with outboxer's tuning."""
    target = async_url(url)
    engine = create_async_engine(target, **{**_engine_kwargs(target), **kwargs})
    if engine.dialect.name == "sqlite":
        _tune_sqlite(engine.sync_engine)
    return engine


class Database:
    """The pair of engines (sync and async) outboxer uses for its own work.

    Built from a URL, or from an engine the application already has; the missing
    twin is derived from that engine's URL. Engines given by the application are
    never disposed by outboxer.
    """

    def __init__(self, url_or_engine: str | URL | Engine | AsyncEngine) -> None:
        self._sync: Engine | None = None
        self._async: AsyncEngine | None = None
        self._owns_sync = True
        self._owns_async = True
        self._lock = threading.Lock()
        if isinstance(url_or_engine, Engine | AsyncEngine):
            self.url = url_or_engine.url
            # SQLite needs outboxer's own connection settings (BEGIN IMMEDIATE, WAL),
            # so an application's SQLite engine only lends its URL.
            if url_or_engine.dialect.name != "sqlite":
                if isinstance(url_or_engine, Engine):
                    self._sync, self._owns_sync = url_or_engine, False
                else:
                    self._async, self._owns_async = url_or_engine, False
        else:
            self.url = parse_url(url_or_engine)
        self.family = _family(self.url)

    @property
    def sync_engine(self) -> Engine:
        if self._sync is None:
            with self._lock:  # consumer threads may ask at the same moment
                if self._sync is None:
                    self._sync = create_sync_engine(self.url.render_as_string(hide_password=False))
        return self._sync

    @property
    def async_engine(self) -> AsyncEngine:
        if self._async is None:
            with self._lock:
                if self._async is None:
                    self._async = create_async(self.url.render_as_string(hide_password=False))
        return self._async

    def table_names(self) -> set[str]:
        """Tables that exist in the database (blocking; wrapped driver errors)."""
        try:
            with self.sync_engine.connect() as conn:
                return set(inspect(conn).get_table_names())
        except SQLAlchemyError as exc:
            orig = getattr(exc, "orig", None) or exc
            raise StoreError(f"cannot read the database: {orig}", url=self.safe_url) from exc

    @property
    def safe_url(self) -> str:
        return safe_url(self.url)

    def dispose(self) -> None:
        """Close the pools of the engines outboxer created (sync face)."""
        if self._sync is not None and self._owns_sync:
            self._sync.dispose()
            self._sync = None

    async def dispose_async_only(self) -> None:
        """Close the async pool (its connections belong to the current event loop)."""
        if self._async is not None:
            if self._owns_async:
                await self._async.dispose()
                self._async = None
            else:
                await self._async.dispose(close=False)

    async def dispose_async(self) -> None:
        """Close the pools of every engine outboxer created."""
        await self.dispose_async_only()
        self.dispose()
