"""The NATS JetStream transport, on nats-py.

Relay: a batch is published at once and its PubAcks awaited together; a message is
sent only once its stream stored it (JetStream's PubAck). Its subject is
``<destination>.<lane>``, the lane a stable hash of its key, so one key's messages
stay in one lane, in order. ``Nats-Msg-Id`` (event id and the row's attempt) lets the
stream's duplicate window drop a resend after a lost PubAck. Messages over the
server's ``max_payload`` (or a stream's size limit) are permanent failures and end
dead; no responders, no stream, timeouts and a connection that is down are transient,
which the relay treats as an outage.

Consumers: one durable pull consumer per (group, lane), explicit acks, ``ack_wait``,
``max_deliver=-1``; acknowledged only after the database commit; ``nack(delay=)``
is a NAK with that delay. A connection that closed for good (or was flagged broken)
is rebuilt by the next call, without a restart; nats-py reconnects on its own when a
server restarts.

The parts: ``settings.py``, ``client.py`` (nats-py imported once), ``errors.py``,
``connection.py``, ``admin.py`` (streams, consumers, lanes), ``producer.py``,
``subscription.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from outboxer.errors import InvalidIdentifierError
from outboxer.routing import ServiceRoute
from outboxer.transports.base import Delivery, Features, OutgoingMessage
from outboxer.transports.nats.admin import NatsAdmin
from outboxer.transports.nats.connection import Connection, Servers, connect
from outboxer.transports.nats.errors import describe, stream_missing
from outboxer.transports.nats.producer import publish_batch
from outboxer.transports.nats.settings import NatsSettings
from outboxer.transports.nats.subscription import NatsSubscription

logger = logging.getLogger(__name__)

_FORBIDDEN = frozenset(" *>/\\")


class NatsTransport:
    """NATS JetStream through nats-py."""

    name = "nats"
    features = Features(requeue=True, requeue_delay=True, rebuilds_clients=True)

    def __init__(
        self, servers: Servers, *, settings: NatsSettings | None = None, lease: float = 30.0
    ) -> None:
        self.servers = servers
        self.settings = settings or NatsSettings()
        # A publish must give up before the claim's lease runs out, or another relay
        # sends the same rows again while this one is still waiting.
        self.publish_timeout = min(self.settings.publish_timeout, max(0.5, lease * 0.8))
        self.admin = NatsAdmin(self.settings)
        self._conn: Connection | None = None
        self._lock = asyncio.Lock()
        self._ready: set[str] = set()
        """Destinations whose stream is known to exist."""
        self._subscriptions: list[NatsSubscription] = []
        self.connection_rebuilds = 0

    @property
    def delivers_in_process(self) -> bool:
        return False

    def check_route(self, route: ServiceRoute) -> None:
        for what, name in (("topic", route.topic), ("group", route.group_id)):
            if set(name) & _FORBIDDEN or name.startswith(".") or name.endswith("."):
                raise InvalidIdentifierError(
                    f"NATS cannot carry the {what} {name!r} of service {route.service_name!r}"
                )

    # ------------------------------------------------------------------ lifecycle

    async def start(self, routes: Sequence[ServiceRoute]) -> None:
        # A lock belongs to the loop that first waits on it; each run may be a new loop.
        self._lock = asyncio.Lock()
        destinations = sorted({r.topic for r in routes})
        conn = await self._current()
        if destinations:
            await self.admin.ensure_streams(conn.js, destinations)
            self._ready.update(destinations)

    async def subscribe(self, route: ServiceRoute) -> NatsSubscription:
        sub = NatsSubscription(route, self.servers, self.settings, self.admin)
        await sub.open()
        self._subscriptions.append(sub)
        return sub

    async def close(self) -> None:
        for sub in self._subscriptions:
            await sub.close()
        self._subscriptions = []
        async with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def delete_destinations(self, destinations: Sequence[str]) -> None:
        """Delete the destinations' streams, with their consumers and messages (a
        demo's or a test's; never called by the relay or the consumer), on a
        connection of its own that it closes."""
        conn = await connect(self.servers, self.settings, name="outboxer-admin")
        try:
            await self.admin.delete_streams(conn.js, destinations)
        finally:
            await conn.close()
        self._ready.difference_update(destinations)

    def break_client(self, reason: str) -> None:
        """Flag the connection as unusable: the next call replaces it."""
        if self._conn is not None:
            self._conn.break_(reason)

    async def _current(self) -> Connection:
        async with self._lock:
            conn = self._conn
            if conn is not None and conn.usable:
                return conn
            if conn is not None:
                logger.warning("rebuilding the NATS connection: %s", conn.broken)
                self._conn = None
                await conn.close()
                self.connection_rebuilds += 1
            self._conn = await connect(self.servers, self.settings, name="outboxer-relay")
            return self._conn

    # ------------------------------------------------------------------ sending

    async def send(
        self, route: ServiceRoute, messages: Sequence[OutgoingMessage]
    ) -> list[Delivery]:
        conn = await self._current()
        if route.topic not in self._ready:
            # A stream declared late (a server that lost its store, or a route
            # sent before start): failures here are the server's, not the rows'.
            await asyncio.wait_for(
                self.admin.ensure_streams(conn.js, [route.topic]), self.publish_timeout
            )
            self._ready.add(route.topic)
        results = await publish_batch(
            conn.js,
            route.topic,
            messages,
            lanes=self.settings.lanes,
            timeout=self.publish_timeout,
        )
        errors = [exc for _, exc in results if exc is not None]
        if any(stream_missing(exc) for exc in errors):
            self._ready.discard(route.topic)
        if errors and len(errors) == len(results):
            logger.debug("a NATS batch failed: %s", describe(errors[0]))
        return [d for d, _ in results]


__all__ = ["NatsSubscription", "NatsTransport"]
