"""Settings of the NATS JetStream transport (``OUTBOXER_NATS__*``, ``[nats]`` in TOML),
the section registered with the ``nats`` scheme.

Kept apart from the client code so configuration can be validated without nats-py
installed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from outboxer.errors import ConfigurationError


class NatsSettings(BaseModel):
    """How outboxer talks to NATS JetStream."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    create_streams: bool = True
    """Declare missing streams and durable consumers at start (else wait for them for
    ``stream_wait_timeout`` seconds, then fail with the names that are missing)."""
    stream_wait_timeout: float = Field(default=60.0, gt=0)
    storage: Literal["file", "memory"] = "file"
    """Storage of the streams outboxer declares: ``file`` survives a server restart."""
    replicas: int = Field(default=1, ge=1, le=5)
    """Replicas of each declared stream (a clustered JetStream: 3 in production)."""
    duplicate_window: float = Field(default=120.0, gt=0)
    """Seconds the stream remembers a ``Nats-Msg-Id``: a resend of the same row attempt
    within it (after a PubAck was lost) is stored once. Must be shorter than the
    outbox's ``redeliver_after``."""
    lanes: int = Field(default=4, ge=1, le=64)
    """Subjects per destination (``<destination>.<lane>``, lane = stable hash of the key
    modulo ``lanes``), each read by one durable consumer per group. Changing it moves
    keys to other lanes: only change it with the destination drained."""
    ack_wait: float = Field(default=30.0, gt=0)
    """Seconds a received message may stay unacknowledged before JetStream delivers it
    again (a consumer that died). The subscription extends it (``+WPI``) while its
    messages are being handled."""
    max_in_progress: float = Field(default=600.0, gt=0)
    """Longest (seconds) a subscription keeps a received, unacknowledged message in
    progress; after it, JetStream delivers it again ``ack_wait`` later."""
    max_ack_pending: int = Field(default=1000, ge=1)
    """Messages a lane's durable consumer hands out unacknowledged, across its readers."""
    publish_timeout: float = Field(default=10.0, gt=0)
    """Seconds a publish waits for its PubAck (capped at 80% of the claim's lease)."""
    connect_timeout: float = Field(default=2.0, gt=0)
    reconnect_wait: float = Field(default=1.0, gt=0)
    """Seconds between attempts to reconnect to a server that went away."""
    max_age: float = Field(default=0.0, ge=0)
    """Seconds a declared stream keeps a message (0: no limit)."""
    max_bytes: int = Field(default=-1, ge=-1)
    """Bytes a declared stream keeps (-1: no limit); beyond it publishes are refused."""

    @classmethod
    def parse(cls, values: BaseModel | dict[str, Any] | None) -> NatsSettings:
        """Validated settings from the ``nats`` section of the outbox settings."""
        if isinstance(values, NatsSettings):
            return values
        if isinstance(values, BaseModel):
            values = values.model_dump()
        try:
            return cls.model_validate(values or {})
        except ValidationError as exc:
            raise ConfigurationError(f"invalid NATS settings: {exc}") from exc
