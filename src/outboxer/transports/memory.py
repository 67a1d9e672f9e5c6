"""An in-memory broker: a transport for tests (``transport="memory"``).

It behaves like a one-partition broker that keeps everything it is sent: the relay
marks rows published when they are stored, consumer groups read them back and
commit offsets after their database commit, and unacknowledged messages are
delivered again to the group's next reader. Tests can look at what was sent
(:meth:`InMemoryTransport.messages`, :meth:`InMemoryTransport.events`) and make the
broker refuse messages (:meth:`InMemoryTransport.fail_next`) or be unreachable
(:attr:`InMemoryTransport.down`). Nothing leaves the process; use one instance per
test. :func:`outboxer.testing.drain` runs an outbox until its work is done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from outboxer.cloudevents import envelope_dict
from outboxer.envelope import Envelope
from outboxer.errors import EnvelopeDecodeError, TransportError
from outboxer.routing import ServiceRoute
from outboxer.transports.base import Delivery, Features, IncomingMessage, OutgoingMessage


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One message as the in-memory broker keeps it."""

    topic: str
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes] = field(default_factory=dict)

    def envelope(self) -> Envelope:
        """The outboxer envelope in this message, also when a CloudEvents service
        sent it (EnvelopeDecodeError if it is none)."""
        if self.value is None:
            raise EnvelopeDecodeError("message has no value", topic=self.topic, offset=self.offset)
        if "ce_specversion" in self.headers or self.headers.get("content-type") == (
            b"application/cloudevents+json"
        ):
            return Envelope.from_dict(envelope_dict(self.value, self.headers))
        return Envelope.from_json(self.value)


@dataclass(slots=True)
class _Group:
    committed: int = 0
    fetched: int = 0
    held_until: float = 0.0
    """Loop time before which nothing is handed out (messages given back with a delay)."""


class MemorySubscription:
    """One reader of a topic in a consumer group."""

    def __init__(self, route: ServiceRoute, broker: InMemoryTransport) -> None:
        self.route = route
        self._broker = broker
        self._inflight: list[IncomingMessage] = []
        self.closed = False

    async def receive(self, max_messages: int, timeout: float) -> list[IncomingMessage]:
        if self.closed:
            return []
        broker = self._broker
        log = broker._topic(self.route.topic)
        group = broker._group(self.route)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while group.fetched >= len(log) or group.held_until > loop.time():
            remaining = deadline - loop.time()
            if remaining <= 0 or self.closed:
                return []
            if group.held_until > loop.time():
                await asyncio.sleep(min(remaining, group.held_until - loop.time()))
                continue
            arrived = broker._arrival()
            try:
                await asyncio.wait_for(arrived.wait(), remaining)
            except TimeoutError:
                return []
        batch = log[group.fetched : group.fetched + max_messages]
        group.fetched += len(batch)
        out = [
            IncomingMessage(
                route=self.route,
                value=m.value,
                key=m.key,
                headers=dict(m.headers),
                position=m.offset,
                coordinates=f"{self.route.topic}@{m.offset}",
            )
            for m in batch
        ]
        self._inflight.extend(out)
        return out

    async def ack(self, messages: Sequence[IncomingMessage]) -> None:
        if not messages:
            return
        group = self._broker._group(self.route)
        acked = {id(m) for m in messages}
        self._inflight = [m for m in self._inflight if id(m) not in acked]
        highest = max(int(m.position) for m in messages)
        group.committed = max(group.committed, highest + 1)

    async def nack(self, messages: Sequence[IncomingMessage], *, delay: float = 0.0) -> None:
        if not messages:
            return
        group = self._broker._group(self.route)
        given = {id(m) for m in messages}
        self._inflight = [m for m in self._inflight if id(m) not in given]
        # One partition: read again from the earliest message given back.
        group.fetched = max(group.committed, min(int(m.position) for m in messages))
        if delay > 0:
            group.held_until = asyncio.get_running_loop().time() + delay

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._inflight:
            # Not acknowledged: the group's next reader gets them again.
            group = self._broker._group(self.route)
            group.fetched = group.committed
            self._inflight = []


class InMemoryTransport:
    """A broker in memory, for tests of handlers and of what a business call sends."""

    name = "memory"
    features = Features(requeue=True, requeue_delay=True)

    def __init__(self) -> None:
        self._topics: dict[str, list[StoredMessage]] = {}
        self._groups: dict[tuple[str, str], _Group] = {}
        self._subscriptions: list[MemorySubscription] = []
        self._arrived: asyncio.Event | None = None
        self._failures: list[tuple[str, bool]] = []
        self.down = False
        """While True, every send fails as a whole (the broker is unreachable)."""

    @property
    def delivers_in_process(self) -> bool:
        return False

    # ------------------------------------------------------------------ for tests

    def messages(self, topic: str | None = None) -> list[StoredMessage]:
        """Everything sent (to ``topic``), in order."""
        if topic is not None:
            return list(self._topics.get(topic, []))
        return [m for log in self._topics.values() for m in log]

    def events(self, event_type: str | None = None) -> list[Envelope]:
        """The envelopes sent (of ``event_type``), in order; redeliveries included."""
        found = [m.envelope() for m in self.messages()]
        return [e for e in found if event_type is None or e.event_type == event_type]

    def fail_next(self, count: int = 1, error: str = "refused", *, permanent: bool = False) -> None:
        """Refuse the next ``count`` messages with ``error`` (``permanent``: one that
        can never succeed, such as a message too large)."""
        self._failures.extend([(error, permanent)] * count)

    def clear(self) -> None:
        """Forget every message and offset."""
        self._topics.clear()
        self._groups.clear()

    # ------------------------------------------------------------------ protocol

    def check_route(self, route: ServiceRoute) -> None:
        pass  # any name the neutral rule allows

    async def start(self, routes: Sequence[ServiceRoute]) -> None:
        self._arrived = asyncio.Event()  # belongs to this run's loop
        for route in routes:
            self._topic(route.topic)

    async def send(
        self, route: ServiceRoute, messages: Sequence[OutgoingMessage]
    ) -> list[Delivery]:
        if self.down:
            raise TransportError("in-memory broker is down")
        log = self._topic(route.topic)
        out: list[Delivery] = []
        for m in messages:
            if self._failures:
                error, permanent = self._failures.pop(0)
                out.append(Delivery(m.outbox_id, error=error, permanent=permanent))
                continue
            offset = len(log)
            log.append(
                StoredMessage(route.topic, offset, m.key.encode(), m.value, dict(m.headers()))
            )
            out.append(Delivery(m.outbox_id, coordinates=f"{route.topic}@{offset}"))
        arrived = self._arrival()
        arrived.set()
        arrived.clear()
        return out

    async def subscribe(self, route: ServiceRoute) -> MemorySubscription:
        sub = MemorySubscription(route, self)
        self._subscriptions.append(sub)
        return sub

    async def close(self) -> None:
        for sub in self._subscriptions:
            await sub.close()
        self._subscriptions = []
        if self._arrived is not None:
            self._arrived.set()

    # ------------------------------------------------------------------ internals

    def _topic(self, topic: str) -> list[StoredMessage]:
        return self._topics.setdefault(topic, [])

    def _group(self, route: ServiceRoute) -> _Group:
        return self._groups.setdefault((route.group_id, route.topic), _Group())

    def _arrival(self) -> asyncio.Event:
        if self._arrived is None:
            self._arrived = asyncio.Event()
        return self._arrived

    def pending(self) -> int:
        """Messages sent but not yet acknowledged by every group that reads them."""
        waiting = 0
        for (_, topic), group in self._groups.items():
            waiting += len(self._topics.get(topic, [])) - group.committed
        return waiting

    def __repr__(self) -> str:
        sizes: dict[str, Any] = {t: len(log) for t, log in self._topics.items()}
        return f"InMemoryTransport(topics={sizes})"
