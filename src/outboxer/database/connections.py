"""Dead connections: telling a lost connection from other failures, and bounding
every round trip outboxer's own engines make.

A peer that vanishes without closing (a host that lost power, a firewall that
dropped the flow, a network partition) leaves a connection that neither answers
nor fails: without a bound, a statement or a COMMIT on it waits forever, and so
does the loop that sent it. TCP keepalive and ``TCP_USER_TIMEOUT`` (set by each
dialect's connect arguments) catch a silent peer at the kernel level after tens of
seconds, but not a peer whose TCP stack still answers while the database behind it
does not (a frozen server, a proxy whose upstream is gone). So the engines outboxer
opens for itself carry a :class:`Watchdog`: every statement, COMMIT and ROLLBACK
must answer within ``database_timeout`` seconds, or the watchdog shuts down the
connection's socket. The driver then fails the call as a lost connection (the
socket reads end of file), SQLAlchemy invalidates the connection and its pool, and
the loop goes on with a new one. Shutting the socket down works the same for
every driver, sync or async, and needs no cooperation from the blocked call (a
cancelled query on a silent connection would wait for the cancellation too).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from outboxer.database.dialects import Dialect
from outboxer.errors import ConnectionLostError

logger = logging.getLogger(__name__)

IDLE_TICKS = 60
"""A watchdog's thread ends after this many looks that found no call in flight."""


def connection_lost(exc: BaseException, dialect: Dialect | None = None) -> bool:
    """Whether ``exc`` (or an error it was raised from) is a database connection that
    was lost or could not be made: the driver's error that SQLAlchemy recognised as a
    disconnect, one ``dialect`` knows as a failed connect, or
    :class:`~outboxer.errors.ConnectionLostError`."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionLostError):
            return True
        if isinstance(current, DBAPIError):
            if current.connection_invalidated:
                return True
            orig = current.orig
            if dialect is not None and orig is not None and dialect.connection_failed(orig):
                return True
        current = current.__cause__ or current.__context__
    return False


class Watchdog:
    """Shuts down the socket of a database call that has not answered within
    ``timeout`` seconds (one daemon thread per watchdog, started with the first
    call it watches; it looks at the calls in flight every ``tick`` seconds, so a
    call is cut between ``timeout`` and ``timeout + tick`` seconds)."""

    def __init__(self, timeout: float, socket_of: Callable[[Any], int | None]) -> None:
        self.timeout = timeout
        self.tick = min(1.0, max(timeout / 4, 0.05))
        self._socket_of = socket_of
        self._calls: dict[int, tuple[float, Any, str]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.fired = 0
        """Connections this watchdog cut."""

    @contextlib.contextmanager
    def watch(self, driver_connection: Any, what: str) -> Iterator[None]:
        """Around one call on ``driver_connection`` (a statement, COMMIT, ROLLBACK)."""
        key = self.enter(driver_connection, what)
        try:
            yield
        finally:
            self.leave(key)

    def enter(self, driver_connection: Any, what: str) -> int:
        """A call on ``driver_connection`` begins (:meth:`leave` it once it returned):
        the plain form of :meth:`watch`, for the path every statement takes."""
        key = id(driver_connection)
        with self._lock:
            self._calls[key] = (time.monotonic() + self.timeout, driver_connection, what)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="outboxer-db-watchdog", daemon=True
                )
                self._thread.start()
        return key

    def leave(self, key: int) -> None:
        """The call :meth:`enter` returned ``key`` for has returned: once this
        returns, its socket is not the watchdog's to cut."""
        with self._lock:
            self._calls.pop(key, None)

    def _run(self) -> None:
        idle = 0
        while True:
            time.sleep(self.tick)
            now = time.monotonic()
            with self._lock:
                idle = 0 if self._calls else idle + 1
                if idle >= IDLE_TICKS:  # nothing to watch for a while: the next call
                    self._thread = None  # starts a new thread
                    return
                late = [(k, c, w) for k, (due, c, w) in self._calls.items() if due <= now]
                for key, conn, what in late:
                    del self._calls[key]
                    self._cut(conn, what)

    def _cut(self, driver_connection: Any, what: str) -> None:
        try:
            fd = self._socket_of(driver_connection)
        except Exception:  # noqa: BLE001 - a driver without the attribute: nothing to cut
            fd = None
        if fd is None or fd < 0:
            return
        logger.warning(
            "database %s without an answer for %.0fs; closing its connection",
            what,
            self.timeout,
            extra={"database_timeout": self.timeout},
        )
        self.fired += 1
        try:
            # A duplicate of the descriptor: shutdown acts on the connection itself
            # (the blocked call reads end of file) and the driver still owns its fd.
            with socket.socket(fileno=os.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed


def install_watchdog(engine: Engine, watchdog: Watchdog) -> None:
    """Run every statement, COMMIT and ROLLBACK of ``engine`` (the sync engine, or an
    async engine's ``sync_engine``) under ``watchdog``.

    SQLAlchemy has events before a statement and after it, but none after a COMMIT,
    so the engine's own dialect object (each engine has one) gets wrapped methods.
    """
    dialect: Any = engine.dialect
    if getattr(dialect, "_outboxer_watchdog", None) is not None:
        return
    dialect._outboxer_watchdog = watchdog

    enter, leave = watchdog.enter, watchdog.leave

    def driver(dbapi_connection: Any) -> Any:
        return getattr(dbapi_connection, "driver_connection", None) or dbapi_connection

    def wrap_cursor_call(name: str) -> None:
        original = getattr(dialect, name)

        def call(cursor: Any, *args: Any, **kwargs: Any) -> Any:
            # The driver's connection: an async adapter's cursor holds it as
            # ``_connection``, a driver's own cursor as ``connection``.
            conn = getattr(cursor, "_connection", None) or getattr(cursor, "connection", None)
            key = enter(driver(conn) if conn is not None else cursor, "statement")
            try:
                return original(cursor, *args, **kwargs)
            finally:
                leave(key)

        setattr(dialect, name, call)

    def wrap_connection_call(name: str, what: str) -> None:
        original = getattr(dialect, name)

        def call(dbapi_connection: Any) -> Any:
            with watchdog.watch(driver(dbapi_connection), what):
                return original(dbapi_connection)

        setattr(dialect, name, call)

    for name in ("do_execute", "do_execute_no_params", "do_executemany"):
        wrap_cursor_call(name)
    wrap_connection_call("do_commit", "COMMIT")
    wrap_connection_call("do_rollback", "ROLLBACK")
