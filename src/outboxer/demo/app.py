"""The demo's system: four services' business tables, the events they publish, their
handlers (with the planned flaky and poison failures), and the counts of effects."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Result
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import Insert, Update

from outboxer.database.engines import create_async, create_sync_engine
from outboxer.envelope import Envelope
from outboxer.errors import OutboxError
from outboxer.models import ServiceStatus
from outboxer.outbox import Outbox

TRANSPORTS = ("local", "kafka", "nats", "redis", "rabbitmq")
MIN_EVENTS = 10
TX_SIZE = 20
"""Business operations per transaction."""
FLAKY_EVERY = 25
FLAKY_FAILURES = 2
POISON_MAX_RETRY = 3

metadata = MetaData()
tasks = Table(
    "tasks",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("title", String(200), nullable=False),
    Column("handled", Integer, nullable=False, default=0),
)
agent_runs = Table(
    "agent_runs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("agent", String(50), nullable=False),
    Column("prompt", String(200), nullable=False),
    Column("handled", Integer, nullable=False, default=0),
)
memories = Table(
    "memories",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("agent", String(50), nullable=False),
    Column("content", String(500), nullable=False),
    Column("handled", Integer, nullable=False, default=0),
)
notifications = Table(
    "notifications",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("recipient", String(200), nullable=False),
    Column("body", String(500), nullable=False),
    Column("handled", Integer, nullable=False, default=0),
)
activity = Table(
    "activity",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("service", String(50), nullable=False),
    Column("outbox_id", Integer, nullable=False),
    Column("event_type", String(100), nullable=False),
    Column("subject_id", Integer, nullable=False),
)
"""One row per handled event, written by the handler (no unique key, so a duplicate
delivery that took effect twice would show up as a second row)."""

_AGENTS = ("planner", "researcher", "writer")


@dataclass(frozen=True, slots=True)
class _Kind:
    service: str
    event_type: str
    table: Table
    row: Callable[[int], dict[str, Any]]


KINDS = (
    _Kind("task", "task.created", tasks, lambda n: {"title": f"task #{n}"}),
    _Kind(
        "agent",
        "agent.run_requested",
        agent_runs,
        lambda n: {"agent": _AGENTS[n % 3], "prompt": f"work on task #{n}"},
    ),
    _Kind(
        "memory",
        "memory.stored",
        memories,
        lambda n: {"agent": _AGENTS[n % 3], "content": f"note {n}: the user prefers short answers"},
    ),
    _Kind(
        "notification",
        "notification.requested",
        notifications,
        lambda n: {"recipient": f"user{n % 97}@example.com", "body": f"your task #{n} is ready"},
    ),
)
SERVICES = tuple(k.service for k in KINDS)
_NOTIFICATION = KINDS[3]


class DemoFailure(RuntimeError):
    """A failure the demo plans (flaky delivery, the poison event)."""


class DemoError(OutboxError):
    """The demo could not finish (timeout, engine stopped on its own)."""


class HideDemoFailures(logging.Filter):
    """Drops the log records of the demo's planned handler failures.

    The live display already counts them; anything else is logged as usual.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, DemoFailure)


@dataclass(frozen=True, slots=True)
class _Planned:
    kind: _Kind
    n: int
    poison: bool = False


def plan_events(events: int) -> list[_Planned]:
    counters = dict.fromkeys(SERVICES, 0)
    plan: list[_Planned] = []
    for i in range(events - 1):
        kind = KINDS[i % len(KINDS)]
        counters[kind.service] += 1
        plan.append(_Planned(kind, counters[kind.service]))
    # Halfway through: the poison event fails among healthy traffic, not after it.
    plan.insert(len(plan) // 2, _Planned(_NOTIFICATION, 0, poison=True))
    return plan


class DemoSystem:
    """The four services on one database: their tables, handlers and publishing."""

    def __init__(self, outbox: Outbox, url: str) -> None:
        self.outbox = outbox
        # The application's own engines, with outboxer's SQLite tuning (WAL, BEGIN
        # IMMEDIATE, busy timeout): business writers share the file with the relay.
        self.sync_engine = create_sync_engine(url)
        self.async_engine = create_async(url)
        self.attempts: dict[int, int] = {}
        self.published = dict.fromkeys(SERVICES, 0)
        self.last_failure = ""
        for kind in KINDS:
            outbox.register_event(kind.event_type, kind.service)
        outbox.register_handler("task.created", self._handle_sync(KINDS[0]))
        outbox.register_handler("agent.run_requested", self._handle_async(KINDS[1]))
        outbox.register_handler("memory.stored", self._handle_async(KINDS[2]))
        outbox.register_handler("notification.requested", self._notify)

    # ------------------------------------------------------------------ handlers

    @staticmethod
    def _effects(kind: _Kind, event: Envelope) -> tuple[Update, Insert]:
        subject = int(event.payload["id"])
        t = kind.table
        return (
            update(t).where(t.c.id == subject).values(handled=t.c.handled + 1),
            insert(activity).values(
                service=kind.service,
                outbox_id=event.outbox_id,
                event_type=event.event_type,
                subject_id=subject,
            ),
        )

    def _handle_sync(self, kind: _Kind) -> Callable[[Envelope, Session], None]:
        def handle(event: Envelope, tx: Session) -> None:
            for stmt in self._effects(kind, event):
                tx.execute(stmt)

        return handle

    def _handle_async(
        self, kind: _Kind
    ) -> Callable[[Envelope, AsyncSession], Coroutine[Any, Any, None]]:
        async def handle(event: Envelope, tx: AsyncSession) -> None:
            for stmt in self._effects(kind, event):
                await tx.execute(stmt)

        return handle

    def _notify(self, event: Envelope, tx: Session) -> None:
        # Effects first, failure after: a failed attempt must roll them back.
        for stmt in self._effects(_NOTIFICATION, event):
            tx.execute(stmt)
        attempt = self.attempts[event.outbox_id] = self.attempts.get(event.outbox_id, 0) + 1
        if event.payload.get("poison"):
            self._fail(event, f"mailbox {event.payload['recipient']} does not exist", attempt)
        if event.payload["n"] % FLAKY_EVERY == 0 and attempt <= FLAKY_FAILURES:
            self._fail(event, "SMTP 421: service busy, try again later", attempt)

    def _fail(self, event: Envelope, reason: str, attempt: int) -> None:
        self.last_failure = f"#{event.outbox_id} attempt {attempt}: {reason}"
        raise DemoFailure(reason)

    # ------------------------------------------------------------------ publishing

    async def publish_all(self, plan: list[_Planned]) -> None:
        chunks = [plan[i : i + TX_SIZE] for i in range(0, len(plan), TX_SIZE)]
        for i, chunk in enumerate(chunks):
            # Both faces of publish: sync sessions (in a worker thread, as a web
            # framework's threadpool would) and async sessions, alternately.
            if i % 2 == 0:
                await asyncio.to_thread(self._publish_sync, chunk)
            else:
                await self._publish_async(chunk)
            for op in chunk:
                self.published[op.kind.service] += 1

    @staticmethod
    def _event(op: _Planned, row_id: int, row: dict[str, Any]) -> dict[str, Any]:
        return {"id": row_id, "n": op.n, **row, **({"poison": True} if op.poison else {})}

    def _publish_sync(self, chunk: list[_Planned]) -> None:
        with Session(self.sync_engine) as session, session.begin():
            for op in chunk:
                row = op.kind.row(op.n)
                row_id = _new_id(session.execute(_insert_row(op.kind.table, row)))
                self.outbox.publish(
                    session,
                    op.kind.event_type,
                    self._event(op, row_id, row),
                    key=f"{op.kind.service}-{row_id}",
                    max_retry=POISON_MAX_RETRY if op.poison else None,
                )

    async def _publish_async(self, chunk: list[_Planned]) -> None:
        async with AsyncSession(self.async_engine) as session, session.begin():
            for op in chunk:
                row = op.kind.row(op.n)
                row_id = _new_id(await session.execute(_insert_row(op.kind.table, row)))
                await self.outbox.publish_async(
                    session,
                    op.kind.event_type,
                    self._event(op, row_id, row),
                    key=f"{op.kind.service}-{row_id}",
                    max_retry=POISON_MAX_RETRY if op.poison else None,
                )

    # ------------------------------------------------------------------ progress

    def settled(self, service: str) -> int:
        stats = self.outbox.stats
        return stats.get("consumed", service) + stats.get("dead", service)

    async def statuses(self) -> dict[str, ServiceStatus]:
        return {s: await self.outbox.store(s).status_async() for s in SERVICES}

    async def drained(self, planned: dict[str, int]) -> bool:
        if any(self.settled(s) < planned[s] for s in SERVICES):
            return False
        # The in-process counters say so; the database has the last word.
        for st in (await self.statuses()).values():
            if st.counts.get("pending", 0) or st.counts.get("published", 0):
                return False
        return True

    # ------------------------------------------------------------------ checking

    async def count_effects(self) -> tuple[dict[str, int], int, int]:
        distinct = select(activity.c.service, activity.c.outbox_id).distinct().subquery()
        async with self.async_engine.connect() as conn:
            rows = await conn.execute(
                select(activity.c.service, func.count()).group_by(activity.c.service)
            )
            per_service = {str(s): int(n) for s, n in rows.all()}
            unique = (await conn.execute(select(func.count()).select_from(distinct))).scalar_one()
            handled = 0
            for kind in KINDS:
                handled += await _sum_handled(conn, kind.table)
        return per_service, int(unique), handled

    async def close(self) -> None:
        self.sync_engine.dispose()
        await self.async_engine.dispose()


def _insert_row(table: Table, row: dict[str, Any]) -> Insert:
    return insert(table).values(**row).returning(table.c.id)


def _new_id(result: Result[Any]) -> int:
    return int(result.scalar_one())


async def _sum_handled(conn: AsyncConnection, table: Table) -> int:
    result = await conn.execute(select(func.coalesce(func.sum(table.c.handled), 0)))
    return int(result.scalar_one())
