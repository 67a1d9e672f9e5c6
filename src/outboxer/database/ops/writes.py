"""New rows: the INSERTs of ``publish`` (now, scheduled, once per event id), the
bulk insert of the test helpers, and ``cancel``."""

from __future__ import annotations

import json
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from sqlalchemy import (
    Executable,
    Insert,
    Table,
    and_,
    bindparam,
    insert,
    or_,
    select,
    update,
)

from outboxer.database.instructions import Execute, Op
from outboxer.database.ops.base import OpContext
from outboxer.database.schema import (
    UtcDateTime,
    db_now,
    db_now_plus,
)
from outboxer.errors import DuplicateEventError, StoreError
from outboxer.models import Status

_NEW_ROWS: weakref.WeakKeyDictionary[Table, Insert] = weakref.WeakKeyDictionary()


def _new_rows(t: Table) -> Insert:
    """The INSERT of a new row, built once per table: the row's columns come as
    parameters, so each publish costs no statement building or cache-key work."""
    stmt = _NEW_ROWS.get(t)
    if stmt is None:
        # A new row is pending, has had no attempt and is due now (database clock).
        stmt = _NEW_ROWS[t] = insert(t).values(
            status=Status.PENDING.value,
            retry_count=0,
            next_retry_at=db_now(),
            created_at=db_now(),
            updated_at=db_now(),
            requeue_count=0,
        )
    return stmt


_NEW_COLUMNS = (
    "event_type",
    "service_name",
    "topic",
    "message_key",
    "payload",
    "max_retry",
    "headers",
    "event_id",
)
_NOTIFYING: weakref.WeakKeyDictionary[Table, dict[str, Executable]] = weakref.WeakKeyDictionary()


def _insert_and_notify(c: OpContext, channel: str) -> Executable:
    """The INSERT of a new row and the notice on ``channel`` in one round trip
    (:meth:`Dialect.with_notice`)."""
    t = c.table
    by_channel = _NOTIFYING.setdefault(t, {})
    stmt = by_channel.get(channel)
    if stmt is None:
        binds: dict[str, Any] = {name: bindparam(name) for name in _NEW_COLUMNS}
        stmt = c.dialect.with_notice(_new_rows(t).values(**binds), t.c.id, channel)
        by_channel[channel] = stmt
    return stmt


def op_insert(c: OpContext, values: dict[str, Any]) -> Op[int]:
    """INSERT one row; ``values`` holds every column but id and the timestamps."""
    ctx = c.ctx(event_type=values["event_type"])
    if c.channel is not None:
        stmt = _insert_and_notify(c, c.channel)
        # every bound column needs a value here
        params = {"headers": None, "event_id": None, **values}
        result = yield Execute(stmt, params, what="insert", context=ctx, driver=True)
        new_id = result.scalar()  # one row: the INSERT's id (scalar_one costs more)
        if new_id is None:
            raise StoreError("the INSERT returned no id", **ctx)
        return int(new_id)
    result = yield Execute(_new_rows(c.table), values, what="insert", context=ctx)
    return int(result.inserted_primary_key[0])


def op_insert_many(
    c: OpContext, rows: Sequence[dict[str, Any]], chunk: int = 5000
) -> Op[list[int]]:
    """INSERT many rows (``values`` as for :func:`op_insert`), ``chunk`` per statement;
    returns their ids in the order of ``rows``."""
    stmt = _new_rows(c.table).returning(c.table.c.id, sort_by_parameter_order=True)
    ids: list[int] = []
    for lo in range(0, len(rows), chunk):
        result = yield Execute(stmt, list(rows[lo : lo + chunk]), what="insert", context=c.ctx())
        ids.extend(int(i) for i in result.scalars().all())
    if rows and c.channel is not None:
        notify = c.dialect.notify(c.channel)
        yield Execute(notify, what="notify", context=c.ctx())
    return ids


_LATER_ROWS: weakref.WeakKeyDictionary[Table, dict[tuple[str, bool], Insert]] = (
    weakref.WeakKeyDictionary()
)


def _insert(c: OpContext, values: Mapping[str, Any], once: bool) -> Insert:
    """The INSERT of a new row as ``values`` asks: due now, due in ``_delay`` seconds
    (the database clock) or at ``_at`` (a UTC datetime); ``once``: skip the row when
    its event id is already in the table (the dialect's insert-or-nothing)."""
    t = c.table
    kind = "at" if "_at" in values else "in" if "_delay" in values else "now"
    if kind == "now" and not once:
        return _new_rows(t)
    cache = _LATER_ROWS.setdefault(t, {})
    stmt = cache.get((kind, once))
    if stmt is None:
        due: Any = db_now()
        if kind == "at":
            due = bindparam("_at", type_=UtcDateTime())
        elif kind == "in":
            due = db_now_plus(bindparam("_delay"))
        base = c.dialect.insert_ignoring_duplicates(t, "event_id") if once else insert(t)
        stmt = cache[(kind, once)] = base.values(
            status=Status.PENDING.value,
            retry_count=0,
            next_retry_at=due,
            deliver_at=None if kind == "now" else due,
            created_at=db_now(),
            updated_at=db_now(),
            requeue_count=0,
        )
    return stmt


class Published(NamedTuple):
    """What :func:`op_publish` did."""

    outbox_id: int
    inserted: bool
    """False: the event id was already there with the same event; nothing written."""


def op_publish(c: OpContext, values: dict[str, Any]) -> Op[Published]:
    """Write one event as ``publish`` asks: scheduled (``_delay``/``_at`` in ``values``)
    and, with an ``event_id``, once per table.

    An event id already in the table writes nothing: the holder's outbox id comes
    back when its event type and payload are the same, :class:`DuplicateEventError`
    is raised when they differ. No statement fails on the duplicate (the dialect's
    insert-or-nothing), so the caller's transaction stays usable. A publisher racing
    another transaction with the same id waits for it at the unique index, writes
    nothing once it committed, and then reads its row.

    Where a plain read sees only the transaction's snapshot (MySQL/MariaDB), the
    holder is read first, so a publish again of a committed event takes no lock, and
    read again with a locking read (the latest version) after a race; elsewhere the
    insert comes first (one statement for a new id) and a plain read follows a skip.
    """
    ctx = c.ctx(event_type=values["event_type"])
    event_id = values.get("event_id")
    if event_id is None:
        result = yield Execute(_insert(c, values, False), values, what="insert", context=ctx)
        outbox_id = int(result.inserted_primary_key[0])
    else:
        snapshot = c.dialect.snapshot_reads
        holder = (yield from _event_holder(c, event_id, lock=False)) if snapshot else None
        if holder is None:
            if c.channel is not None and _due_now(values):
                # The row and the notice in one round trip, as op_insert does; a
                # skipped row returns nothing and notifies nobody.
                params = {"headers": None, **values}
                stmt = _insert_once_and_notify(c, c.channel)
                result = yield Execute(stmt, params, what="insert", context=ctx)
                row = result.first()
                if row is not None:
                    return Published(int(row[0]), True)
                new_id = None
            else:
                stmt = _insert(c, values, True)
                result = yield Execute(stmt, values, what="insert", context=ctx)
                new_id = c.dialect.inserted_id(result)
            if new_id is None:
                # Another transaction holds the id (committed by now, if it raced us).
                holder = yield from _event_holder(c, event_id, lock=snapshot)
                if holder is None:
                    raise StoreError(
                        "the event id was taken and released while publishing",
                        **c.ctx(event_id=event_id),
                    )
        if holder is not None:
            _check_same_event(c, holder, values)
            return Published(int(holder.id), False)
        assert new_id is not None
        outbox_id = new_id
    if c.channel is not None and _due_now(values):
        notify = c.dialect.notify(c.channel)
        yield Execute(notify, what="notify", context=ctx)
    return Published(outbox_id, True)


def _due_now(values: Mapping[str, Any]) -> bool:
    return "_at" not in values and "_delay" not in values


_NOTIFYING_ONCE: weakref.WeakKeyDictionary[Table, dict[str, Executable]] = (
    weakref.WeakKeyDictionary()
)


def _insert_once_and_notify(c: OpContext, channel: str) -> Executable:
    """The dialect's insert-or-nothing of a new row and its notice in one round trip
    (:meth:`Dialect.with_notice`): the new row's id, or nothing when it was skipped."""
    t = c.table
    by_channel = _NOTIFYING_ONCE.setdefault(t, {})
    stmt = by_channel.get(channel)
    if stmt is None:
        binds: dict[str, Any] = {name: bindparam(name) for name in _NEW_COLUMNS}
        ins = c.dialect.insert_ignoring_duplicates(t, "event_id").values(
            status=Status.PENDING.value,
            retry_count=0,
            next_retry_at=db_now(),
            created_at=db_now(),
            updated_at=db_now(),
            requeue_count=0,
            **binds,
        )
        stmt = c.dialect.with_notice(ins, t.c.id, channel)
        by_channel[channel] = stmt
    return stmt


def _event_holder(c: OpContext, event_id: str, *, lock: bool) -> Op[Any]:
    t = c.table
    stmt = select(t.c.id, t.c.event_type, t.c.payload).where(t.c.event_id == event_id)
    if lock:
        stmt = c.dialect.lock_rows(stmt, read=True)
    result = yield Execute(stmt, what="event id", context=c.ctx(event_id=event_id))
    return result.first()


def _check_same_event(c: OpContext, holder: Any, values: Mapping[str, Any]) -> None:
    """Raise :class:`DuplicateEventError` unless ``holder`` is the event ``values``
    describes (same event type, equal business payload as JSON)."""
    same = holder.event_type == values["event_type"]
    if same:
        try:
            same = json.loads(holder.payload).get("payload") == json.loads(values["payload"]).get(
                "payload"
            )
        except (ValueError, AttributeError):
            same = False
    if not same:
        raise DuplicateEventError(
            f"event id {values['event_id']!r} is already used by another event "
            f"(event type {holder.event_type!r}) with a different type or payload; "
            f"nothing was written",
            **c.ctx(
                event_id=values["event_id"],
                event_type=values["event_type"],
                outbox_id=int(holder.id),
            ),
        )


def op_cancel(c: OpContext, event_id: str) -> Op[bool]:
    """Take back the event ``event_id`` while it is still waiting: pending, never
    attempted nor sent, and not claimed by a relay (due now and not taken, or
    scheduled and not yet due). It becomes ``cancelled`` (final: never sent or
    handled). True when it was cancelled; False when it is not there, is already on
    its way (a relay's lease runs), was sent, or is in a final state."""
    t = c.table
    waiting = and_(
        t.c.event_id == event_id,
        t.c.status == Status.PENDING.value,
        t.c.retry_count == 0,
        t.c.published_at.is_(None),
        # A claim moves next_retry_at past now (the lease) and away from deliver_at.
        or_(t.c.next_retry_at <= db_now(), t.c.next_retry_at == t.c.deliver_at),
    )
    result = yield Execute(
        update(t)
        .where(waiting)
        .values(status=Status.CANCELLED.value, next_retry_at=None, updated_at=db_now()),
        what="cancel",
        context=c.ctx(event_id=event_id),
    )
    return int(result.rowcount) == 1
