"""Streams and durable consumers: the topology the NATS transport needs.

One stream per destination, its subjects ``<destination>.<lane>``; one durable pull
consumer per (group, lane) with explicit acks, ``ack_wait`` and no redelivery limit
(``max_deliver=-1``: how often the server delivered a message never makes it a dead
letter; the outbox row decides). Declared when ``nats.create_streams``, else waited
for with a clear error after ``nats.stream_wait_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Sequence

from outboxer.errors import TransportError
from outboxer.routing import ServiceRoute
from outboxer.transports.nats.client import JetStreamContext, js_api, js_errors
from outboxer.transports.nats.settings import NatsSettings

logger = logging.getLogger(__name__)


def stream_name(destination: str) -> str:
    """A destination's stream: JetStream names cannot hold ``.``."""
    return destination.replace(".", "_")


def lane_of(key: str, lanes: int) -> int:
    """The lane of a message key: stable across processes and restarts (CRC-32)."""
    if lanes == 1:
        return 0
    return zlib.crc32(key.encode()) % lanes


def lane_subject(destination: str, lane: int) -> str:
    return f"{destination}.{lane}"


def durable_name(group: str, lane: int) -> str:
    return f"{group.replace('.', '_')}_{lane}"


class NatsAdmin:
    """The topology calls of one transport, on a JetStream context it is given."""

    def __init__(self, settings: NatsSettings) -> None:
        self.settings = settings

    def stream_config(self, destination: str) -> js_api.StreamConfig:
        s = self.settings
        return js_api.StreamConfig(
            name=stream_name(destination),
            subjects=[f"{destination}.*"],
            retention=js_api.RetentionPolicy.LIMITS,
            storage=js_api.StorageType.FILE if s.storage == "file" else js_api.StorageType.MEMORY,
            num_replicas=s.replicas,
            duplicate_window=s.duplicate_window,
            max_age=s.max_age or None,
            max_bytes=s.max_bytes,
            discard=js_api.DiscardPolicy.OLD if s.max_bytes < 0 else js_api.DiscardPolicy.NEW,
        )

    def consumer_config(self, route: ServiceRoute, lane: int) -> js_api.ConsumerConfig:
        name = durable_name(route.group_id, lane)
        return js_api.ConsumerConfig(
            name=name,
            durable_name=name,
            deliver_policy=js_api.DeliverPolicy.ALL,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=self.settings.ack_wait,
            max_deliver=-1,
            filter_subject=lane_subject(route.topic, lane),
            max_ack_pending=self.settings.max_ack_pending,
        )

    async def ensure_streams(self, js: JetStreamContext, destinations: Sequence[str]) -> None:
        """Every destination's stream exists (declared when allowed), else
        TransportError after ``nats.stream_wait_timeout``."""
        await self._ensure(js, [(d, None) for d in destinations])

    async def ensure_consumers(self, js: JetStreamContext, route: ServiceRoute) -> None:
        """The route's stream and its durable consumer per lane exist."""
        await self._ensure(js, [(route.topic, None), (route.topic, route)])

    async def _ensure(
        self, js: JetStreamContext, wanted: Sequence[tuple[str, ServiceRoute | None]]
    ) -> None:
        wait = self.settings.stream_wait_timeout
        deadline = time.monotonic() + wait
        announced = False
        while True:
            missing: list[str] = []
            for destination, route in wanted:
                missing.extend(await self._ensure_one(js, destination, route))
            if not missing:
                return
            if time.monotonic() >= deadline:
                raise TransportError(
                    f"NATS JetStream topology not ready after {wait:.0f}s "
                    "(nats.stream_wait_timeout; nats.create_streams is off): " + ", ".join(missing)
                )
            if not announced:
                logger.warning("waiting for NATS streams/consumers: %s", ", ".join(missing))
                announced = True
            await asyncio.sleep(min(1.0, max(0.05, deadline - time.monotonic())))

    async def _ensure_one(
        self, js: JetStreamContext, destination: str, route: ServiceRoute | None
    ) -> list[str]:
        """What is still missing (declaring it first when allowed)."""
        create = self.settings.create_streams
        stream = stream_name(destination)
        if route is None:
            try:
                await js.stream_info(stream)
                return []
            except js_errors.NotFoundError:
                if not create:
                    return [f"stream {stream}"]
            try:
                await js.add_stream(self.stream_config(destination))
                logger.info("created NATS stream %s", stream)
            except js_errors.BadRequestError as exc:
                # Another process declared it first (same config: fine).
                logger.debug("declaring NATS stream %s: %s", stream, exc)
            return []
        missing = []
        for lane in range(self.settings.lanes):
            name = durable_name(route.group_id, lane)
            try:
                await js.consumer_info(stream, name)
                continue
            except js_errors.NotFoundError:
                if not create:
                    missing.append(f"consumer {stream}/{name}")
                    continue
            await js.add_consumer(stream, self.consumer_config(route, lane))
        return missing

    async def delete_streams(self, js: JetStreamContext, destinations: Sequence[str]) -> None:
        """Delete the destinations' streams (their consumers and messages go with them)."""
        for destination in destinations:
            try:
                await js.delete_stream(stream_name(destination))
                logger.info("deleted NATS stream %s", stream_name(destination))
            except js_errors.NotFoundError:
                continue
