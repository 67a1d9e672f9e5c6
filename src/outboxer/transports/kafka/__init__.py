"""The Kafka transport (confluent-kafka); ``pip install 'outboxer[kafka]'``.

:class:`KafkaSettings` (the ``[kafka]`` section) and :func:`create` (the factory of
``kafka://host:port[,host:port]``) import without confluent-kafka;
:class:`KafkaTransport` needs it and says how to install it when it is missing.
The test broker, :class:`~outboxer.transports.kafka.embedded.EmbeddedKafka`, is in
``embedded.py`` (users import it from :mod:`outboxer.testing`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from outboxer.errors import ConfigurationError
from outboxer.transports.kafka.settings import KafkaSettings

if TYPE_CHECKING:
    from outboxer.settings import OutboxSettings
    from outboxer.transports.kafka.transport import KafkaTransport


def create(spec: str, settings: OutboxSettings) -> KafkaTransport:
    """The transport of ``kafka://host:port[,host:port]`` with the ``[kafka]`` section."""
    servers = spec.split("://", 1)[1].strip("/") if "://" in spec else ""
    if not servers:
        raise ConfigurationError(f"transport {spec!r} names no bootstrap servers")
    kafka = KafkaSettings.parse(settings.section("kafka"))
    # Optional dependency: imported only when asked for.
    from outboxer.transports.kafka.transport import KafkaTransport  # noqa: PLC0415

    return KafkaTransport(servers, settings=kafka, lease=settings.lease)


def __getattr__(name: str) -> Any:
    if name == "KafkaTransport":
        from outboxer.transports.kafka.transport import KafkaTransport  # noqa: PLC0415

        return KafkaTransport
    raise AttributeError(name)


__all__ = ["KafkaSettings", "KafkaTransport", "create"]
