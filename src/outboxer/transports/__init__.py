"""Transports: how envelopes travel from the relay to the consumers.

``local`` (in-process, the embedded default) and ``kafka`` implement the one
protocol in :mod:`outboxer.transports.base`.
"""

from outboxer.transports.base import (
    Delivery,
    IncomingMessage,
    OutgoingMessage,
    Subscription,
    Transport,
)
from outboxer.transports.local import LocalTransport

__all__ = [
    "Delivery",
    "IncomingMessage",
    "LocalTransport",
    "OutgoingMessage",
    "Subscription",
    "Transport",
]
