"""The transport protocol: the seam between the outbox and a broker.

A transport sends batches of envelopes for a service route and reports, per message,
whether the broker acknowledged it; and it hands out subscriptions that receive
batches for a route and acknowledge (commit) them after the database transaction
that processed them has committed, or give them back (``nack``). What a transport
promises beyond that it declares in its :class:`Features`.

Route words are the broker's own in the transport and neutral here: a route's
``topic`` is its destination (a Kafka topic, a RabbitMQ exchange or queue, a NATS
subject, a Redis stream) and its ``group_id`` the group of consumers that share it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from outboxer.envelope import Envelope
from outboxer.routing import ServiceRoute


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One claimed outbox row, ready to send: ``value`` is the envelope's wire JSON."""

    outbox_id: int
    retry_count: int
    key: str
    value: bytes
    event_id: str
    event_type: str
    event_version: str
    extra_headers: Mapping[str, str] = field(default_factory=dict)
    """Propagation headers stored with the row (a W3C ``traceparent``)."""
    envelope: Envelope | None = field(default=None, compare=False, repr=False)
    """The envelope ``value`` encodes, built by a relay whose transport delivers in
    process (:attr:`Features.in_process`), so the consumer does not parse it again."""
    marked: bool = field(default=False, compare=False, repr=False)
    """In process: the relay's claim already marked the row as being handled (its
    consumer was idle), so the consumer does not mark it again."""

    @classmethod
    def from_envelope(
        cls,
        envelope: Envelope,
        *,
        key: str,
        retry_count: int,
        headers: Mapping[str, str] | None = None,
    ) -> OutgoingMessage:
        return cls(
            envelope.outbox_id,
            retry_count,
            key,
            envelope.to_json(),
            envelope.event_id,
            envelope.event_type,
            envelope.event_version,
            headers or {},
        )

    def headers(self) -> list[tuple[str, bytes]]:
        """Event id, type and version (for consumers that route on headers), then the
        propagation headers stored with the row."""
        own = [
            ("event_id", self.event_id.encode()),
            ("event_type", self.event_type.encode()),
            ("event_version", self.event_version.encode()),
        ]
        if not self.extra_headers:
            return own
        names = {name for name, _ in own}
        extra = [(k, v.encode()) for k, v in self.extra_headers.items() if k not in names]
        return own + extra


@dataclass(frozen=True, slots=True)
class Delivery:
    """What became of one sent message.

    ``error`` is ``None`` when the broker acknowledged it. ``permanent`` errors (a
    message larger than the broker accepts, say) will never succeed: the relay marks
    the row dead instead of retrying. ``transient`` errors are the broker's, not the
    message's (unreachable, timed out, no leader, producer state): they never count
    an attempt; when every message of a batch fails so, the relay treats it as an
    outage and backs off.
    ``settled`` means the consumer side already recorded the outcome in the database
    (the in-process transport), so the relay must not mark the row published; with an
    ``error`` and ``transient``, the consumer never took the message (nothing ran).
    ``coordinates``: where the broker put an acknowledged message, as short text
    (Kafka: ``topic/partition@offset``); the relay stores it with the published mark.
    """

    outbox_id: int
    error: str | None = None
    permanent: bool = False
    settled: bool = False
    transient: bool = False
    coordinates: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(slots=True)
class IncomingMessage:
    """One message received from the transport, not yet acknowledged."""

    route: ServiceRoute
    value: bytes | None
    key: bytes | None = None
    headers: Mapping[str, bytes] = field(default_factory=dict)
    position: Any = None
    """The transport's own marker (partition and offset for Kafka) used by ``ack``."""
    coordinates: str | None = None
    """Where the message was read, as short text (Kafka: ``topic/partition@offset``);
    an inbox row keeps it."""
    envelope: Envelope | None = None
    """The envelope ``value`` encodes, handed over in process with the message (the
    consumer then does not parse ``value``); None from any broker."""
    marked: bool = False
    """In process: the row is already marked as being handled by the claim that
    took it (:attr:`OutgoingMessage.marked`); False from any broker."""


@dataclass(frozen=True, slots=True)
class Features:
    """What a transport can promise beyond the protocol; the contract suite
    (``tests/integration/test_transport_contract.py``) tests each promise it makes and
    skips the rest, as watermill's pub/sub tests do.

    ``in_process``: ``send`` returns once this process's consumer has committed the
    batch (nothing is stored in between; the database is the queue).
    ``ordered_per_key``: one destination's messages of one key are received in the
    order they were sent.
    ``redelivers_unacked``: messages a subscription received and did not acknowledge
    (its process died, it was closed) go to the group's next reader.
    ``requeue``: ``Subscription.nack`` gives messages back to the broker at once (else
    they come back with the next reader, or, in process, after the claim's lease).
    ``requeue_delay``: ``nack(delay=)`` keeps them back that long.
    ``dead_letters``: the broker keeps a dead-letter destination of its own.
    ``rebuilds_clients``: a client that met a fatal error is replaced without a restart.
    """

    in_process: bool = False
    ordered_per_key: bool = True
    redelivers_unacked: bool = True
    requeue: bool = False
    requeue_delay: bool = False
    dead_letters: bool = False
    rebuilds_clients: bool = False


@runtime_checkable
class Subscription(Protocol):
    """Receives one route's messages (Kafka: one consumer in the route's group)."""

    route: ServiceRoute

    async def receive(self, max_messages: int, timeout: float) -> list[IncomingMessage]:
        """Up to ``max_messages``, waiting at most ``timeout`` seconds for the first."""
        ...

    async def ack(self, messages: Sequence[IncomingMessage]) -> None:
        """Acknowledge messages processed and committed in the database."""
        ...

    async def nack(self, messages: Sequence[IncomingMessage], *, delay: float = 0.0) -> None:
        """Give messages back unprocessed ("not now"): they are delivered again, after
        ``delay`` seconds where the broker can wait (``Features.requeue_delay``), else
        as soon as it can. On a log (Kafka, the in-memory broker) a partition is read
        again from its earliest message given back: do not acknowledge later messages
        of the same key after giving one back."""
        ...

    async def close(self) -> None:
        """Stop receiving; unacknowledged messages will be delivered again later."""
        ...


@runtime_checkable
class Transport(Protocol):
    """A broker (or the in-process handoff) that carries envelopes."""

    name: str
    features: Features

    @property
    def delivers_in_process(self) -> bool:
        """True when a send only completes once this process's consumer processed it."""
        ...

    def check_route(self, route: ServiceRoute) -> None:
        """Refuse (``InvalidIdentifierError``) a route whose destination or group this
        broker cannot carry; called when the route is declared, before any message.
        The route's names already follow the neutral rule of :mod:`outboxer.routing`."""
        ...

    async def start(self, routes: Sequence[ServiceRoute]) -> None:
        """Connect and make sure the routes' destinations are ready."""
        ...

    async def send(
        self, route: ServiceRoute, messages: Sequence[OutgoingMessage]
    ) -> list[Delivery]:
        """Send a batch; one :class:`Delivery` per message, in the same order.

        Raising means the transport failed as a whole (an outage): the relay gives
        the rows back without counting an attempt and backs off."""
        ...

    async def subscribe(self, route: ServiceRoute) -> Subscription:
        """A subscription to ``route`` in the route's consumer group."""
        ...

    async def close(self) -> None:
        """Flush what was sent, close every subscription, release every connection."""
        ...
