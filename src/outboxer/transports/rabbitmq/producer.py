"""The relay's side: one connection and one channel with publisher confirms.

A batch is published at once and its confirms awaited together. Every message is
persistent (``delivery_mode=2``) and ``mandatory``: a message no queue takes comes back
as a return and counts as not sent. A message is sent only when the broker confirmed
it (``basic.ack``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from outboxer.transports.base import Delivery, OutgoingMessage
from outboxer.transports.rabbitmq.admin import lane_of
from outboxer.transports.rabbitmq.client import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    aio_pika,
)
from outboxer.transports.rabbitmq.errors import delivery_of, describe, needs_rebuild

logger = logging.getLogger(__name__)

KEY_HEADER = "outboxer_key"
"""The AMQP header that carries the message key (AMQP messages have no key)."""


class ProducerHandle:
    """A connection and its confirming channel; ``broken`` says why it must be replaced."""

    def __init__(self, connection: AbstractConnection, channel: AbstractChannel) -> None:
        self.connection = connection
        self.channel = channel
        self.broken: str | None = None
        self.undeclared = False
        """A destination was added: the next send declares it on a new handle."""
        self._exchanges: dict[str, AbstractExchange] = {}

    @property
    def usable(self) -> bool:
        return self.broken is None and not self.connection.is_closed and not self.channel.is_closed

    def break_(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason

    async def exchange(self, name: str) -> AbstractExchange:
        found = self._exchanges.get(name)
        if found is None:
            # The exchange is declared by the topology; the object only names it.
            found = await self.channel.get_exchange(name, ensure=False)
            self._exchanges[name] = found
        return found

    async def close(self) -> None:
        try:
            await self.connection.close()
        except Exception as exc:  # noqa: BLE001 - a connection being discarded
            logger.debug("closing the RabbitMQ publishing connection: %s", describe(exc))


def amqp_message(message: OutgoingMessage) -> Any:
    headers: dict[str, Any] = {name: value.decode() for name, value in message.headers()}
    headers[KEY_HEADER] = message.key
    return aio_pika.Message(
        message.value,
        headers=headers,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message.event_id,
        type=message.event_type,
    )


async def publish_batch(
    handle: ProducerHandle,
    destination: str,
    messages: Sequence[OutgoingMessage],
    *,
    lanes: int,
    timeout: float,
    max_size: int,
) -> list[Delivery]:
    """Publish every message at once, then await all confirms; one Delivery each."""
    exchange = await handle.exchange(destination)
    out: list[Delivery | None] = [None] * len(messages)
    pending: list[tuple[int, Any]] = []
    lane_of_message: dict[int, int] = {}
    for i, m in enumerate(messages):
        if len(m.value) > max_size:
            out[i] = Delivery(
                m.outbox_id,
                error=f"message of {len(m.value)} bytes is larger than "
                f"rabbitmq.max_message_size ({max_size})",
                permanent=True,
            )
            continue
        lane = lane_of_message[i] = lane_of(m.key, lanes)
        publish = exchange.publish(
            amqp_message(m),
            routing_key=str(lane),
            mandatory=True,
            timeout=timeout,
        )
        pending.append((i, asyncio.ensure_future(publish)))
    results = await asyncio.gather(*(f for _, f in pending), return_exceptions=True)
    for (i, _), result in zip(pending, results, strict=True):
        m = messages[i]
        if not isinstance(result, BaseException):
            # RabbitMQ has no offsets: where it went is the exchange and the lane.
            out[i] = Delivery(m.outbox_id, coordinates=f"{destination}/{lane_of_message[i]}")
            continue
        if isinstance(result, asyncio.CancelledError):
            raise result
        if needs_rebuild(result):
            handle.break_(describe(result))
        out[i] = delivery_of(m.outbox_id, result, len(m.value))
    return [d for d in out if d is not None]
