"""A RabbitMQ subscription: one connection and channel per route, consuming every
lane queue of the route's group with manual acknowledgements and a prefetch.

Each lane queue has a single active consumer, so one subscription at a time reads a
lane, in order. Deliveries wait in a local buffer until ``receive`` hands them out;
``ack`` acknowledges exactly what the consumer committed. ``nack`` closes the channel
and opens a new one: the broker puts back everything the channel held unacknowledged
(what was given back and what was buffered behind it) at its place in its queue, so a
lane is read again in order from its earliest message given back, as on a log. A
closed channel or connection (the broker restarted, a network cut) likewise gives
back what was unacknowledged, and the next ``receive`` builds a new one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from outboxer.routing import ServiceRoute
from outboxer.transports.base import IncomingMessage
from outboxer.transports.rabbitmq.admin import queue_name
from outboxer.transports.rabbitmq.client import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
)
from outboxer.transports.rabbitmq.errors import describe
from outboxer.transports.rabbitmq.producer import KEY_HEADER
from outboxer.transports.rabbitmq.settings import RabbitMQSettings

logger = logging.getLogger(__name__)

_BUILD_RETRY_FIRST = 1.0
_BUILD_RETRY_MAX = 30.0


def _header_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode()


class RabbitMQSubscription:
    """One route's consumer of all its group's lanes."""

    def __init__(
        self,
        route: ServiceRoute,
        settings: RabbitMQSettings,
        connect: Any,
    ) -> None:
        self.route = route
        self._settings = settings
        self._connect = connect
        """``async () -> AbstractConnection``: a new connection to the broker."""
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._buffer: asyncio.Queue[tuple[int, AbstractIncomingMessage]] = asyncio.Queue()
        self._generation = 0
        self._closed = False
        self._build_retry_at = 0.0
        self._build_backoff = _BUILD_RETRY_FIRST
        self.rebuilds = 0

    @property
    def _usable(self) -> bool:
        return (
            self._connection is not None
            and self._channel is not None
            and not self._connection.is_closed
            and not self._channel.is_closed
        )

    async def open(self) -> None:
        await self._build()

    async def _build(self) -> None:
        """A new connection and channel consuming every lane; the old ones closed."""
        await self._discard()
        generation = self._generation = self._generation + 1
        connection = await self._connect()
        try:
            channel = await connection.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=self._settings.prefetch)
            buffer = self._buffer

            async def delivered(message: AbstractIncomingMessage) -> None:
                buffer.put_nowait((generation, message))

            for lane in range(self._settings.lanes):
                queue = await channel.get_queue(queue_name(self.route, lane), ensure=False)
                await queue.consume(delivered, no_ack=False)
        except BaseException:
            await connection.close()
            raise
        self._connection, self._channel = connection, channel

    async def _discard(self) -> None:
        """Close the channel and connection (the broker requeues what they held) and
        forget what they delivered."""
        connection, self._connection, self._channel = self._connection, None, None
        self._generation += 1
        self._buffer = asyncio.Queue()
        if connection is not None and not connection.is_closed:
            try:
                await connection.close()
            except Exception as exc:  # noqa: BLE001 - discarded anyway
                logger.debug("closing a RabbitMQ consumer connection: %s", describe(exc))

    async def _rebuild(self, timeout: float) -> bool:
        """Build again unless the last failure says to wait; True when usable."""
        wait = self._build_retry_at - time.monotonic()
        if wait > 0:
            await asyncio.sleep(min(wait, timeout))
            return False
        extra = {"service": self.route.service_name}
        first = self._build_backoff == _BUILD_RETRY_FIRST
        if first:
            logger.warning(
                "rebuilding the RabbitMQ consumer: its connection is closed", extra=extra
            )
        try:
            await self._build()
        except Exception as exc:  # noqa: BLE001 - any failure: try again later
            (logger.warning if first else logger.debug)(
                "building the RabbitMQ consumer failed (trying again every %.0fs at most): %s",
                _BUILD_RETRY_MAX,
                describe(exc),
                extra=extra,
            )
            self._build_retry_at = time.monotonic() + self._build_backoff
            self._build_backoff = min(self._build_backoff * 2, _BUILD_RETRY_MAX)
            return False
        if not first:
            logger.info("the RabbitMQ consumer is built again", extra=extra)
        self._build_backoff = _BUILD_RETRY_FIRST
        self.rebuilds += 1
        return True

    async def receive(self, max_messages: int, timeout: float) -> list[IncomingMessage]:
        if self._closed:
            return []
        if not self._usable and not await self._rebuild(timeout):
            return []
        buffer = self._buffer
        taken: list[tuple[int, AbstractIncomingMessage]] = []
        try:
            taken.append(await asyncio.wait_for(buffer.get(), timeout))
        except TimeoutError:
            return []
        while len(taken) < max_messages and not buffer.empty():
            taken.append(buffer.get_nowait())
        return [self._incoming(g, m) for g, m in taken if g == self._generation]

    def _incoming(self, generation: int, message: AbstractIncomingMessage) -> IncomingMessage:
        raw = dict(message.headers or {})
        key = raw.pop(KEY_HEADER, None)
        headers = {str(k): _header_bytes(v) for k, v in raw.items() if v is not None}
        return IncomingMessage(
            route=self.route,
            value=message.body,
            key=None if key is None else _header_bytes(key),
            headers=headers,
            position=(generation, message),
            coordinates=f"{message.exchange}/{message.routing_key}",
        )

    async def ack(self, messages: Sequence[IncomingMessage]) -> None:
        if not messages:
            return
        try:
            for m in messages:
                generation, message = m.position
                if generation != self._generation:
                    continue  # its channel is gone: the broker delivers it again
                await message.ack()
        except Exception as exc:  # noqa: BLE001 - the channel closed under us
            # The broker delivers the unacknowledged ones again; the row lock makes the
            # repeat a no-op.
            logger.warning(
                "acknowledging RabbitMQ messages failed (they will be redelivered): %s",
                describe(exc),
                extra={"service": self.route.service_name},
            )

    async def nack(self, messages: Sequence[IncomingMessage], *, delay: float = 0.0) -> None:
        """Give back ``messages`` and everything received after them: the channel is
        closed (the broker requeues them in place) and a new one opened. ``delay`` is
        not honoured (``Features.requeue_delay`` is False)."""
        if not messages or self._closed:
            return
        try:
            await self._build()
        except Exception as exc:  # noqa: BLE001 - the next receive builds it again
            logger.warning(
                "reopening the RabbitMQ consumer after giving messages back: %s",
                describe(exc),
                extra={"service": self.route.service_name},
            )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._discard()
