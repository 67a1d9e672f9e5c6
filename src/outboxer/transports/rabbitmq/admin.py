"""Topology: each route's durable exchange (the route's destination), and per
consumer group ``lanes`` durable queues bound to it by lane number, each read by one
consumer at a time (``x-single-active-consumer``).

The relay's side needs the exchanges (declared at start); a group's queues are
declared when the group subscribes, by the application that consumes it (the
producer does not know the groups of other applications, and a queue nobody reads
would grow forever). Until a group's queues exist, a publish finds no queue and
comes back (``mandatory``): an outage, the rows stay in the outbox.
Declared when ``rabbitmq.declare_topology``, else waited for (passive declarations)
until ``rabbitmq.topology_wait_timeout``, then a ``TransportError`` naming what is
missing.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Sequence
from typing import Any

from outboxer.errors import InvalidIdentifierError, TransportError
from outboxer.routing import ServiceRoute
from outboxer.transports.rabbitmq.client import AbstractChannel, AbstractConnection, aio_pika
from outboxer.transports.rabbitmq.errors import describe
from outboxer.transports.rabbitmq.settings import RabbitMQSettings

logger = logging.getLogger(__name__)

MAX_NAME_BYTES = 255
"""AMQP 0-9-1 names are short strings."""


def lane_of(key: str, lanes: int) -> int:
    """The lane of a key: stable across processes and restarts (not Python's hash)."""
    return zlib.crc32(key.encode()) % lanes


def queue_name(route: ServiceRoute, lane: int) -> str:
    return f"{route.topic}.{route.group_id}.{lane}"


def check_names(route: ServiceRoute, lanes: int) -> None:
    if route.topic.startswith("amq."):
        raise InvalidIdentifierError(
            f"RabbitMQ reserves exchange names starting with 'amq.': {route.topic!r}"
        )
    longest = queue_name(route, lanes - 1)
    if len(longest.encode()) > MAX_NAME_BYTES:
        raise InvalidIdentifierError(
            f"RabbitMQ queue name {longest!r} is longer than {MAX_NAME_BYTES} bytes "
            "(destination + group + lane): shorten the topic or the group"
        )


def broker_major_version(connection: AbstractConnection) -> int:
    """The broker's major version from its connection.start properties (0: unknown)."""
    try:
        props: Any = connection.transport.connection.server_properties  # type: ignore[union-attr]
        version = props.get("version", "0")
        text = version.decode() if isinstance(version, bytes) else str(version)
        return int(text.split(".", 1)[0])
    except (AttributeError, TypeError, ValueError):
        return 0


def queue_arguments(settings: RabbitMQSettings, major: int) -> dict[str, Any]:
    args: dict[str, Any] = {
        "x-queue-type": settings.queue_type,
        "x-single-active-consumer": True,
    }
    if settings.queue_type == "quorum" and major >= 4:
        # RabbitMQ 4 gives quorum queues a delivery limit of 20 (redeliveries after
        # consumer failures), past which the broker drops or dead-letters on its own.
        # The outbox row decides about dead letters: no limit (-1, RabbitMQ 4.0+).
        # RabbitMQ 3.x has no limit unless one is set.
        args["x-delivery-limit"] = -1
    return args


class RabbitMQAdmin:
    """Declares (or waits for) the exchanges and queues of a transport's routes."""

    def __init__(self, settings: RabbitMQSettings) -> None:
        self.settings = settings

    async def declare(
        self, connection: AbstractConnection, routes: Sequence[ServiceRoute], *, queues: bool
    ) -> None:
        """Declare every route's exchange, and with ``queues`` its group's lane queues
        and their bindings (idempotent)."""
        major = broker_major_version(connection)
        args = queue_arguments(self.settings, major)
        channel = await connection.channel(publisher_confirms=False)
        try:
            for route in routes:
                exchange = await channel.declare_exchange(
                    route.topic, aio_pika.ExchangeType.DIRECT, durable=True
                )
                if not queues:
                    continue
                for lane in range(self.settings.lanes):
                    queue = await channel.declare_queue(
                        queue_name(route, lane), durable=True, arguments=args
                    )
                    await queue.bind(exchange, routing_key=str(lane))
        finally:
            if not channel.is_closed:
                await channel.close()

    async def missing(
        self, connection: AbstractConnection, routes: Sequence[ServiceRoute], *, queues: bool
    ) -> list[str]:
        """The exchanges and queues of ``routes`` that do not exist (passive
        declarations; each miss closes its channel, so each check has its own)."""
        names: list[tuple[str, str]] = []
        for route in routes:
            names.append(("exchange", route.topic))
            if queues:
                names.extend(
                    ("queue", queue_name(route, lane)) for lane in range(self.settings.lanes)
                )
        out = []
        for kind, name in names:
            channel: AbstractChannel = await connection.channel(publisher_confirms=False)
            try:
                if kind == "exchange":
                    await channel.declare_exchange(name, passive=True)
                else:
                    await channel.declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                out.append(f"{kind} {name}")
            finally:
                if not channel.is_closed:
                    await channel.close()
        return out

    async def ensure(
        self, connection: AbstractConnection, routes: Sequence[ServiceRoute], *, queues: bool
    ) -> None:
        """Declare the exchanges (and the groups' queues) when allowed, else wait for
        them; TransportError when still missing after ``topology_wait_timeout``."""
        if not routes:
            return
        if self.settings.declare_topology:
            try:
                await self.declare(connection, routes, queues=queues)
            except aio_pika.exceptions.ChannelPreconditionFailed as exc:
                raise TransportError(
                    "a RabbitMQ exchange or queue exists with other arguments than "
                    f"rabbitmq.queue_type/lanes ask for: {describe(exc)}"
                ) from exc
            return
        wait = self.settings.topology_wait_timeout
        deadline = time.monotonic() + wait
        announced = False
        while True:
            missing = await self.missing(connection, routes, queues=queues)
            if not missing:
                return
            if time.monotonic() >= deadline:
                raise TransportError(
                    f"RabbitMQ topology not ready after {wait:.0f}s "
                    "(rabbitmq.topology_wait_timeout; rabbitmq.declare_topology is off): "
                    + ", ".join(missing)
                )
            if not announced:
                logger.warning(
                    "waiting for RabbitMQ exchanges and queues to be declared: %s",
                    ", ".join(missing),
                )
                announced = True
            await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
