"""aio-pika, imported once, with the install hint when it is missing.

Every module of the package that talks to a broker imports the client from here, so
``import outboxer.transports.rabbitmq`` (the settings) works without the extra.
"""

from __future__ import annotations

try:
    import aio_pika
    from aio_pika import exceptions as amqp_errors
    from aio_pika.abc import (
        AbstractChannel,
        AbstractConnection,
        AbstractExchange,
        AbstractIncomingMessage,
        AbstractQueue,
    )
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the RabbitMQ transport needs aio-pika: pip install 'outboxer[rabbitmq]'"
    ) from exc

__all__ = [
    "AbstractChannel",
    "AbstractConnection",
    "AbstractExchange",
    "AbstractIncomingMessage",
    "AbstractQueue",
    "aio_pika",
    "amqp_errors",
]
