"""Transport URLs: a scheme -> factory registry.

``local`` (the in-process handoff), ``memory`` (an in-memory broker for tests) and
``kafka://host:port[,host:port]`` are built in; ``register_transport`` adds a
scheme. A factory receives the whole transport string and the outbox settings, and
reads its own section of them (``settings.section(scheme)``), which the transport
registers with its scheme: ``[kafka]`` in TOML, ``OUTBOXER_KAFKA__*`` in the
environment. Sections are validated when the settings are loaded, and a factory
checks the rest of what it is given (the URL), so a misconfigured transport is
refused when the ``Outbox`` is built, not when the first message is sent.

This is the one module that names every built-in transport; the transports never
import one another.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from pydantic import BaseModel

from outboxer.errors import ConfigurationError
from outboxer.settings import OutboxSettings, register_section
from outboxer.transports import kafka
from outboxer.transports import nats as nats_transport
from outboxer.transports import rabbitmq as amqp
from outboxer.transports import redis as redis_streams
from outboxer.transports.base import Transport
from outboxer.transports.local import LocalTransport
from outboxer.transports.memory import InMemoryTransport

TransportFactory = Callable[[str, OutboxSettings], Transport]

_lock = threading.Lock()
_factories: dict[str, TransportFactory] = {}


def register_transport(
    scheme: str, factory: TransportFactory, *, settings: type[BaseModel] | None = None
) -> None:
    """Make ``scheme`` (``scheme`` or ``scheme://...``) build transports with ``factory``.

    ``settings``: the model of the transport's own section, read from ``[scheme]``
    and ``OUTBOXER_SCHEME__*`` (register the transport before loading settings)."""
    if not scheme.isidentifier():
        raise ConfigurationError(f"transport scheme must be an identifier, got {scheme!r}")
    if settings is not None:
        register_section(scheme.lower(), settings)
    with _lock:
        _factories[scheme.lower()] = factory


def schemes() -> list[str]:
    """Every registered scheme, sorted (the contract suite runs one case per scheme)."""
    with _lock:
        return sorted(_factories)


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


register_transport("local", _local)
register_transport("memory", _memory)
register_transport("kafka", kafka.create, settings=kafka.KafkaSettings)
# amqp://user:pass@host:port/vhost reads the [rabbitmq] section (OUTBOXER_RABBITMQ__*).
register_transport("amqp", amqp.create)
register_section(amqp.SECTION, amqp.RabbitMQSettings)
register_transport("nats", nats_transport.create, settings=nats_transport.NatsSettings)
register_transport("redis", redis_streams.create, settings=redis_streams.RedisSettings)
