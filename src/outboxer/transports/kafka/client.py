"""confluent-kafka, imported once, with the install hint when it is missing.

Every module of the package that talks to a broker imports the client from here, so
``import outboxer.transports.kafka`` (the settings) works without the extra.
"""

from __future__ import annotations

try:
    from confluent_kafka import (
        Consumer,
        KafkaError,
        KafkaException,
        Message,
        Producer,
        TopicPartition,
    )
    from confluent_kafka import admin as kafka_admin
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the Kafka transport needs confluent-kafka: pip install 'outboxer[kafka]'"
    ) from exc

AdminClient = kafka_admin.AdminClient
NewTopic = kafka_admin.NewTopic  # type: ignore[attr-defined]  # re-exported without __all__

__all__ = [
    "AdminClient",
    "Consumer",
    "KafkaError",
    "KafkaException",
    "Message",
    "NewTopic",
    "Producer",
    "TopicPartition",
]
