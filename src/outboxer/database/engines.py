"""Database URLs, drivers and the engines outboxer opens for itself.

One URL is enough: outboxer derives the synchronous and the asynchronous driver
from it (see each dialect module for the drivers and the tuning of its engines).

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
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DisconnectionError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from outboxer.database.connections import Watchdog, install_watchdog
from outboxer.database.dialects import Dialect, dialect_for
from outboxer.database.runner import install_statement_guard
from outboxer.errors import ConfigurationError, StoreError


def parse_url(url: str | URL) -> URL:
    """``url`` parsed and checked: a supported database that outboxer can share."""
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise ConfigurationError(f"invalid database URL: {exc}") from exc
    dialect_of(parsed).check_url(parsed)
    return parsed


def dialect_of(url: URL) -> Dialect:
    try:
        return dialect_for(url.get_backend_name())
    except ConfigurationError as exc:
        raise ConfigurationError(
            exc.message, url=url.render_as_string(hide_password=True)
        ) from None


def sync_url(url: str | URL) -> URL:
    """The URL with a synchronous driver outboxer supports."""
    parsed = parse_url(url)
    dialect = dialect_of(parsed)
    return dialect.driver_url(parsed, dialect.sync_driver)


def async_url(url: str | URL) -> URL:
    """The URL with an asynchronous driver (asyncpg/asyncmy kept when named)."""
    parsed = parse_url(url)
    dialect = dialect_of(parsed)
    driver = parsed.get_driver_name()
    if driver not in dialect.async_drivers:
        driver = dialect.async_driver
    return dialect.driver_url(parsed, driver)


def safe_url(url: str | URL) -> str:
    """The URL as text with the password masked, for logs and CLI output."""
    return make_url(url).render_as_string(hide_password=True)


def create_sync_engine(
    url: str | URL, *, watchdog: Watchdog | None = None, **kwargs: Any
) -> Engine:
    """A synchronous engine for ``url`` with outboxer's tuning (every call bounded by
    ``watchdog``, when given)."""
    target = sync_url(url)
    dialect = dialect_of(target)
    # The sync engine serves callers (store methods, the CLI) who should not see an
    # error for a connection the server closed: it pings on checkout, except a
    # connection a worker's handler thread returned a moment ago (install_idle_ping).
    # The loops' async engine skips the ping and retries a failed round instead.
    options = dialect.engine_options(target)
    engine = create_engine(target, **{**options, **kwargs})
    if dialect.pre_ping and "pool_pre_ping" not in kwargs:
        install_idle_ping(engine)
    dialect.tune(engine)
    install_statement_guard(engine)
    if watchdog is not None:
        install_watchdog(engine, watchdog)
    return engine


PING_AFTER_IDLE = 1.0
"""Seconds a pooled connection may idle before a worker's handler thread pings it."""

_trusting = threading.local()


@contextlib.contextmanager
def fresh_connections_trusted() -> Iterator[None]:
    """On this thread, for the block: a pooled connection checked in less than
    :data:`PING_AFTER_IDLE` seconds ago is used without a ping (a worker's handler
    thread: a connection that died meanwhile fails its batch, which the worker runs
    again without counting an attempt). Elsewhere every checkout pings."""
    before = getattr(_trusting, "on", False)
    _trusting.on = True
    try:
        yield
    finally:
        _trusting.on = before


def install_idle_ping(engine: Engine, idle: float | None = None) -> None:
    """``pool_pre_ping``, except for a connection checked in less than ``idle``
    seconds ago (default :data:`PING_AFTER_IDLE`) on a thread inside
    :func:`fresh_connections_trusted`.

    A server closes connections (its timeouts, a restart, a proxy, an operator's
    ``pg_terminate_backend``); callers (store methods, the CLI, a worker starting)
    should not see an error for one, so their checkouts ping, as ``pool_pre_ping``
    does. A worker's handler transactions reuse a connection a moment after the
    previous batch returned it; the ping's round trip there was a tenth of the way
    from an event's claim to its handler. A connection found new (never checked in)
    is not pinged either. A ping that finds the connection gone raises
    :class:`~sqlalchemy.exc.DisconnectionError`: the pool replaces the connection and
    checks out again (SQLAlchemy's "pessimistic" disconnect handling).
    """
    dialect = engine.dialect

    @event.listens_for(engine, "checkin")
    def _idle_from(dbapi_connection: Any, record: Any) -> None:
        record.info["outboxer_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idled(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        since = record.info.get("outboxer_idle_since")
        if since is None:
            return  # new: connected for this checkout
        limit = PING_AFTER_IDLE if idle is None else idle
        if getattr(_trusting, "on", False) and time.monotonic() - since < limit:
            return  # a handler thread's, back from use a moment ago
        try:
            dialect.do_ping(dbapi_connection)
        except Exception as exc:
            if dialect.is_disconnect(exc, dbapi_connection, None):  # type: ignore[arg-type]
                raise DisconnectionError(f"connection lost while idle: {exc}") from exc
            raise


def create_async(url: str | URL, *, watchdog: Watchdog | None = None, **kwargs: Any) -> AsyncEngine:
    """An asynchronous engine for ``url`` with outboxer's tuning (every call bounded by
    ``watchdog``, when given)."""
    target = async_url(url)
    dialect = dialect_of(target)
    engine = create_async_engine(target, **{**dialect.engine_options(target), **kwargs})
    dialect.tune(engine.sync_engine)
    install_statement_guard(engine.sync_engine)
    if watchdog is not None:
        install_watchdog(engine.sync_engine, watchdog)
    return engine


class Database:
    """The pair of engines (sync and async) outboxer uses for its own work.

    Built from a URL, or from an engine the application already has; the missing
    twin is derived from that engine's URL. Engines given by the application are
    never disposed by outboxer. ``timeout``: the bound on each statement, COMMIT and
    ROLLBACK of the engines outboxer creates (``database_timeout``; 0: none).
    """

    def __init__(
        self, url_or_engine: str | URL | Engine | AsyncEngine, *, timeout: float = 0.0
    ) -> None:
        self._sync: Engine | None = None
        self._async: AsyncEngine | None = None
        self._owns_sync = True
        self._owns_async = True
        self._writer: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        self._lock = threading.Lock()
        if isinstance(url_or_engine, Engine | AsyncEngine):
            self.url = url_or_engine.url
            # A database that needs outboxer's own connection settings (SQLite's
            # BEGIN IMMEDIATE, WAL) takes only the URL of an application's engine.
            if dialect_of(self.url).borrows_engines:
                if isinstance(url_or_engine, Engine):
                    self._sync, self._owns_sync = url_or_engine, False
                    install_statement_guard(url_or_engine)
                else:
                    self._async, self._owns_async = url_or_engine, False
                    install_statement_guard(url_or_engine.sync_engine)
        else:
            self.url = parse_url(url_or_engine)
        self.dialect = dialect_of(self.url)
        self.watchdog = Watchdog(timeout, self.dialect.socket_of) if timeout > 0 else None
        """Cuts the connection of a call that does not answer within ``timeout``."""

    @property
    def family(self) -> str:
        """``sqlite``, ``postgresql`` or ``mysql`` (MariaDB included)."""
        return self.dialect.family

    @property
    def sync_engine(self) -> Engine:
        if self._sync is None:
            with self._lock:  # consumer threads may ask at the same moment
                if self._sync is None:
                    self._sync = create_sync_engine(
                        self.url.render_as_string(hide_password=False), watchdog=self.watchdog
                    )
        return self._sync

    @property
    def async_engine(self) -> AsyncEngine:
        if self._async is None:
            with self._lock:
                if self._async is None:
                    self._async = create_async(
                        self.url.render_as_string(hide_password=False), watchdog=self.watchdog
                    )
        return self._async

    def table_names(self) -> set[str]:
        """Tables that exist in the database (blocking; wrapped driver errors)."""
        try:
            with self.sync_engine.connect() as conn:
                return set(inspect(conn).get_table_names())
        except SQLAlchemyError as exc:
            orig = getattr(exc, "orig", None) or exc
            raise StoreError(f"cannot read the database: {orig}", url=self.safe_url) from exc

    def writer(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """Held by this process's loops around each writing transaction on a database
        with one writer at a time (``Dialect.single_writer``, SQLite).

        There, a loop that starts a write while another holds the lock waits inside
        the driver (up to the busy timeout), where a stop cannot
        interrupt it. Waiting on this lock instead keeps every wait cancellable. Other
        databases lock rows, not the database: no lock.
        """
        if not self.dialect.single_writer:
            return contextlib.nullcontext()
        loop = asyncio.get_running_loop()
        if self._writer is None or self._writer[0] is not loop:
            self._writer = (loop, asyncio.Lock())  # a lock belongs to one loop
        return self._writer[1]

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
