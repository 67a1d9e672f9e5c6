"""The operations tools and the console: find, count, requeue, purge, status,
activity; the operator's changes (requeue, purge, edit) each written with its audit
row in the same transaction, and the audit trail read back."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import (
    Table,
    and_,
    case,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.sql import ColumnElement

from outboxer.database.instructions import Execute, Op
from outboxer.database.ops.base import OpContext, due_rows, row_message, truncate_error
from outboxer.database.ops.writes import op_cancel
from outboxer.database.schema import (
    db_minute,
    db_now,
    db_now_plus,
)
from outboxer.models import (
    Activity,
    AuditEntry,
    BlockedKey,
    OutboxMessage,
    ServiceStatus,
    Status,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class RowFilter:
    """Which rows of a table an operations tool works on (every field optional)."""

    status: Status | None = None
    ids: Sequence[int] | None = None
    event_type: str | None = None
    older_than: float | None = None
    """Last changed (``updated_at``) at least this many seconds ago."""
    newer_than: float | None = None
    """Last changed less than this many seconds ago."""
    after_id: int | None = None
    """Only ids above this one (keyset paging)."""
    before_id: int | None = None
    """Only ids below this one (keyset paging, newest first)."""
    key: str | None = None
    """Only this message key (the ``(message_key, id)`` index)."""
    event_id: str | None = None
    """Only this event id (the unique ``event_id`` column); in an outbox table also
    the outbox id an event published without an id goes out with."""


def _event_id_where(c: OpContext, event_id: str) -> ColumnElement[bool]:
    t = c.table
    cond: ColumnElement[bool] = t.c.event_id == event_id
    if not c.route.inbox and event_id.isdigit() and len(event_id) < 19:
        # An event published without an id goes out with its outbox id.
        cond = or_(cond, and_(t.c.id == int(event_id), t.c.event_id.is_(None)))
    return cond


def _where(c: OpContext, f: RowFilter) -> ColumnElement[bool]:
    t = c.table
    parts: list[ColumnElement[bool]] = []
    if f.key is not None:
        parts.append(t.c.message_key == f.key)
    if f.event_id is not None:
        parts.append(_event_id_where(c, f.event_id))
    if f.before_id is not None:
        parts.append(t.c.id < f.before_id)
    if f.status is not None:
        parts.append(t.c.status == f.status.value)
    if f.ids is not None:
        parts.append(t.c.id.in_(list(f.ids)))
    if f.event_type is not None:
        parts.append(t.c.event_type == f.event_type)
    if f.older_than is not None:
        parts.append(t.c.updated_at <= db_now_plus(-f.older_than))
    if f.newer_than is not None:
        parts.append(t.c.updated_at > db_now_plus(-f.newer_than))
    if f.after_id is not None:
        parts.append(t.c.id > f.after_id)
    return and_(true(), *parts)


def op_find(
    c: OpContext, f: RowFilter, limit: int, newest_first: bool = False
) -> Op[list[OutboxMessage]]:
    """Rows matching ``f`` in id order (``newest_first``: descending), at most
    ``limit`` (ops tooling, read only)."""
    t = c.table
    order = t.c.id.desc() if newest_first else t.c.id
    stmt = select(t).where(_where(c, f)).order_by(order).limit(max(limit, 1))
    result = yield Execute(stmt, what="list", context=c.ctx())
    return [row_message(r) for r in result.all()]


def op_count(c: OpContext, f: RowFilter) -> Op[int]:
    """How many rows match ``f``."""
    stmt = select(func.count()).select_from(c.table).where(_where(c, f))
    result = yield Execute(stmt, what="count", context=c.ctx())
    return int(result.scalar_one())


def op_requeue(
    c: OpContext,
    ids: Sequence[int] | None,
    status: Status,
    *,
    event_type: str | None = None,
    since: float | None = None,
) -> Op[int]:
    """Make rows of ``status`` due now with a fresh retry budget (ops tooling).

    ``ids`` (None: every such row), ``event_type`` and ``since`` (changed within the
    last ``since`` seconds: died recently) narrow the set. The row keeps a note:
    ``requeue_count`` + 1 and ``requeued_at``; ``last_error`` stays until it succeeds.
    """
    t = c.table
    f = RowFilter(status=status, ids=ids, event_type=event_type, newer_than=since)
    stmt = (
        update(t)
        .where(_where(c, f))
        .values(
            status=Status.PENDING.value,
            retry_count=0,
            next_retry_at=db_now(),
            updated_at=db_now(),
            requeue_count=t.c.requeue_count + 1,
            requeued_at=db_now(),
            handling=0,
            crashes=0,
        )
    )
    result = yield Execute(stmt, what="requeue", context=c.ctx())
    return int(result.rowcount)


def op_purge_batch(c: OpContext, f: RowFilter, limit: int, audit: Audit | None = None) -> Op[int]:
    """DELETE up to ``limit`` rows matching ``f`` (retention; one short transaction).

    The ids are picked first (skipping rows other transactions hold where the database
    can) and deleted with the filter repeated, so a row that changed in between is
    kept. Two statements rather than ``DELETE ... LIMIT``: MySQL allows no ``LIMIT``
    in an ``IN`` sub-select, PostgreSQL no ``LIMIT`` on ``DELETE``. With ``audit``
    (an operator's purge, not the sweep) the batch writes its audit row.
    """
    t = c.table
    cond = _where(c, f)
    pick = select(t.c.id).where(cond).order_by(t.c.updated_at).limit(max(limit, 1))
    pick = c.dialect.lock_rows(pick, skip_locked=True)
    result = yield Execute(pick, what="purge", context=c.ctx())
    ids = list(result.scalars().all())
    if not ids:
        return 0
    result = yield Execute(
        delete(t).where(and_(t.c.id.in_(ids), cond)), what="purge", context=c.ctx()
    )
    deleted = int(result.rowcount)
    if audit is not None and deleted:
        # Rows that changed between the pick and the delete were kept; the trail
        # names the ids picked and the count deleted.
        detail = {**audit.detail, "deleted": deleted}
        yield from op_write_audit(c, Audit(audit.actor, "purge", detail), ids)
    return deleted


RATE_WINDOW = 60.0
"""Seconds over which ``op_status`` counts recent throughput."""


def op_status(c: OpContext, rates: bool = False) -> Op[ServiceStatus]:
    """Counts by status, rows due now and the oldest due row's age; with ``rates``
    also the rows published and consumed in the last minute (two index range scans
    on ``(status, updated_at)``)."""
    t = c.table
    result = yield Execute(
        select(t.c.status, func.count()).group_by(t.c.status), what="status", context=c.ctx()
    )
    counts = {s.value: 0 for s in Status}
    counts.update({row[0]: int(row[1]) for row in result.all()})
    due = due_rows(c, None)
    result = yield Execute(
        select(func.count(), func.min(t.c.next_retry_at), db_now()).where(due),
        what="status",
        context=c.ctx(),
    )
    n_due, oldest, now = result.one()
    # Scheduled rows are read on the claim index's range of pending rows not due.
    result = yield Execute(
        select(func.count()).where(
            t.c.status == Status.PENDING.value,
            t.c.next_retry_at > db_now(),
            t.c.deliver_at > db_now(),
        ),
        what="status",
        context=c.ctx(),
    )
    scheduled = int(result.scalar_one())
    age = None
    if n_due and oldest is not None and now is not None:
        age = max(0.0, (now - oldest).total_seconds())
    published = consumed = None
    if rates:
        since = db_now_plus(-RATE_WINDOW)
        recent = t.c.updated_at > since
        # Handed over in the window: published then (published_at), or consumed in
        # process without a published state (the local transport: consumed_at).
        sent = func.coalesce(t.c.published_at, t.c.consumed_at) > since
        done = (Status.PUBLISHED.value, Status.CONSUMED.value)
        result = yield Execute(
            select(
                func.count(case((sent, 1))),
                func.count(case((t.c.status == Status.CONSUMED.value, 1))),
            ).where(t.c.status.in_(done), recent),
            what="status",
            context=c.ctx(),
        )
        published, consumed = (int(n) for n in result.one())
    return ServiceStatus(
        c.route.service_name,
        t.name,
        counts,
        int(n_due),
        age,
        published,
        consumed,
        scheduled=scheduled,
    )


def op_activity(c: OpContext, minutes: int) -> Op[Activity]:
    """Rows published, consumed and failed in each of the last ``minutes`` UTC
    minutes (the current one included), grouped by the database, reading only the
    index range ``(status, updated_at > now - minutes)``.

    A row is counted by its latest change: "failed" is a row whose last attempt
    failed in that minute (dead, or pending again with attempts spent); a published
    row is counted at ``published_at`` (or ``consumed_at`` when the in-process
    transport consumed it without publishing)."""
    t = c.table
    since = db_now_plus(-60.0 * minutes)
    recent = and_(t.c.status.in_([s.value for s in Status]), t.c.updated_at > since)
    consumed = t.c.status == Status.CONSUMED.value
    failed = or_(
        t.c.status == Status.DEAD.value,
        and_(t.c.status == Status.PENDING.value, t.c.retry_count > 0),
    )
    changed = db_minute(t.c.updated_at).label("minute")
    result = yield Execute(
        select(changed, func.count(case((consumed, 1))), func.count(case((failed, 1))))
        .where(recent)
        .group_by(changed),
        what="activity",
        context=c.ctx(),
    )
    by_change = {row[0]: (int(row[1]), int(row[2])) for row in result.all()}
    sent_at = func.coalesce(t.c.published_at, t.c.consumed_at)
    sent = db_minute(sent_at).label("minute")
    result = yield Execute(
        select(sent, func.count(), db_now())
        .where(recent, t.c.status.in_(SENT_STATUSES), sent_at > since)
        .group_by(sent),
        what="activity",
        context=c.ctx(),
    )
    rows = result.all()
    by_sent = {row[0]: int(row[1]) for row in rows}
    if rows:
        now = rows[0][2]
    else:
        now = (yield Execute(select(db_now()), what="activity", context=c.ctx())).scalar_one()
    last = now.replace(second=0, microsecond=0)
    labels = [last - timedelta(minutes=minutes - 1 - i) for i in range(minutes)]
    keys = [m.strftime("%Y-%m-%d %H:%M") for m in labels]
    return Activity(
        minutes=labels,
        published=[by_sent.get(k, 0) for k in keys],
        consumed=[by_change.get(k, (0, 0))[0] for k in keys],
        failed=[by_change.get(k, (0, 0))[1] for k in keys],
    )


SENT_STATUSES = (Status.PUBLISHED.value, Status.CONSUMED.value)


@dataclass(frozen=True, slots=True)
class Audit:
    """Who does what, to be written with the change it describes."""

    actor: str
    action: str
    detail: Mapping[str, Any]


def op_write_audit(
    c: OpContext,
    audit: Audit,
    ids: Sequence[int],
    *,
    before: str | None = None,
    after: str | None = None,
) -> Op[None]:
    """Insert the audit row of an action on ``ids`` of ``c``'s service (run inside
    the action's own transaction, so both commit or neither)."""
    if c.audit is None:
        raise RuntimeError("the op context has no audit table")
    stmt = insert(c.audit).values(
        at=db_now(),
        actor=audit.actor[:200],
        action=audit.action,
        service_name=c.route.service_name,
        outbox_ids=json.dumps(sorted(ids)),
        detail=json.dumps(dict(audit.detail), sort_keys=True, default=str),
        payload_before=before,
        payload_after=after,
    )
    yield Execute(stmt, what="audit", context=c.ctx())


def _requeued() -> dict[str, Any]:
    return {
        "status": Status.PENDING.value,
        "retry_count": 0,
        "next_retry_at": db_now(),
        "updated_at": db_now(),
        "requeued_at": db_now(),
        "handling": 0,
        "crashes": 0,
    }


def op_requeue_audited(
    c: OpContext,
    ids: Sequence[int] | None,
    status: Status,
    audit: Audit,
    *,
    event_type: str | None = None,
    since: float | None = None,
) -> Op[int]:
    """:func:`op_requeue` by an operator: the rows are locked and named first, then
    requeued by id, and the audit row lists them, all in one transaction."""
    t = c.table
    f = RowFilter(status=status, ids=ids, event_type=event_type, newer_than=since)
    pick = c.dialect.lock_rows(select(t.c.id).where(_where(c, f)).order_by(t.c.id))
    result = yield Execute(pick, what="requeue", context=c.ctx())
    chosen = list(result.scalars().all())
    if not chosen:
        return 0
    stmt = (
        update(t)
        .where(t.c.id.in_(chosen), t.c.status == status.value)
        .values(requeue_count=t.c.requeue_count + 1, **_requeued())
    )
    result = yield Execute(stmt, what="requeue", context=c.ctx())
    done = int(result.rowcount)
    yield from op_write_audit(c, audit, chosen)
    return done


def op_edit(c: OpContext, outbox_id: int, payload: str, audit: Audit) -> Op[OutboxMessage | None]:
    """Replace the stored envelope of dead letter ``outbox_id`` with ``payload`` (the
    checked, encoded envelope) and requeue it; the audit row keeps the envelope
    before and after. None when the row is not (or no longer) dead."""
    t = c.table
    pick = c.dialect.lock_rows(
        select(t).where(t.c.id == outbox_id, t.c.status == Status.DEAD.value)
    )
    result = yield Execute(pick, what="edit", context=c.ctx(outbox_id=outbox_id))
    row = result.first()
    if row is None:
        return None
    before = row_message(row)
    stmt = (
        update(t)
        .where(t.c.id == outbox_id, t.c.status == Status.DEAD.value)
        .values(payload=payload, requeue_count=t.c.requeue_count + 1, **_requeued())
    )
    yield Execute(stmt, what="edit", context=c.ctx(outbox_id=outbox_id))
    yield from op_write_audit(c, audit, [outbox_id], before=before.payload, after=payload)
    result = yield Execute(select(t).where(t.c.id == outbox_id), what="edit", context=c.ctx())
    return row_message(result.one())


def op_cancel_audited(c: OpContext, event_id: str, audit: Audit) -> Op[bool]:
    """:func:`~outboxer.database.ops.writes.op_cancel` by an operator, with its audit
    row in the same transaction."""
    done = yield from op_cancel(c, event_id)
    if not done:
        return False
    t = c.table
    result = yield Execute(
        select(t.c.id).where(t.c.event_id == event_id), what="cancel", context=c.ctx()
    )
    ids = list(result.scalars().all())
    yield from op_write_audit(c, Audit(audit.actor, audit.action, {**audit.detail}), ids)
    return True


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditFilter:
    """Which audit rows to read (every field optional)."""

    service: str | None = None
    action: str | None = None
    outbox_id: int | None = None
    before_id: int | None = None
    """Keyset paging, newest first."""
    older_than: float | None = None
    """Written at least this many seconds ago (purging the trail)."""


def _audit_where(audit: Table, f: AuditFilter) -> ColumnElement[bool]:
    parts: list[ColumnElement[bool]] = []
    if f.service is not None:
        parts.append(audit.c.service_name == f.service)
    if f.action is not None:
        parts.append(audit.c.action == f.action)
    if f.outbox_id is not None:
        # Ids are stored as a sorted JSON list: "[7]", "[3, 7]", "[7, 9]".
        oid = str(int(f.outbox_id))
        parts.append(
            or_(
                audit.c.outbox_ids == f"[{oid}]",
                audit.c.outbox_ids.like(f"[{oid},%"),
                audit.c.outbox_ids.like(f"%, {oid},%"),
                audit.c.outbox_ids.like(f"%, {oid}]"),
            )
        )
    if f.before_id is not None:
        parts.append(audit.c.id < f.before_id)
    if f.older_than is not None:
        parts.append(audit.c.at <= db_now_plus(-f.older_than))
    return and_(true(), *parts)


def op_audit_list(audit: Table, f: AuditFilter, limit: int) -> Op[list[AuditEntry]]:
    """Audit rows matching ``f``, newest first, at most ``limit``."""
    stmt = select(audit).where(_audit_where(audit, f)).order_by(audit.c.id.desc())
    result = yield Execute(stmt.limit(max(limit, 1)), what="audit", context={})
    return [AuditEntry.from_mapping(r._mapping) for r in result.all()]


def op_audit_purge(audit: Table, f: AuditFilter) -> Op[int]:
    """Delete the audit rows matching ``f`` (only when asked: retention never does)."""
    result = yield Execute(delete(audit).where(_audit_where(audit, f)), what="audit", context={})
    return int(result.rowcount)


def _open_statuses(c: OpContext) -> list[str]:
    statuses = [Status.PENDING.value, Status.PUBLISHED.value]
    if c.dead_blocks:
        statuses.append(Status.DEAD.value)
    return statuses


def op_blocked_keys(c: OpContext, limit: int) -> Op[list[BlockedKey]]:
    """The keys of an ordered service held back, at most ``limit``: keys whose
    earliest open event is failing (pending after an attempt) or dead (when dead
    blocks), and parked keys; each with its head, the events behind it and since
    when. Reads the ``(status, ...)`` and ``(message_key, id)`` indexes."""
    t = c.table
    failing = and_(t.c.status == Status.PENDING.value, t.c.retry_count > 0)
    stuck = or_(failing, t.c.status == Status.DEAD.value) if c.dead_blocks else failing
    result = yield Execute(
        select(t.c.message_key, func.min(t.c.id))
        .where(stuck)
        .group_by(t.c.message_key)
        .order_by(func.min(t.c.id))
        .limit(max(limit, 1)),
        what="blocked keys",
        context=c.ctx(),
    )
    candidates = {row[0]: int(row[1]) for row in result.all()}
    parked: dict[str, Any] = {}
    if c.parked is not None:
        p = c.parked
        result = yield Execute(
            select(p)
            .where(p.c.service_name == c.route.service_name)
            .order_by(p.c.parked_at)
            .limit(max(limit, 1)),
            what="blocked keys",
            context=c.ctx(),
        )
        parked = {r.message_key: r for r in result.all()}
    keys = set(candidates) | set(parked)
    if not keys:
        return []
    # Per key: its earliest open row and how many open rows it has.
    heads: dict[str, int] = {}
    result = yield Execute(
        select(t.c.message_key, func.min(t.c.id), func.count())
        .where(t.c.message_key.in_(keys), t.c.status.in_(_open_statuses(c)))
        .group_by(t.c.message_key),
        what="blocked keys",
        context=c.ctx(),
    )
    open_rows = {row[0]: (int(row[1]), int(row[2])) for row in result.all()}
    for key in keys:
        if key in candidates:
            first_open = open_rows.get(key)
            head = candidates[key]
            # A failing head that is not the key's earliest open event waits itself.
            if first_open is not None and first_open[0] < head:
                if key not in parked:
                    continue
                head = first_open[0]
            heads[key] = head
        elif key in open_rows:
            heads[key] = open_rows[key][0]
    rows: dict[int, OutboxMessage] = {}
    if heads:
        result = yield Execute(
            select(t).where(t.c.id.in_(sorted(set(heads.values())))),
            what="blocked keys",
            context=c.ctx(),
        )
        rows = {r.id: row_message(r) for r in result.all()}
    found: list[BlockedKey] = []
    for key in keys:
        head_row = rows.get(heads[key]) if key in heads else None
        count = open_rows.get(key, (0, 0))[1]
        if key in parked:
            p_row = parked[key]
            found.append(
                BlockedKey(
                    c.route.service_name,
                    key,
                    "parked",
                    head_row,
                    count,
                    p_row.parked_at,
                    parked_by=p_row.actor,
                    reason=p_row.reason,
                )
            )
        elif head_row is not None:
            behind = count - 1  # the head is one of the key's open rows
            by = "dead" if head_row.status is Status.DEAD else "failing"
            found.append(
                BlockedKey(
                    c.route.service_name,
                    key,
                    by,
                    head_row,
                    max(0, behind),
                    head_row.created_at,
                )
            )
    found.sort(key=lambda b: (b.since, b.message_key))
    return found[:limit]


def op_retry_head(c: OpContext, key: str, audit: Audit) -> Op[int | None]:
    """Make the head of ``key`` (its earliest open event, when it is failing, or dead
    and dead blocks) due now: a failing one keeps its attempts, a dead one is
    requeued. Returns its id (None: no such head). A dead event that holds nothing
    (``ordered_after_dead = "skip"``) is never the head: it stays dead."""
    t = c.table
    pick = c.dialect.lock_rows(
        select(t.c.id, t.c.status, t.c.retry_count)
        .where(t.c.message_key == key, t.c.status.in_(_open_statuses(c)))
        .order_by(t.c.id)
        .limit(1)
    )
    result = yield Execute(pick, what="retry head", context=c.ctx())
    row = result.first()
    failing = row is not None and row.status == Status.PENDING.value and row.retry_count > 0
    if row is None or not (failing or row.status == Status.DEAD.value):
        return None
    values: dict[str, Any] = {"next_retry_at": db_now(), "updated_at": db_now(), "handling": 0}
    if row.status == Status.DEAD.value:
        values = {**_requeued(), "requeue_count": t.c.requeue_count + 1}
    yield Execute(
        update(t).where(t.c.id == row.id, t.c.status == row.status).values(**values),
        what="retry head",
        context=c.ctx(outbox_id=row.id),
    )
    yield from op_write_audit(c, audit, [row.id])
    return int(row.id)


def op_skip_head(c: OpContext, key: str, reason: str, audit: Audit) -> Op[int | None]:
    """Mark the head of ``key`` (its earliest open event, pending) dead with
    ``reason``, so the events behind it go on. Only a head that holds the key is
    skipped: one that failed, or any head of a parked key; a head that has not
    failed (the failing one went through meanwhile) is left. Returns its id (None:
    no such head)."""
    t = c.table
    columns: list[Any] = [t.c.id, t.c.status, t.c.retry_count]
    if c.parked is not None:
        p = c.parked
        columns.append(
            exists()
            .where(p.c.service_name == c.route.service_name, p.c.message_key == t.c.message_key)
            .label("parked")
        )
    pick = c.dialect.lock_rows(
        select(*columns)
        .where(t.c.message_key == key, t.c.status.in_(_open_statuses(c)))
        .order_by(t.c.id)
        .limit(1)
    )
    result = yield Execute(pick, what="skip head", context=c.ctx())
    row = result.first()
    if row is None or row.status != Status.PENDING.value:
        return None
    if not row.retry_count and not getattr(row, "parked", False):
        return None
    yield Execute(
        update(t)
        .where(t.c.id == row.id, t.c.status == Status.PENDING.value)
        .values(
            status=Status.DEAD.value,
            last_error=truncate_error(reason),
            next_retry_at=None,
            updated_at=db_now(),
            handling=0,
        ),
        what="skip head",
        context=c.ctx(outbox_id=row.id),
    )
    yield from op_write_audit(c, audit, [row.id])
    return int(row.id)


def op_park(c: OpContext, key: str, reason: str | None, audit: Audit) -> Op[bool]:
    """Park ``key``: its events wait until released. False when already parked."""
    p = c.parked
    assert p is not None
    result = yield Execute(
        select(p.c.message_key).where(
            p.c.service_name == c.route.service_name, p.c.message_key == key
        ),
        what="park",
        context=c.ctx(),
    )
    if result.first() is not None:
        return False
    yield Execute(
        insert(p).values(
            service_name=c.route.service_name,
            message_key=key,
            parked_at=db_now(),
            actor=audit.actor[:200],
            reason=reason,
        ),
        what="park",
        context=c.ctx(),
    )
    yield from op_write_audit(c, audit, [])
    return True


def op_release_key(c: OpContext, key: str, audit: Audit) -> Op[int | None]:
    """Release parked ``key``: its waiting events are due at once. Returns how many
    were made due (None: the key was not parked)."""
    p = c.parked
    assert p is not None
    result = yield Execute(
        delete(p).where(p.c.service_name == c.route.service_name, p.c.message_key == key),
        what="release",
        context=c.ctx(),
    )
    if not result.rowcount:
        return None
    t = c.table
    result = yield Execute(
        update(t)
        .where(
            t.c.message_key == key,
            t.c.status == Status.PENDING.value,
            t.c.next_retry_at > db_now(),
            or_(t.c.deliver_at.is_(None), t.c.deliver_at <= db_now()),
        )
        .values(next_retry_at=db_now(), updated_at=db_now()),
        what="release",
        context=c.ctx(),
    )
    released = int(result.rowcount)
    yield from op_write_audit(c, audit, [])
    return released
