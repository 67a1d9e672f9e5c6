"""One implementation of each database operation, two faces (sync and async).

Operations are generators that *yield* what they need done (:class:`Execute` a
statement, :class:`Invoke` a caller's callback) and receive the result. A runner
performs the instructions on a synchronous ``Connection``/``Session`` or an
asynchronous ``AsyncConnection``/``AsyncSession``. The logic of the state machine
therefore exists once; the faces differ only in how they wait.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.sql import Executable

from outboxer.errors import HandlerError, StoreError, TransactionAbortedError

T = TypeVar("T")

SyncCallback = Callable[[Session], Any]
AsyncCallback = Callable[[AsyncSession], Awaitable[Any]]
Callback = Callable[..., Any]


@dataclass(slots=True)
class Execute:
    """Run a statement; the op receives the (buffered) result."""

    statement: Executable
    params: Any = None
    what: str = "statement"
    context: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Invoke:
    """Call a callback with a session joined to the op's transaction.

    ``savepoint``: run it inside a SAVEPOINT. ``capture``: an exception does not
    propagate; the op receives it (``None`` on success) and the savepoint is
    rolled back.
    """

    fn: Callback
    args: tuple[Any, ...] = ()
    savepoint: bool = False
    capture: bool = False


Instruction = Execute | Invoke
Op = Generator[Instruction, Any, T]


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


def callable_name(fn: Callable[..., Any]) -> str:
    """A callable's qualified name, for messages."""
    return str(getattr(fn, "__qualname__", None) or repr(fn))


def is_async_callable(fn: Callable[..., Any]) -> bool:
    """True for ``async def`` functions and objects whose ``__call__`` is one."""
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - looking for an async __call__
    return call is not None and inspect.iscoroutinefunction(call)


class SyncRunner:
    """Runs ops on a synchronous Connection or Session."""

    def __init__(self, executor: Connection | Session) -> None:
        self.executor = executor
        self._session = executor if isinstance(executor, Session) else None
        self._owns_session = False
        self.callback_error: BaseException | None = None

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
            if self._session is not None:
                return self._session.execute(instr.statement, instr.params)
            return self.executor.execute(instr.statement, instr.params)
        except SQLAlchemyError as exc:
            raise _db_error(instr, exc) from exc

    def _invoke(self, instr: Invoke) -> BaseException | None:
        session = self.session()
        if not instr.savepoint:
            try:
                instr.fn(*instr.args, session)
                session.flush()
            except Exception as exc:
                self.callback_error = exc
                raise
            return None
        nested = session.begin_nested()
        try:
            result = instr.fn(*instr.args, session)
            if inspect.isawaitable(result):
                _close(result)
                raise HandlerError(
                    f"{callable_name(instr.fn)} returned an awaitable: declare it `async def` so "
                    "it is awaited (a plain function runs synchronously)"
                )
            _check_still_open(nested.is_active, instr.fn)
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

    async def _invoke(self, instr: Invoke) -> BaseException | None:
        session = self.session()
        if not instr.savepoint:
            try:
                await self._call(instr, session)
                await session.flush()
            except Exception as exc:
                self.callback_error = exc
                raise
            return None
        nested = await session.begin_nested()
        try:
            try:
                await self._call(instr, session)
            except asyncio.CancelledError as exc:
                if _being_cancelled():
                    raise
                # A handler's own awaited task was cancelled: its failure, not ours.
                raise HandlerError(f"{callable_name(instr.fn)} raised CancelledError") from exc
            _check_still_open(nested.is_active, instr.fn)
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
