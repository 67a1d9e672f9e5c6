"""Settings of the Kafka transport (``OUTBOXER_KAFKA__*``, ``[kafka]`` in TOML), the
section registered with the ``kafka`` scheme.

Kept apart from the client code so configuration can be validated without
confluent-kafka installed.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from outboxer.errors import ConfigurationError


class KafkaSettings(BaseModel):
    """How outboxer talks to Kafka; ``config`` passes any librdkafka setting through."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    create_topics: bool = True
    partitions: int = Field(default=3, ge=1)
    replication_factor: int = Field(default=-1, description="-1: the broker's default")
    session_timeout_ms: int = Field(default=10_000, ge=1000)
    socket_timeout_ms: int = Field(default=10_000, ge=100)
    """librdkafka's ``socket.timeout.ms``: a request to the broker unanswered this long
    fails and its connection is closed and opened again (a broker that vanished
    without closing). TCP keepalive is on as well (``socket.keepalive.enable``)."""
    topic_wait_timeout: float = Field(default=60.0, gt=0)
    unassigned_rebuild_after: float = Field(default=15.0, gt=0)
    """Seconds a consumer may have no partition (while its group does not cover the
    topic) before it is closed and built again; doubles after each rebuild."""
    config: dict[str, str | int | float | bool] = Field(default_factory=dict)
    """Extra librdkafka settings for producer and consumers (security, tuning). In the
    environment, one JSON object: ``OUTBOXER_KAFKA__CONFIG='{"security.protocol": "SSL"}'``
    (librdkafka's names contain dots, which variable names cannot)."""

    @field_validator("config", mode="before")
    @classmethod
    def _config_from_json(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            decoded = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"kafka.config given as text must be a JSON object: {exc}") from exc
        if not isinstance(decoded, dict):
            raise ValueError("kafka.config given as text must be a JSON object")
        return decoded

    @classmethod
    def parse(cls, values: BaseModel | dict[str, Any] | None) -> KafkaSettings:
        """Validated settings from the ``kafka`` section of the outbox settings."""
        if isinstance(values, KafkaSettings):
            return values
        if isinstance(values, BaseModel):
            values = values.model_dump()
        try:
            return cls.model_validate(values or {})
        except ValidationError as exc:
            raise ConfigurationError(f"invalid Kafka settings: {exc}") from exc
