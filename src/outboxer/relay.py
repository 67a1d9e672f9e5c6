"""The relay: claim due rows -> send them -> mark the outcome.

Per service route: claim up to ``batch_size`` due rows in one statement (with a
lease, so many relays can run at once and a crashed one's rows come back), send
them as one batch, then mark every acknowledged row published in one statement
(guarded by the claimed ``retry_count``), failed ones failed-for-retry and
permanently refused or undecodable ones dead. Broker-side (transient) failures are
never attempts: a batch failing only so is an outage (the rows are held and the
relay backs off); beside successes, their rows are due again after ``error_delay``.
No database transaction is open while the transport is waiting on the broker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Set as AbstractSet

from outboxer.aio import sleep_unless
from outboxer.backoff import ErrorBackoff
from outboxer.errors import EnvelopeDecodeError
from outboxer.hooks import Observer
from outboxer.models import OutboxMessage
from outboxer.routing import ServiceRoute
from outboxer.settings import OutboxSettings
from outboxer.store import Store
from outboxer.transports.base import Delivery, OutgoingMessage, Transport
from outboxer.wake import Waker

logger = logging.getLogger(__name__)

COMMIT_RECHECK = 0.02
"""A Connection's commit hook fires just before COMMIT: after a wake-up that found
nothing, look once more this much later instead of waiting a whole poll."""


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

    async def _claim(self) -> tuple[list[OutboxMessage], set[int]]:
        """Due rows, plus now and then published rows nobody consumed (the second
        item: their ids). The redelivery check has its own timer, so a steady
        backlog cannot starve it; while it finds a full share it stays due."""
        size = self.settings.batch_size
        again: list[OutboxMessage] = []
        after = self.redeliver_after
        now = asyncio.get_running_loop().time()
        if after > 0 and now >= self._next_redelivery_check:
            share = max(1, size // 2)
            again = await self.store.claim_unconsumed_async(share, after)
            if len(again) < share:
                self._next_redelivery_check = now + min(after / 2, 60.0)
            if again:
                logger.warning(
                    "%d published message(s) not consumed within %.0fs; sending them again",
                    len(again),
                    after,
                    extra={
                        "service": self.route.service_name,
                        "outbox_ids": [m.id for m in again[:20]],
                    },
                )
        rows = await self.store.claim_due_async(size - len(again), self.settings.lease)
        self.hooks.batch_claimed(self.route.service_name, len(rows), len(again))
        return [*rows, *again], {m.id for m in again}

    async def run_once(self) -> int:
        """Claim, send and mark one batch; returns how many rows were claimed."""
        started = time.perf_counter()
        rows, redelivered = await self._claim()
        if not rows:
            return 0
        outgoing, broken = self._prepare(rows)
        if broken:
            for oid, reason in broken:
                await self.store.mark_dead_many_async([oid], reason, unless_final=True)
            self.hooks.rows_undecodable(self.route.service_name, len(broken))
        if outgoing:
            sent_at = time.perf_counter()
            deliveries = await self._send(outgoing)
            if deliveries is None:
                await self._hold(outgoing, redelivered)
                return len(rows)
            self._outage_over()
            await self._record(outgoing, deliveries, redelivered, time.perf_counter() - sent_at)
        self.hooks.relay_round(self.route.service_name, len(rows), time.perf_counter() - started)
        return len(rows)

    def _prepare(
        self, rows: list[OutboxMessage]
    ) -> tuple[list[OutgoingMessage], list[tuple[int, str]]]:
        outgoing: list[OutgoingMessage] = []
        broken: list[tuple[int, str]] = []
        for row in rows:
            try:
                env = row.envelope()
            except EnvelopeDecodeError as exc:
                logger.error(
                    "stored envelope cannot be decoded; marking dead",
                    extra={"service": row.service_name, "outbox_id": row.id},
                )
                broken.append((row.id, f"stored payload is not a valid envelope: {exc}"))
                continue
            outgoing.append(
                OutgoingMessage.from_envelope(env, key=row.message_key, retry_count=row.retry_count)
            )
        return outgoing, broken

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

    def _outage_begins(self, reason: str, exc: BaseException | None) -> None:
        service = self.route.service_name
        if self.outage_since is not None:
            logger.debug("transport still unavailable: %s", reason, extra={"service": service})
            return
        self.outage_since = time.monotonic()
        logger.warning(
            "transport unavailable, holding messages without counting attempts: %s",
            reason,
            exc_info=exc,
            extra={"service": service, "transport": self.transport.name},
        )
        self.hooks.outage_started(service, reason)

    def _outage_over(self) -> None:
        since, self.outage_since = self.outage_since, None
        if since is None:
            return
        self._outage.reset()
        seconds = time.monotonic() - since
        logger.warning(
            "transport available again after %.1fs",
            seconds,
            extra={"service": self.route.service_name, "transport": self.transport.name},
        )
        self.hooks.outage_ended(self.route.service_name, seconds)

    async def _hold(self, outgoing: list[OutgoingMessage], redelivered: AbstractSet[int]) -> None:
        """An outage: give the claimed rows back, due again when the relay will probe
        again; nothing is an attempt. Rows sent again stay published."""
        self.next_delay = self._outage.next()
        due = [m.outbox_id for m in outgoing if m.outbox_id not in redelivered]
        await self.store.release_async(due, self.next_delay)

    async def _record(
        self,
        outgoing: list[OutgoingMessage],
        deliveries: list[Delivery],
        redelivered: AbstractSet[int] = frozenset(),
        seconds: float = 0.0,
    ) -> None:
        service = self.route.service_name
        published: dict[int, list[int]] = defaultdict(list)
        handed_over = 0
        handoff_failed: list[str] = []
        failed: list[tuple[int, str]] = []
        held: list[int] = []
        held_error = ""
        dead: dict[str, list[int]] = defaultdict(list)
        resend_failed: list[str] = []
        for msg, d in zip(outgoing, deliveries, strict=True):
            if d.settled:
                if d.error is not None:
                    handoff_failed.append(d.error)
                else:
                    handed_over += 1
            elif d.error is None:
                published[msg.retry_count].append(msg.outbox_id)
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
        for retry_count, ids in published.items():
            marked += await self.store.mark_published_many_async(
                ids, expect_retry_count=retry_count
            )
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
        if resend_failed:
            self.hooks.resend_failed(service, len(resend_failed), resend_failed[0])
        if failed:
            await self.store.mark_failed_many_async(failed)
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

    async def run(self, stopping: asyncio.Event) -> None:
        """Loop until ``stopping`` is set; the batch in flight is always finished."""
        service = self.route.service_name
        backoff = ErrorBackoff(self.settings.error_delay, self.settings.error_delay_max)
        woken = False
        while not stopping.is_set():
            try:
                claimed = await self.run_once()
                backoff.reset()
            except Exception as exc:
                logger.exception("relay round failed", extra={"service": service})
                self.hooks.loop_error(service, "relay", exc)
                await sleep_unless(stopping, backoff.next())
                continue
            if self.outage_since is not None and claimed:
                await sleep_unless(stopping, self.next_delay)  # then probe again
                continue
            if claimed >= self.settings.batch_size:
                continue  # backlog: go again at once
            if stopping.is_set():
                break
            if woken and not claimed:
                woken = False
                await sleep_unless(stopping, COMMIT_RECHECK)
                continue
            woken = await self._wait_for_work(stopping)

    async def _wait_for_work(self, stopping: asyncio.Event) -> bool:
        """Until a wake-up (True), a stop or the poll interval (False)."""
        wake = asyncio.ensure_future(
            self.waker.wait(self.route.service_name, self.settings.poll_interval)
        )
        stop = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait({wake, stop}, return_when=asyncio.FIRST_COMPLETED)
            return wake.done() and not wake.cancelled() and wake.result()
        finally:
            for task in (wake, stop):
                if not task.done():
                    task.cancel()
