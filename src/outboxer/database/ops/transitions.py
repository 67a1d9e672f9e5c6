"""The state machine's transitions on one outbox table: read, claim, mark published,
release, mark consumed/dead/failed, consume in the caller's transaction, defer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import (
    Float,
    Integer,
    and_,
    bindparam,
    case,
    select,
    update,
)
from sqlalchemy.sql import ColumnElement, Executable

from outboxer.database.instructions import Callback, Execute, Invoke, Op
from outboxer.database.ops.base import (
    OpContext,
    due_rows,
    hot,
    only_id,
    row_message,
    truncate_error,
)
from outboxer.database.schema import (
    MAX_COORDINATES_CHARS,
    db_now,
    db_now_plus,
)
from outboxer.models import FINAL_STATUSES, OutboxMessage, Status
from outboxer.settings import DEFAULT_BATCH_SIZE


def op_get(c: OpContext, outbox_id: int) -> Op[OutboxMessage | None]:
    t = c.table
    result = yield Execute(
        select(t).where(t.c.id == outbox_id), what="get", context=c.ctx(outbox_id=outbox_id)
    )
    row = result.first()
    return None if row is None else row_message(row)


def op_list_due(c: OpContext, limit: int, service_name: str | None) -> Op[list[OutboxMessage]]:
    t = c.table
    stmt = (
        select(t)
        .where(due_rows(c, service_name))
        .order_by(t.c.next_retry_at, t.c.id)
        .limit(limit if limit > 0 else DEFAULT_BATCH_SIZE)
    )
    result = yield Execute(stmt, what="list due", context=c.ctx())
    return [row_message(r) for r in result.all()]


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
    return (yield from _claim(c, limit, due_rows(c, service_name), order, lease))


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
    values = _claim_values(lease)
    limit = limit if limit > 0 else DEFAULT_BATCH_SIZE
    claimed = yield from c.dialect.claim(c.table, cond, order, limit, values, c.ctx())
    return sorted((row_message(row, **now) for row, now in claimed), key=lambda m: m.id)


def _claim_values(lease: float | ColumnElement[float] | None) -> dict[str, Any]:
    values: dict[str, Any] = {"updated_at": db_now()}
    if lease is not None:
        values["next_retry_at"] = db_now_plus(lease)
    return values


class Claimed(NamedTuple):
    """What the relay needs of a claimed row."""

    id: int
    message_key: str
    payload: str
    retry_count: int
    headers: str | None
    """Propagation headers stored with the row (JSON text), if any."""
    claimed_at: datetime | None = None
    """The row's ``updated_at`` as the claim set it: the relay's published mark
    requires it unchanged, so nothing a consumer did meanwhile is overwritten."""
    marked: bool = False
    """The claim also marked the row as being handled (it had no mark): an
    in-process consumer handling it now need not mark it again."""


def op_claim_to_send(
    c: OpContext,
    limit: int,
    lease: float,
    *,
    relaxed: bool = False,
    marks: tuple[int, int] | None = None,
) -> Op[list[Claimed]]:
    """:func:`op_claim` returning only what the relay sends (no row objects); its
    statements are built once per table and limit (:func:`hot`), the lease a parameter.

    ``relaxed`` (the claim is its own transaction): its commit need not wait for the
    disk. A claim lost with a crashed server only makes its rows due at once instead
    of after the lease; any later durable commit (the consumer's batch, the relay's
    published mark) flushes it first.

    ``marks`` (the handling marks for one row and for several; an in-process relay
    whose consumer is idle): where the dialect can (:meth:`Dialect.claim_marking`),
    the same statement marks the claimed rows as being handled, each row's
    :attr:`Claimed.marked` saying whether it did; elsewhere a plain claim."""
    t = c.table
    limit = limit if limit > 0 else DEFAULT_BATCH_SIZE
    built = hot(c, ("claim to send", limit, relaxed, marks))
    args = built.get("args")
    if args is None:
        cols = (t.c.id, t.c.message_key, t.c.payload, t.c.retry_count, t.c.headers, t.c.updated_at)
        values = _claim_values(bindparam("lease", type_=Float()))
        args = built["args"] = (due_rows(c, None), (t.c.next_retry_at, t.c.id), cols, values)
    cond, order, cols, values = args
    if marks is not None and relaxed:
        marking = built.get("marking")
        if marking is None and not built.get("no marking"):
            marking = c.dialect.claim_marking(t, cond, order, limit, values, cols, marks)
            built["marking"] = marking
            built["no marking"] = marking is None
        if marking is not None:
            result = yield Execute(marking, {"lease": float(lease)}, what="claim", context=c.ctx())
            return sorted(
                Claimed(
                    r.id,
                    r.message_key,
                    r.payload,
                    r.retry_count,
                    r.headers,
                    r.updated_at,
                    r.was_handling == 0,
                )
                for r in result.all()
            )
    claimed = yield from c.dialect.claim(
        t,
        cond,
        order,
        limit,
        values,
        c.ctx(),
        cols,
        params={"lease": float(lease)},
        built=built,
        relaxed=relaxed,
    )
    rows = [
        Claimed(
            r.id,
            r.message_key,
            r.payload,
            r.retry_count,
            r.headers,
            new.get("updated_at", r.updated_at),
        )
        for r, new in claimed
    ]
    rows.sort()
    return rows


def op_mark_published(
    c: OpContext,
    ids: Sequence[int],
    expect_retry_count: int | None = None,
    expect_updated_at: datetime | None = None,
    coordinates: Mapping[int, str] | None = None,
) -> Op[int]:
    """pending -> published; never overwrites consumed or dead.

    ``coordinates`` (outbox id -> where the broker put it) are written by the same
    UPDATE: lineage costs no statement. Where the database has arrays (PostgreSQL)
    they are a parameter beside the ids and the statement is built once
    (:func:`hot`); elsewhere they are a ``CASE`` on the id, built per batch.

    ``expect_retry_count`` (the relay passes the value it claimed) also skips rows
    that failed meanwhile, so a consumer's retry is never hidden by a late mark;
    ``expect_updated_at`` (the claim's stamp) skips rows changed in any way since the
    claim (a consumer that already held the event back behind an earlier one).
    """
    if not ids:
        return 0
    where = {oid: text[:MAX_COORDINATES_CHARS] for oid, text in (coordinates or {}).items() if text}
    params: dict[str, Any] = {"mark_ids": list(ids)}
    if expect_retry_count is not None:
        params["mark_retry_count"] = expect_retry_count
    if expect_updated_at is not None:
        params["mark_claimed_at"] = expect_updated_at
    if where:
        params["mark_coordinates"] = [where.get(oid) for oid in params["mark_ids"]]
    built = hot(c, ("mark published", *sorted(params)))
    stmt = built.get("statement")
    if stmt is None:
        t = c.table
        found = None
        if where:
            found = c.dialect.value_by_id(t.c.id, "mark_ids", "mark_coordinates", t.c.coordinates)
        if where and found is None:
            # No arrays: a CASE for this batch's coordinates, built for this call only.
            del params["mark_coordinates"]
            stmt = _published_mark(c, params, case(where, value=t.c.id, else_=t.c.coordinates))
        else:
            stmt = built["statement"] = _published_mark(c, params, found)
    result = yield Execute(
        stmt, params, what="mark published", context=c.ctx(outbox_id=only_id(ids))
    )
    return int(result.rowcount)


def _published_mark(
    c: OpContext, params: Mapping[str, Any], coordinates: ColumnElement[Any] | None
) -> Executable:
    """The published mark for the guards in ``params`` (their values bound at
    execution), writing ``coordinates`` when given."""
    t = c.table
    values: dict[str, Any] = {
        "status": Status.PUBLISHED.value,
        "published_at": db_now(),
        "last_error": None,
        "next_retry_at": None,
        "updated_at": db_now(),
    }
    if coordinates is not None:
        values["coordinates"] = coordinates
    cond = and_(c.dialect.ids_param(t.c.id, "mark_ids"), t.c.status.not_in(FINAL_STATUSES))
    if "mark_retry_count" in params:
        cond = and_(cond, t.c.retry_count == bindparam("mark_retry_count", type_=Integer()))
    if "mark_claimed_at" in params:
        cond = and_(cond, t.c.updated_at == bindparam("mark_claimed_at", type_=t.c.updated_at.type))
    return update(t).where(c.dialect.in_lock_order(t, cond)).values(**values)


def op_release(c: OpContext, ids: Sequence[int], delay: float, *, unmark: bool = False) -> Op[int]:
    """Give claimed rows back, due again in ``delay`` seconds, without an attempt
    (the transport was down: nothing was sent). Rows no longer pending are left.
    ``unmark``: also clear the handling mark the claim set (no handler ran)."""
    if not ids:
        return 0
    t = c.table
    values: dict[str, Any] = {"next_retry_at": db_now_plus(delay), "updated_at": db_now()}
    if unmark:
        values["handling"] = 0
    stmt = (
        update(t)
        .where(
            c.dialect.in_lock_order(
                t, and_(c.dialect.ids_in(t.c.id, ids), t.c.status == Status.PENDING.value)
            )
        )
        .values(**values)
    )
    result = yield Execute(stmt, what="release", context=c.ctx(outbox_id=only_id(ids)))
    return int(result.rowcount)


def op_mark_consumed(c: OpContext, ids: Sequence[int]) -> Op[int]:
    if not ids:
        return 0
    t = c.table
    stmt = (
        update(t)
        .where(c.dialect.ids_in(t.c.id, ids))
        .values(
            status=Status.CONSUMED.value,
            consumed_at=db_now(),
            last_error=None,
            next_retry_at=None,
            updated_at=db_now(),
            handling=0,
        )
    )
    result = yield Execute(stmt, what="mark consumed", context=c.ctx(outbox_id=only_id(ids)))
    return int(result.rowcount)


def op_mark_dead(
    c: OpContext, ids: Sequence[int], reason: str, *, unless_final: bool = False
) -> Op[int]:
    """-> dead, whatever the status; ``unless_final`` leaves consumed/dead rows alone."""
    if not ids:
        return 0
    t = c.table
    cond: ColumnElement[bool] = c.dialect.ids_in(t.c.id, ids)
    if unless_final:
        cond = and_(cond, t.c.status.not_in(FINAL_STATUSES))
    stmt = (
        update(t)
        .where(c.dialect.in_lock_order(t, cond))
        .values(
            status=Status.DEAD.value,
            last_error=truncate_error(reason),
            next_retry_at=None,
            updated_at=db_now(),
            handling=0,
        )
    )
    result = yield Execute(stmt, what="mark dead", context=c.ctx(outbox_id=only_id(ids)))
    return int(result.rowcount)


class Attempt(NamedTuple):
    """What one recorded failure did to its row."""

    status: Status | None
    """``pending`` (retried later), ``dead``, or None: the row was consumed/dead."""
    attempts: int
    """The row's ``retry_count`` afterwards."""


def op_mark_failed(c: OpContext, failures: Sequence[tuple[int, str]]) -> Op[dict[int, Attempt]]:
    """Record one failed attempt per ``(id, reason)``, under a row lock.

    consumed/dead rows are untouched (status ``None``); otherwise retry_count + 1 and
    the row becomes ``dead`` when it reaches max_retry, else stays ``pending`` and is
    due again after the policy's backoff. Missing ids are absent from the result.
    """
    if not failures:
        return {}
    t = c.table
    reasons = dict(failures)
    ctx = c.ctx(outbox_id=failures[0][0] if len(failures) == 1 else None)
    result = yield Execute(
        c.dialect.lock_rows(
            select(t.c.id, t.c.status, t.c.retry_count, t.c.max_retry)
            .where(c.dialect.ids_in(t.c.id, list(reasons)))
            .order_by(t.c.id)  # the order consumers lock in: no deadlock with them
        ),
        what="lock for retry",
        context=ctx,
    )
    outcome: dict[int, Attempt] = {}
    retry_rows: list[dict[str, Any]] = []
    dead_rows: list[dict[str, Any]] = []
    for row in result.all():
        if row.status in FINAL_STATUSES:
            outcome[row.id] = Attempt(None, row.retry_count)
            continue
        attempts = row.retry_count + 1
        params = {"_id": row.id, "_rc": attempts, "_err": truncate_error(reasons[row.id])}
        if attempts >= row.max_retry:
            dead_rows.append(params)
            outcome[row.id] = Attempt(Status.DEAD, attempts)
        else:
            params["_delay"] = c.policy.delay(attempts)
            retry_rows.append(params)
            outcome[row.id] = Attempt(Status.PENDING, attempts)
    base = update(t).where(t.c.id == bindparam("_id"))
    if retry_rows:
        yield Execute(
            base.values(
                status=Status.PENDING.value,
                retry_count=bindparam("_rc"),
                last_error=bindparam("_err"),
                next_retry_at=db_now_plus(bindparam("_delay")),
                updated_at=db_now(),
                handling=0,
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
                handling=0,
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
        c.dialect.lock_rows(select(t.c.status).where(t.c.id == outbox_id)),
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


def op_defer(c: OpContext, delays: Mapping[int, float]) -> Op[None]:
    """Hold events back without an attempt: pending again, due in their delay (the
    relay sends them again then; an inbox's retry loop picks them up)."""
    t = c.table
    yield Execute(
        update(t)
        .where(
            t.c.id == bindparam("_id"),
            t.c.status != Status.CONSUMED.value,  # not_in: no expanding IN in executemany
            t.c.status != Status.DEAD.value,
            t.c.status != Status.CANCELLED.value,
        )
        .values(
            status=Status.PENDING.value,
            next_retry_at=db_now_plus(bindparam("_delay")),
            updated_at=db_now(),
            handling=0,
        ),
        [{"_id": oid, "_delay": delay} for oid, delay in sorted(delays.items())],
        what="defer",
        context=c.ctx(),
    )
