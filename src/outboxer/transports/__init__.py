"""Transports: how envelopes travel from the relay to the consumers.

Every transport implements the one protocol in :mod:`outboxer.transports.base`;
:mod:`outboxer.transports.registry` builds one from a URL. ``local`` (in-process,
the embedded default), ``memory`` (an in-memory broker for tests) and ``kafka``
ship with outboxer.
"""

from outboxer.transports.base import (
    Delivery,
    Features,
    IncomingMessage,
    OutgoingMessage,
    Subscription,
    Transport,
)
from outboxer.transports.local import LocalTransport
from outboxer.transports.memory import InMemoryTransport
from outboxer.transports.registry import make_transport, register_transport

__all__ = [
    "Delivery",
    "Features",
    "InMemoryTransport",
    "IncomingMessage",
    "LocalTransport",
    "OutgoingMessage",
    "Subscription",
    "Transport",
    "make_transport",
    "register_transport",
]
