"""Dispatchers: one route's batches through the handlers, in the database.

A batch from one route is processed in one database transaction (the policy of
:mod:`outboxer.consumer.batch`): the batch's outbox rows are locked, each live
message's handler runs (in its own SAVEPOINT after a failure), then
consumed/failed/dead marks are written and everything commits at once. Only then is
the batch acknowledged to the transport. Before any handler runs, the messages are
marked as being handled in a short transaction of their own (poison protection).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from outboxer.aio import HandlerThread
from outboxer.cloudevents import envelope_dict, is_cloudevents
from outboxer.consumer.batch import BatchOutcome, op_dispatch, op_inbox_receive
from outboxer.database.connections import connection_lost
from outboxer.database.engines import fresh_connections_trusted
from outboxer.database.instructions import Op
from outboxer.database.ops.base import Outcome
from outboxer.database.ops.handling import Started
from outboxer.database.schema import MAX_COORDINATES_CHARS
from outboxer.envelope import Envelope
from outboxer.errors import ConnectionLostError, describe_error
from outboxer.handlers import BatchHandler, Handler, handler_fn, is_async_callable
from outboxer.hooks import Observer
from outboxer.logs import log_dead, log_retried
from outboxer.models import Status
from outboxer.routing import ServiceRoute
from outboxer.settings import DEFAULT_LEASE
from outboxer.store import Storage
from outboxer.transports.adapters import Adapter, InboxEvent, outboxer_envelope
from outboxer.transports.base import IncomingMessage

logger = logging.getLogger(__name__)

LOSSES_PER_ATTEMPT = 3
"""A message whose own transaction loses its database connection this many times in
a row (in one worker) is charged a failed attempt: a network fault spends no
attempt, but a message that breaks its connection every time (a statement that
kills the server's backend) still ends dead after ``max_retry`` attempts."""


class Dispatcher:
    """Runs one route's batches through the handlers, in the database."""

    def __init__(
        self,
        storage: Storage,
        route: ServiceRoute,
        handlers: Mapping[str, Handler],
        hooks: Observer,
        *,
        isolate: bool = False,
        skip_busy: bool = True,
    ) -> None:
        self.storage = storage
        self.route = route
        self.handlers = handlers
        self.hooks = hooks
        self.isolate = isolate
        """Skip the fast path: every handler in its own savepoint from the start."""
        self.skip_busy = skip_busy
        """A message another live worker is handling now is acknowledged without
        waiting for it (its row is sent again if that worker dies: the relay's lease
        or ``redeliver_after``); False: wait for that worker, as a plain lock would."""
        self._ctx = storage.op_context(route)
        self._thread = HandlerThread(f"outboxer-handlers-{route.service_name}"[:64])
        self._cloudevents = is_cloudevents(route)
        self._async_types = {e for e, h in handlers.items() if is_async_callable(handler_fn(h))}
        self._headers: dict[str, Mapping[str, bytes]] = {}
        self._own: set[int] = set()
        """Rows this dispatcher marked as being handled and has not settled (their
        transaction failed and is tried again): their marks are not crashes."""
        self._losses: dict[Any, int] = {}
        """Connections lost in a row by a message's own transaction (by message)."""
        self._premarked: set[Any] = set()
        """Of the batch being dispatched, the rows its in-process claim marked as
        being handled already (:attr:`IncomingMessage.marked`)."""
        if hooks.wants("handler_context"):
            # Observers (tracing) wrap each handler call: a span continuing the trace
            # in the message's headers.
            self.handlers = {
                e: h if isinstance(h, BatchHandler) else self._in_context(h)
                for e, h in handlers.items()
            }

    def _in_context(self, fn: Handler) -> Handler:
        hooks, service, headers = self.hooks, self.route.service_name, self._headers

        if is_async_callable(fn):

            @functools.wraps(fn)
            async def run_async(event: Envelope, tx: Any) -> Any:
                cm = hooks.handler_context(service, event, headers.get(event.event_id, {}))
                with cm or contextlib.nullcontext():
                    return await fn(event, tx)

            return run_async

        @functools.wraps(fn)
        def run(event: Envelope, tx: Any) -> Any:
            cm = hooks.handler_context(service, event, headers.get(event.event_id, {}))
            with cm or contextlib.nullcontext():
                return fn(event, tx)

        return run

    def decode(self, batch: Sequence[IncomingMessage], *, report: bool = True) -> list[Any]:
        """Valid envelopes of a batch; the rest are skipped (logged and counted when
        ``report``: a batch processed again does not count them twice)."""
        envelopes: list[Envelope] = []
        for msg in batch:
            try:
                if msg.envelope is not None and not self._cloudevents:
                    envelopes.append(msg.envelope)  # handed over in process, checked
                    self._headers[msg.envelope.event_id] = msg.headers
                    continue
                if self._cloudevents:
                    obj: Any = envelope_dict(msg.value, msg.headers)
                else:
                    obj = json.loads(msg.value) if msg.value is not None else None
                if isinstance(obj, dict) and obj.get("outbox_id") is None:
                    if report:
                        self._skipped(msg, "no_outbox_id", "message without outbox_id skipped")
                    continue
                env = Envelope.from_dict(obj)
                envelopes.append(env)
                self._headers[env.event_id] = msg.headers
            except Exception as exc:  # noqa: BLE001 - any undecodable input (RecursionError too)
                if report:
                    self._skipped(msg, "undecodable", "undecodable message skipped", exc)
        return envelopes

    def _skipped(
        self, msg: IncomingMessage, reason: str, text: str, exc: BaseException | None = None
    ) -> None:
        service = self.route.service_name
        logger.warning(text, exc_info=exc, extra={"service": service, "at": msg.position})
        self.hooks.messages_skipped(service, reason, 1)

    async def dispatch(
        self, batch: Sequence[IncomingMessage], *, first_pass: bool = True
    ) -> BatchOutcome:
        """Process a batch and commit; raises only if a database transaction failed.

        The batch runs in one transaction per run of consecutive messages whose
        handlers are of one kind: sync handlers on a worker thread with the sync
        engine (blocking code in them never stalls the event loop), async handlers on
        the loop with the async engine. Each transaction first tries the fast path
        (no savepoints); if anything in it fails, it is rolled back and run again
        with a savepoint per handler, which isolates the failing message.
        """
        if first_pass:
            self.hooks.messages_received(self.route.service_name, len(batch))
        self._headers.clear()
        items = self.decode(batch, report=first_pass)
        total = BatchOutcome()
        # In process, the claim that took these rows may have marked them already.
        self._premarked = {m.position for m in batch if m.marked} if first_pass else set()
        ready, suspect = await self._start(items, alone=False)
        if not suspect:
            await self._settle(ready, total)
            return total
        # A batch with these messages killed its worker: one at a time now, so the
        # innocent ones go through and a crash is pinned on the message causing it.
        for item in ready:
            alone, _ = await self._start([item], alone=True)
            await self._settle(alone, total)
        return total

    async def _start(self, items: list[Any], *, alone: bool) -> tuple[list[Any], bool]:
        """Mark ``items`` as being handled, in a short transaction of their own, before
        any handler runs (:func:`~outboxer.database.ops.handling.op_start`); report the
        crashes it found. Returns the items to handle now, and whether they must be
        run one at a time."""
        if not items:
            return [], False
        store = self.storage.store(self.route)
        keys = [self._key(i) for i in items]
        premarked = self._premarked
        if premarked and not alone:
            if all(k in premarked for k in keys):
                # Marked by the claim that took them, a moment ago: nothing to write.
                self._own.update(keys)
                return items, False
            self._own.update(k for k in keys if k in premarked)  # marked: ours
        try:
            started = await store.start_handling_async(
                keys, alone=alone, own=frozenset(self._own), skip_busy=self.skip_busy
            )
        except Exception as exc:
            if connection_lost(exc, self.storage.database.dialect):
                # The marks may have committed without this worker hearing it: they
                # are its own, not the trace of a crash.
                self._own.update(keys)
            raise
        return self._started(items, started, self._key)

    def _key(self, item: Any) -> int:
        return int(item.outbox_id)

    def _started(
        self, items: list[Any], started: Started, key: Callable[[Any], int | None]
    ) -> tuple[list[Any], bool]:
        """What :meth:`_start` returns, from what the start op found."""
        service = self.route.service_name
        for o in started.crashed:
            self.hooks.worker_crashed(service, o.outbox_id, o.event_type)
        if started.crashed:
            dead = {o.outbox_id for o in started.dead}
            self._report(
                BatchOutcome(
                    retried=[o for o in started.crashed if o.outbox_id not in dead],
                    dead=started.dead,
                )
            )
        if started.busy:
            logger.info(
                "%d message(s) skipped: another worker is handling them now",
                len(started.busy),
                extra={"service": service, "outbox_ids": started.busy},
            )
            self.hooks.messages_skipped(service, "busy", len(started.busy))
        ready = set(started.ready)
        chosen = [i for i in items if key(i) in ready]
        ready.difference_update(started.unmarked)
        if started.suspect:
            logger.warning(
                "the worker died in an earlier delivery of these %d message(s); "
                "handling them one at a time",
                len(chosen),
                extra={"service": service},
            )
            return chosen, True
        self._own.update(ready)
        return chosen, False

    async def _settle(self, items: list[Any], total: BatchOutcome) -> None:
        """Run started items through their handlers and commit the outcome."""
        for is_async, segment in self._segments(items):
            out = await self._transaction(segment, is_async)
            self._report(out)
            total.add(out)
            if self._losses:  # almost always empty: no per-message work then
                for item in segment:
                    self._losses.pop(self._loss_key(item), None)
            self._own.difference_update(k for k in map(self._key_or_none, segment) if k)

    def _key_or_none(self, item: Any) -> int | None:
        return self._key(item)

    def _loss_key(self, item: Any) -> Any:
        return item.outbox_id

    def _segments(self, envelopes: Sequence[Any]) -> list[tuple[bool, list[Any]]]:
        """Consecutive runs of messages by handler kind (async or not), in order."""
        segments: list[tuple[bool, list[Any]]] = []
        for env in envelopes:
            if env.event_type in self.handlers:
                is_async = env.event_type in self._async_types
            else:  # marked dead or skipped: no handler runs, any transaction will do
                is_async = segments[-1][0] if segments else False
            if segments and segments[-1][0] == is_async:
                segments[-1][1].append(env)
            else:
                segments.append((is_async, [env]))
        return segments

    async def _transaction(self, items: list[Any], is_async: bool) -> BatchOutcome:
        failed: tuple[Any, BaseException] | None = None
        timings: list[tuple[str, float, BaseException | None]] = []
        if not self.isolate:
            fast = await self._run(self._op(items, isolate=False, failed=None), is_async)
            if fast.failed_fast is None:
                return fast
            # Rolled back: run again with a savepoint per handler; the failed message
            # keeps the error of its one call.
            failed, timings = self._failed(fast), fast.timings
        out = await self._run(self._op(items, isolate=True, failed=failed), is_async)
        out.timings[:0] = timings
        return out

    def _op(
        self, items: list[Any], *, isolate: bool, failed: tuple[Any, BaseException] | None
    ) -> Op[BatchOutcome]:
        """The batch transaction for decoded ``items`` (envelopes here)."""
        return op_dispatch(self._ctx, items, self.handlers, isolate=isolate, failed=failed)

    def _failed(self, fast: BatchOutcome) -> tuple[Any, BaseException] | None:
        """The fast path's failure, named the way :meth:`_op` takes it (None: a batch
        handler failed, so which event failed is unknown)."""
        assert fast.failed_fast is not None
        return fast.failed_fast if fast.failed_fast[0] else None

    async def _run(self, op: Op[BatchOutcome], is_async: bool) -> BatchOutcome:
        """Run a batch op in a transaction of its own; commit it, unless the op says
        the fast path failed (then roll it back)."""
        connector = self.storage.connector
        if is_async:
            return await connector.run_async(op, commit_if=_settled, context=self._ctx.ctx)
        async with connector.writer():
            return await self._thread.run(self._run_sync, op)

    def _report(self, out: BatchOutcome) -> None:
        service = self.route.service_name
        hooks = self.hooks
        for event_type, seconds in out.latencies:
            hooks.event_latency(service, event_type, seconds)
        for event_type, seconds, error in out.timings:
            hooks.handler_finished(service, event_type, seconds, error)
        errors = dict(out.handler_errors)
        if out.consumed:
            hooks.messages_consumed(service, len(out.consumed))
        # One line per failed attempt or dead letter; tracebacks at DEBUG (and in
        # last_error), not a page per attempt.
        for o in out.retried:
            log_retried(logger, **_fields(service, o), error=errors.get(o.outbox_id))
            hooks.message_retried(service, o.outbox_id, o.attempts, o.reason)
        for o in out.dead:
            log_dead(logger, **_fields(service, o), error=errors.get(o.outbox_id))
            hooks.message_dead(service, o.outbox_id, o.attempts, o.reason)
        if out.skipped:
            hooks.messages_skipped(service, "settled", out.skipped)
        if out.deferred:
            hooks.messages_skipped(service, "deferred", len(out.deferred))

    async def dispatch_alone(self, message: IncomingMessage) -> None:
        """One message in its own transaction; if that fails, a failed attempt is
        recorded for it in a transaction of its own. Raises if the database cannot
        record anything, and :class:`ConnectionLostError` when the transaction lost
        its connection (not an attempt, up to :data:`LOSSES_PER_ATTEMPT` in a row)."""
        try:
            await self.dispatch([message], first_pass=False)
            return
        except Exception as exc:  # noqa: BLE001 - whatever broke it is recorded below
            failure = exc
        decoded = self.decode([message], report=False)
        if decoded and connection_lost(failure, self.storage.database.dialect):
            key = self._loss_key(decoded[0])
            losses = self._losses[key] = self._losses.get(key, 0) + 1
            if losses < LOSSES_PER_ATTEMPT:
                raise ConnectionLostError(
                    "the database connection was lost while handling a message; "
                    "tried again, not counted as an attempt",
                    service=self.route.service_name,
                ) from failure
        if decoded:
            await self._record_broken(decoded[0], failure)
            # Reset once recorded: if recording failed too, the next loss is charged.
            self._losses.pop(self._loss_key(decoded[0]), None)
            key = self._key_or_none(decoded[0])
            if key is not None:
                self._own.discard(key)

    async def _record_broken(self, env: Any, failure: Exception) -> None:
        """A failed attempt for a message whose own transaction failed."""
        logger.error(
            "message %s breaks its own transaction; counted as a failed attempt",
            env.outbox_id,
            exc_info=failure,
            extra={"service": self.route.service_name, "outbox_id": env.outbox_id},
        )
        reason = describe_error(failure)
        store = self.storage.store(self.route)
        outcome = await store.mark_failed_many_async([(env.outbox_id, reason)])
        status = outcome.get(env.outbox_id)
        if status is not None:
            after = await store.get_by_id_async(env.outbox_id)
            attempts = after.retry_count if after is not None else 0
            done = Outcome(env.outbox_id, env.event_type, attempts, reason)
            out = BatchOutcome(
                retried=[done] if status is Status.PENDING else [],
                dead=[done] if status is Status.DEAD else [],
                timings=[(env.event_type, 0.0, failure)],
            )
            self._report(out)

    def _run_sync(self, op: Op[BatchOutcome]) -> BatchOutcome:
        # A connection that died since the last batch fails this one, which runs
        # again (a loss is no attempt): no ping before each batch.
        with fresh_connections_trusted():
            return self.storage.connector.run(op, commit_if=_settled, context=self._ctx.ctx)


def _settled(out: BatchOutcome) -> bool:
    """Whether a batch transaction commits: not when its fast path failed."""
    return out.failed_fast is None


class InboxDispatcher(Dispatcher):
    """Runs one inbox route's batches: each received message is read by the route's
    adapter, stored in the inbox (once: a redelivered or duplicated message finds its
    row) and handled in the same transaction. A failure leaves the inbox row pending
    with its backoff, and the inbox's own relay runs it again later, so a failing
    message never holds its partition back and nothing is acknowledged before the
    database commit."""

    def __init__(
        self,
        storage: Storage,
        route: ServiceRoute,
        handlers: Mapping[str, Handler],
        hooks: Observer,
        *,
        adapter: Adapter = outboxer_envelope,
        isolate: bool = False,
        lease: float = DEFAULT_LEASE,
    ) -> None:
        super().__init__(storage, route, handlers, hooks, isolate=isolate)
        self.adapter = adapter
        self.lease = lease
        self._row_of: dict[str, int] = {}
        self._rows: dict[str, dict[str, Any]] = {}
        """Event id -> its inbox row, built once when the message was decoded."""

    def _row(self, event: InboxEvent) -> dict[str, Any]:
        row = self._rows.get(event.event_id)
        if row is None:
            row = self._rows[event.event_id] = self._lineage(
                self.storage.rows.received(self.route, **_received(event)), None
            )
        return row

    def _lineage(self, row: dict[str, Any], coordinates: str | None) -> dict[str, Any]:
        # Every row of a batch has the same columns (one executemany).
        row["coordinates"] = coordinates[:MAX_COORDINATES_CHARS] if coordinates else None
        row["consumer_group"] = self.route.group_id
        return row

    async def _start(self, items: list[Any], *, alone: bool) -> tuple[list[Any], bool]:
        """Store the received events (once) and mark them as being handled, in one
        short transaction before any handler runs."""
        if not items:
            return [], False
        rows = [self._row(e) for e in items]
        store = self.storage.store(self.route)
        row_of, started = await store.inbox_start_async(
            rows, lease=self.lease, alone=alone, own=self._own
        )
        self._row_of.update(row_of)
        return self._started(items, started, lambda e: row_of.get(e.event_id))

    def _key_or_none(self, item: Any) -> int | None:
        return self._row_of.pop(item.event_id, None)

    def _loss_key(self, item: Any) -> Any:
        return item.event_id

    def decode(self, batch: Sequence[IncomingMessage], *, report: bool = True) -> list[Any]:
        events: list[InboxEvent] = []
        self._rows = {}
        for msg in batch:
            try:
                event = self.adapter(msg)
                if event is None:
                    continue
                # Built (and so checked) now, so one bad message cannot fail the
                # batch's insert; the start and the batch use this row.
                row = self.storage.rows.received(self.route, **_received(event))
                row = self._lineage(row, msg.coordinates)
            except Exception as exc:  # noqa: BLE001 - whatever the adapter cannot read
                if report:
                    self._skipped(msg, "undecodable", "unreadable message skipped", exc)
                continue
            events.append(event)
            self._rows[event.event_id] = row
            self._headers[event.event_id] = msg.headers
        return events

    def _op(
        self, items: list[Any], *, isolate: bool, failed: tuple[Any, BaseException] | None
    ) -> Op[BatchOutcome]:
        # Stored by _start already; inserted again if missing (nothing when present),
        # so the batch never depends on the start's relaxed commit.
        unique = {e.event_id: e for e in items}
        rows = [self._row(e) for e in unique.values()]
        return op_inbox_receive(
            self._ctx, items, rows, self.handlers, isolate=isolate, failed=failed
        )

    def _failed(self, fast: BatchOutcome) -> tuple[Any, BaseException] | None:
        # The fast path's insert was rolled back: its row ids mean nothing now.
        assert fast.failed_fast is not None
        row_id, error = fast.failed_fast
        event_id = fast.event_ids.get(row_id)
        return None if event_id is None else (event_id, error)

    async def _record_broken(self, event: Any, failure: Exception) -> None:
        """The message is stored (once) and its failed attempt recorded."""
        logger.error(
            "message %s breaks its own transaction; stored and counted as a failed attempt",
            event.event_id,
            exc_info=failure,
            extra={"service": self.route.service_name, "event_id": event.event_id},
        )
        store = self.storage.store(self.route)
        row_id = await store.store_received_async(self._row(event))
        outcome = await store.mark_failed_many_async([(row_id, describe_error(failure))])
        if outcome.get(row_id) is not None:
            self.hooks.handler_finished(self.route.service_name, event.event_type, 0.0, failure)


def _received(event: InboxEvent) -> dict[str, Any]:
    return {
        "event_id": event.event_id,
        "event_type": event.event_type,
        "key": event.key,
        "payload": event.payload,
        "version": event.version,
        "aggregate_id": event.aggregate_id,
    }


def _fields(service: str, o: Outcome) -> dict[str, Any]:
    return {
        "service": service,
        "outbox_id": o.outbox_id,
        "event_type": o.event_type,
        "attempts": o.attempts,
        "reason": o.reason,
    }
