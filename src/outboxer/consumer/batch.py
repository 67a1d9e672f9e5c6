"""The consumer's dispatch policy: a batch through its handlers in one transaction.

The fast path (handlers one after the other, no savepoint; a failure rolls the whole
transaction back), the isolated run (a savepoint per handler), batch handlers given
consecutive events of their type, and the order of a key's events (an event waits
while an earlier event of its key is open). The statements it runs are the
database's (:mod:`outboxer.database.ops`); this module decides which and when.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from outboxer.database.instructions import Invoke, Op
from outboxer.database.ops.base import OpContext, Outcome
from outboxer.database.ops.handling import op_lock_batch, op_open_before
from outboxer.database.ops.inbox import op_inbox_ids, op_store_received
from outboxer.database.ops.transitions import (
    op_defer,
    op_mark_consumed,
    op_mark_dead,
    op_mark_failed,
)
from outboxer.envelope import Envelope
from outboxer.errors import describe_error
from outboxer.handlers import BatchHandler, Handler
from outboxer.models import FINAL_STATUSES, Status

logger = logging.getLogger(__name__)


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

    def add(self, other: BatchOutcome) -> None:
        """Count ``other`` (a later transaction of the same delivery) in this one."""
        self.consumed.extend(other.consumed)
        self.retried.extend(other.retried)
        self.dead.extend(other.dead)
        self.skipped += other.skipped
        self.handler_errors.extend(other.handler_errors)
        self.timings.extend(other.timings)
        self.deferred.extend(other.deferred)
        self.event_ids.update(other.event_ids)
        self.latencies.extend(other.latencies)


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
    out = BatchOutcome()
    rows = yield from op_lock_batch(c, [e.outbox_id for e in envelopes])
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
PARKED_WAIT = MAX_ORDER_WAIT
"""Seconds between looks at a key an operator parked (releasing it makes its events
due at once)."""


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
    """How long each key of the batch waits for its open rows outside the batch (a
    scheduled row not yet due only when scheduled rows block)."""
    keys = {oid: row.message_key for oid, row in live}
    ids = [oid for oid, _ in live]
    earlier = yield from op_open_before(c, set(keys.values()), ids)
    # Parked keys were read with the batch's rows (op_lock_batch): no statement here.
    parked = {row.message_key for _, row in live if getattr(row, "parked", False)}
    waits: dict[str, list[tuple[int, float]]] = {}
    for r in earlier:
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
    order = _KeyOrder(keys, waits)
    for key in parked:
        # Every event of a parked key waits, the first one too.
        order.held[key] = PARKED_WAIT
    return order


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
    if rows:
        yield from op_store_received(c, rows)
    row_of = yield from op_inbox_ids(c, {e.event_id for e in events})
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
