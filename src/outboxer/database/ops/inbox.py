"""The inbox: received events stored once (by event id) and started."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

from sqlalchemy import (
    select,
    text,
)

from outboxer.database.instructions import Execute, Op
from outboxer.database.ops.base import OpContext
from outboxer.database.ops.handling import Started, op_start
from outboxer.database.schema import (
    db_now,
    db_now_plus,
)
from outboxer.models import Status


def op_store_received(
    c: OpContext, rows: Sequence[dict[str, Any]], due_in: float | None = None
) -> Op[None]:
    """Insert received events unless stored already; due now, or in ``due_in``
    seconds (a lease: the inbox's retry loop leaves them to the consumer that is
    about to handle them)."""
    stmt = c.dialect.insert_ignoring_duplicates(c.table, "event_id").values(
        status=Status.PENDING.value,
        retry_count=0,
        next_retry_at=db_now() if due_in is None else db_now_plus(due_in),
        created_at=db_now(),
        updated_at=db_now(),
        requeue_count=0,
    )
    yield Execute(stmt, list(rows), what="store in inbox", context=c.ctx())


def op_inbox_store(c: OpContext, row: dict[str, Any]) -> Op[int]:
    """Store one received event in the inbox (unless it is there) and return its id."""
    t = c.table
    yield from op_store_received(c, [row])
    result = yield Execute(
        select(t.c.id).where(t.c.event_id == row["event_id"]), what="inbox id", context=c.ctx()
    )
    return int(result.scalar_one())


def op_inbox_start(
    c: OpContext,
    rows: Sequence[dict[str, Any]],
    *,
    lease: float,
    alone: bool = False,
    own: AbstractSet[int] = frozenset(),
    skip_busy: bool = True,
) -> Op[tuple[dict[str, int], Started]]:
    """Store received events (those not stored yet, leased for ``lease`` seconds) and
    start handling them (:func:`op_start`), in one short transaction before any
    handler runs; returns event id -> row id and what the start found.

    Stored rows are read without a lock first, so a copy of an event that another
    consumer is handling never waits for it (MySQL's INSERT IGNORE would)."""
    if c.dialect.relaxed_commit:
        yield Execute(text(c.dialect.relaxed_commit), what="relaxed commit", context=c.ctx())
    unique = {r["event_id"]: r for r in rows}
    row_of: dict[str, int] = {}
    if unique:
        row_of = yield from op_inbox_ids(c, unique)
    new = [r for event_id, r in unique.items() if event_id not in row_of]
    if new:
        yield from op_store_received(c, new, due_in=lease)
        row_of.update((yield from op_inbox_ids(c, [r["event_id"] for r in new])))
    started = yield from op_start(
        c, list(row_of.values()), alone=alone, own=own, skip_busy=skip_busy, relaxed=False
    )
    return row_of, started


def op_inbox_ids(c: OpContext, event_ids: Iterable[str]) -> Op[dict[str, int]]:
    """Event id -> row id of the stored events among ``event_ids``."""
    t = c.table
    result = yield Execute(
        select(t.c.id, t.c.event_id).where(t.c.event_id.in_(sorted(set(event_ids)))),
        what="inbox ids",
        context=c.ctx(),
    )
    return {r.event_id: int(r.id) for r in result.all()}
