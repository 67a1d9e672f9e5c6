"""Value types shared by the store, the relay, the consumer and the tools."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class Event:
    """One event to publish with :meth:`outboxer.Outbox.publish_many` (the fields are
    ``publish``'s arguments)."""

    event_type: str
    payload: Any
    key: str | None = None
    aggregate_id: str | None = None
    event_id: str | None = None
    version: str | None = None
    max_retry: int | None = None


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    """A service's outbox at a glance (for ``outboxer status`` and dashboards)."""

    service: str
    table: str
    counts: dict[str, int]
    due: int
    oldest_due_seconds: float | None
    """Age of the oldest row that is due now (how far the relay is behind)."""

    @property
    def dead(self) -> int:
        return self.counts.get(Status.DEAD.value, 0)

    @property
    def total(self) -> int:
        return sum(self.counts.values())
