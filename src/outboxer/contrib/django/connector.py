"""The connector over Django's own connection: outboxer's ops on ``connections[using]``.

Every statement of an op is compiled by SQLAlchemy for the database behind the Django
alias and executed on the DB-API connection Django holds, so a publish joins the
caller's ``transaction.atomic()`` block and a handler's ORM writes commit with the
consumed mark. SQLAlchemy only borrows that connection: its commit, rollback, close
and per-connection set-up are refused by :class:`_Borrowed`; Django's atomic blocks
alone begin, commit and roll back.

Operations outboxer runs on its own (the relay's claims, the consumer's batches, the
tools) run on a small pool of threads owned by the connector, each with its own
Django connection kept between operations; before each one Django's
``close_if_unusable_or_obsolete`` drops a connection (of any alias the thread opened)
that failed or outlived ``CONN_MAX_AGE``, as Django does between requests, so a
database restart costs the operation in flight and the next one connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

from django.db import (
    Error as DjangoDatabaseError,
)  # every DB-API error Django wraps (InterfaceError too)
from django.db import connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from outboxer.database import migrations
from outboxer.database.dialects import Dialect, dialect_for
from outboxer.database.engines import Database
from outboxer.database.instructions import Execute, Invoke, Op
from outboxer.database.migrations import TablePlan
from outboxer.database.runner import ends_transaction
from outboxer.database.schema import Tables
from outboxer.errors import (
    HandlerError,
    StoreError,
    TransactionAbortedError,
    TransactionRequiredError,
)
from outboxer.handlers import callable_name

T = TypeVar("T")

DRIVERS = {
    "psycopg": "psycopg",
    "psycopg2": "psycopg2",
    "sqlite3": "pysqlite",
    "pymysql": "pymysql",
    "MySQLdb": "mysqldb",
}
"""SQLAlchemy's driver name for the module of a DB-API connection Django holds."""

DRIVER_OPTIONS: dict[str, dict[str, Any]] = {
    # psycopg's type registry wants its own Connection class, not the borrowed one;
    # outboxer's tables have no hstore column.
    "psycopg": {"use_native_hstore": False},
    "psycopg2": {"use_native_hstore": False},
}


@dataclass(frozen=True, slots=True)
class DjangoTransaction:
    """The caller's open ``transaction.atomic()`` block on ``using``: what
    :class:`DjangoConnector` accepts where SQLAlchemy's connector takes a session."""

    using: str = "default"


class _Token:
    """Stands for one publish's transaction until Django runs its commit callbacks."""

    __slots__ = ("__weakref__",)


class _Borrowed:
    """Django's DB-API connection as SQLAlchemy sees it: statements go through;
    ending the transaction, closing and per-connection set-up are left to Django."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        return self._raw.cursor(*args, **kwargs)

    def commit(self) -> None:
        """Django's atomic block commits."""

    def rollback(self) -> None:
        """Django's atomic block rolls back."""

    def close(self) -> None:
        """Django closes its connection."""

    def add_notice_handler(self, handler: Any) -> None:
        """Django's connection keeps its own notice handlers (psycopg)."""

    def character_set_name(self) -> None:
        """Django chose the character set when it connected (MySQL)."""

    def create_function(self, *args: Any, **kwargs: Any) -> None:
        """No SQL functions are added to Django's connection (SQLite)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class DjangoConnector:
    """Runs outboxer's ops on Django's connection for the alias ``using``.

    ``tx`` is a :class:`DjangoTransaction`: the op runs on the calling thread's
    connection, inside its open atomic block (``savepoint``: a nested atomic block).
    Without ``tx`` the op runs on one of the connector's threads inside a
    ``transaction.atomic()`` of its own (``commit_if`` False: marked for rollback).
    Callbacks (handlers) are called with the Django connection as their ``tx``.
    """

    def __init__(self, database: Database, using: str = "default", *, threads: int = 4) -> None:
        self.database = database
        self.using = using
        self.dialect: Dialect = database.dialect
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()
        self._local = threading.local()
        self._threads = 1 if self.dialect.single_writer else threads
        self._pool = ThreadPoolExecutor(
            # One writer at a time on SQLite: one thread, so its writes queue here.
            max_workers=self._threads,
            thread_name_prefix=f"outboxer-django-{using}",
            initializer=self._mark_own_thread,
        )

    # ------------------------------------------------------------------ checks

    def dialect_of(self, tx: object) -> Dialect:
        self.check_tx(tx)
        assert isinstance(tx, DjangoTransaction)
        return dialect_for(connections[tx.using].vendor)

    def check_sync(self, tx: object) -> None:
        if not isinstance(tx, DjangoTransaction):
            raise TransactionRequiredError(
                f"expected the Django transaction of DjangoOutbox.publish, got {type(tx).__name__}"
            )
        if not connections[tx.using].in_atomic_block:
            raise TransactionRequiredError(
                f"publish needs an open transaction.atomic(using={tx.using!r}) block: the "
                "event must commit or roll back with the business writes "
                "(publish(..., autocommit=True) writes it in a transaction of its own)"
            )

    def check_async(self, tx: object) -> None:
        raise TransactionRequiredError(
            "Django's transactions are synchronous: use DjangoOutbox.apublish in async code"
        )

    def check_tx(self, tx: object) -> None:
        self.check_sync(tx)

    # ------------------------------------------------------------------ commit wake-ups

    def transaction_of(self, tx: object) -> Any:
        # One token per publish: Django's commit callbacks fire once.
        return _Token()

    def when_ended(
        self, target: Any, committed: Callable[[Any], None], rolled_back: Callable[..., None]
    ) -> None:
        # Django drops the callback when the block rolls back; the token goes with it.
        transaction.on_commit(lambda: committed(target), using=self.using)

    def writer(self) -> AbstractAsyncContextManager[Any]:
        return self.database.writer()

    # ------------------------------------------------------------------ running

    def run(
        self,
        op: Op[T],
        tx: object = None,
        *,
        savepoint: bool = False,
        read_only: bool = False,
        single: bool = False,
        commit_if: Callable[[T], bool] | None = None,
        context: Callable[[], dict[str, Any]] | None = None,
    ) -> T:
        if tx is not None:
            self.check_sync(tx)
            assert isinstance(tx, DjangoTransaction)
            block = transaction.atomic(using=tx.using) if savepoint else nullcontext()
            with block:
                return self._perform(op, tx.using)
        if getattr(self._local, "own", False):
            return self._own(op, commit_if, context)
        return self._pool.submit(self._own, op, commit_if, context).result()

    async def run_async(
        self,
        op: Op[T],
        tx: object = None,
        *,
        savepoint: bool = False,
        read_only: bool = False,
        single: bool = False,
        commit_if: Callable[[T], bool] | None = None,
        context: Callable[[], dict[str, Any]] | None = None,
    ) -> T:
        if tx is not None:
            self.check_async(tx)
        future = self._pool.submit(self._own, op, commit_if, context)
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        """Close the Django connections of the connector's threads and stop them."""
        # Django closes a connection only on its own thread: one job per thread, held
        # at a barrier so that no thread takes two.
        barrier = threading.Barrier(self._threads)

        def close_mine() -> None:
            try:
                barrier.wait(timeout=30)
            finally:
                connections.close_all()

        jobs = [self._pool.submit(close_mine) for _ in range(self._threads)]
        for job in jobs:
            with contextlib.suppress(threading.BrokenBarrierError):
                job.result()
        self._pool.shutdown(wait=True)

    def plan(self, using: str, tables: Tables) -> list[TablePlan]:
        """What migrating ``tables`` would do, read on Django's connection ``using``
        (inside a migration's transaction, where another connection could wait)."""
        with self._borrowed(using) as sa:
            return migrations.plan_on(sa, tables, migrations.outbox_tables(tables))

    def _mark_own_thread(self) -> None:
        self._local.own = True

    def _own(
        self,
        op: Op[T],
        commit_if: Callable[[T], bool] | None,
        context: Callable[[], dict[str, Any]] | None,
    ) -> T:
        # Django's close_old_connections, between operations as between requests: on
        # every alias this thread opened (handlers may use others than ``using``).
        for opened in connections.all(initialized_only=True):
            if not opened.in_atomic_block:
                opened.close_if_unusable_or_obsolete()
        conn = connections[self.using]
        self._local.callback_error = None
        try:
            with transaction.atomic(using=self.using):
                out = self._perform(op, self.using)
                if commit_if is not None and not commit_if(out):
                    transaction.set_rollback(True, using=self.using)
                elif conn.needs_rollback:
                    # Django would roll the block back on leaving it, silently, while
                    # the op's result says what it wrote.
                    raise TransactionAbortedError(
                        "Django marked the transaction for rollback during the operation; "
                        "nothing of it was kept"
                    )
                return out
        except (DjangoDatabaseError, SQLAlchemyError) as exc:
            conn.errors_occurred = True  # checked (and closed if broken) by the next op
            if exc is self._local.callback_error:
                raise
            raise StoreError(f"database error: {exc}", **(context() if context else {})) from exc
        except StoreError:
            conn.errors_occurred = True
            raise

    def _sqlalchemy(self, conn: BaseDatabaseWrapper) -> Engine:
        if self._engine is None:
            with self._engine_lock:
                if self._engine is None:
                    raw = conn.connection
                    driver = DRIVERS.get(type(raw).__module__.split(".")[0])
                    if driver is None:
                        raise StoreError(
                            f"outboxer cannot use Django's {type(raw).__module__} connections"
                        )
                    self._engine = create_engine(
                        f"{conn.vendor}+{driver}://",
                        creator=self._borrow,
                        poolclass=NullPool,
                        **DRIVER_OPTIONS.get(driver, {}),
                    )
        return self._engine

    def _borrow(self) -> _Borrowed:
        return _Borrowed(connections[self._local.borrowing].connection)

    @contextlib.contextmanager
    def _borrowed(self, using: str) -> Iterator[Connection]:
        conn = connections[using]
        conn.ensure_connection()
        engine = self._sqlalchemy(conn)
        self._local.borrowing = using
        with engine.connect() as sa:
            yield sa

    def _perform(self, op: Op[T], using: str) -> T:
        with self._borrowed(using) as sa:
            try:
                instr = next(op)
                while True:
                    if isinstance(instr, Execute):
                        instr = op.send(self._execute(sa, instr, using))
                    else:
                        instr = op.send(self._invoke(instr, using))
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            finally:
                op.close()

    def _execute(self, sa: Connection, instr: Execute, using: str) -> Any:
        try:
            return sa.execute(instr.statement, instr.params)
        except SQLAlchemyError as exc:
            conn = connections[using]
            if conn.in_atomic_block:
                # As Django does when an ORM write fails in an atomic block: the block
                # (or the savepoint around this op) rolls back, even if the caller
                # catches the error; otherwise MySQL and SQLite would commit the
                # business writes without the event.
                conn.needs_rollback = True
            orig = getattr(exc, "orig", None) or exc
            raise StoreError(
                f"database error during {instr.what}: {orig}", **instr.context
            ) from exc

    def _invoke(self, instr: Invoke, using: str) -> BaseException | None:
        conn = connections[using]
        block = transaction.atomic(using=using) if instr.savepoint else nullcontext()
        try:
            with block, self._guarded(conn, instr):
                result = instr.fn(*instr.args, conn)
                if inspect.isawaitable(result):
                    close = getattr(result, "close", None)
                    if callable(close):
                        close()
                    raise HandlerError(
                        f"{callable_name(instr.fn)} returned an awaitable: Django handlers "
                        "are plain functions"
                    )
                if conn.needs_rollback:
                    # A database error was caught inside the block: Django would roll
                    # the block back at its end, silently. Raised here, it rolls back
                    # the callback's savepoint (or fails the fast path) as an error of
                    # the callback, so its event is not marked consumed.
                    raise HandlerError(
                        f"{callable_name(instr.fn)} left Django's transaction marked for "
                        "rollback (it caught a database error inside the atomic block); "
                        "wrap a write that may fail in a transaction.atomic() of its own"
                    )
            if instr.guard and not conn.in_atomic_block:
                raise HandlerError(f"{callable_name(instr.fn)} ended the transaction it was given")
        except Exception as exc:
            if instr.savepoint and conn.needs_rollback:
                # Django could not roll back to the savepoint (the database aborted the
                # whole transaction: a MariaDB deadlock, say): nothing may be marked.
                raise TransactionAbortedError(
                    "the transaction was aborted by the database during a callback: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            if instr.capture:
                return exc
            self._local.callback_error = exc
            raise
        return None

    @contextlib.contextmanager
    def _guarded(self, conn: BaseDatabaseWrapper, instr: Invoke) -> Iterator[None]:
        if not instr.guard:
            yield
            return
        name = callable_name(instr.fn)
        dialect_name = self.dialect.family

        def refuse(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
            if ends_transaction(sql, dialect_name):
                raise HandlerError(
                    f"{name} tried to end the transaction it was given ({sql.strip()[:60]!r}); "
                    "handlers must leave commit and rollback to outboxer (their writes "
                    "commit with the consumed mark)"
                )
            return execute(sql, params, many, context)

        with conn.execute_wrapper(refuse):
            yield
