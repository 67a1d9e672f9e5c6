"""The relay: claim due rows -> send them -> mark the outcome.

Per service route: claim up to ``batch_size`` due rows in one statement (with a
lease, so many relays can run at once and a crashed one's rows come back), send
them as one batch, then mark every acknowledged row published in one statement
(guarded by the claimed ``retry_count``), failed ones failed-for-retry and
permanently refused or undecodable ones dead. No database transaction is open while
the transport is waiting on the broker.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from outboxer.aio import sleep_unless
from outboxer.errors import EnvelopeDecodeError
from outboxer.metrics import Stats
from outboxer.models import OutboxMessage
from outboxer.routing import ServiceRoute
from outboxer.store import Store
from outboxer.transports.base import Delivery, OutgoingMessage, Transport

logger = logging.getLogger(__name__)


class Waker:
    """Wakes relays when this process commits a publish (thread-safe)."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop, services: list[str]) -> None:
        self._loop = loop
        self._events = {s: asyncio.Event() for s in services}

    def unbind(self) -> None:
        self._loop = None
        self._events = {}

    @property
    def active(self) -> bool:
        return self._loop is not None

    def notify(self, services: set[str] | frozenset[str]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            same_loop = asyncio.get_running_loop() is loop
        except RuntimeError:  # published from another thread
            same_loop = False
        for service in services:
            ev = self._events.get(service)
            if ev is None:
                continue
            if same_loop:
                ev.set()
            else:
                loop.call_soon_threadsafe(ev.set)

    async def wait(self, service: str, timeout: float) -> bool:
        ev = self._events.get(service)
        if ev is None:
            await asyncio.sleep(timeout)
            return False
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except TimeoutError:
            return False
        finally:
            ev.clear()
        return True


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayConfig:
    batch_size: int = 100
    poll_interval: float = 1.0
    lease: float = 30.0
    error_delay: float = 1.0
    redeliver_after: float = 0.0
    """Send ``published`` rows again when unconsumed this long (0: never)."""


class Relay:
    """One service route's relay loop."""

    def __init__(
        self,
        store: Store,
        transport: Transport,
        stats: Stats,
        waker: Waker,
        config: RelayConfig,
    ) -> None:
        self.store = store
        self.route: ServiceRoute = store.route
        self.transport = transport
        self.stats = stats
        self.waker = waker
        self.config = config
        self._next_redelivery_check = 0.0

    async def _claim(self) -> tuple[list[OutboxMessage], set[int]]:
        """Due rows, plus now and then published rows nobody consumed (the second
        item: their ids). The redelivery check has its own timer, so a steady
        backlog cannot starve it; while it finds a full share it stays due."""
        service = self.route.service_name
        size = self.config.batch_size
        again: list[OutboxMessage] = []
        after = self.config.redeliver_after
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
                    extra={"service": service, "outbox_ids": [m.id for m in again[:20]]},
                )
                self.stats.add(service, "redelivered", len(again))
        rows = await self.store.claim_due_async(size - len(again), self.config.lease)
        self.stats.add(service, "claimed", len(rows))
        return [*rows, *again], {m.id for m in again}

    async def run_once(self) -> int:
        """Claim, send and mark one batch; returns how many rows were claimed."""
        rows, redelivered = await self._claim()
        if not rows:
            return 0
        outgoing, broken = self._prepare(rows)
        if broken:
            for oid, reason in broken:
                await self.store.mark_dead_many_async([oid], reason, unless_final=True)
            self.stats.add(self.route.service_name, "undecodable_rows", len(broken))
        if outgoing:
            deliveries = await self._send(outgoing)
            await self._record(outgoing, deliveries, redelivered)
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

    async def _send(self, outgoing: list[OutgoingMessage]) -> list[Delivery]:
        try:
            deliveries = await self.transport.send(self.route, outgoing)
        except Exception as exc:
            logger.exception("transport send failed", extra={"service": self.route.service_name})
            reason = f"transport error: {type(exc).__name__}: {exc}"
            return [Delivery(m.outbox_id, error=reason) for m in outgoing]
        if len(deliveries) != len(outgoing):
            raise RuntimeError(
                f"transport {self.transport.name} returned {len(deliveries)} results "
                f"for {len(outgoing)} messages"
            )
        return deliveries

    async def _record(
        self,
        outgoing: list[OutgoingMessage],
        deliveries: list[Delivery],
        redelivered: AbstractSet[int] = frozenset(),
    ) -> None:
        service = self.route.service_name
        published: dict[int, list[int]] = defaultdict(list)
        failed: list[tuple[int, str]] = []
        dead: dict[str, list[int]] = defaultdict(list)
        for msg, d in zip(outgoing, deliveries, strict=True):
            if d.settled:
                if d.error is not None:
                    self.stats.add(service, "send_failed")
                    logger.warning(
                        "in-process handoff failed; rows return after their lease: %s",
                        d.error,
                        extra={"service": service, "outbox_id": msg.outbox_id},
                    )
                else:
                    self.stats.add(service, "sent")
            elif d.error is None:
                published[msg.retry_count].append(msg.outbox_id)
            elif msg.outbox_id in redelivered:
                # A copy was delivered before; a failed resend must not become an
                # attempt or a dead letter (the consumer would then skip that copy).
                # The row stays published and is tried again after redeliver_after.
                self.stats.add(service, "redeliver_failed")
            elif d.permanent:
                dead[f"broker refused the message permanently: {d.error}"].append(msg.outbox_id)
            else:
                failed.append((msg.outbox_id, f"send failed: {d.error}"))
        for retry_count, ids in published.items():
            marked = await self.store.mark_published_many_async(ids, expect_retry_count=retry_count)
            self.stats.add(service, "sent", len(ids))
            self.stats.add(service, "published", marked)
        if failed:
            await self.store.mark_failed_many_async(failed)
            self.stats.add(service, "send_failed", len(failed))
            logger.warning(
                "%d message(s) not acknowledged by the broker; will retry: %s",
                len(failed),
                failed[0][1],
                extra={"service": service},
            )
        for reason, ids in dead.items():
            await self.store.mark_dead_many_async(ids, reason, unless_final=True)
            self.stats.add(service, "send_dead", len(ids))
            logger.error("%s", reason, extra={"service": service, "outbox_ids": ids[:20]})

    async def run(self, stopping: asyncio.Event) -> None:
        """Loop until ``stopping`` is set; the batch in flight is always finished."""
        service = self.route.service_name
        delay = self.config.error_delay
        woken = False
        while not stopping.is_set():
            try:
                claimed = await self.run_once()
                delay = self.config.error_delay
            except Exception:
                logger.exception("relay round failed", extra={"service": service})
                await sleep_unless(stopping, delay)
                delay = min(delay * 2, 30.0)
                continue
            if claimed >= self.config.batch_size:
                continue  # backlog: go again at once
            if stopping.is_set():
                break
            if woken and not claimed:
                # A Connection's commit hook fires just before COMMIT: look once more
                # shortly instead of waiting a whole poll interval.
                woken = False
                await sleep_unless(stopping, 0.02)
                continue
            wake = asyncio.ensure_future(self.waker.wait(service, self.config.poll_interval))
            stop = asyncio.ensure_future(stopping.wait())
            try:
                await asyncio.wait({wake, stop}, return_when=asyncio.FIRST_COMPLETED)
                woken = wake.done() and not wake.cancelled() and wake.result()
            finally:
                for task in (wake, stop):
                    if not task.done():
                        task.cancel()
