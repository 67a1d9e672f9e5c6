"""Settings of the Redis Streams transport (``OUTBOXER_REDIS__*``, ``[redis]`` in TOML),
the section registered with the ``redis`` scheme.

Kept apart from the client code so configuration can be validated without redis-py
installed.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from outboxer.errors import ConfigurationError


class RedisSettings(BaseModel):
    """How outboxer talks to Redis Streams."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lanes: int = Field(default=4, ge=1, le=1024)
    """Streams per destination (``<destination>:<lane>``); a key's messages go to lane
    ``crc32(key) % lanes`` and each lane is read by one subscription at a time. Every
    producer and consumer of a destination must use the same number."""
    create_streams: bool = True
    """Create streams and consumer groups (``XGROUP CREATE ... MKSTREAM``) at start and
    after the server lost them; when false they are waited for."""
    stream_wait_timeout: float = Field(default=60.0, gt=0)
    """Seconds ``start`` waits for the server and the streams before it fails."""
    key_prefix: str = ""
    """Put before every key the transport names (streams, lane leases): a namespace in
    a shared server."""
    maxlen: int | None = Field(default=None, ge=1)
    """``XADD ... MAXLEN ~ n``: trim each lane to about this many entries. Off by
    default: trimming drops entries whether or not a group has read them."""
    lane_lease: float = Field(default=10.0, ge=1.0)
    """Seconds a subscription's hold on a lane lasts unless renewed (renewed every
    third of it, between batches): the time a dead reader's lanes wait for a new one.
    Keep it above the longest time a batch takes to handle: a reader that outlives its
    lease can no longer acknowledge, and the lane's next reader handles it again."""
    claim_idle: float = Field(default=30.0, ge=1.0)
    """Seconds an entry of a lane may sit unacknowledged with another consumer of the
    group before the lane's reader claims it (``XPENDING IDLE`` + ``XCLAIM``)."""
    wait_replicas: int = Field(default=0, ge=0)
    """After each batch, ``WAIT`` until this many replicas have it; fewer in
    ``wait_timeout`` seconds: the batch is not sent (sent again later). 0: off."""
    wait_timeout: float = Field(default=1.0, gt=0)
    socket_timeout: float = Field(default=5.0, ge=1.0)
    """Seconds a command (or a connect) may go unanswered before its connection is
    dropped and the call fails as an outage."""

    @classmethod
    def parse(cls, values: BaseModel | dict[str, Any] | None) -> RedisSettings:
        """Validated settings from the ``redis`` section of the outbox settings."""
        if isinstance(values, RedisSettings):
            return values
        if isinstance(values, BaseModel):
            values = values.model_dump()
        try:
            return cls.model_validate(values or {})
        except ValidationError as exc:
            raise ConfigurationError(f"invalid Redis settings: {exc}") from exc
