"""The consumer's statements: the handling marks written before any handler runs
(poison protection) and the rows a batch locks and reads."""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    and_,
    exists,
    or_,
    select,
    text,
    update,
)

from outboxer.database.instructions import Execute, Op
from outboxer.database.ops.base import OpContext, Outcome, hot, only_id
from outboxer.database.ops.transitions import op_mark_failed
from outboxer.database.schema import (
    db_now,
)
from outboxer.models import FINAL_STATUSES, Status

HANDLING_IN_BATCH = 1
"""``handling`` of a message whose delivery started in a batch of several."""
HANDLING_ALONE = 2
"""``handling`` of a message whose delivery started alone: a crash is pinned on it."""


def crash_reason(crashes: int) -> str:
    """``last_error`` of a message whose handler killed its worker ``crashes`` times."""
    times = "once" if crashes == 1 else f"{crashes} times"
    return f"the worker process died while handling it ({times})"


@dataclass
class Started:
    """What :func:`op_start` found and marked."""

    ready: list[int] = field(default_factory=list)
    """Rows to handle now (marked as being handled here, unless ``suspect``)."""
    suspect: bool = False
    """An earlier delivery of some of these rows in a batch never settled (its worker
    died): nothing is marked; start and run them one at a time."""
    busy: list[int] = field(default_factory=list)
    """Rows a live worker is handling now (marked, and locked by its transaction):
    not handled in this delivery."""
    unmarked: list[int] = field(default_factory=list)
    """``skip_busy`` False: such rows, handed to the batch (in ``ready``) unmarked."""
    crashed: list[Outcome] = field(default_factory=list)
    """Rows whose last delivery, alone, never settled: the worker died handling them.
    Each is charged one attempt (retried after its backoff, or dead) and not run now."""
    dead: list[Outcome] = field(default_factory=list)
    """Of ``crashed``, the rows that reached max_retry."""


def op_mark_clean(c: OpContext, ids: Sequence[int], mark: int) -> Op[list[int] | None]:
    """The fast path of :func:`op_start`, for one autocommit statement where the
    dialect has one (:meth:`Dialect.mark_clean`): mark the rows of ``ids`` that are
    pending or published and carry no mark; returns their ids (None: no fast path).
    Built once per table and mark (:func:`hot`), the ids a parameter."""
    built = hot(c, ("mark handling", mark))
    stmt = built.get("statement")
    if stmt is None:
        if built.get("none"):
            return None
        t = c.table
        cond = and_(
            c.dialect.ids_param(t.c.id, "clean_ids"),
            t.c.status.not_in(FINAL_STATUSES),
            t.c.handling == 0,
        )
        stmt = c.dialect.mark_clean(t, cond, {"handling": mark})
        if stmt is None:
            built["none"] = True
            return None
        built["statement"] = stmt
    result = yield Execute(
        stmt, {"clean_ids": list(ids)}, what="mark handling", context=c.ctx(outbox_id=only_id(ids))
    )
    return [int(r.id) for r in result.all()]


def op_start(
    c: OpContext,
    ids: Sequence[int],
    *,
    alone: bool = False,
    own: AbstractSet[int] = frozenset(),
    skip_busy: bool = True,
    relaxed: bool = True,
) -> Op[Started]:
    """Record, in a short transaction of its own, that the messages ``ids`` are about
    to be handled, before any handler runs: a worker that dies in a handler leaves
    the mark behind, and the next delivery finds it (the settling commit of
    :func:`op_dispatch` clears it).

    A mark left by a delivery of the message alone pins the crash on it: one failed
    attempt (``crashes`` + 1; dead at max_retry, else retried after its backoff), and
    it is not handled in this delivery. A mark left by a batch says only that one of
    its messages killed the worker: nothing is charged, nothing is marked, and the
    caller runs them one at a time (``suspect``). ``own`` are rows this process
    marked itself and has not settled yet (its transaction failed, the process
    lives): their marks are not crashes.

    A marked row that another transaction holds locked is being handled by a live
    worker right now: it is returned in ``busy`` without waiting for it (PostgreSQL,
    MySQL/MariaDB); with ``skip_busy`` False it is handed to the batch unmarked
    instead (the batch transaction then waits for it, as before marks existed).

    ``relaxed``: the transaction may commit without waiting for the disk
    (:attr:`Dialect.relaxed_commit`; the op is the first in its transaction).

    Statements: one plain read; one UPDATE of the unmarked rows in id order (it
    waits only for short locks such as the relay's marks, holding nothing else);
    for marked rows only, a ``FOR UPDATE SKIP LOCKED`` that never waits. So the
    start cannot deadlock with the relay or another consumer.
    """
    out = Started()
    ids = sorted(set(ids))
    if not ids:
        return out
    t = c.table
    ctx = c.ctx(outbox_id=only_id(ids))
    if c.dialect.relaxed_commit and relaxed:
        yield Execute(text(c.dialect.relaxed_commit), what="relaxed commit", context=ctx)
    cols = (t.c.id, t.c.status, t.c.event_type, t.c.handling, t.c.crashes)
    result = yield Execute(
        select(*cols).where(c.dialect.ids_in(t.c.id, ids)), what="start handling", context=ctx
    )
    clean: list[int] = []
    marked: list[int] = []
    for row in result.all():
        if row.status in FINAL_STATUSES:
            continue
        (marked if row.handling and row.id not in own else clean).append(row.id)
    clean.sort()
    mark = HANDLING_ALONE if alone or len(clean) + len(marked) == 1 else HANDLING_IN_BATCH
    live: list[int] = []
    if clean:
        free = and_(
            c.dialect.ids_in(t.c.id, clean),
            t.c.status.not_in(FINAL_STATUSES),
            or_(t.c.handling == 0, c.dialect.ids_in(t.c.id, sorted(own & set(clean))))
            if own & set(clean)
            else t.c.handling == 0,
        )
        done = yield Execute(
            update(t).where(c.dialect.in_lock_order(t, free)).values(handling=mark),
            what="mark handling",
            context=ctx,
        )
        live = clean
        if int(done.rowcount) < len(clean):
            # Settled or taken by another worker since the read.
            again = yield Execute(
                select(t.c.id, t.c.status, t.c.handling).where(c.dialect.ids_in(t.c.id, clean)),
                what="start handling",
                context=ctx,
            )
            live = []
            for row in again.all():
                if row.handling == mark and row.status not in FINAL_STATUSES:
                    live.append(row.id)
                elif row.status not in FINAL_STATUSES:
                    out.busy.append(row.id)
    crashed: dict[int, Any] = {}
    if marked:
        pick = select(*cols).where(c.dialect.ids_in(t.c.id, sorted(marked))).order_by(t.c.id)
        pick = c.dialect.lock_rows(pick, skip_locked=True)
        result = yield Execute(pick, what="left marks", context=ctx)
        found = {r.id: r for r in result.all()}
        for oid in sorted(marked):
            row = found.get(oid)
            if row is None:  # locked: a live worker is handling it now
                out.busy.append(oid)
            elif row.status in FINAL_STATUSES:
                continue
            elif row.handling == HANDLING_ALONE:
                crashed[oid] = row
            else:  # left by a batch (or cleared meanwhile): run it, one at a time
                out.suspect = out.suspect or (row.handling == HANDLING_IN_BATCH and not alone)
                live.append(oid)
    if crashed:
        failures = [(oid, crash_reason(row.crashes + 1)) for oid, row in crashed.items()]
        yield Execute(
            update(t)
            .where(c.dialect.ids_in(t.c.id, list(crashed)))
            .values(crashes=t.c.crashes + 1),
            what="count crashes",
            context=ctx,
        )
        attempts = yield from op_mark_failed(c, failures)
        reasons = dict(failures)
        for oid, (status, count) in attempts.items():
            if status is None:
                continue
            outcome = Outcome(oid, crashed[oid].event_type, count, reasons[oid])
            out.crashed.append(outcome)
            if status is Status.DEAD:
                out.dead.append(outcome)
    live.sort()
    final = HANDLING_ALONE if alone or len(live) == 1 else HANDLING_IN_BATCH
    if out.suspect:
        # Nothing stays marked: each message is started again alone.
        yield Execute(
            update(t).where(c.dialect.ids_in(t.c.id, live), t.c.handling != 0).values(handling=0),
            what="clear batch marks",
            context=ctx,
        )
    elif live and (marked or final != mark):
        yield Execute(
            update(t).where(c.dialect.ids_in(t.c.id, live)).values(handling=final),
            what="mark handling",
            context=ctx,
        )
    out.ready = live
    if not skip_busy:
        out.unmarked, out.busy = sorted(out.busy), []
        out.ready = sorted([*live, *out.unmarked])
    return out


def op_lock_batch(c: OpContext, ids: Sequence[int]) -> Op[dict[int, Any]]:
    """Lock a batch's rows in id order (concurrent consumers cannot deadlock) and read
    what the dispatch needs of them; missing rows are absent. For an ordered service
    each row also says whether an operator parked its key (``parked``), read in the
    same statement."""
    t = c.table
    columns: list[Any] = [
        t.c.id,
        t.c.status,
        t.c.event_type,
        t.c.retry_count,
        t.c.created_at,
        t.c.message_key,
    ]
    if c.route.ordered and c.parked is not None:
        p = c.parked
        columns.append(
            exists()
            .where(p.c.service_name == c.route.service_name, p.c.message_key == t.c.message_key)
            .label("parked")
        )
    result = yield Execute(
        c.dialect.lock_rows(
            select(*columns).where(c.dialect.ids_in(t.c.id, sorted(set(ids)))).order_by(t.c.id)
        ),
        what="lock batch",
        context=c.ctx(),
    )
    return {r.id: r for r in result.all()}


def op_open_before(c: OpContext, keys: AbstractSet[str], ids: Sequence[int]) -> Op[list[Any]]:
    """The open rows (pending, published; dead too when dead blocks) of ``keys`` that
    come before the batch's rows ``ids`` and are not among them, in id order, each
    with the database's ``now``."""
    t = c.table
    open_statuses = [Status.PENDING.value, Status.PUBLISHED.value]
    if c.dead_blocks:
        open_statuses.append(Status.DEAD.value)
    result = yield Execute(
        select(
            t.c.id,
            t.c.message_key,
            t.c.status,
            t.c.retry_count,
            t.c.next_retry_at,
            t.c.deliver_at,
            db_now().label("now"),
        )
        .where(
            t.c.message_key.in_(set(keys)),
            t.c.status.in_(open_statuses),
            t.c.id < max(ids),
            t.c.id.not_in(ids),
        )
        .order_by(t.c.id),
        what="ordered keys",
        context=c.ctx(),
    )
    return list(result.all())
