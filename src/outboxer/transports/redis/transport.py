"""The Redis Streams transport, on redis-py's asyncio client.

Relay: a batch is one pipeline of ``XADD``s (not a transaction: one round trip, each
entry answered on its own); a message counts as sent when ``XADD`` replied with its
entry id (and, with ``redis.wait_replicas``, when ``WAIT`` says enough replicas have
it). A destination is ``redis.lanes`` streams, a key's messages all in one lane.

Consumers: one subscription per route, in the route's consumer group, reading the
lanes it holds a lease on (see ``subscription.py``); acknowledged (``XACK``) only
after the database commit, and only while the lane's lease is still theirs.

Outages and rebuilds: a call that fails on the connection (refused, reset, timed
out) drops the client; ``send`` builds a new one and tries once more at once, then
raises ``TransportError`` (the relay holds the rows without counting an attempt and
logs the outage once at its start and once at its end). Streams and groups are
declared at start (or waited for) and created again when the server lost them.

The parts: ``errors.py``, ``producer.py``, ``subscription.py``, ``admin.py``
(lanes, streams, groups); ``client.py`` imports redis-py once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from urllib.parse import urlsplit, urlunsplit

from outboxer.errors import TransportError
from outboxer.routing import ServiceRoute
from outboxer.transports.base import Delivery, Features, OutgoingMessage
from outboxer.transports.redis.admin import Topology
from outboxer.transports.redis.client import Redis, connect
from outboxer.transports.redis.errors import OUTAGE_ERRORS, REBUILD_ERRORS, describe
from outboxer.transports.redis.producer import add_batch
from outboxer.transports.redis.settings import RedisSettings
from outboxer.transports.redis.subscription import RedisSubscription

logger = logging.getLogger(__name__)


def redacted(url: str) -> str:
    """``url`` without its password (for errors and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))


class RedisTransport:
    """Redis Streams (Redis 6.2 or later: ``XAUTOCLAIM``) through redis-py."""

    name = "redis"
    features = Features(requeue=True, requeue_delay=True, rebuilds_clients=True)

    def __init__(self, url: str, *, settings: RedisSettings | None = None) -> None:
        self.url = url
        self.settings = settings or RedisSettings()
        self.topology = Topology(self.settings)
        self._client: Redis | None = None
        self._subscriptions: list[RedisSubscription] = []
        self._routes: list[ServiceRoute] = []
        self.client_rebuilds = 0
        self._failing = False
        """The last send failed as a whole (an outage: the relay logs it once)."""

    @property
    def delivers_in_process(self) -> bool:
        return False

    def check_route(self, route: ServiceRoute) -> None:
        pass  # a stream's name and a group's may be any string

    # ------------------------------------------------------------------ lifecycle

    def _current(self) -> Redis:
        if self._client is None:
            self._client = connect(self.url, self.settings.socket_timeout)
        return self._client

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def start(self, routes: Sequence[ServiceRoute]) -> None:
        self._routes = list(routes)
        await self.topology.ensure(self._current(), self._routes, redacted(self.url))

    async def subscribe(self, route: ServiceRoute) -> RedisSubscription:
        sub = RedisSubscription(route, self.url, self.settings, self.topology)
        await sub.open()
        self._subscriptions.append(sub)
        return sub

    async def close(self) -> None:
        subs, self._subscriptions = self._subscriptions, []
        for sub in subs:
            await sub.close()
        await self._drop_client()

    # ------------------------------------------------------------------ sending

    async def send(
        self, route: ServiceRoute, messages: Sequence[OutgoingMessage]
    ) -> list[Delivery]:
        if not messages:
            return []
        try:
            deliveries = await add_batch(
                self._current(), self.topology, self.settings, route.topic, messages
            )
            self._failing = False
            return deliveries
        except REBUILD_ERRORS as exc:
            # The client's connection is broken (or the server restarted): a new
            # client, one more try at once; a second failure is an outage (logged
            # by the relay, once when it starts and once when it ends).
            if not self._failing:
                logger.info("rebuilding the Redis client after %s", describe(exc))
            await self._drop_client()
            self.client_rebuilds += 1
        try:
            deliveries = await add_batch(
                self._current(), self.topology, self.settings, route.topic, messages
            )
            self._failing = False
            return deliveries
        except OUTAGE_ERRORS as exc:
            self._failing = True
            await self._drop_client()
            raise TransportError(
                f"Redis unreachable: {describe(exc)}", url=redacted(self.url)
            ) from exc
        except asyncio.CancelledError:
            await self._drop_client()
            raise


__all__ = ["RedisSubscription", "RedisTransport", "redacted"]
