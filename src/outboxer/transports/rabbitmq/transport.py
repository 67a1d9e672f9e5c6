"""The RabbitMQ transport, on aio-pika (``amqp://user:pass@host:port/vhost``).

Relay: one connection with one channel in confirm mode; each route's destination is a
durable direct exchange, each message persistent and ``mandatory``, routed to lane
``crc32(key) % rabbitmq.lanes``; a batch is published at once and its confirms awaited
together. A message counts as sent only after its ``basic.ack``; a nack, a return (no
queue for its lane), a closed channel or a missing confirm is a transient failure (no
attempt counted), a message above ``rabbitmq.max_message_size`` a permanent one.

Consumers: per route, a connection consuming the group's lane queues (durable, quorum
by default, single active consumer; declared by the first subscription of the group,
so a group that never subscribed has no queue and its messages stay in the outbox),
manual acknowledgements after the database commit, a prefetch of ``rabbitmq.prefetch``.

Connections are plain (not aio-pika's robust ones): a connection or channel that
closed is replaced by the next call (``send`` or ``receive``), and nothing is
published again behind the relay's back (docs/decisions.md).

The parts: ``errors.py`` (what each failure means), ``producer.py``,
``subscription.py``, ``admin.py`` (exchanges, queues, lanes); ``client.py`` imports
aio-pika once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from outboxer.errors import ConfigurationError, TransportError
from outboxer.routing import ServiceRoute
from outboxer.transports.base import Delivery, Features, OutgoingMessage
from outboxer.transports.rabbitmq.admin import RabbitMQAdmin, check_names
from outboxer.transports.rabbitmq.client import AbstractConnection, aio_pika
from outboxer.transports.rabbitmq.errors import describe
from outboxer.transports.rabbitmq.producer import ProducerHandle, publish_batch
from outboxer.transports.rabbitmq.settings import RabbitMQSettings
from outboxer.transports.rabbitmq.subscription import RabbitMQSubscription

logger = logging.getLogger(__name__)


def redacted(url: str) -> str:
    """The URL without its password (for errors and logs)."""
    scheme, _, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not at:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{hostpart}"


class RabbitMQTransport:
    """RabbitMQ through aio-pika."""

    name = "rabbitmq"
    features = Features(requeue=True, requeue_delay=False, rebuilds_clients=True)

    def __init__(
        self,
        url: str,
        *,
        settings: RabbitMQSettings | None = None,
        lease: float = 30.0,
        client_name: str = "outboxer",
    ) -> None:
        if "://" not in url or not url.split("://", 1)[1].strip("/"):
            raise ConfigurationError(f"transport {redacted(url)!r} names no RabbitMQ host")
        self.url = url
        self.settings = settings or RabbitMQSettings()
        self.client_name = client_name
        # A send must give up before the claim's lease runs out, or another relay
        # sends the same rows again while this one is still waiting.
        self.confirm_timeout = max(1.0, lease * 0.8)
        self.admin = RabbitMQAdmin(self.settings)
        self._producer: ProducerHandle | None = None
        self._producer_lock = asyncio.Lock()
        self._subscriptions: list[RabbitMQSubscription] = []
        self._routes: dict[str, ServiceRoute] = {}
        """The routes whose exchanges the producer declares (by destination)."""
        self._groups: set[tuple[str, str]] = set()
        """(destination, group) whose lane queues this transport has declared."""
        self.producer_rebuilds = 0

    @property
    def delivers_in_process(self) -> bool:
        return False

    def check_route(self, route: ServiceRoute) -> None:
        check_names(route, self.settings.lanes)

    async def connect(self) -> AbstractConnection:
        """A new connection; TransportError when the broker cannot be reached."""
        try:
            return await aio_pika.connect(
                self.url,
                timeout=self.settings.connect_timeout,
                heartbeat=self.settings.heartbeat,
                client_properties={"connection_name": self.client_name},
            )
        except (TimeoutError, ConnectionError, OSError, aio_pika.exceptions.AMQPError) as exc:
            raise TransportError(
                f"cannot connect to RabbitMQ at {redacted(self.url)}: {describe(exc)}"
            ) from exc

    # ------------------------------------------------------------------ lifecycle

    async def start(self, routes: Sequence[ServiceRoute]) -> None:
        # A lock belongs to the loop that first waits on it; each run may be a new loop.
        self._producer_lock = asyncio.Lock()
        for route in routes:
            self.check_route(route)
            self._routes[route.topic] = route
        await self._current_producer()

    async def subscribe(self, route: ServiceRoute) -> RabbitMQSubscription:
        self.check_route(route)
        if (route.topic, route.group_id) not in self._groups:
            connection = await self.connect()
            try:
                await self.admin.ensure(connection, [route], queues=True)
            finally:
                await connection.close()
            self._groups.add((route.topic, route.group_id))
        sub = RabbitMQSubscription(route, self.settings, self.connect)
        await sub.open()
        self._subscriptions.append(sub)
        return sub

    async def delete_topology(self) -> None:
        """Delete the exchanges and queues this transport declared, with the messages
        in them (a throw-away run: the demo, tests). Never needed in production."""
        connection = await self.connect()
        try:
            channel = await connection.channel(publisher_confirms=False)
            for topic, group in sorted(self._groups):
                for lane in range(self.settings.lanes):
                    await channel.queue_delete(f"{topic}.{group}.{lane}")
            for topic in sorted(self._routes):
                await channel.exchange_delete(topic)
        finally:
            await connection.close()

    async def close(self) -> None:
        for sub in self._subscriptions:
            await sub.close()
        self._subscriptions = []
        async with self._producer_lock:
            handle, self._producer = self._producer, None
        if handle is not None:
            await handle.close()

    # ------------------------------------------------------------------ sending

    async def _current_producer(self) -> ProducerHandle:
        async with self._producer_lock:
            handle = self._producer
            if handle is not None and handle.usable and not handle.undeclared:
                return handle
            if handle is not None:
                if handle.usable:
                    reason = "a new destination to declare"
                else:
                    reason = handle.broken or "its connection closed"
                logger.warning("rebuilding the RabbitMQ producer: %s", reason)
                self._producer = None
                self.producer_rebuilds += 1
                await handle.close()
            self._producer = handle = await self._new_producer()
            return handle

    async def _new_producer(self) -> ProducerHandle:
        connection = await self.connect()
        try:
            await self.admin.ensure(connection, list(self._routes.values()), queues=False)
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        except BaseException:
            await connection.close()
            raise
        return ProducerHandle(connection, channel)

    async def send(
        self, route: ServiceRoute, messages: Sequence[OutgoingMessage]
    ) -> list[Delivery]:
        if route.topic not in self._routes:
            self._routes[route.topic] = route
            if self._producer is not None:
                self._producer.undeclared = True  # declare the new destination
        handle = await self._current_producer()
        return await publish_batch(
            handle,
            route.topic,
            messages,
            lanes=self.settings.lanes,
            timeout=self.confirm_timeout,
            max_size=self.settings.max_message_size,
        )


__all__ = ["RabbitMQSubscription", "RabbitMQTransport"]
