"""Every SQL statement of the outbox state machine, written once.

Each operation is a generator (an *op*) that yields the statements it needs and
receives their results (see :mod:`outboxer.database.runner`); the store runs it on
its own connection or on the caller's transaction, sync or async. The consumer's
batch transaction (:func:`op_dispatch`) lives here too, so this module is the one
place to read to know what outboxer asks of a database. Statements are SQLAlchemy
Core expressions; what differs per database comes from the dialect
(:mod:`outboxer.database.dialects`).
"""

from __future__ import annotations

import json
import logging
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import (
    Executable,
    Insert,
    Table,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.sql import ColumnElement

from outboxer.backoff import RetryPolicy
from outboxer.database.dialects import Dialect
from outboxer.database.instructions import Callback, Execute, Invoke, Op
from outboxer.database.schema import (
    MAX_ERROR_CHARS,
    MAX_EVENT_ID_CHARS,
    UtcDateTime,
    db_minute,
    db_now,
    db_now_plus,
)
from outboxer.envelope import Envelope
from outboxer.errors import DuplicateEventError, StoreError, describe_error
from outboxer.models import FINAL_STATUSES, Activity, OutboxMessage, ServiceStatus, Status
from outboxer.routing import ServiceRoute
from outboxer.settings import DEFAULT_BATCH_SIZE

logger = logging.getLogger(__name__)

Handler = Callable[..., Any]
"""``async def h(event: Envelope, tx: AsyncSession)`` or ``def h(event, tx: Session)``."""


@dataclass(frozen=True, slots=True)
class BatchHandler:
    """A handler that takes a list of events: ``fn(events, tx)``. The fast path calls
    it once with consecutive events of its type (in order); after a failure each
    event is run again alone, in its own savepoint."""

    fn: Callable[..., Any]

    def __call__(self, events: list[Envelope], tx: Any) -> Any:
        return self.fn(events, tx)


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


@dataclass(frozen=True, slots=True)
class OpContext:
    """What an op needs to know: the table, the route, the database and the retry policy."""

    table: Table
    route: ServiceRoute
    dialect: Dialect
    policy: RetryPolicy
    channel: str | None = None
    """Where a commit that inserted rows notifies waiting relays (None: no notice)."""
    dead_blocks: bool = False
    """Ordered services: a dead event holds back the later events of its key."""
    scheduled_blocks: bool = False
    """Ordered services: a scheduled event not yet due holds back the later events
    of its key."""

    def ctx(self, **extra: Any) -> dict[str, Any]:
        return {"service": self.route.service_name, "table": self.table.name, **extra}


def _message(row: Any, **replace: Any) -> OutboxMessage:
    return OutboxMessage.from_mapping(row._mapping, **replace)


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


def _insert_and_notify(t: Table, channel: str) -> Executable:
    """``WITH ins AS (INSERT ... RETURNING id) SELECT id, pg_notify(channel, '')``: the
    row and the notice in one round trip. The database sends one notice per channel
    per transaction however many rows it inserted, at commit (none on rollback)."""
    by_channel = _NOTIFYING.setdefault(t, {})
    stmt = by_channel.get(channel)
    if stmt is None:
        binds: dict[str, Any] = {name: bindparam(name) for name in _NEW_COLUMNS}
        ins = _new_rows(t).values(**binds).returning(t.c.id).cte("ins")
        stmt = select(ins.c.id, func.pg_notify(literal(channel), ""))
        by_channel[channel] = stmt
    return stmt


def op_insert(c: OpContext, values: dict[str, Any]) -> Op[int]:
    """INSERT one row; ``values`` holds every column but id and the timestamps."""
    ctx = c.ctx(event_type=values["event_type"])
    if c.channel is not None:
        stmt = _insert_and_notify(c.table, c.channel)
        # every bound column needs a value here
        params = {"headers": None, "event_id": None, **values}
        result = yield Execute(stmt, params, what="insert", context=ctx)
        return int(result.scalar_one())
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
        notify = select(func.pg_notify(literal(c.channel), ""))
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
        notify = select(func.pg_notify(literal(c.channel), ""))
        yield Execute(notify, what="notify", context=ctx)
    return Published(outbox_id, True)


def _due_now(values: Mapping[str, Any]) -> bool:
    return "_at" not in values and "_delay" not in values


_NOTIFYING_ONCE: weakref.WeakKeyDictionary[Table, dict[str, Executable]] = (
    weakref.WeakKeyDictionary()
)


def _insert_once_and_notify(c: OpContext, channel: str) -> Executable:
    """``WITH ins AS (INSERT ... ON CONFLICT DO NOTHING RETURNING id) SELECT id,
    pg_notify(channel, '') FROM ins``: a new row and its notice in one round trip."""
    t = c.table
    by_channel = _NOTIFYING_ONCE.setdefault(t, {})
    stmt = by_channel.get(channel)
    if stmt is None:
        binds: dict[str, Any] = {name: bindparam(name) for name in _NEW_COLUMNS}
        ins = (
            c.dialect.insert_ignoring_duplicates(t, "event_id")
            .values(
                status=Status.PENDING.value,
                retry_count=0,
                next_retry_at=db_now(),
                created_at=db_now(),
                updated_at=db_now(),
                requeue_count=0,
                **binds,
            )
            .returning(t.c.id)
            .cte("ins")
        )
        stmt = select(ins.c.id, func.pg_notify(literal(channel), ""))
        by_channel[channel] = stmt
    return stmt


def _event_holder(c: OpContext, event_id: str, *, lock: bool) -> Op[Any]:
    t = c.table
    stmt = select(t.c.id, t.c.event_type, t.c.payload).where(t.c.event_id == event_id)
    if lock:
        stmt = stmt.with_for_update(read=True)
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


def op_copy_event_ids(t: Table, chunk: int = 1000) -> Op[list[tuple[str, list[int]]]]:
    """Migration to version 4: copy the explicit event ids stored in the rows'
    envelopes into the ``event_id`` column, in id order, ``chunk`` rows per read.
    The earliest row of an id gets it; later rows with the same id keep the column
    empty. Returns those repeats: ``(event id, [holder, later ids...])``."""
    held: dict[str, int] = {}
    result = yield Execute(
        select(t.c.event_id, t.c.id).where(t.c.event_id.is_not(None)),
        what="event ids",
        context={"table": t.name},
    )
    for event_id, oid in result.all():
        held[event_id] = oid
    repeats: dict[str, list[int]] = {}
    after = 0
    while True:
        # Only envelopes with an explicit id: an event without one stores null.
        result = yield Execute(
            select(t.c.id, t.c.payload)
            .where(
                t.c.id > after,
                t.c.event_id.is_(None),
                t.c.payload.contains('"event_id":"', autoescape=True),
            )
            .order_by(t.c.id)
            .limit(chunk),
            what="copy event ids",
            context={"table": t.name},
        )
        rows = result.all()
        if not rows:
            break
        after = rows[-1].id
        copies: list[dict[str, Any]] = []
        for oid, payload in rows:
            try:
                document = json.loads(payload)
            except ValueError:
                continue
            event_id = document.get("event_id") if isinstance(document, dict) else None
            if not isinstance(event_id, str) or not 0 < len(event_id) <= MAX_EVENT_ID_CHARS:
                continue
            first = held.get(event_id)
            if first is None:
                held[event_id] = oid
                copies.append({"_id": oid, "_event_id": event_id})
            else:
                repeats.setdefault(event_id, [first]).append(oid)
        if copies:
            yield Execute(
                update(t).where(t.c.id == bindparam("_id")).values(event_id=bindparam("_event_id")),
                copies,
                what="copy event ids",
                context={"table": t.name},
            )
    return sorted(repeats.items(), key=lambda item: item[1][0])


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
        .limit(limit if limit > 0 else DEFAULT_BATCH_SIZE)
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
    values = _claim_values(lease)
    limit = limit if limit > 0 else DEFAULT_BATCH_SIZE
    claimed = yield from c.dialect.claim(c.table, cond, order, limit, values, c.ctx())
    return sorted((_message(row, **now) for row, now in claimed), key=lambda m: m.id)


def _claim_values(lease: float | None) -> dict[str, Any]:
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


def op_claim_to_send(c: OpContext, limit: int, lease: float) -> Op[list[Claimed]]:
    """:func:`op_claim` returning only what the relay sends (no row objects)."""
    t = c.table
    cols = (t.c.id, t.c.message_key, t.c.payload, t.c.retry_count, t.c.headers, t.c.updated_at)
    limit = limit if limit > 0 else DEFAULT_BATCH_SIZE
    claimed = yield from c.dialect.claim(
        t, _due(c, None), (t.c.next_retry_at, t.c.id), limit, _claim_values(lease), c.ctx(), cols
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
) -> Op[int]:
    """pending -> published; never overwrites consumed or dead.

    ``expect_retry_count`` (the relay passes the value it claimed) also skips rows
    that failed meanwhile, so a consumer's retry is never hidden by a late mark;
    ``expect_updated_at`` (the claim's stamp) skips rows changed in any way since the
    claim (a consumer that already held the event back behind an earlier one).
    """
    if not ids:
        return 0
    t = c.table
    cond = and_(c.dialect.ids_in(t.c.id, ids), t.c.status.not_in(FINAL_STATUSES))
    if expect_retry_count is not None:
        cond = and_(cond, t.c.retry_count == expect_retry_count)
    if expect_updated_at is not None:
        cond = and_(cond, t.c.updated_at == expect_updated_at)
    stmt = (
        update(t)
        .where(c.dialect.in_lock_order(t, cond))
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


def op_release(c: OpContext, ids: Sequence[int], delay: float) -> Op[int]:
    """Give claimed rows back, due again in ``delay`` seconds, without an attempt
    (the transport was down: nothing was sent). Rows no longer pending are left."""
    if not ids:
        return 0
    t = c.table
    stmt = (
        update(t)
        .where(
            c.dialect.in_lock_order(
                t, and_(c.dialect.ids_in(t.c.id, ids), t.c.status == Status.PENDING.value)
            )
        )
        .values(next_retry_at=db_now_plus(delay), updated_at=db_now())
    )
    result = yield Execute(stmt, what="release", context=c.ctx(outbox_id=_first(ids)))
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
    result = yield Execute(stmt, what="mark consumed", context=c.ctx(outbox_id=_first(ids)))
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
    result = yield Execute(stmt, what="mark dead", context=c.ctx(outbox_id=_first(ids)))
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
        select(t.c.id, t.c.status, t.c.retry_count, t.c.max_retry)
        .where(c.dialect.ids_in(t.c.id, list(reasons)))
        .order_by(t.c.id)  # the order consumers lock in: no deadlock with them
        .with_for_update(),
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
    return [_message(r) for r in result.all()]


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


def op_purge_batch(c: OpContext, f: RowFilter, limit: int) -> Op[int]:
    """DELETE up to ``limit`` rows matching ``f`` (retention; one short transaction).

    The ids are picked first (skipping rows other transactions hold where the database
    can) and deleted with the filter repeated, so a row that changed in between is
    kept. Two statements rather than ``DELETE ... LIMIT``: MySQL allows no ``LIMIT``
    in an ``IN`` sub-select, PostgreSQL no ``LIMIT`` on ``DELETE``.
    """
    t = c.table
    cond = _where(c, f)
    pick = select(t.c.id).where(cond).order_by(t.c.updated_at).limit(max(limit, 1))
    if c.dialect.skip_locked:
        pick = pick.with_for_update(skip_locked=True)
    result = yield Execute(pick, what="purge", context=c.ctx())
    ids = list(result.scalars().all())
    if not ids:
        return 0
    result = yield Execute(
        delete(t).where(and_(t.c.id.in_(ids), cond)), what="purge", context=c.ctx()
    )
    return int(result.rowcount)


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
    due = _due(c, None)
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


# ----------------------------------------------------------- the consumer's batch


@dataclass(slots=True)
class Outcome:
    """What happened to one message of a batch that was not consumed."""

    outbox_id: int
    event_type: str
    attempts: int
    reason: str


@dataclass
class BatchOutcome:
    """What one consumer batch transaction did (valid once it committed)."""

    consumed: list[int] = field(default_factory=list)
    retried: list[Outcome] = field(default_factory=list)
    dead: list[Outcome] = field(default_factory=list)
    skipped: int = 0
    handler_errors: list[tuple[int, BaseException]] = field(default_factory=list)
    timings: list[tuple[str, float, BaseException | None]] = field(default_factory=list)
    """(event type, seconds, error) of every handler call."""
    deferred: list[int] = field(default_factory=list)
    """Ordered services: messages held back behind an earlier event of their key."""
    event_ids: dict[int, str] = field(default_factory=dict)
    """Inbox batches: row id -> the producer's event id."""
    failed_fast: tuple[int, BaseException] | None = None
    """Fast path only: the message whose handler raised; nothing was marked and the
    transaction must be rolled back, then the batch run isolated."""
    latencies: list[tuple[str, float]] = field(default_factory=list)
    """(event type, seconds from the row's created_at to its handler's start)."""


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
    pending or published and carry no mark; returns their ids (None: no fast path)."""
    t = c.table
    cond = and_(c.dialect.ids_in(t.c.id, ids), t.c.status.not_in(FINAL_STATUSES), t.c.handling == 0)
    stmt = c.dialect.mark_clean(t, cond, {"handling": mark})
    if stmt is None:
        return None
    result = yield Execute(stmt, what="mark handling", context=c.ctx(outbox_id=_first(ids)))
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
    ctx = c.ctx(outbox_id=_first(ids))
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
        if c.dialect.skip_locked:
            pick = pick.with_for_update(skip_locked=True)
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


def op_dispatch(
    c: OpContext,
    envelopes: Sequence[Envelope],
    handlers: Mapping[str, Handler],
    *,
    isolate: bool = True,
    failed: tuple[int, BaseException] | None = None,
) -> Op[BatchOutcome]:
    """The consumer's batch transaction.

    The batch's rows are locked in id order (concurrent consumers cannot deadlock);
    rows missing, already consumed or dead, or named twice in the batch are skipped;
    messages without a handler are marked dead. Then the handlers run, and their
    messages are marked consumed in one statement:

    - ``isolate=False`` (the fast path): handlers run one after the other with no
      savepoint; at the first exception the op stops and reports it in
      ``failed_fast``, and the caller rolls the whole transaction back (and runs the
      batch again isolated).
    - ``isolate=True``: each handler runs in its own SAVEPOINT, so a failure undoes
      only its own work and is recorded as a failed attempt of its message.
      ``failed`` is the fast path's failure: that message's attempt is recorded with
      that error instead of running its handler a second time.
    """
    t = c.table
    out = BatchOutcome()
    ids = sorted({e.outbox_id for e in envelopes})
    result = yield Execute(
        select(t.c.id, t.c.status, t.c.event_type, t.c.retry_count, t.c.created_at, t.c.message_key)
        .where(c.dialect.ids_in(t.c.id, ids))
        .order_by(t.c.id)
        .with_for_update(),
        what="lock batch",
        context=c.ctx(),
    )
    rows = {r.id: r for r in result.all()}
    seen: set[int] = set()
    live: list[tuple[Envelope, Handler]] = []
    dead: dict[str, list[int]] = {}
    for env in envelopes:
        row = rows.get(env.outbox_id)
        if row is None or row.status in FINAL_STATUSES or env.outbox_id in seen:
            out.skipped += 1
            continue
        seen.add(env.outbox_id)
        if row.event_type != env.event_type and env.event_type.strip():
            # An envelope whose id points at another event (produced to the wrong
            # topic, or by hand): never touch a row that is not its own.
            logger.warning(
                "envelope %s says event type %r but the row holds %r; skipped",
                env.outbox_id,
                env.event_type,
                row.event_type,
                extra={"service": c.route.service_name, "outbox_id": env.outbox_id},
            )
            out.skipped += 1
            continue
        handler = handlers.get(env.event_type) if env.event_type.strip() else None
        if handler is None:
            reason = (
                f"no handler registered for event type {env.event_type!r} "
                f"in service {c.route.service_name!r}"
                if env.event_type.strip()
                else "envelope has no event type"
            )
            dead.setdefault(reason, []).append(env.outbox_id)
            out.dead.append(Outcome(env.outbox_id, env.event_type, row.retry_count, reason))
            continue
        out.latencies.append((env.event_type, time.time() - row.created_at.timestamp()))
        live.append((env, handler))
    order: _KeyOrder | None = None
    if c.route.ordered and live:
        # A key's events are handled in publish (id) order; an event whose key has an
        # earlier event still open waits for it.
        live.sort(key=lambda item: item[0].outbox_id)
        order = yield from _key_order(c, [(e.outbox_id, rows[e.outbox_id]) for e, _ in live])
    clock = time.perf_counter
    failures: list[tuple[int, str]] = []
    types: dict[int, str] = {}
    index = 0
    while index < len(live):
        env, handler = live[index]
        index += 1
        if order is not None:
            wait = order.wait(env.outbox_id)
            if wait is not None:
                out.deferred.append(env.outbox_id)
                order.defer(env.outbox_id, wait)
                continue
        started = clock()
        if not isolate:
            if isinstance(handler, BatchHandler):
                group = [env]
                while (
                    index < len(live)
                    and live[index][1] is handler
                    and (order is None or order.wait(live[index][0].outbox_id) is None)
                ):
                    group.append(live[index][0])
                    index += 1
                error = yield Invoke(handler.fn, (group,), capture=True, guard=True)
                share = (clock() - started) / len(group)
                out.timings.extend((e.event_type, share, error) for e in group)
                if error is not None:
                    # Which event failed is unknown: each runs again alone.
                    out.failed_fast = (0, error)
                    return out
                out.consumed.extend(e.outbox_id for e in group)
                continue
            error = yield Invoke(handler, (env,), capture=True, guard=True)
            out.timings.append((env.event_type, clock() - started, error))
            if error is not None:
                out.failed_fast = (env.outbox_id, error)
                return out
            out.consumed.append(env.outbox_id)
            continue
        if failed is not None and failed[0] == env.outbox_id:
            error = failed[1]  # it ran and failed in the fast path: one call, one attempt
        else:
            call, args = (
                (handler.fn, ([env],)) if isinstance(handler, BatchHandler) else (handler, (env,))
            )
            error = yield Invoke(call, args, savepoint=True, capture=True, guard=True)
            out.timings.append((env.event_type, clock() - started, error))
        if error is None:
            out.consumed.append(env.outbox_id)
        else:
            failures.append((env.outbox_id, describe_error(error)))
            types[env.outbox_id] = env.event_type
            out.handler_errors.append((env.outbox_id, error))
            if order is not None:
                retry_count = rows[env.outbox_id].retry_count
                order.hold(env.outbox_id, c.policy.delay(retry_count + 1))
    yield from op_mark_consumed(c, out.consumed)
    if failures:
        marked = yield from op_mark_failed(c, failures)
        reasons = dict(failures)
        for oid, (status, attempts) in marked.items():
            if status is None:
                continue
            outcome = Outcome(oid, types[oid], attempts, reasons[oid])
            (out.dead if status is Status.DEAD else out.retried).append(outcome)
    for reason, dead_ids in dead.items():
        yield from op_mark_dead(c, dead_ids, reason)
    if order is not None and order.deferred:
        yield from op_defer(c, order.deferred)
    return out


ORDER_MARGIN = 0.05
"""Seconds an event held back waits after the event it waits for is due."""
IN_FLIGHT_WAIT = 1.0
"""Seconds an event waits for an earlier event of its key that is on its way."""
MAX_ORDER_WAIT = 10.0
"""Longest hold behind an event waiting for its retry: a held event looks again at
least this often (the earlier event may be retried sooner, after a requeue say)."""
DEAD_WAIT = MAX_ORDER_WAIT
"""Seconds between looks at a key held by a dead event (``ordered_after_dead=block``):
a requeue of the dead event releases the key within this time."""


class _KeyOrder:
    """Which events of an ordered batch must wait, and for how long."""

    def __init__(self, keys: dict[int, str], waits: dict[str, list[tuple[int, float]]]) -> None:
        self.keys = keys
        self.earlier = waits
        """key -> (id, seconds until it may be done) of its open rows outside the batch."""
        self.held: dict[str, float] = {}
        """Keys held in this batch (an event failed or waits) -> seconds to wait."""
        self.deferred: dict[int, float] = {}

    def wait(self, outbox_id: int) -> float | None:
        key = self.keys[outbox_id]
        waits = [w for oid, w in self.earlier.get(key, ()) if oid < outbox_id]
        if key in self.held:
            waits.append(self.held[key])
        return max(waits) + ORDER_MARGIN if waits else None

    def defer(self, outbox_id: int, seconds: float) -> None:
        self.deferred[outbox_id] = seconds
        self.hold(outbox_id, seconds)

    def hold(self, outbox_id: int, seconds: float) -> None:
        key = self.keys[outbox_id]
        self.held[key] = max(self.held.get(key, 0.0), seconds)


def _key_order(c: OpContext, live: list[tuple[int, Any]]) -> Op[_KeyOrder]:
    """The open rows (pending, published; dead too when dead blocks) that come before
    the batch's rows of the same keys; a scheduled row not yet due only when
    scheduled rows block."""
    t = c.table
    keys = {oid: row.message_key for oid, row in live}
    ids = [oid for oid, _ in live]
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
            t.c.message_key.in_(set(keys.values())),
            t.c.status.in_(open_statuses),
            t.c.id < max(ids),
            t.c.id.not_in(ids),
        )
        .order_by(t.c.id),
        what="ordered keys",
        context=c.ctx(),
    )
    waits: dict[str, list[tuple[int, float]]] = {}
    for r in result.all():
        if r.status == Status.DEAD.value:
            seconds = DEAD_WAIT
        elif (
            r.status == Status.PENDING.value
            and not r.retry_count
            and r.deliver_at is not None
            and r.deliver_at > r.now
        ):
            # Scheduled and not yet due: later events of its key go on, unless asked.
            if not c.scheduled_blocks:
                continue
            seconds = min((r.deliver_at - r.now).total_seconds(), MAX_ORDER_WAIT)
        elif r.status == Status.PENDING.value and r.retry_count and r.next_retry_at is not None:
            # Waiting for its retry (or claimed for it: the lease is no measure).
            left = (r.next_retry_at - r.now).total_seconds()
            seconds = min(max(0.0, left), MAX_ORDER_WAIT)
        else:  # published, or due for its first send, or on its way
            seconds = IN_FLIGHT_WAIT
        waits.setdefault(r.message_key, []).append((r.id, seconds))
    return _KeyOrder(keys, waits)


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


# ----------------------------------------------------------- the inbox


def _store_received(
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
    yield from _store_received(c, [row])
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
    t = c.table
    if c.dialect.relaxed_commit:
        yield Execute(text(c.dialect.relaxed_commit), what="relaxed commit", context=c.ctx())
    unique = {r["event_id"]: r for r in rows}
    row_of: dict[str, int] = {}
    if unique:
        result = yield Execute(
            select(t.c.id, t.c.event_id).where(t.c.event_id.in_(sorted(unique))),
            what="inbox ids",
            context=c.ctx(),
        )
        row_of = {r.event_id: int(r.id) for r in result.all()}
    new = [r for event_id, r in unique.items() if event_id not in row_of]
    if new:
        yield from _store_received(c, new, due_in=lease)
        result = yield Execute(
            select(t.c.id, t.c.event_id).where(t.c.event_id.in_([r["event_id"] for r in new])),
            what="inbox ids",
            context=c.ctx(),
        )
        row_of.update({r.event_id: int(r.id) for r in result.all()})
    started = yield from op_start(
        c, list(row_of.values()), alone=alone, own=own, skip_busy=skip_busy, relaxed=False
    )
    return row_of, started


def op_inbox_receive(
    c: OpContext,
    events: Sequence[Any],
    rows: Sequence[dict[str, Any]],
    handlers: Mapping[str, Handler],
    *,
    isolate: bool = True,
    failed: tuple[str, BaseException] | None = None,
) -> Op[BatchOutcome]:
    """Store received events in the inbox (a duplicate of one already there is not
    stored again) and handle them as :func:`op_dispatch` does, in one transaction.

    ``events`` are the adapter's :class:`~outboxer.transports.adapters.InboxEvent`,
    ``rows`` their inbox rows (as built by the store's row rules, with ``event_id``);
    ``failed`` names the fast path's failure by event id (row ids of a rolled back
    insert are not reused).
    """
    t = c.table
    if rows:
        yield from _store_received(c, rows)
    event_ids = sorted({e.event_id for e in events})
    result = yield Execute(
        select(t.c.id, t.c.event_id).where(t.c.event_id.in_(event_ids)),
        what="inbox ids",
        context=c.ctx(),
    )
    row_of = {r.event_id: int(r.id) for r in result.all()}
    envelopes = [
        Envelope(
            outbox_id=row_of[e.event_id],
            event_id=e.event_id,
            event_type=e.event_type,
            event_version=e.version,
            aggregate_id=e.aggregate_id or e.key,
            payload=e.payload,
        )
        for e in events
        if e.event_id in row_of
    ]
    fail = None if failed is None else (row_of[failed[0]], failed[1])
    out = yield from op_dispatch(c, envelopes, handlers, isolate=isolate, failed=fail)
    out.event_ids = {oid: event_id for event_id, oid in row_of.items()}
    return out


# ----------------------------------------------------------- schema versions


def op_schema_versions(versions: Table) -> Op[dict[str, int]]:
    """The highest recorded schema version of each outbox table."""
    result = yield Execute(
        select(versions.c.table_name, func.max(versions.c.version)).group_by(versions.c.table_name),
        what="read schema versions",
    )
    return {str(name): int(version) for name, version in result.all()}


def op_record_versions(versions: Table, table_name: str, steps: Sequence[Any]) -> Op[None]:
    """Record ``steps`` (each with ``version`` and ``description``) as applied now."""
    if not steps:
        return
    yield Execute(
        insert(versions).values(applied_at=db_now()),
        [
            {"table_name": table_name, "version": s.version, "description": s.description}
            for s in steps
        ],
        what="record schema version",
        context={"table": table_name},
    )


# ----------------------------------------------------------- single-instance locks


def op_try_lock(dialect: Dialect, name: str) -> Op[bool]:
    """Try to take the database-wide lock ``name`` for this connection's session
    (PostgreSQL advisory lock, MySQL ``GET_LOCK``) without waiting; True when taken.
    Databases without such locks (SQLite, one writer at a time) always grant it."""
    stmt = dialect.lock_statement(name)
    if stmt is None:
        return True
    result = yield Execute(stmt, what="take lock", context={"lock": name})
    return bool(result.scalar())


def op_unlock(dialect: Dialect, name: str) -> Op[None]:
    stmt = dialect.unlock_statement(name)
    if stmt is not None:
        yield Execute(stmt, what="release lock", context={"lock": name})
