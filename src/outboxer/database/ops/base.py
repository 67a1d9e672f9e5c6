"""What every op shares: the context it runs in, the row it reads, the error text it
stores."""

from __future__ import annotations

import weakref
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Table,
    and_,
)
from sqlalchemy.sql import ColumnElement

from outboxer.backoff import RetryPolicy
from outboxer.database.dialects import Dialect
from outboxer.database.schema import (
    MAX_ERROR_CHARS,
    db_now,
)
from outboxer.models import OutboxMessage, Status
from outboxer.routing import ServiceRoute


def truncate_error(reason: str) -> str:
    """``reason`` as stored in ``last_error``: its first 2000 characters.

    NUL characters (PostgreSQL text cannot hold them) become ``\\0`` and unpaired
    surrogates (not encodable as UTF-8) a backslash escape, so any exception text can
    be recorded.
    """
    if "\x00" in reason:
        reason = reason.replace("\x00", "\\0")
    try:
        reason.encode()
    except UnicodeEncodeError:
        reason = reason.encode("utf-8", "backslashreplace").decode()
    return reason[:MAX_ERROR_CHARS]


@dataclass(frozen=True, slots=True)
class OpContext:
    """What an op needs to know: the table, the route, the database and the retry policy."""

    table: Table
    route: ServiceRoute
    dialect: Dialect
    policy: RetryPolicy
    channel: str | None = None
    """Where a commit that inserted rows notifies waiting relays (None: no notice)."""
    dead_blocks: bool = False
    """Ordered services: a dead event holds back the later events of its key."""
    scheduled_blocks: bool = False
    """Ordered services: a scheduled event not yet due holds back the later events
    of its key."""
    audit: Table | None = None
    """Where operator actions are recorded (``outboxer_audit``)."""
    parked: Table | None = None
    """Keys of ordered services held by an operator (``outboxer_parked_keys``)."""

    def ctx(self, **extra: Any) -> dict[str, Any]:
        return {"service": self.route.service_name, "table": self.table.name, **extra}


HOT_VARIANTS = 256
"""At most this many built statement sets per table (a hot op's variants: a limit, the
guards it was given); beyond it statements are built per call, as cold ops are."""

_hot: weakref.WeakKeyDictionary[Table, dict[Hashable, dict[str, Any]]] = weakref.WeakKeyDictionary()


def hot(c: OpContext, key: Hashable) -> dict[str, Any]:
    """Where a hot op (the relay's claim and mark) keeps the statements it built for
    ``c.table`` and ``key``, to run them again with new parameters.

    A statement built once has one SQL text: SQLAlchemy compiles it once (its cache key
    is the same), and the driver converts it once and prepares it on the server (for
    psycopg, after a few runs). Building a statement per call cost the relay about a
    third of its busy time (a ``CASE`` of 100 branches, an ``IN`` list, the claim's
    sub-select). Empty on the first call: the op fills it.
    """
    by_key = _hot.setdefault(c.table, {})
    found = by_key.get(key)
    if found is None:
        found = {}
        if len(by_key) < HOT_VARIANTS:
            by_key[key] = found
    return found


def row_message(row: Any, **replace: Any) -> OutboxMessage:
    return OutboxMessage.from_mapping(row._mapping, **replace)


def only_id(ids: Sequence[int]) -> int | None:
    return ids[0] if len(ids) == 1 else None


def due_rows(c: OpContext, service_name: str | None) -> ColumnElement[bool]:
    t = c.table
    cond = and_(
        t.c.status == Status.PENDING.value,
        t.c.next_retry_at.is_not(None),
        t.c.next_retry_at <= db_now(),
    )
    if service_name:
        cond = and_(cond, t.c.service_name == service_name)
    return cond


@dataclass(slots=True)
class Outcome:
    """What happened to one message of a batch that was not consumed."""

    outbox_id: int
    event_type: str
    attempts: int
    reason: str
