"""One implementation of each database operation, two faces (sync and async).

Operations are generators that *yield* what they need done (an
:class:`~outboxer.database.instructions.Execute` of a statement, an
:class:`~outboxer.database.instructions.Invoke` of a caller's callback) and receive
the result. A runner performs the instructions on a synchronous
``Connection``/``Session`` or an asynchronous ``AsyncConnection``/``AsyncSession``.
The logic of the state machine therefore exists once; the faces differ only in how
they wait.

Handlers run guarded: statements that would end the transaction they were given
are refused before they reach the database, and a transaction ended anyway (the
driver's own commit, say) aborts the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import re
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import Dialect as SADialect
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.sql import Executable

from outboxer.database.dialects import dialect_for
from outboxer.database.instructions import Execute, Invoke, Op
from outboxer.errors import HandlerError, StoreError, TransactionAbortedError
from outboxer.handlers import callable_name, is_async_callable

T = TypeVar("T")

SyncCallback = Callable[[Session], Any]
AsyncCallback = Callable[[AsyncSession], Awaitable[Any]]

GUARD_KEY = "outboxer_handler"
"""``Connection.info`` key set while a guarded callback (a handler) runs."""

_LITERALS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*.*?\*/", re.DOTALL)
_ENDS_TRANSACTION = re.compile(
    r"(COMMIT|END|ABORT|ROLLBACK(?!\s+(WORK\s+)?TO\b)|BEGIN|START\s+TRANSACTION"
    r"|SET\s+(SESSION\s+|@@)?AUTOCOMMIT)\b",
    re.IGNORECASE,
)


def ends_transaction(sql: str, dialect_name: str) -> bool:
    """Whether ``sql`` would end (or restart) the open transaction: COMMIT, ROLLBACK
    (not ``ROLLBACK TO SAVEPOINT``), BEGIN, autocommit changes, and the statements a
    database commits implicitly (MySQL DDL). Literals and comments are ignored."""
    dialect = dialect_for(dialect_name)
    for part in _LITERALS.sub("''", sql).split(";"):
        statement = part.strip()
        if statement and (
            _ENDS_TRANSACTION.match(statement) or dialect.implicitly_commits(statement)
        ):
            return True
    return False


def _refuse_transaction_control(
    conn: Connection, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
) -> None:
    handler = conn.info.get(GUARD_KEY)
    if handler is not None and ends_transaction(statement, conn.dialect.name):
        raise HandlerError(
            f"{callable_name(handler)} tried to end the transaction it was given "
            f"({statement.strip()[:60]!r}); "
            "handlers must leave commit and rollback to outboxer (their writes commit with "
            "the consumed mark)"
        )


def install_statement_guard(engine: Engine) -> None:
    """Refuse statements that end the transaction while a handler runs on ``engine``'s
    connections (idempotent; costs one dict lookup per statement otherwise)."""
    if not event.contains(engine, "before_cursor_execute", _refuse_transaction_control):
        event.listen(engine, "before_cursor_execute", _refuse_transaction_control)


_DRIVER_FORMS: weakref.WeakKeyDictionary[
    Executable, weakref.WeakKeyDictionary[SADialect, tuple[str, dict[str, Any]] | None]
] = weakref.WeakKeyDictionary()


def driver_form(
    statement: Executable, dialect: SADialect, options: dict[str, Any]
) -> tuple[str, dict[str, Any]] | None:
    """``statement`` as the driver's SQL text and the values of its constant
    parameters, compiled once per dialect; None where running that text is not the
    same as SQLAlchemy's execution: parameters by position, bind types that convert
    values, parameters rendered at execution (expanding ``IN``), a
    ``schema_translate_map`` among the connection's ``options``."""
    if options.get("schema_translate_map"):
        return None
    forms = _DRIVER_FORMS.get(statement)
    if forms is None:
        forms = _DRIVER_FORMS[statement] = weakref.WeakKeyDictionary()
    if dialect in forms:
        return forms[dialect]
    form: tuple[str, dict[str, Any]] | None = None
    compiled: Any = statement.compile(dialect=dialect)  # type: ignore[attr-defined]
    if (
        dialect.paramstyle in ("pyformat", "named")
        and not compiled.positional
        and getattr(compiled, "_bind_processors", None) == {}
        and not compiled.literal_execute_params
        and not compiled.post_compile_params
    ):
        constants = {
            name: value
            for name, value in compiled.params.items()
            if not compiled.binds[name].required
        }
        form = (compiled.string, constants)
    forms[dialect] = form
    return form


def _as_driver_sql(instr: Execute, conn: Connection) -> tuple[str, dict[str, Any]] | None:
    """``instr`` as the driver's SQL and parameters on ``conn`` (:func:`driver_form`;
    None: run it as SQLAlchemy would)."""
    form = driver_form(instr.statement, conn.dialect, dict(conn.get_execution_options()))
    return None if form is None else (form[0], {**form[1], **instr.params})


def _transaction_probe(conn: Connection) -> Callable[[], bool | None]:
    """Asks what the driver says of ``conn``'s transaction (None: it does not say),
    on its driver connection as it is now: ready to ask again and again (a runner
    asks before and after every handler)."""
    return functools.partial(
        dialect_for(conn.dialect.name).in_transaction, conn.connection.driver_connection
    )


def _db_error(instr: Execute, exc: SQLAlchemyError) -> StoreError:
    orig = getattr(exc, "orig", None) or exc
    return StoreError(f"database error during {instr.what}: {orig}", **instr.context)


def _aborted(exc: BaseException) -> TransactionAbortedError:
    # The savepoint could not be rolled back: the database already aborted the whole
    # transaction (a MySQL/MariaDB deadlock, SQLite out of disk, a callback that
    # rolled back its session). Nothing done in it may be kept or marked.
    return TransactionAbortedError(
        f"the transaction was aborted by the database during a callback: "
        f"{type(exc).__name__}: {exc}"
    )


def _check_still_open(active: bool, fn: Callable[..., Any]) -> None:
    if not active:
        raise _aborted(
            HandlerError(
                f"{callable_name(fn)} committed or rolled back the transaction it was given; "
                "handlers must leave that to outboxer (their writes commit with the "
                "consumed mark)"
            )
        )


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _close(awaitable: Any) -> None:
    close = getattr(awaitable, "close", None)
    if callable(close):
        close()  # no "coroutine was never awaited" warning for a refused result


@contextlib.contextmanager
def _guarded(
    conn: Connection, instr: Invoke, probe: Callable[[], bool | None]
) -> Iterator[list[bool | None]]:
    """While a guarded callback runs: refuse statements that end the transaction, and
    yield what the driver said of the transaction before the callback (``probe``:
    :func:`_transaction_probe` of ``conn``)."""
    if not instr.guard:
        yield [None]
        return
    conn.info[GUARD_KEY] = instr.fn
    try:
        yield [probe()]
    finally:
        conn.info.pop(GUARD_KEY, None)


def _refuse_awaitable(result: Any, fn: Callable[..., Any]) -> None:
    if result is not None and inspect.isawaitable(result):
        _close(result)
        raise HandlerError(
            f"{callable_name(fn)} returned an awaitable: declare it `async def` so "
            "it is awaited (a plain function runs synchronously)"
        )


def _check_transaction(
    session_open: bool,
    conn: Connection,
    fn: Callable[..., Any],
    before: list[bool | None],
    probe: Callable[[], bool | None],
) -> None:
    """After a guarded callback: its session and the database transaction are open.

    The driver's word counts only as a change: MySQL reports a transaction only once
    it has written, so "not in a transaction" before the callback says nothing.
    """
    _check_still_open(session_open, fn)
    if not conn.in_transaction() or (before[0] is True and probe() is False):
        raise _aborted(
            HandlerError(
                f"{callable_name(fn)} ended the database transaction it was given (through "
                "the driver, or a statement the database commits implicitly); what it "
                "committed cannot be undone, the rest of the batch is abandoned"
            )
        )


class SyncRunner:
    """Runs ops on a synchronous Connection or Session."""

    def __init__(self, executor: Connection | Session) -> None:
        self.executor = executor
        self._session = executor if isinstance(executor, Session) else None
        self._owns_session = False
        self.callback_error: BaseException | None = None
        self._guard: tuple[Connection, Callable[[], bool | None]] | None = None
        """The session's connection and its driver's transaction probe, found at the
        first handler of a run and kept for the others (one connection per run)."""

    def session(self) -> Session:
        if self._session is None:
            assert isinstance(self.executor, Connection)
            self._session = Session(
                bind=self.executor, expire_on_commit=False, join_transaction_mode="rollback_only"
            )
            self._owns_session = True
        return self._session

    def _execute(self, instr: Execute) -> Any:
        try:
            if instr.driver:
                conn = (
                    self._session.connection(bind_arguments={"clause": instr.statement})
                    if self._session is not None
                    else self.executor
                )
                assert isinstance(conn, Connection)
                sql = _as_driver_sql(instr, conn)
                if sql is not None:
                    return conn.exec_driver_sql(*sql)
            if self._session is not None:
                return self._session.execute(instr.statement, instr.params)
            return self.executor.execute(instr.statement, instr.params)
        except SQLAlchemyError as exc:
            raise _db_error(instr, exc) from exc

    def _invoke(self, instr: Invoke) -> BaseException | None:
        session = self.session()
        if self._guard is None:
            first = session.connection()
            self._guard = (first, _transaction_probe(first))
        conn, probe = self._guard
        if not instr.savepoint:
            try:
                with _guarded(conn, instr, probe) as before:
                    _refuse_awaitable(instr.fn(*instr.args, session), instr.fn)
                if instr.guard:
                    _check_transaction(session.in_transaction(), conn, instr.fn, before, probe)
                session.flush()
            except TransactionAbortedError:
                raise
            except Exception as exc:
                if instr.capture:  # the op decides; the transaction must not commit
                    return exc
                self.callback_error = exc
                raise
            return None
        nested = session.begin_nested()
        try:
            with _guarded(conn, instr, probe) as before:
                _refuse_awaitable(instr.fn(*instr.args, session), instr.fn)
            _check_still_open(nested.is_active, instr.fn)
            if instr.guard:
                _check_transaction(True, conn, instr.fn, before, probe)
            nested.commit()
        except TransactionAbortedError:
            raise
        except Exception as exc:
            if not nested.is_active:
                raise _aborted(exc) from exc
            try:
                nested.rollback()
            except Exception as lost:
                raise _aborted(exc) from lost
            if instr.capture:
                return exc
            self.callback_error = exc
            raise
        return None

    def run(self, op: Op[T]) -> T:
        try:
            instr = next(op)
            while True:
                if isinstance(instr, Execute):
                    instr = op.send(self._execute(instr))
                else:
                    instr = op.send(self._invoke(instr))
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        finally:
            op.close()
            self._guard = None
            if self._owns_session and self._session is not None:
                self._session.close()
                self._session = None
                self._owns_session = False


class AsyncRunner:
    """Runs ops on an AsyncConnection or AsyncSession."""

    def __init__(self, executor: AsyncConnection | AsyncSession) -> None:
        self.executor = executor
        self._session = executor if isinstance(executor, AsyncSession) else None
        self._owns_session = False
        self.callback_error: BaseException | None = None

    def session(self) -> AsyncSession:
        if self._session is None:
            assert isinstance(self.executor, AsyncConnection)
            self._session = AsyncSession(
                bind=self.executor, expire_on_commit=False, join_transaction_mode="rollback_only"
            )
            self._owns_session = True
        return self._session

    async def _execute(self, instr: Execute) -> Any:
        try:
            if instr.driver:
                conn = (
                    await self._session.connection(bind_arguments={"clause": instr.statement})
                    if self._session is not None
                    else self.executor
                )
                assert isinstance(conn, AsyncConnection)
                assert conn.sync_connection is not None  # a connected AsyncConnection
                sql = _as_driver_sql(instr, conn.sync_connection)
                if sql is not None:
                    return await conn.exec_driver_sql(*sql)
            if self._session is not None:
                return await self._session.execute(instr.statement, instr.params)
            return await self.executor.execute(instr.statement, instr.params)
        except SQLAlchemyError as exc:
            raise _db_error(instr, exc) from exc

    async def _call(self, instr: Invoke, session: AsyncSession) -> None:
        if is_async_callable(instr.fn):
            await instr.fn(*instr.args, session)
            return
        # A sync callback gets a sync Session on the same connection; its database
        # calls run through the async driver and do not block the event loop.
        result = await session.run_sync(lambda sync_session: instr.fn(*instr.args, sync_session))
        if inspect.isawaitable(result):  # a wrapper around an async handler
            await result

    async def _call_handler(self, instr: Invoke, session: AsyncSession) -> None:
        try:
            await self._call(instr, session)
        except asyncio.CancelledError as exc:
            if _being_cancelled():
                raise
            # A handler's own awaited task was cancelled: its failure, not ours.
            raise HandlerError(f"{callable_name(instr.fn)} raised CancelledError") from exc

    async def _invoke(self, instr: Invoke) -> BaseException | None:
        session = self.session()
        conn = (await session.connection()).sync_connection
        assert conn is not None
        probe = _transaction_probe(conn)
        if not instr.savepoint:
            try:
                with _guarded(conn, instr, probe) as before:
                    await self._call_handler(instr, session)
                if instr.guard:
                    _check_transaction(session.in_transaction(), conn, instr.fn, before, probe)
                await session.flush()
            except TransactionAbortedError:
                raise
            except Exception as exc:
                if instr.capture:  # the op decides; the transaction must not commit
                    return exc
                self.callback_error = exc
                raise
            return None
        nested = await session.begin_nested()
        try:
            with _guarded(conn, instr, probe) as before:
                await self._call_handler(instr, session)
            _check_still_open(nested.is_active, instr.fn)
            if instr.guard:
                _check_transaction(True, conn, instr.fn, before, probe)
            await nested.commit()
        except TransactionAbortedError:
            raise
        except Exception as exc:
            if not nested.is_active:
                raise _aborted(exc) from exc
            try:
                await nested.rollback()
            except Exception as lost:
                raise _aborted(exc) from lost
            if instr.capture:
                return exc
            self.callback_error = exc
            raise
        return None

    async def run(self, op: Op[T]) -> T:
        try:
            instr = next(op)
            while True:
                if isinstance(instr, Execute):
                    instr = op.send(await self._execute(instr))
                else:
                    instr = op.send(await self._invoke(instr))
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        finally:
            op.close()
            if self._owns_session and self._session is not None:
                await self._session.close()
                self._session = None
                self._owns_session = False
