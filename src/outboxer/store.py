"""The outbox state machine: the seed's repository, method for method, sync and async.

All SQL lives in the op functions below (SQLAlchemy Core, no string SQL). Each op
is written once as a generator (see :mod:`outboxer.runner`); :class:`Store` runs it
either in its own transaction or on the caller's (``with_tx``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Insert, Table, and_, bindparam, func, insert, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.sql import ColumnElement

from outboxer.backoff import RetryPolicy
from outboxer.db import READ_ONLY
from outboxer.errors import (
    ConfigurationError,
    InvalidEventError,
    MessageNotFoundError,
    ServiceMismatchError,
    StoreError,
    TransactionRequiredError,
)
from outboxer.models import FINAL_STATUSES, OutboxMessage, Status
from outboxer.routing import ServiceRoute, validate_event_type
from outboxer.runner import AsyncRunner, Callback, Execute, Invoke, Op, SyncRunner
from outboxer.schema import MAX_ERROR_CHARS, db_now, db_now_plus

if TYPE_CHECKING:
    from outboxer.outbox import Outbox

SyncTx = Session | Connection
AsyncTx = AsyncSession | AsyncConnection
DEFAULT_LIMIT = 100
DEFAULT_LEASE = timedelta(seconds=30)


def truncate_error(reason: str) -> str:
    """``reason`` as stored in ``last_error``: its first 2000 characters.

    NUL characters (PostgreSQL text cannot hold them) become ``\\0`` and unpaired
    surrogates (not encodable as UTF-8) a backslash escape, so any exception text can
    be recorded.
    """
    if "\x00" in reason:
        reason = reason.replace("\x00", "\\0")
    try:
        reason.encode()
    except UnicodeEncodeError:
        reason = reason.encode("utf-8", "backslashreplace").decode()
    return reason[:MAX_ERROR_CHARS]


def clean_key(key: object, event_type: str | None = None) -> str:
    """A message key trimmed and checked: a string of at most 255 characters."""
    if not isinstance(key, str):
        raise InvalidEventError(
            f"message key must be a string, got {type(key).__name__}", event_type=event_type
        )
    key = key.strip()
    if len(key) > 255:
        raise InvalidEventError(
            f"message key is longer than 255 characters ({len(key)})", event_type=event_type
        )
    if any(ord(c) < 32 for c in key):
        raise InvalidEventError(
            f"message key {key[:40]!r} contains control characters", event_type=event_type
        )
    try:
        key.encode()
    except UnicodeEncodeError as exc:
        raise InvalidEventError(
            f"message key is not valid Unicode: {exc}", event_type=event_type
        ) from exc
    return key


def lease_seconds(lease: timedelta | float) -> float:
    seconds = lease.total_seconds() if isinstance(lease, timedelta) else float(lease)
    if not seconds > 0:
        raise ConfigurationError(f"lease must be positive, got {lease!r}")
    return seconds


@dataclass(frozen=True, slots=True)
class OpContext:
    """What an op needs to know: the table, the database family, the retry policy."""

    table: Table
    route: ServiceRoute
    family: str
    policy: RetryPolicy

    def ctx(self, **extra: Any) -> dict[str, Any]:
        return {"service": self.route.service_name, "table": self.table.name, **extra}


def _message(row: Any, **replace: Any) -> OutboxMessage:
    return OutboxMessage.from_mapping(row._mapping, **replace)


# --------------------------------------------------------------------------- ops


def _new_rows(t: Table) -> Insert:
    # A new row is pending, has had no attempt and is due now (database clock).
    return insert(t).values(
        status=Status.PENDING.value,
        retry_count=0,
        next_retry_at=db_now(),
        created_at=db_now(),
        updated_at=db_now(),
    )


def op_insert(c: OpContext, values: dict[str, Any]) -> Op[int]:
    """INSERT one row; ``values`` holds every column but id and the timestamps."""
    stmt = _new_rows(c.table).values(**values)
    result = yield Execute(stmt, what="insert", context=c.ctx(event_type=values["event_type"]))
    return int(result.inserted_primary_key[0])


def op_insert_many(c: OpContext, rows: Sequence[dict[str, Any]], chunk: int = 5000) -> Op[None]:
    """INSERT many rows (``values`` as for :func:`op_insert`), ``chunk`` per statement."""
    for lo in range(0, len(rows), chunk):
        yield Execute(
            _new_rows(c.table), list(rows[lo : lo + chunk]), what="insert", context=c.ctx()
        )


def op_get(c: OpContext, outbox_id: int) -> Op[OutboxMessage | None]:
    t = c.table
    result = yield Execute(
        select(t).where(t.c.id == outbox_id), what="get", context=c.ctx(outbox_id=outbox_id)
    )
    row = result.first()
    return None if row is None else _message(row)


def _due(c: OpContext, service_name: str | None) -> ColumnElement[bool]:
    t = c.table
    cond = and_(
        t.c.status == Status.PENDING.value,
        t.c.next_retry_at.is_not(None),
        t.c.next_retry_at <= db_now(),
    )
    if service_name:
        cond = and_(cond, t.c.service_name == service_name)
    return cond


def op_list_due(c: OpContext, limit: int, service_name: str | None) -> Op[list[OutboxMessage]]:
    t = c.table
    stmt = (
        select(t)
        .where(_due(c, service_name))
        .order_by(t.c.next_retry_at, t.c.id)
        .limit(limit if limit > 0 else DEFAULT_LIMIT)
    )
    result = yield Execute(stmt, what="list due", context=c.ctx())
    return [_message(r) for r in result.all()]


def op_claim(
    c: OpContext, limit: int, lease: float, service_name: str | None
) -> Op[list[OutboxMessage]]:
    """Take up to ``limit`` due rows for this worker: push their due time by ``lease``.

    Rows stay ``pending`` and the claim is not an attempt; a worker that dies
    simply lets the lease run out. Concurrent claimers never get the same row:
    PostgreSQL and MySQL/MariaDB skip rows another claimer has locked, SQLite runs
    one writer at a time.
    """
    t = c.table
    order = (t.c.next_retry_at, t.c.id)
    return (yield from _claim(c, limit, _due(c, service_name), order, lease))


def op_claim_unconsumed(c: OpContext, limit: int, older_than: float) -> Op[list[OutboxMessage]]:
    """Take ``published`` rows nobody consumed within ``older_than`` seconds, to send
    them again (a broker that lost acknowledged messages, a topic's retention that
    deleted them before a consumer came). They stay ``published``; the claim moves
    their ``updated_at`` so they are not taken again for another ``older_than``.
    """
    t = c.table
    cond = and_(t.c.status == Status.PUBLISHED.value, t.c.updated_at <= db_now_plus(-older_than))
    return (yield from _claim(c, limit, cond, (t.c.updated_at, t.c.id), None))


def _claim(
    c: OpContext,
    limit: int,
    cond: ColumnElement[bool],
    order: tuple[ColumnElement[Any], ...],
    lease: float | None,
) -> Op[list[OutboxMessage]]:
    t = c.table
    limit = limit if limit > 0 else DEFAULT_LIMIT
    ctx = c.ctx()
    if c.family in ("postgresql", "sqlite"):
        pick = select(t.c.id).where(cond).order_by(*order).limit(limit)
        if c.family == "postgresql":
            pick = pick.with_for_update(skip_locked=True)
        values: dict[str, Any] = {"updated_at": db_now()}
        if lease is not None:
            values["next_retry_at"] = db_now_plus(lease)
        stmt = update(t).where(t.c.id.in_(pick.scalar_subquery())).values(**values).returning(*t.c)
        result = yield Execute(stmt, what="claim", context=ctx)
        return sorted((_message(r) for r in result.all()), key=lambda m: m.id)
    # MySQL/MariaDB: no UPDATE ... RETURNING and no LIMIT in an IN-subquery on the
    # updated table. Lock with SKIP LOCKED, then move exactly those rows.
    columns: list[Any] = [t, db_now().label("_claimed_at")]
    if lease is not None:
        columns.append(db_now_plus(lease).label("_lease_until"))
    locked = (
        select(*columns).where(cond).order_by(*order).limit(limit).with_for_update(skip_locked=True)
    )
    result = yield Execute(locked, what="claim", context=ctx)
    rows = result.all()
    if not rows:
        return []
    claimed_at = rows[0]._claimed_at
    values = {"updated_at": claimed_at}
    if lease is not None:
        values["next_retry_at"] = rows[0]._lease_until
    yield Execute(
        update(t).where(t.c.id.in_([r.id for r in rows])).values(**values),
        what="claim",
        context=ctx,
    )
    return [_message(r, **values) for r in rows]


def op_mark_published(
    c: OpContext, ids: Sequence[int], expect_retry_count: int | None = None
) -> Op[int]:
    """pending -> published; never overwrites consumed or dead.

    ``expect_retry_count`` (the relay passes the value it claimed) also skips rows
    that failed meanwhile, so a consumer's retry is never hidden by a late mark.
    """
    if not ids:
        return 0
    t = c.table
    cond = and_(t.c.id.in_(list(ids)), t.c.status.not_in(FINAL_STATUSES))
    if expect_retry_count is not None:
        cond = and_(cond, t.c.retry_count == expect_retry_count)
    stmt = (
        update(t)
        .where(cond)
        .values(
            status=Status.PUBLISHED.value,
            published_at=db_now(),
            last_error=None,
            next_retry_at=None,
            updated_at=db_now(),
        )
    )
    result = yield Execute(stmt, what="mark published", context=c.ctx(outbox_id=_first(ids)))
    return int(result.rowcount)


def _first(ids: Sequence[int]) -> int | None:
    return ids[0] if len(ids) == 1 else None


def op_mark_consumed(c: OpContext, ids: Sequence[int]) -> Op[int]:
    if not ids:
        return 0
    t = c.table
    stmt = (
        update(t)
        .where(t.c.id.in_(list(ids)))
        .values(
            status=Status.CONSUMED.value,
            consumed_at=db_now(),
            last_error=None,
            next_retry_at=None,
            updated_at=db_now(),
        )
    )
    result = yield Execute(stmt, what="mark consumed", context=c.ctx(outbox_id=_first(ids)))
    return int(result.rowcount)


def op_mark_dead(
    c: OpContext, ids: Sequence[int], reason: str, *, unless_final: bool = False
) -> Op[int]:
    """-> dead (the seed: unconditionally); ``unless_final`` leaves consumed/dead rows."""
    if not ids:
        return 0
    t = c.table
    cond: ColumnElement[bool] = t.c.id.in_(list(ids))
    if unless_final:
        cond = and_(cond, t.c.status.not_in(FINAL_STATUSES))
    stmt = (
        update(t)
        .where(cond)
        .values(
            status=Status.DEAD.value,
            last_error=truncate_error(reason),
            next_retry_at=None,
            updated_at=db_now(),
        )
    )
    result = yield Execute(stmt, what="mark dead", context=c.ctx(outbox_id=_first(ids)))
    return int(result.rowcount)


def op_mark_failed(
    c: OpContext, failures: Sequence[tuple[int, str]]
) -> Op[dict[int, Status | None]]:
    """Record one failed attempt per ``(id, reason)``, under a row lock.

    consumed/dead rows are untouched (``None``); otherwise retry_count + 1 and the
    row becomes ``dead`` when it reaches max_retry, else stays ``pending`` and is due
    again after the policy's backoff. Missing ids are absent from the result.
    """
    if not failures:
        return {}
    t = c.table
    reasons = dict(failures)
    ctx = c.ctx(outbox_id=failures[0][0] if len(failures) == 1 else None)
    result = yield Execute(
        select(t.c.id, t.c.status, t.c.retry_count, t.c.max_retry)
        .where(t.c.id.in_(list(reasons)))
        .with_for_update(),
        what="lock for retry",
        context=ctx,
    )
    outcome: dict[int, Status | None] = {}
    retry_rows: list[dict[str, Any]] = []
    dead_rows: list[dict[str, Any]] = []
    for row in result.all():
        if row.status in FINAL_STATUSES:
            outcome[row.id] = None
            continue
        attempts = row.retry_count + 1
        params = {"_id": row.id, "_rc": attempts, "_err": truncate_error(reasons[row.id])}
        if attempts >= row.max_retry:
            dead_rows.append(params)
            outcome[row.id] = Status.DEAD
        else:
            params["_delay"] = c.policy.delay(attempts)
            retry_rows.append(params)
            outcome[row.id] = Status.PENDING
    base = update(t).where(t.c.id == bindparam("_id"))
    if retry_rows:
        yield Execute(
            base.values(
                status=Status.PENDING.value,
                retry_count=bindparam("_rc"),
                last_error=bindparam("_err"),
                next_retry_at=db_now_plus(bindparam("_delay")),
                updated_at=db_now(),
            ),
            retry_rows,
            what="mark failed for retry",
            context=ctx,
        )
    if dead_rows:
        yield Execute(
            base.values(
                status=Status.DEAD.value,
                retry_count=bindparam("_rc"),
                last_error=bindparam("_err"),
                next_retry_at=None,
                updated_at=db_now(),
            ),
            dead_rows,
            what="mark failed for retry",
            context=ctx,
        )
    return outcome


def op_consume(c: OpContext, outbox_id: int, fn: Callback | None, mark: bool) -> Op[bool]:
    """Lock the row; skip missing/consumed/dead; run ``fn(tx)``; mark consumed.

    Returns True when the callback ran (and, with ``mark``, the row is consumed).
    A callback exception propagates and the caller's transaction rolls back.
    """
    t = c.table
    result = yield Execute(
        select(t.c.status).where(t.c.id == outbox_id).with_for_update(),
        what="lock for consume",
        context=c.ctx(outbox_id=outbox_id),
    )
    row = result.first()
    if row is None or row.status in FINAL_STATUSES:
        return False
    if fn is not None:
        yield Invoke(fn)
    if mark:
        yield from op_mark_consumed(c, [outbox_id])
    return True


def op_requeue(c: OpContext, ids: Sequence[int] | None, status: Status) -> Op[int]:
    """Make rows of ``status`` due now with a fresh retry budget (ops tooling)."""
    t = c.table
    cond = t.c.status == status.value
    if ids is not None:
        cond = and_(cond, t.c.id.in_(list(ids)))
    stmt = (
        update(t)
        .where(cond)
        .values(
            status=Status.PENDING.value,
            retry_count=0,
            next_retry_at=db_now(),
            updated_at=db_now(),
        )
    )
    result = yield Execute(stmt, what="requeue", context=c.ctx())
    return int(result.rowcount)


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    """A service's outbox at a glance (for ``outboxer status`` and dashboards)."""

    service: str
    table: str
    counts: dict[str, int]
    due: int
    oldest_due_seconds: float | None
    """Age of the oldest row that is due now (how far the relay is behind)."""

    @property
    def dead(self) -> int:
        return self.counts.get(Status.DEAD.value, 0)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def op_status(c: OpContext) -> Op[ServiceStatus]:
    t = c.table
    result = yield Execute(
        select(t.c.status, func.count()).group_by(t.c.status), what="status", context=c.ctx()
    )
    counts = {s.value: 0 for s in Status}
    counts.update({row[0]: int(row[1]) for row in result.all()})
    due = _due(c, None)
    result = yield Execute(
        select(func.count(), func.min(t.c.next_retry_at), db_now()).where(due),
        what="status",
        context=c.ctx(),
    )
    n_due, oldest, now = result.one()
    age = None
    if n_due and oldest is not None and now is not None:
        age = max(0.0, (now - oldest).total_seconds())
    return ServiceStatus(c.route.service_name, t.name, counts, int(n_due), age)


# ------------------------------------------------------------------------- faces


def _check_sync(tx: object) -> None:
    if isinstance(tx, AsyncSession | AsyncConnection):
        raise TransactionRequiredError(
            "this method needs a synchronous Session/Connection; "
            "use the *_async method with an AsyncSession/AsyncConnection"
        )
    if not isinstance(tx, Session | Connection):
        raise TransactionRequiredError(
            f"expected a SQLAlchemy Session or Connection, got {type(tx).__name__}"
        )


def _check_async(tx: object) -> None:
    if isinstance(tx, Session | Connection):
        raise TransactionRequiredError(
            "this method needs an AsyncSession/AsyncConnection; "
            "use the method without _async for a synchronous Session/Connection"
        )
    if not isinstance(tx, AsyncSession | AsyncConnection):
        raise TransactionRequiredError(
            f"expected a SQLAlchemy AsyncSession or AsyncConnection, got {type(tx).__name__}"
        )


class Store:
    """The outbox state machine bound to one service route.

    Get one from :meth:`Outbox.store`. Each method opens and commits its own
    transaction, unless the store is bound to the caller's with :meth:`with_tx`
    (then nothing is committed; consume methods run inside a SAVEPOINT so a failing
    callback leaves the caller's transaction usable).
    """

    def __init__(self, outbox: Outbox, route: ServiceRoute, tx: SyncTx | AsyncTx | None = None):
        self._outbox = outbox
        self.route = route
        self._tx = tx
        self._ctx = outbox.op_context(route, tx)

    def with_route(self, route: ServiceRoute | str) -> Store:
        """The same store (and transaction) for another service route."""
        if isinstance(route, str):
            route = self._outbox.routes.route_for_service(route)
        else:
            self._outbox.routes.register_service(
                route.service_name, table=route.table_name, topic=route.topic, group=route.group_id
            )
        return Store(self._outbox, route, self._tx)

    def with_tx(self, tx: SyncTx | AsyncTx) -> Store:
        """The same store writing on the caller's transaction (never committing it)."""
        if not isinstance(tx, Session | Connection | AsyncSession | AsyncConnection):
            raise TransactionRequiredError(
                f"expected a SQLAlchemy Session, Connection, AsyncSession or AsyncConnection, "
                f"got {type(tx).__name__}"
            )
        return Store(self._outbox, self.route, tx)

    @property
    def table(self) -> Table:
        return self._ctx.table

    # -- running

    def _run(self, op: Op[Any], *, savepoint: bool = False, read_only: bool = False) -> Any:
        tx = self._tx
        if tx is None:
            engine = self._outbox.db.sync_engine
            runner: SyncRunner | None = None
            try:
                with engine.connect() as conn:
                    if read_only:
                        conn.execution_options(**READ_ONLY)
                    with conn.begin():
                        runner = SyncRunner(conn)
                        return runner.run(op)
            except SQLAlchemyError as exc:
                if runner is not None and exc is runner.callback_error:
                    raise
                raise StoreError(f"database error: {exc}", **self._ctx.ctx()) from exc
        _check_sync(tx)
        assert isinstance(tx, Session | Connection)
        cm: AbstractContextManager[Any] = tx.begin_nested() if savepoint else nullcontext()
        with cm:
            return SyncRunner(tx).run(op)

    async def _run_async(
        self, op: Op[Any], *, savepoint: bool = False, read_only: bool = False
    ) -> Any:
        tx = self._tx
        if tx is None:
            engine = self._outbox.db.async_engine
            runner: AsyncRunner | None = None
            try:
                async with engine.connect() as conn:
                    if read_only:
                        await conn.execution_options(**READ_ONLY)
                    async with conn.begin():
                        runner = AsyncRunner(conn)
                        return await runner.run(op)
            except SQLAlchemyError as exc:
                if runner is not None and exc is runner.callback_error:
                    raise
                raise StoreError(f"database error: {exc}", **self._ctx.ctx()) from exc
        _check_async(tx)
        assert isinstance(tx, AsyncSession | AsyncConnection)
        cm: AbstractAsyncContextManager[Any] = tx.begin_nested() if savepoint else nullcontext()
        async with cm:
            return await AsyncRunner(tx).run(op)

    # -- building

    def _prepare_create(
        self, event_type: str, message_key: str, payload: Any, max_retry: int
    ) -> dict[str, Any]:
        event_type = validate_event_type(event_type)
        route = self._outbox.routes.resolve_event(event_type)
        if route.service_name != self.route.service_name:
            raise ServiceMismatchError(
                f"event type {event_type!r} belongs to service {route.service_name!r}, "
                f"this store is bound to {self.route.service_name!r}",
                event_type=event_type,
                service=route.service_name,
                store_service=self.route.service_name,
            )
        message_key = clean_key(message_key, event_type)
        if isinstance(max_retry, bool) or not isinstance(max_retry, int):
            raise InvalidEventError(f"max_retry must be an int, got {max_retry!r}")
        if max_retry <= 0:
            max_retry = self._outbox.retry_policy.max_retry
        return self._outbox.row_values(route, event_type, message_key, payload, max_retry)

    # -- the seed's repository, sync face

    def create_message(
        self, event_type: str, message_key: str, payload: Any, max_retry: int = 0
    ) -> int:
        """Insert a pending row; ``max_retry <= 0`` means the outbox default (20)."""
        values = self._prepare_create(event_type, message_key, payload, max_retry)
        return int(self._run(op_insert(self._ctx, values)))

    def get_by_id(self, outbox_id: int) -> OutboxMessage | None:
        return self._run(op_get(self._ctx, outbox_id), read_only=True)  # type: ignore[no-any-return]

    def list_due_messages(
        self, limit: int = DEFAULT_LIMIT, service_name: str | None = None
    ) -> list[OutboxMessage]:
        return self._run(op_list_due(self._ctx, limit, _svc(service_name)), read_only=True)  # type: ignore[no-any-return]

    def claim_due(
        self,
        limit: int = DEFAULT_LIMIT,
        lease: timedelta | float = DEFAULT_LEASE,
        service_name: str | None = None,
    ) -> list[OutboxMessage]:
        """Claim due rows for this worker (see :func:`op_claim`)."""
        op = op_claim(self._ctx, limit, lease_seconds(lease), _svc(service_name))
        return self._run(op)  # type: ignore[no-any-return]

    def claim_unconsumed(self, limit: int, older_than: float) -> list[OutboxMessage]:
        """Published rows not consumed within ``older_than`` seconds (to send again)."""
        return self._run(op_claim_unconsumed(self._ctx, limit, older_than))  # type: ignore[no-any-return]

    def mark_published(self, outbox_id: int) -> None:
        self._run(op_mark_published(self._ctx, [outbox_id]))

    def mark_published_many(
        self, ids: Iterable[int], *, expect_retry_count: int | None = None
    ) -> int:
        return int(self._run(op_mark_published(self._ctx, list(ids), expect_retry_count)))

    def mark_consumed(self, outbox_id: int) -> None:
        self._run(op_mark_consumed(self._ctx, [outbox_id]))

    def mark_dead(self, outbox_id: int, reason: str) -> None:
        self._run(op_mark_dead(self._ctx, [outbox_id], reason))

    def mark_dead_many(self, ids: Iterable[int], reason: str, *, unless_final: bool = False) -> int:
        """Dead letters; ``unless_final`` leaves rows already consumed or dead alone."""
        op = op_mark_dead(self._ctx, list(ids), reason, unless_final=unless_final)
        return int(self._run(op))

    def mark_failed_for_retry(self, outbox_id: int, reason: str) -> Status | None:
        """One failed attempt; returns the new status, ``None`` if consumed/dead."""
        outcome = self._run(op_mark_failed(self._ctx, [(outbox_id, reason)]))
        return self._found(outcome, outbox_id)

    def mark_failed_many(self, failures: Sequence[tuple[int, str]]) -> dict[int, Status | None]:
        return self._run(op_mark_failed(self._ctx, list(failures)))  # type: ignore[no-any-return]

    def consume_and_mark_consumed(
        self, outbox_id: int, fn: Callable[[Session], Any] | None
    ) -> bool:
        """Run ``fn(session)`` and mark the row consumed in one transaction."""
        return bool(self._run(op_consume(self._ctx, outbox_id, fn, True), savepoint=True))

    def consume_in_tx(self, outbox_id: int, fn: Callable[[Session], Any] | None) -> bool:
        """As :meth:`consume_and_mark_consumed` without the mark (caller marks later)."""
        return bool(self._run(op_consume(self._ctx, outbox_id, fn, False), savepoint=True))

    def status(self) -> ServiceStatus:
        """Counts by status, rows due now and the age of the oldest due row."""
        return self._run(op_status(self._ctx), read_only=True)  # type: ignore[no-any-return]

    async def status_async(self) -> ServiceStatus:
        return await self._run_async(op_status(self._ctx), read_only=True)  # type: ignore[no-any-return]

    def requeue(self, ids: Sequence[int] | None = None, *, status: Status = Status.DEAD) -> int:
        return int(self._run(op_requeue(self._ctx, ids, status)))

    # -- async face

    async def create_message_async(
        self, event_type: str, message_key: str, payload: Any, max_retry: int = 0
    ) -> int:
        values = self._prepare_create(event_type, message_key, payload, max_retry)
        return int(await self._run_async(op_insert(self._ctx, values)))

    async def get_by_id_async(self, outbox_id: int) -> OutboxMessage | None:
        return await self._run_async(op_get(self._ctx, outbox_id), read_only=True)  # type: ignore[no-any-return]

    async def list_due_messages_async(
        self, limit: int = DEFAULT_LIMIT, service_name: str | None = None
    ) -> list[OutboxMessage]:
        op = op_list_due(self._ctx, limit, _svc(service_name))
        return await self._run_async(op, read_only=True)  # type: ignore[no-any-return]

    async def claim_due_async(
        self,
        limit: int = DEFAULT_LIMIT,
        lease: timedelta | float = DEFAULT_LEASE,
        service_name: str | None = None,
    ) -> list[OutboxMessage]:
        op = op_claim(self._ctx, limit, lease_seconds(lease), _svc(service_name))
        return await self._run_async(op)  # type: ignore[no-any-return]

    async def claim_unconsumed_async(self, limit: int, older_than: float) -> list[OutboxMessage]:
        op = op_claim_unconsumed(self._ctx, limit, older_than)
        return await self._run_async(op)  # type: ignore[no-any-return]

    async def mark_published_async(self, outbox_id: int) -> None:
        await self._run_async(op_mark_published(self._ctx, [outbox_id]))

    async def mark_published_many_async(
        self, ids: Iterable[int], *, expect_retry_count: int | None = None
    ) -> int:
        op = op_mark_published(self._ctx, list(ids), expect_retry_count)
        return int(await self._run_async(op))

    async def mark_consumed_async(self, outbox_id: int) -> None:
        await self._run_async(op_mark_consumed(self._ctx, [outbox_id]))

    async def mark_dead_async(self, outbox_id: int, reason: str) -> None:
        await self._run_async(op_mark_dead(self._ctx, [outbox_id], reason))

    async def mark_dead_many_async(
        self, ids: Iterable[int], reason: str, *, unless_final: bool = False
    ) -> int:
        op = op_mark_dead(self._ctx, list(ids), reason, unless_final=unless_final)
        return int(await self._run_async(op))

    async def mark_failed_for_retry_async(self, outbox_id: int, reason: str) -> Status | None:
        outcome = await self._run_async(op_mark_failed(self._ctx, [(outbox_id, reason)]))
        return self._found(outcome, outbox_id)

    async def mark_failed_many_async(
        self, failures: Sequence[tuple[int, str]]
    ) -> dict[int, Status | None]:
        return await self._run_async(op_mark_failed(self._ctx, list(failures)))  # type: ignore[no-any-return]

    async def consume_and_mark_consumed_async(self, outbox_id: int, fn: Callback | None) -> bool:
        """Async twin; ``fn`` may be ``async def fn(AsyncSession)`` or ``def fn(Session)``."""
        op = op_consume(self._ctx, outbox_id, fn, True)
        return bool(await self._run_async(op, savepoint=True))

    async def consume_in_tx_async(self, outbox_id: int, fn: Callback | None) -> bool:
        op = op_consume(self._ctx, outbox_id, fn, False)
        return bool(await self._run_async(op, savepoint=True))

    async def requeue_async(
        self, ids: Sequence[int] | None = None, *, status: Status = Status.DEAD
    ) -> int:
        return int(await self._run_async(op_requeue(self._ctx, ids, status)))

    def _found(self, outcome: dict[int, Status | None], outbox_id: int) -> Status | None:
        if outbox_id not in outcome:
            raise MessageNotFoundError(
                "outbox message not found", **self._ctx.ctx(outbox_id=outbox_id)
            )
        return outcome[outbox_id]


def _svc(service_name: str | None) -> str | None:
    if service_name is None:
        return None
    return service_name.strip() or None


def _dialect_name(tx: SyncTx | AsyncTx) -> str:
    bind = tx.get_bind() if isinstance(tx, Session | AsyncSession) else tx
    return str(bind.dialect.name)
