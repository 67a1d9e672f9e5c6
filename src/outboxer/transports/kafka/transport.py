"""The Kafka transport, on confluent-kafka (librdkafka).

Producer: idempotent, ``acks=all``; the message key is the outbox message key, the
value the envelope JSON, and event id/type/version travel as headers too. A
background thread serves librdkafka's delivery callbacks and resolves one asyncio
future per message, so a batch is sent at once and its acknowledgements awaited
together. Messages the broker will never accept (too large, invalid) are reported
as permanent failures and end dead; broker-side failures (unreachable, timed out,
producer state) are reported as transient, which the relay treats as an outage.

A producer that can no longer deliver is rebuilt by the next send, without a
restart: after a fatal error (raised by ``poll``/``produce`` or reported to the
error callback), after a delivery report that only a new producer identity can
clear (``UNKNOWN_PRODUCER_ID`` and kin: an idempotent producer whose broker lost its
state loops on epoch bumps forever), and after deliveries have timed out with no
success for a whole ``message.timeout.ms``. Topics are ensured again when it is
rebuilt (a replaced broker has lost them).

Consumers: one per service route, in the route's consumer group, auto-commit off.
Each runs its blocking librdkafka calls on its own thread, and offsets are committed
only for batches whose database transaction has committed. A consumer that meets a
fatal error, or that has had no partition for ``kafka.unassigned_rebuild_after``
seconds while the group does not cover the topic's partitions, is closed and built
again.

The parts: ``errors.py`` (what each librdkafka error means), ``producer.py``,
``subscription.py``, ``admin.py`` (topics, groups); ``client.py`` imports
confluent-kafka once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from outboxer.errors import ConfigurationError
from outboxer.routing import ServiceRoute
from outboxer.transports.base import Delivery, Features, OutgoingMessage
from outboxer.transports.kafka.admin import KafkaAdmin
from outboxer.transports.kafka.producer import ProducerHandle, produce_batch
from outboxer.transports.kafka.settings import KafkaSettings
from outboxer.transports.kafka.subscription import KafkaSubscription

logger = logging.getLogger(__name__)
librdkafka_logger = logging.getLogger("outboxer.librdkafka")


class KafkaTransport:
    """Kafka (or any Kafka-protocol broker) through confluent-kafka."""

    name = "kafka"
    features = Features(requeue=True, requeue_delay=True, rebuilds_clients=True)

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        settings: KafkaSettings | None = None,
        lease: float = 30.0,
        client_id: str = "outboxer",
    ) -> None:
        if not bootstrap_servers.strip():
            raise ConfigurationError("Kafka bootstrap servers are empty")
        self.bootstrap_servers = bootstrap_servers
        self.settings = settings or KafkaSettings()
        self.client_id = client_id
        # A send must give up before the claim's lease runs out, or another relay
        # sends the same rows again while this one is still waiting.
        self.delivery_timeout_ms = max(1000, int(lease * 1000 * 0.8))
        self._producer: ProducerHandle | None = None
        self._producer_lock = asyncio.Lock()
        self._subscriptions: list[KafkaSubscription] = []
        self._topics: list[str] = []
        self.admin = KafkaAdmin(self._common(), self.settings)
        self.producer_rebuilds = 0

    @property
    def delivers_in_process(self) -> bool:
        return False

    # ------------------------------------------------------------------ config

    def _common(self) -> dict[str, Any]:
        # librdkafka's own log lines go to Python logging, not to stderr.
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            "logger": librdkafka_logger,
            # Notice a recreated topic in seconds, not the default 5 minutes.
            "topic.metadata.refresh.interval.ms": 10_000,
            # A broker that vanished without closing: requests time out, the
            # connection is rebuilt (the default would wait a minute).
            "socket.timeout.ms": self.settings.socket_timeout_ms,
            "socket.keepalive.enable": True,
        }

    def producer_config(self) -> dict[str, Any]:
        return {
            **self._common(),
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "message.timeout.ms": self.delivery_timeout_ms,
            **self.settings.config,
        }

    def consumer_config(self, route: ServiceRoute) -> dict[str, Any]:
        return {
            **self._common(),
            "group.id": route.group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": self.settings.session_timeout_ms,
            "enable.partition.eof": False,
            **self.settings.config,
        }

    def check_route(self, route: ServiceRoute) -> None:
        pass  # the neutral rule of outboxer.routing is Kafka's own (249 characters)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, routes: Sequence[ServiceRoute]) -> None:
        # A lock belongs to the loop that first waits on it; each run may be a new loop.
        self._producer_lock = asyncio.Lock()
        self._topics = sorted({r.topic for r in routes})
        if self._topics:
            await asyncio.to_thread(self.admin.ensure_topics, self._topics)
        await self._current_producer()

    def ensure_topics_quietly(self, topics: Sequence[str]) -> None:
        """Create missing topics (after a broker lost them); failures only logged."""
        self.admin.ensure_topics_quietly(topics)

    def group_covers_topic(self, route: ServiceRoute) -> bool:
        """Whether the route's group owns every partition of its topic."""
        return self.admin.group_covers_topic(route)

    async def subscribe(self, route: ServiceRoute) -> KafkaSubscription:
        sub = KafkaSubscription(route, self.consumer_config(route), self.settings, self.admin)
        await sub.open()
        self._subscriptions.append(sub)
        return sub

    async def close(self) -> None:
        for sub in self._subscriptions:
            await sub.close()
        self._subscriptions = []
        async with self._producer_lock:
            handle, self._producer = self._producer, None
        if handle is not None:
            remaining = await asyncio.to_thread(handle.close, 30.0)
            if remaining:
                logger.warning(
                    "%d message(s) were not flushed before close; their rows are sent again "
                    "after their lease",
                    remaining,
                )

    # ------------------------------------------------------------------ sending

    async def _current_producer(self) -> ProducerHandle:
        async with self._producer_lock:
            handle = self._producer
            if handle is None:
                handle = self._producer = self._new_producer()
            elif handle.broken is not None:
                old = handle
                logger.warning("rebuilding the Kafka producer: %s", old.broken)
                await asyncio.to_thread(self.ensure_topics_quietly, self._topics)
                handle = self._producer = self._new_producer()
                self.producer_rebuilds += 1
                await asyncio.to_thread(old.close, 0)
            return handle

    def _new_producer(self) -> ProducerHandle:
        return ProducerHandle(self.producer_config(), self.delivery_timeout_ms / 1000)

    async def send(
        self, route: ServiceRoute, messages: Sequence[OutgoingMessage]
    ) -> list[Delivery]:
        handle = await self._current_producer()
        return await produce_batch(
            handle, route.topic, messages, self.delivery_timeout_ms / 1000 + 5
        )


__all__ = ["KafkaSubscription", "KafkaTransport"]
