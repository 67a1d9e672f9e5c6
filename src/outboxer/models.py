"""Value types shared by the store, the relay and the consumer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from outboxer.envelope import Envelope


class Status(StrEnum):
    """Lifecycle of an outbox row."""

    PENDING = "pending"
    PUBLISHED = "published"
    CONSUMED = "consumed"
    DEAD = "dead"


FINAL_STATUSES = (Status.CONSUMED.value, Status.DEAD.value)


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """One outbox row as read from the database (timestamps are UTC-aware)."""

    id: int
    event_type: str
    service_name: str
    topic: str
    message_key: str
    payload: str
    status: Status
    retry_count: int
    max_retry: int
    next_retry_at: datetime | None
    published_at: datetime | None
    consumed_at: datetime | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any], **replace: Any) -> OutboxMessage:
        values = {name: row[name] for name in cls.__slots__}
        values.update(replace)
        values["status"] = Status(values["status"])
        return cls(**values)

    def envelope(self) -> Envelope:
        """The envelope the relay sends for this row (raises EnvelopeDecodeError)."""
        return Envelope.from_stored(self.payload, self.id, self.message_key)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        return data
