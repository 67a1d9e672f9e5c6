"""A Kafka subscription: one consumer in the route's group, auto-commit off.

Its blocking librdkafka calls run on a thread of its own, and offsets are committed
only for batches whose database transaction has committed. A consumer that meets a
fatal error, or that has had no partition for ``kafka.unassigned_rebuild_after``
seconds while the group does not cover the topic's partitions, is closed and built
again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from outboxer.routing import ServiceRoute
from outboxer.transports.base import IncomingMessage
from outboxer.transports.kafka.admin import KafkaAdmin
from outboxer.transports.kafka.client import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from outboxer.transports.kafka.errors import describe
from outboxer.transports.kafka.settings import KafkaSettings

logger = logging.getLogger(__name__)

_BUILD_RETRY_FIRST = 1.0
_BUILD_RETRY_MAX = 30.0
"""Bounds (seconds) of the wait between attempts to build a consumer that failed to build."""


class KafkaSubscription:
    """One route's consumer; its blocking calls run on a dedicated thread."""

    def __init__(
        self,
        route: ServiceRoute,
        config: dict[str, Any],
        settings: KafkaSettings,
        admin: KafkaAdmin,
    ) -> None:
        self.route = route
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"outboxer-kafka-{route.service_name}"
        )
        self._config = config
        self._settings = settings
        self._admin = admin
        self._consumer: Consumer | None = None
        self._closed = False
        self._unassigned_since: float | None = None
        self._rebuild_after = settings.unassigned_rebuild_after
        self._held: dict[tuple[str, int], float] = {}
        """Partitions paused by ``nack(delay=)`` and when to resume them (used on the
        consumer's thread only)."""
        self.rebuilds = 0
        self._build_retry_at = 0.0
        self._build_backoff = _BUILD_RETRY_FIRST

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _make(self) -> Consumer:
        consumer = Consumer(self._config)
        consumer.subscribe([self.route.topic])
        return consumer

    async def open(self) -> None:
        self._consumer = await self._call(self._make)
        self._unassigned_since = time.monotonic()

    def _fetch(self, max_messages: int, timeout: float) -> tuple[list[Message], bool]:
        assert self._consumer is not None
        if self._held:
            now = time.monotonic()
            due = [key for key, until in self._held.items() if until <= now]
            if due:
                self._consumer.resume([TopicPartition(t, p) for t, p in due])
                for key in due:
                    del self._held[key]
        first = self._consumer.poll(timeout)
        rest = self._consumer.consume(max_messages - 1, 0) if first and max_messages > 1 else []
        assigned = bool(self._consumer.assignment())
        return ([first, *rest] if first is not None else []), assigned

    async def receive(self, max_messages: int, timeout: float) -> list[IncomingMessage]:
        if self._closed:
            return []
        if self._consumer is None:
            # The last build failed (a rebuild during an outage): try again, spaced out.
            await self._build_again(timeout)
            return []
        try:
            raw, assigned = await self._call(self._fetch, max_messages, timeout)
        except (KafkaException, RuntimeError) as exc:
            # RuntimeError: confluent-kafka's answer on a consumer that was closed.
            await self._rebuild(f"consumer call failed: {exc}")
            return []
        out: list[IncomingMessage] = []
        for m in raw:
            err = m.error()
            if err is not None:
                if err.fatal():
                    await self._rebuild(f"fatal consumer error {describe(err)}")
                    return out
                if err.code() != KafkaError._PARTITION_EOF:
                    logger.warning(
                        "Kafka consumer: %s",
                        describe(err),
                        extra={"service": self.route.service_name},
                    )
                continue
            raw_headers: Any = m.headers() or []
            pairs = raw_headers.items() if isinstance(raw_headers, dict) else raw_headers
            headers = {
                str(k): v if isinstance(v, bytes) else str(v).encode()
                for k, v in pairs
                if v is not None
            }
            out.append(
                IncomingMessage(
                    route=self.route,
                    value=m.value(),
                    key=m.key(),
                    headers=headers,
                    position=(m.topic(), m.partition(), m.offset()),
                    coordinates=f"{m.topic()}/{m.partition()}@{m.offset()}",
                )
            )
        await self._watch_assignment(assigned or bool(out))
        return out

    async def _watch_assignment(self, assigned: bool) -> None:
        now = time.monotonic()
        if assigned:
            self._unassigned_since = None
            return
        if self._unassigned_since is None:
            self._unassigned_since = now
            return
        if now - self._unassigned_since < self._rebuild_after:
            return
        covered = await asyncio.to_thread(self._admin.group_covers_topic, self.route)
        if covered:
            # A spare member: every partition has another owner. Look again later.
            self._unassigned_since = now
            return
        await self._rebuild(f"no partition assigned for {now - self._unassigned_since:.0f}s")

    async def _rebuild(self, reason: str) -> None:
        """Close the consumer (its group membership goes with it) and build it again."""
        extra = {"service": self.route.service_name}
        logger.warning("rebuilding the Kafka consumer: %s", reason, extra=extra)
        old, self._consumer = self._consumer, None
        if old is not None:
            try:
                await self._call(old.close)
            except Exception as exc:  # noqa: BLE001 - the old consumer is discarded anyway
                logger.warning("closing the old Kafka consumer: %s", exc, extra=extra)
        if self._closed:
            return
        await asyncio.to_thread(self._admin.ensure_topics_quietly, [self.route.topic])
        self._build_backoff = _BUILD_RETRY_FIRST
        await self._try_build()
        self._rebuild_after = min(self._rebuild_after * 2, 300.0)
        self.rebuilds += 1

    async def _try_build(self) -> None:
        """Build the consumer; on failure leave none and say when to try again."""
        extra = {"service": self.route.service_name}
        try:
            self._consumer = await self._call(self._make)
        except KafkaException as exc:
            first = self._build_backoff == _BUILD_RETRY_FIRST
            (logger.warning if first else logger.debug)(
                "building the Kafka consumer failed (trying again every %.0fs at most): %s",
                _BUILD_RETRY_MAX,
                exc,
                extra=extra,
            )
            self._build_retry_at = time.monotonic() + self._build_backoff
            self._build_backoff = min(self._build_backoff * 2, _BUILD_RETRY_MAX)
            return
        self._unassigned_since = time.monotonic()
        if self._build_backoff != _BUILD_RETRY_FIRST:
            logger.info("the Kafka consumer is built again", extra=extra)
        self._build_backoff = _BUILD_RETRY_FIRST

    async def _build_again(self, timeout: float) -> None:
        wait = self._build_retry_at - time.monotonic()
        if wait > 0:
            await asyncio.sleep(min(wait, timeout))
            return
        await self._try_build()

    async def ack(self, messages: Sequence[IncomingMessage]) -> None:
        if not messages or self._consumer is None:
            return
        highest: dict[tuple[str, int], int] = {}
        for m in messages:
            topic, partition, offset = m.position
            key = (topic, partition)
            highest[key] = max(highest.get(key, -1), offset)
        offsets = [TopicPartition(t, p, o + 1) for (t, p), o in highest.items()]
        consumer = self._consumer
        try:
            await self._call(partial(consumer.commit, offsets=offsets, asynchronous=False))
            self._rebuild_after = self._settings.unassigned_rebuild_after
        except (KafkaException, RuntimeError) as exc:
            # Typically a rebalance took the partition away: the new owner gets the
            # messages again and the row lock makes the repeat a no-op.
            logger.warning(
                "offset commit failed (messages will be redelivered): %s",
                exc,
                extra={"service": self.route.service_name},
            )

    async def nack(self, messages: Sequence[IncomingMessage], *, delay: float = 0.0) -> None:
        if not messages or self._consumer is None:
            return
        earliest: dict[tuple[str, int], int] = {}
        for m in messages:
            topic, partition, offset = m.position
            key = (topic, partition)
            earliest[key] = min(earliest.get(key, offset), offset)
        consumer = self._consumer

        def rewind() -> None:
            # Read each partition again from its earliest message given back; with a
            # delay, pause it until then (resumed by the next fetch after the delay).
            parts = [TopicPartition(t, p, o) for (t, p), o in earliest.items()]
            for tp in parts:
                consumer.seek(tp)
            if delay > 0:
                consumer.pause(parts)
                until = time.monotonic() + delay
                for key in earliest:
                    self._held[key] = until

        try:
            await self._call(rewind)
        except (KafkaException, RuntimeError) as exc:
            # The partition went to another member: it reads them from the last commit.
            logger.warning(
                "giving messages back failed (the partition's next owner gets them): %s",
                exc,
                extra={"service": self.route.service_name},
            )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        consumer = self._consumer
        if consumer is not None:
            try:
                await self._call(consumer.close)
            except KafkaException as exc:
                logger.warning("closing Kafka consumer: %s", exc)
        self._executor.shutdown(wait=True)
