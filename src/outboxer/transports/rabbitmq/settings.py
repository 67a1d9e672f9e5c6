"""Settings of the RabbitMQ transport (``OUTBOXER_RABBITMQ__*``, ``[rabbitmq]`` in TOML),
the section read by the ``amqp`` scheme.

Kept apart from the client code so configuration can be validated without aio-pika
installed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from outboxer.errors import ConfigurationError

BROKER_MAX_MESSAGE_SIZE = 134_217_728
"""RabbitMQ's default ``max_message_size`` (128 MiB)."""


class RabbitMQSettings(BaseModel):
    """How outboxer talks to RabbitMQ."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    declare_topology: bool = True
    """Declare each route's exchange at start, and a consumer group's lane queues and
    their bindings when it subscribes. Off: wait for them (``topology_wait_timeout``)."""
    topology_wait_timeout: float = Field(default=60.0, gt=0)
    lanes: int = Field(default=8, ge=1, le=1024)
    """Queues per (destination, group): a key's messages all go to lane
    ``crc32(key) % lanes``, read by one consumer at a time (single active consumer).
    Changing it on a running system moves keys to other lanes: drain first."""
    queue_type: Literal["quorum", "classic"] = "quorum"
    prefetch: int = Field(default=200, ge=1, le=65_535)
    """Unacknowledged messages a subscription may hold (``basic.qos`` per consumer)."""
    connect_timeout: float = Field(default=10.0, gt=0)
    heartbeat: int = Field(default=30, ge=0)
    """Seconds of the AMQP heartbeat: a broker that vanished without closing is noticed
    after about two of them. 0 turns it off."""
    max_message_size: int = Field(default=BROKER_MAX_MESSAGE_SIZE, ge=1)
    """Messages larger than this (bytes) are refused before sending and their rows end
    dead; set it to the broker's ``max_message_size`` when that is lower."""

    @classmethod
    def parse(cls, values: BaseModel | dict[str, Any] | None) -> RabbitMQSettings:
        """Validated settings from the ``rabbitmq`` section of the outbox settings."""
        if isinstance(values, RabbitMQSettings):
            return values
        if isinstance(values, BaseModel):
            values = values.model_dump()
        try:
            return cls.model_validate(values or {})
        except ValidationError as exc:
            raise ConfigurationError(f"invalid RabbitMQ settings: {exc}") from exc
