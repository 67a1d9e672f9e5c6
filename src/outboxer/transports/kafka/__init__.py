"""The Kafka transport (confluent-kafka); ``pip install 'outboxer[kafka]'``.

:class:`KafkaSettings` imports without confluent-kafka; :class:`KafkaTransport`
needs it and says how to install it when it is missing. The test broker,
:class:`~outboxer.transports.kafka.embedded.EmbeddedKafka`, is in ``embedded.py``
(users import it from :mod:`outboxer.testing`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from outboxer.transports.kafka.settings import KafkaSettings

if TYPE_CHECKING:
    from outboxer.transports.kafka.transport import KafkaTransport


def __getattr__(name: str) -> Any:
    if name == "KafkaTransport":
        from outboxer.transports.kafka.transport import KafkaTransport  # noqa: PLC0415

        return KafkaTransport
    raise AttributeError(name)


__all__ = ["KafkaSettings", "KafkaTransport"]
