"""Value types shared by the store, the relay, the consumer and the tools."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from outboxer.envelope import Envelope


class Status(StrEnum):
    """Lifecycle of an outbox row."""

    PENDING = "pending"
    PUBLISHED = "published"
    CONSUMED = "consumed"
    DEAD = "dead"
    CANCELLED = "cancelled"
    """Taken back before it was sent (``Outbox.cancel``): never sent, never handled."""


FINAL_STATUSES = (Status.CONSUMED.value, Status.DEAD.value, Status.CANCELLED.value)


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
    headers: str | None = None
    """Propagation headers captured at publish (W3C ``traceparent``), as JSON."""
    requeue_count: int = 0
    """How many times an operator requeued this row (dead letters given a new start)."""
    requeued_at: datetime | None = None
    """When it was last requeued."""
    event_id: str | None = None
    """The event id given to ``publish`` (unique in the table); ``None`` when the
    event was published without one (its id on the wire is then the outbox id)."""
    deliver_at: datetime | None = None
    """The due time a scheduled event was published with (``delay=``/``deliver_at=``)."""
    handling: int = 0
    """A delivery of it has started and not settled: 1 in a batch, 2 alone (0: none).
    Found set by the next delivery, it means the worker died while handling it."""
    crashes: int = 0
    """How many times a worker process died while handling this message alone."""
    coordinates: str | None = None
    """Lineage: where the broker put it when it acknowledged it (Kafka:
    ``topic/partition@offset``); in an inbox, where it was read."""
    consumer_group: str | None = None
    """Lineage, in an inbox: the consumer group that received it."""

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any], **replace: Any) -> OutboxMessage:
        values = {name: row[name] for name in cls.__slots__}
        values.update(replace)
        values["status"] = Status(values["status"])
        return cls(**values)

    def envelope(self) -> Envelope:
        """The envelope the relay sends for this row (raises EnvelopeDecodeError)."""
        return Envelope.from_stored(self.payload, self.id, self.message_key)

    def header_map(self) -> dict[str, str]:
        """The stored propagation headers (``{}`` when none or unreadable)."""
        return parse_headers(self.headers)


def parse_headers(text: str | None) -> dict[str, str]:
    """Stored headers JSON as a ``str -> str`` dict; anything else is ignored."""
    if not text:
        return {}
    try:
        obj = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(obj, dict):
        return {}
    return {str(k): v for k, v in obj.items() if isinstance(v, str)}


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
    delay: float | timedelta | None = None
    deliver_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    """A service's outbox at a glance (for ``outboxer status`` and dashboards)."""

    service: str
    table: str
    counts: dict[str, int]
    due: int
    oldest_due_seconds: float | None
    """Age of the oldest row that is due now (how far the relay is behind)."""
    published_last_minute: int | None = None
    """Rows handed to the transport in the last 60 s (``None``: not measured)."""
    consumed_last_minute: int | None = None
    """Rows consumed in the last 60 s (``None``: not measured)."""
    scheduled: int = 0
    """Pending rows published for later (``delay=``/``deliver_at=``) whose time has
    not come: part of the ``pending`` count, never of ``due`` or ``oldest_due``."""

    @property
    def dead(self) -> int:
        return self.counts.get(Status.DEAD.value, 0)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True, slots=True)
class Activity:
    """Rows published, consumed and failed per UTC minute (``minutes``: the start of
    each, the database's clock, oldest first; the last one is the current minute)."""

    minutes: list[datetime]
    published: list[int]
    consumed: list[int]
    failed: list[int]

    def __add__(self, other: Activity) -> Activity:
        if other.minutes[-1] > self.minutes[-1]:
            return other + self  # the later clock reading names the minutes
        return Activity(
            minutes=self.minutes,
            published=[a + b for a, b in zip(self.published, other.published, strict=True)],
            consumed=[a + b for a, b in zip(self.consumed, other.consumed, strict=True)],
            failed=[a + b for a, b in zip(self.failed, other.failed, strict=True)],
        )


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One operator action as the audit table (``outboxer_audit``) keeps it."""

    id: int
    at: datetime
    """When (the database's clock, UTC), in the transaction of the action."""
    actor: str
    """Who: the OS user of a command, ``console:<address>`` for the web console."""
    action: str
    """``requeue``, ``purge``, ``edit``, ``cancel``, ``skip``, ``park``, ``release``."""
    service_name: str
    outbox_ids: list[int]
    detail: dict[str, Any]
    payload_before: str | None = None
    payload_after: str | None = None

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any]) -> AuditEntry:
        ids = json.loads(row["outbox_ids"] or "[]")
        detail = json.loads(row["detail"] or "{}")
        return cls(
            id=int(row["id"]),
            at=row["at"],
            actor=row["actor"],
            action=row["action"],
            service_name=row["service_name"],
            outbox_ids=[int(i) for i in ids] if isinstance(ids, list) else [],
            detail=detail if isinstance(detail, dict) else {},
            payload_before=row["payload_before"],
            payload_after=row["payload_after"],
        )


@dataclass(frozen=True, slots=True)
class BlockedKey:
    """A key of an ordered service whose events are held back, and by what."""

    service_name: str
    message_key: str
    by: str
    """``failing`` (the head waits for its retry), ``dead`` (with
    ``ordered_after_dead = "block"``) or ``parked`` (an operator holds the key)."""
    head: OutboxMessage | None
    """The earliest open (or dead) event of the key; None for a parked key with none."""
    waiting: int
    """Events of the key held behind the head (all of them for a parked key)."""
    since: datetime
    """When the head was published (parked: when the key was parked)."""
    parked_by: str | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class TraceStep:
    """One step of an event's life (``Admin.trace``)."""

    at: datetime | None
    """When (the database's clock); None when the step has no time of its own."""
    service_name: str
    outbox_id: int
    step: str
    """``created``, ``received``, ``attempts``, ``sent``, ``consumed``, ``dead``,
    ``cancelled``, ``waiting``, or an audited action (``requeue``, ``edit``, ...)."""
    detail: str
    inbox: bool = False
    """The row is an inbox row (the event as a consumer received it)."""
    app: str = ""
    """Which application's tables it was read from (set when tracing across apps)."""
