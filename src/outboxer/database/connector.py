"""The seam between outboxer and a database connection: the connector runs ops.

Everything above the database layer (the store, the publisher, the consumer, the
test helpers) runs its ops through one :class:`Connector`, handed in once through
:class:`~outboxer.store.Storage`; none of them builds a runner or opens a connection
itself. :class:`SQLAlchemyConnector` is today's connector (SQLAlchemy's engines,
sessions and connections). A framework whose connection is not SQLAlchemy's
(Django's cursor) adds one connector: it accepts that framework's transactions,
compiles outboxer's statements with the dialect of its database, performs the
:mod:`~outboxer.database.instructions` of an op, and guards a handler's transaction
as :class:`~outboxer.database.instructions.Invoke` describes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager, nullcontext
from typing import Any, Protocol, TypeVar

from sqlalchemy import Connection, event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

from outboxer.database.dialects import READ_ONLY_OPTION, Dialect, dialect_for
from outboxer.database.engines import Database
from outboxer.database.instructions import Op
from outboxer.database.runner import AsyncRunner, SyncRunner
from outboxer.errors import StoreError, TransactionRequiredError

T = TypeVar("T")

READ_ONLY = {READ_ONLY_OPTION: True}
"""Execution options of a transaction that only reads (SQLite: no write lock)."""
AUTOCOMMIT = {"isolation_level": "AUTOCOMMIT"}
"""Execution options of a one-statement operation that needs no explicit transaction."""


class Connector(Protocol):
    """How outboxer reaches its database: every op runs through one of these.

    ``tx`` is a caller's open transaction (a session or connection of the
    framework's kind): the op joins it and nothing is committed (``savepoint``: the op
    runs inside a SAVEPOINT, so a failing callback leaves ``tx`` usable). Without
    ``tx`` the connector opens a transaction of its own and commits it; ``read_only``
    (the op only reads) and ``single`` (the op is one statement: it may run without
    BEGIN/COMMIT where the dialect allows) are hints; ``commit_if`` decides from the
    op's result whether to commit (False: roll back). ``context()`` names the work in
    errors (service, table); it is called only when there is an error.

    An :class:`~outboxer.database.instructions.Invoke` with ``guard`` runs a handler:
    the connector refuses statements that would end the transaction while it runs, and
    raises :class:`~outboxer.errors.TransactionAbortedError` when the transaction was
    ended anyway.
    """

    dialect: Dialect
    """outboxer's own database."""

    def dialect_of(self, tx: object) -> Dialect:
        """The dialect of a caller's transaction."""
        ...

    def check_sync(self, tx: object) -> None:
        """Refuse (TransactionRequiredError) anything but a synchronous transaction."""
        ...

    def check_async(self, tx: object) -> None:
        """Refuse (TransactionRequiredError) anything but an asynchronous transaction."""
        ...

    def check_tx(self, tx: object) -> None:
        """Refuse (TransactionRequiredError) anything but a transaction of either kind."""
        ...

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
        """Run ``op`` synchronously (callbacks get a synchronous session)."""
        ...

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
        """Run ``op`` on the event loop (async callbacks are awaited; sync ones get a
        synchronous session on the same connection)."""
        ...

    def transaction_of(self, tx: object) -> Any:
        """The object that stands for ``tx``'s transactions (weakly referenceable), the
        same for every face of one session or connection."""
        ...

    def when_ended(
        self, target: Any, committed: Callable[[Any], None], rolled_back: Callable[..., None]
    ) -> None:
        """Call ``committed(target)`` after each commit of ``target``'s transactions
        and ``rolled_back(target, ...)`` after each rollback, for as long as it lives
        (a publish in it wakes this process's relays at commit)."""
        ...

    def writer(self) -> AbstractAsyncContextManager[Any]:
        """Held by this process's loops around each writing transaction they open (a
        single-writer database queues them here, where a stop can interrupt the wait)."""
        ...


class SQLAlchemyConnector:
    """The connector over SQLAlchemy: outboxer's engines (:class:`Database`) for its
    own transactions, and a caller's ``Session``/``Connection`` (sync) or
    ``AsyncSession``/``AsyncConnection`` for theirs."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.dialect = database.dialect

    def dialect_of(self, tx: object) -> Dialect:
        self.check_tx(tx)
        assert isinstance(tx, Session | Connection | AsyncSession | AsyncConnection)
        bind = tx.get_bind() if isinstance(tx, Session | AsyncSession) else tx
        return dialect_for(str(bind.dialect.name))

    def check_sync(self, tx: object) -> None:
        if isinstance(tx, AsyncSession | AsyncConnection):
            raise TransactionRequiredError(
                "this method needs a synchronous Session/Connection; "
                "use the *_async method with an AsyncSession/AsyncConnection"
            )
        if not isinstance(tx, Session | Connection):
            raise TransactionRequiredError(
                f"expected a SQLAlchemy Session or Connection, got {type(tx).__name__}"
            )

    def check_async(self, tx: object) -> None:
        if isinstance(tx, Session | Connection):
            raise TransactionRequiredError(
                "this method needs an AsyncSession/AsyncConnection; "
                "use the method without _async for a synchronous Session/Connection"
            )
        if not isinstance(tx, AsyncSession | AsyncConnection):
            raise TransactionRequiredError(
                f"expected a SQLAlchemy AsyncSession or AsyncConnection, got {type(tx).__name__}"
            )

    def check_tx(self, tx: object) -> None:
        if not isinstance(tx, Session | Connection | AsyncSession | AsyncConnection):
            raise TransactionRequiredError(
                f"expected a SQLAlchemy Session, Connection, AsyncSession or AsyncConnection, "
                f"got {type(tx).__name__}"
            )

    def transaction_of(self, tx: object) -> Any:
        if isinstance(tx, AsyncSession):
            return tx.sync_session
        if isinstance(tx, AsyncConnection):
            return tx.sync_connection
        return tx

    def when_ended(
        self, target: Any, committed: Callable[[Any], None], rolled_back: Callable[..., None]
    ) -> None:
        session = isinstance(target, Session)
        event.listen(target, "after_commit" if session else "commit", committed)
        event.listen(target, "after_soft_rollback" if session else "rollback", rolled_back)

    def writer(self) -> AbstractAsyncContextManager[Any]:
        return self.database.writer()

    def _options(self, read_only: bool, single: bool) -> dict[str, Any]:
        if read_only:
            return READ_ONLY
        if single and self.dialect.autocommit_single_statements:
            # One statement is its own transaction: no BEGIN and COMMIT round trips.
            return AUTOCOMMIT
        return {}

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
            assert isinstance(tx, Session | Connection)
            cm: AbstractContextManager[Any] = tx.begin_nested() if savepoint else nullcontext()
            with cm:
                return SyncRunner(tx).run(op)
        runner: SyncRunner | None = None
        options = self._options(read_only, single)
        try:
            with self.database.sync_engine.connect() as conn:
                if options:
                    conn.execution_options(**options)
                with conn.begin() as own:
                    runner = SyncRunner(conn)
                    out = runner.run(op)
                    if commit_if is not None and not commit_if(out):
                        own.rollback()
                    return out
        except SQLAlchemyError as exc:
            if runner is not None and exc is runner.callback_error:
                raise
            raise StoreError(f"database error: {exc}", **(context() if context else {})) from exc

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
            assert isinstance(tx, AsyncSession | AsyncConnection)
            cm: AbstractAsyncContextManager[Any] = tx.begin_nested() if savepoint else nullcontext()
            async with cm:
                return await AsyncRunner(tx).run(op)
        runner: AsyncRunner | None = None
        options = self._options(read_only, single)
        writer = contextlib.nullcontext() if read_only else self.database.writer()
        try:
            async with writer, self.database.async_engine.connect() as conn:
                if options:
                    await conn.execution_options(**options)
                async with conn.begin() as own:
                    runner = AsyncRunner(conn)
                    out = await runner.run(op)
                    if commit_if is not None and not commit_if(out):
                        await own.rollback()
                    return out
        except SQLAlchemyError as exc:
            if runner is not None and exc is runner.callback_error:
                raise
            raise StoreError(f"database error: {exc}", **(context() if context else {})) from exc
