"""The RabbitMQ transport (aio-pika); ``pip install 'outboxer[rabbitmq]'``.

:class:`RabbitMQSettings` (the ``[rabbitmq]`` section) and :func:`create` (the factory
of ``amqp://user:pass@host:port/vhost``) import without aio-pika;
:class:`RabbitMQTransport` needs it and says how to install it when it is missing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from outboxer.errors import ConfigurationError
from outboxer.transports.rabbitmq.settings import RabbitMQSettings

if TYPE_CHECKING:
    from outboxer.settings import OutboxSettings
    from outboxer.transports.rabbitmq.transport import RabbitMQTransport

SECTION = "rabbitmq"


def create(spec: str, settings: OutboxSettings) -> RabbitMQTransport:
    """The transport of ``amqp://user:pass@host:port/vhost`` with the ``[rabbitmq]`` section."""
    rest = spec.split("://", 1)[1] if "://" in spec else ""
    if not rest.strip("/"):
        raise ConfigurationError(
            f"transport {spec.rsplit('@', maxsplit=1)[-1]!r} names no RabbitMQ host"
        )
    rabbitmq = RabbitMQSettings.parse(settings.section(SECTION))
    # Optional dependency: imported only when asked for.
    from outboxer.transports.rabbitmq.transport import RabbitMQTransport  # noqa: PLC0415

    return RabbitMQTransport(spec, settings=rabbitmq, lease=settings.lease)


def __getattr__(name: str) -> Any:
    if name == "RabbitMQTransport":
        from outboxer.transports.rabbitmq.transport import RabbitMQTransport  # noqa: PLC0415

        return RabbitMQTransport
    raise AttributeError(name)


__all__ = ["SECTION", "RabbitMQSettings", "RabbitMQTransport", "create"]
