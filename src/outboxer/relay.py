"""The relay: claim due rows -> send them -> mark the outcome.

Per service route: claim up to ``batch_size`` due rows in one statement (with a
lease, so many relays can run at once and a crashed one's rows come back), send
them as one batch, then mark every acknowledged row published in one statement
(guarded by the claimed ``retry_count``), failed ones failed-for-retry and
permanently refused or undecodable ones dead. Broker-side (transient) failures are
never attempts: a batch failing only so is an outage (the rows are held and the
relay backs off); beside successes, their rows are due again after ``error_delay``.
No database transaction is open while the transport is waiting on the broker.

Batches are pipelined: while the broker acknowledges one batch, the relay claims
and sends the next ones, up to ``relay_pipeline`` batches in flight, so the
database and the broker work at the same time. A row is marked published only
after its own acknowledgement; the lease bounds how long a crashed relay holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import datetime

from outboxer.aio import sleep_unless
from outboxer.backoff import ErrorBackoff
from outboxer.cloudevents import PREFIX, WireCloudEvent, encode_for, is_cloudevents
from outboxer.database.connections import connection_lost
from outboxer.database.ops.transitions import Claimed
from outboxer.envelope import Envelope, WireEvent, wire_event
from outboxer.errors import EnvelopeDecodeError
from outboxer.hooks import Observer
from outboxer.logs import log_dead
from outboxer.models import Status, parse_headers
from outboxer.routing import ServiceRoute
from outboxer.settings import DEFAULT_POLL_INTERVAL, POLLED_POLL_INTERVAL, OutboxSettings
from outboxer.store import Store
from outboxer.transports.base import Delivery, OutgoingMessage, Transport
from outboxer.wake import Waker

logger = logging.getLogger(__name__)

COMMIT_RECHECK = 0.002
"""A Connection's commit hook fires just before COMMIT: after a wake-up that found
nothing, look again this soon (then 2x, 4x, ...) instead of waiting a whole poll."""

STAY_FAST = 1.0
"""Without notifications (MariaDB, SQLite, ``notify = false``), polls stay at
``poll_interval_min`` this many seconds after the last poll that found rows before
the wait starts doubling: a steady trickle of events (a few a second or more) is
found within ``poll_interval_min``, not after a poll that backed off meanwhile."""

COALESCE_WAIT = 0.1
"""After a wake-up while a batch smaller than ``batch_size`` is in flight, wait for
it (at most this long) before claiming again: what arrived meanwhile then goes out
as one batch instead of queueing behind it as many small ones. A full batch (a
backlog) never waits: the pipeline keeps ``relay_pipeline`` batches in flight."""


@dataclass(slots=True)
class _Batch:
    claimed: int
    outgoing: list[OutgoingMessage]
    redelivered: set[int] = field(default_factory=set)
    started: float = 0.0
    claimed_at: dict[int, datetime | None] = field(default_factory=dict)
    """Each row's claim stamp: its published mark requires the row unchanged since."""


class Relay:
    """One service route's relay loop."""

    def __init__(
        self,
        store: Store,
        transport: Transport,
        settings: OutboxSettings,
        *,
        hooks: Observer,
        waker: Waker,
        redeliver_after: float = 0.0,
    ) -> None:
        self.store = store
        self.route: ServiceRoute = store.route
        self.transport = transport
        self.settings = settings
        self.hooks = hooks
        self.waker = waker
        self.redeliver_after = redeliver_after
        """Send ``published`` rows again when unconsumed this long (0: never)."""
        self._next_redelivery_check = 0.0
        self._outage = ErrorBackoff(settings.error_delay, settings.error_delay_max)
        self.outage_since: float | None = None
        """Monotonic time the current transport outage began (None: no outage)."""
        self.next_delay = 0.0
        # Per-message report only when someone listens (tracing).
        self._headers_hook = hooks.wants("message_sending")
        self._cloudevents = is_cloudevents(self.route)
        # In process, the consumer gets each envelope built, not only its wire form
        # to parse again.
        features = getattr(transport, "features", None)  # a transport may predate them
        self._in_process = bool(getattr(features, "in_process", False)) and not self._cloudevents
        # An in-process transport that says when its consumer is idle: a claim made
        # then also marks the rows as being handled (one statement, not two).
        idle = getattr(transport, "idle", None)
        self._consumer_idle = idle if getattr(features, "in_process", False) else None
        # A transport may name its protocol binding's header prefix (Kafka's: ce_).
        self._ce_prefix: str = getattr(transport, "cloudevents_prefix", PREFIX)

    @property
    def pipeline_depth(self) -> int:
        """Batches in flight at once. SQLite has one writer: a claim made while the
        previous batch is being consumed (in-process) would only wait for its lock."""
        if self.store.dialect.single_writer:
            return 1
        return self.settings.relay_pipeline

    # ---------------------------------------------------------------- one batch

    async def run_once(self) -> int:
        """Claim, send and mark one batch; returns how many rows were claimed."""
        batch = await self._claim()
        if batch is None:
            return 0
        await self._deliver(batch)
        return batch.claimed

    async def _claim(self) -> _Batch | None:
        """Due rows, plus now and then published rows nobody consumed. The redelivery
        check has its own timer, so a steady backlog cannot starve it; while it finds
        a full share it stays due."""
        started = time.perf_counter()
        size = self.settings.batch_size
        again: list[Claimed] = []
        after = self.redeliver_after
        now = asyncio.get_running_loop().time()
        if after > 0 and now >= self._next_redelivery_check:
            share = max(1, size // 2)
            found = await self.store.claim_unconsumed_async(share, after)
            if len(found) < share:
                self._next_redelivery_check = now + min(after / 2, 60.0)
            if found:
                logger.warning(
                    "%d published message(s) not consumed within %.0fs; sending them again",
                    len(found),
                    after,
                    extra={
                        "service": self.route.service_name,
                        "outbox_ids": [m.id for m in found[:20]],
                    },
                )
            again = [
                Claimed(m.id, m.message_key, m.payload, m.retry_count, m.headers, m.updated_at)
                for m in found
            ]
        idle = self._consumer_idle
        mark = not again and idle is not None and bool(idle(self.route))
        rows = await self.store.claim_to_send_async(
            size - len(again), self.settings.lease, mark=mark
        )
        self.hooks.batch_claimed(self.route.service_name, len(rows), len(again))
        if not rows and not again:
            return None
        outgoing = await self._prepare([*rows, *again])
        stamps = {m.id: m.claimed_at for m in [*rows, *again]}
        return _Batch(len(rows) + len(again), outgoing, {m.id for m in again}, started, stamps)

    async def _prepare(self, rows: list[Claimed]) -> list[OutgoingMessage]:
        """Wire messages for the rows (the envelope, or CloudEvents by the route's
        ``format``); undecodable rows are marked dead."""
        outgoing: list[OutgoingMessage] = []
        broken: list[tuple[int, str]] = []
        for row in rows:
            headers = parse_headers(row.headers)
            wire: WireEvent | WireCloudEvent
            try:
                if self._cloudevents:
                    wire = encode_for(
                        self.route, row.payload, row.id, row.message_key, headers, self._ce_prefix
                    )
                    headers = wire.headers
                else:
                    wire = wire_event(row.payload, row.id, row.message_key)
            except EnvelopeDecodeError as exc:
                logger.error(
                    "stored envelope cannot be decoded; marking dead",
                    extra={"service": self.route.service_name, "outbox_id": row.id},
                )
                broken.append((row.id, f"stored payload is not a valid envelope: {exc}"))
                continue
            if self._headers_hook:
                self.hooks.message_sending(
                    self.route.service_name, row.id, wire.event_type, headers
                )
            envelope = None
            if self._in_process and isinstance(wire, WireEvent) and wire.decoded is not None:
                with contextlib.suppress(EnvelopeDecodeError):  # the consumer says why
                    envelope = Envelope.from_dict(wire.decoded)
            outgoing.append(
                OutgoingMessage(
                    row.id,
                    row.retry_count,
                    row.message_key,
                    wire.value,
                    wire.event_id,
                    wire.event_type,
                    wire.event_version,
                    headers,
                    envelope,
                    marked=row.marked,
                )
            )
        await self._bury(broken)
        return outgoing

    async def _bury(self, broken: list[tuple[int, str]]) -> None:
        for oid, reason in broken:
            await self.store.mark_dead_many_async([oid], reason, unless_final=True)
        if broken:
            self.hooks.rows_undecodable(self.route.service_name, len(broken))

    async def _deliver(self, batch: _Batch) -> None:
        """Send a claimed batch and record the outcome (or hold it: an outage)."""
        if batch.outgoing:
            sent_at = time.perf_counter()
            deliveries = await self._send(batch.outgoing)
            if deliveries is None:
                await self._hold(batch.outgoing, batch.redelivered)
                return
            self._outage_over()
            await self._record(
                batch.outgoing,
                deliveries,
                batch.redelivered,
                time.perf_counter() - sent_at,
                batch.claimed_at,
            )
        self.hooks.relay_round(
            self.route.service_name, batch.claimed, time.perf_counter() - batch.started
        )

    async def _send(self, outgoing: list[OutgoingMessage]) -> list[Delivery] | None:
        """The transport's deliveries, or None when it failed as a whole (it raised,
        or every message failed with a transient, broker-side error)."""
        try:
            deliveries = await self.transport.send(self.route, outgoing)
        except Exception as exc:  # noqa: BLE001 - a send that raises is an outage
            self._outage_begins(f"{type(exc).__name__}: {exc}", exc)
            return None
        if len(deliveries) != len(outgoing):
            raise RuntimeError(
                f"transport {self.transport.name} returned {len(deliveries)} results "
                f"for {len(outgoing)} messages"
            )
        if all(d.error is not None and d.transient and not d.settled for d in deliveries):
            self._outage_begins(str(deliveries[0].error), None)
            return None
        return deliveries

    # ---------------------------------------------------------------- outages

    def _outage_begins(self, reason: str, exc: BaseException | None) -> None:
        service = self.route.service_name
        # The hooks log the outage once at its start and once at its end (LogReports);
        # the details of each failed probe are for DEBUG.
        logger.debug("transport unavailable: %s", reason, exc_info=exc, extra={"service": service})
        if self.outage_since is None:
            self.outage_since = time.monotonic()
            self.hooks.outage_started(service, reason)

    def _outage_over(self) -> None:
        since, self.outage_since = self.outage_since, None
        if since is None:
            return
        self._outage.reset()
        self.hooks.outage_ended(self.route.service_name, time.monotonic() - since)

    async def _hold(self, outgoing: list[OutgoingMessage], redelivered: AbstractSet[int]) -> None:
        """An outage: give the claimed rows back, due again when the relay will probe
        again; nothing is an attempt. Rows sent again stay published."""
        self.next_delay = self._outage.next()
        due = [m.outbox_id for m in outgoing if m.outbox_id not in redelivered]
        await self.store.release_async(due, self.next_delay)

    # ---------------------------------------------------------------- marks

    async def _record(
        self,
        outgoing: list[OutgoingMessage],
        deliveries: list[Delivery],
        redelivered: AbstractSet[int] = frozenset(),
        seconds: float = 0.0,
        claimed_at: Mapping[int, datetime | None] | None = None,
    ) -> None:
        service = self.route.service_name
        stamps = claimed_at or {}
        published: dict[tuple[int, datetime | None], list[int]] = defaultdict(list)
        coordinates: dict[int, str] = {}
        handed_over = 0
        handoff_failed: list[str] = []
        untouched: list[int] = []
        failed: list[tuple[int, str]] = []
        held: list[int] = []
        held_error = ""
        dead: dict[str, list[int]] = defaultdict(list)
        resend_failed: list[str] = []
        for msg, d in zip(outgoing, deliveries, strict=True):
            if d.settled:
                if d.error is not None:
                    handoff_failed.append(d.error)
                    if d.transient and msg.marked:
                        untouched.append(msg.outbox_id)
                else:
                    handed_over += 1
            elif d.error is None:
                published[msg.retry_count, stamps.get(msg.outbox_id)].append(msg.outbox_id)
                if d.coordinates:
                    coordinates[msg.outbox_id] = d.coordinates
            elif msg.outbox_id in redelivered:
                # A copy was delivered before; a failed resend must not become an
                # attempt or a dead letter (the consumer would then skip that copy).
                # The row stays published and is tried again after redeliver_after.
                resend_failed.append(d.error)
            elif d.permanent:
                dead[f"broker refused the message permanently: {d.error}"].append(msg.outbox_id)
            elif d.transient:
                # The broker's trouble, not the message's (a replaced broker that does
                # not know the producer, a timeout): sent again, no attempt counted.
                held.append(msg.outbox_id)
                held_error = held_error or d.error
            else:
                failed.append((msg.outbox_id, f"send failed: {d.error}"))
        marked = 0
        for (retry_count, stamp), ids in published.items():
            where = {i: coordinates[i] for i in ids if i in coordinates}
            marked += await self._mark_published(ids, retry_count, stamp, where)
        sent = handed_over + sum(len(ids) for ids in published.values())
        if sent:
            self.hooks.batch_sent(service, sent, marked, seconds)
        if handoff_failed:
            logger.warning(
                "in-process handoff of %d message(s) failed; their rows return after the lease: %s",
                len(handoff_failed),
                handoff_failed[0],
                extra={"service": service},
            )
            self.hooks.batch_failed(service, len(handoff_failed), 0, handoff_failed[0])
        if untouched:
            await self._unmark(untouched)
        if resend_failed:
            self.hooks.resend_failed(service, len(resend_failed), resend_failed[0])
        if failed:
            statuses = await self.store.mark_failed_many_async(failed)
            self._report_dead(outgoing, failed, statuses)
            logger.warning(
                "%d message(s) not acknowledged by the broker; will retry: %s",
                len(failed),
                failed[0][1],
                extra={"service": service},
            )
        if held:
            delay = self.settings.error_delay
            await self.store.release_async(held, delay)
            logger.warning(
                "%d message(s) not acknowledged for a broker-side reason; sent again in "
                "%.1fs without counting an attempt: %s",
                len(held),
                delay,
                held_error,
                extra={"service": service, "outbox_ids": held[:20]},
            )
        for reason, ids in dead.items():
            await self.store.mark_dead_many_async(ids, reason, unless_final=True)
            logger.error("%s", reason, extra={"service": service, "outbox_ids": ids[:20]})
        if failed or held or dead:
            if failed:
                first = failed[0][1]
            elif held:
                first = f"send failed: {held_error}"
            else:
                first = next(iter(dead))
            self.hooks.batch_failed(
                service, len(failed) + len(held), sum(len(ids) for ids in dead.values()), first
            )

    async def _mark_published(
        self,
        ids: list[int],
        retry_count: int,
        stamp: datetime | None,
        coordinates: Mapping[int, str] | None = None,
    ) -> int:
        """Mark sent rows published; once more on a new connection if the connection
        was lost (its answer too: the mark may have been made, and then the second one
        finds the rows changed since the claim and leaves them, as it should). Without
        it the rows would be sent again after the lease."""
        try:
            return await self.store.mark_published_many_async(
                ids,
                expect_retry_count=retry_count,
                expect_updated_at=stamp,
                coordinates=coordinates,
            )
        except Exception as exc:
            if not connection_lost(exc, self.store.dialect):
                raise
            logger.warning(
                "database connection lost while marking %d row(s) published; marking again",
                len(ids),
                extra={"service": self.route.service_name, "error": str(exc)},
            )
            return await self.store.mark_published_many_async(
                ids,
                expect_retry_count=retry_count,
                expect_updated_at=stamp,
                coordinates=coordinates,
            )

    async def _unmark(self, ids: list[int]) -> None:
        """Rows whose claim marked them as being handled, and that no consumer took
        (it stopped first): due again at once with no mark, so the next delivery
        does not take the mark for a worker that died handling them. If this fails,
        the mark stays and the next delivery treats them as a crash's."""
        try:
            await self.store.release_async(ids, 0.0, unmark=True)
        except Exception:  # the lease returns them anyway
            logger.warning(
                "could not clear the handling marks of %d row(s) no consumer took",
                len(ids),
                exc_info=True,
                extra={"service": self.route.service_name, "outbox_ids": ids[:20]},
            )

    def _report_dead(
        self,
        outgoing: list[OutgoingMessage],
        failed: list[tuple[int, str]],
        statuses: dict[int, Status | None],
    ) -> None:
        """Failed sends that used up ``max_retry``: one ERROR line and a report each."""
        by_id = {m.outbox_id: m for m in outgoing}
        service = self.route.service_name
        for oid, reason in failed:
            if statuses.get(oid) is Status.DEAD:
                msg = by_id[oid]
                attempts = msg.retry_count + 1
                event_type = msg.event_type
                log_dead(
                    logger,
                    service=service,
                    outbox_id=oid,
                    event_type=event_type,
                    attempts=attempts,
                    reason=reason,
                )
                self.hooks.message_dead(service, oid, attempts, reason)

    # ---------------------------------------------------------------- the loop

    async def run(self, stopping: asyncio.Event) -> None:
        """Loop until ``stopping`` is set; batches in flight are always finished."""
        service = self.route.service_name
        backoff = ErrorBackoff(self.settings.error_delay, self.settings.error_delay_max)
        slots = asyncio.Semaphore(self.pipeline_depth)
        in_flight: set[asyncio.Task[None]] = set()
        woken = False
        top = self.settings.poll_interval or (
            DEFAULT_POLL_INTERVAL if self.store.notifies else POLLED_POLL_INTERVAL
        )
        poll = top

        def finished(task: asyncio.Task[None]) -> None:
            in_flight.discard(task)
            slots.release()
            if not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                assert exc is not None
                logger.error(
                    "relay batch failed; its rows return after the lease",
                    exc_info=exc,
                    extra={"service": service},
                )
                self.hooks.loop_error(service, "relay", exc)

        partial: set[asyncio.Task[None]] = set()  # in flight, smaller than batch_size
        loop = asyncio.get_running_loop()
        stay_fast = not self.store.notifies
        last_found = -STAY_FAST
        try:
            while not stopping.is_set():
                if partial:
                    # Let the small batch in flight finish first: what came since
                    # then leaves as one batch.
                    await asyncio.wait(set(partial), timeout=COALESCE_WAIT)
                await slots.acquire()
                try:
                    batch = await self._claim()
                    backoff.reset()
                except Exception as exc:
                    slots.release()
                    logger.exception("relay round failed", extra={"service": service})
                    self.hooks.loop_error(service, "relay", exc)
                    await sleep_unless(stopping, backoff.next())
                    continue
                if batch is not None:
                    task = asyncio.create_task(self._deliver(batch))
                    in_flight.add(task)
                    task.add_done_callback(finished)
                    if batch.claimed < self.settings.batch_size:
                        partial.add(task)
                        task.add_done_callback(partial.discard)
                else:
                    slots.release()
                if self.outage_since is not None:
                    await _drain(in_flight)  # the batches in flight fail too
                    await sleep_unless(stopping, self.next_delay)  # then probe again
                    continue
                claimed = batch.claimed if batch is not None else 0
                if claimed >= self.settings.batch_size:
                    continue  # backlog: claim the next batch while this one is sent
                if stopping.is_set():
                    break
                # Adaptive polling: soon after work was found, slower while idle, up to
                # poll_interval (the latency of databases without notifications).
                now = loop.time()
                if claimed:
                    last_found = now
                    poll = min(self.settings.poll_interval_min, top)
                elif woken:
                    poll = min(COMMIT_RECHECK, top)  # woken a moment before the COMMIT
                elif stay_fast and now - last_found < STAY_FAST:
                    poll = min(self.settings.poll_interval_min, top)
                else:
                    poll = min(poll * 2, top)
                woken = await self._wait_for_work(stopping, poll)
        except asyncio.CancelledError:
            for task in in_flight:  # past shutdown_timeout: their rows return after the lease
                task.cancel()
            raise
        finally:
            await _drain(in_flight)

    async def _wait_for_work(self, stopping: asyncio.Event, timeout: float) -> bool:
        """Until a wake-up (True), a stop or ``timeout`` seconds (False)."""
        wake = asyncio.ensure_future(self.waker.wait(self.route.service_name, timeout))
        stop = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait({wake, stop}, return_when=asyncio.FIRST_COMPLETED)
            return wake.done() and not wake.cancelled() and wake.result()
        finally:
            for task in (wake, stop):
                if not task.done():
                    task.cancel()


async def _drain(tasks: set[asyncio.Task[None]]) -> None:
    if tasks:
        await asyncio.wait(set(tasks))
