"""Transport URLs: a scheme -> factory registry.

``local`` (the in-process handoff), ``memory`` (an in-memory broker for tests) and
``kafka://host:port[,host:port]`` are built in; ``register_transport`` adds a
scheme. A factory receives the whole transport string and the outbox settings, and
validates its own section of them, so a misconfigured transport is refused when the
``Outbox`` is built, not when the first message is sent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from outboxer.errors import ConfigurationError
from outboxer.settings import OutboxSettings
from outboxer.transports.base import Transport
from outboxer.transports.local import LocalTransport
from outboxer.transports.memory import InMemoryTransport

TransportFactory = Callable[[str, OutboxSettings], Transport]

_lock = threading.Lock()
_factories: dict[str, TransportFactory] = {}


def register_transport(scheme: str, factory: TransportFactory) -> None:
    """Make ``scheme`` (``scheme`` or ``scheme://...``) build transports with ``factory``."""
    if not scheme.isidentifier():
        raise ConfigurationError(f"transport scheme must be an identifier, got {scheme!r}")
    with _lock:
        _factories[scheme.lower()] = factory


def scheme_of(spec: str) -> str:
    return spec.split("://", 1)[0].strip().lower()


def make_transport(spec: str | Transport, settings: OutboxSettings) -> Transport:
    """The transport named by ``spec`` (an instance is returned as it is)."""
    if not isinstance(spec, str):
        return spec
    factory = _factories.get(scheme_of(spec))
    if factory is None:
        known = ", ".join(sorted(_factories))
        raise ConfigurationError(
            f"unknown transport {spec!r}: use one of {known} (e.g. 'kafka://host:9092') "
            "or a Transport instance"
        )
    return factory(spec, settings)


def _local(spec: str, settings: OutboxSettings) -> Transport:
    return LocalTransport()


def _memory(spec: str, settings: OutboxSettings) -> Transport:
    return InMemoryTransport()


def _kafka(spec: str, settings: OutboxSettings) -> Transport:
    servers = spec.split("://", 1)[1].strip("/") if "://" in spec else ""
    if not servers:
        raise ConfigurationError(f"transport {spec!r} names no bootstrap servers")
    from outboxer.transports.kafka import KafkaSettings  # noqa: PLC0415

    kafka = KafkaSettings.parse(settings.kafka)
    # Optional dependency: imported only when asked for.
    from outboxer.transports.kafka.transport import KafkaTransport  # noqa: PLC0415

    return KafkaTransport(servers, settings=kafka, lease=settings.lease)


register_transport("local", _local)
register_transport("memory", _memory)
register_transport("kafka", _kafka)
