"""``outboxer demo``: four services exchanging a few thousand events through outboxer.

The system has four services (agent, task, memory, notification), running
on SQLite with the in-process transport by default, or through the embedded
Kafka-protocol broker. Every event is published in the business transaction that
inserts its row; every handler writes its effect in the transaction that marks the
event consumed. One in every 25 notifications fails its first two deliveries (the
retries are visible), and one poison notification always fails and ends dead. At
the end the effects are counted from the business tables, so the summary shows
whether each consumed event took effect exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table as RichTable
from rich.text import Text
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
from outboxer.errors import ConfigurationError, OutboxError
from outboxer.models import ServiceStatus
from outboxer.outbox import Outbox
from outboxer.settings import OutboxSettings
from outboxer.signals import stop_on_signals
from outboxer.testing import EmbeddedKafka

TRANSPORTS = ("local", "kafka")
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
class ServiceCounts:
    """One service's numbers in the demo summary."""

    published: int
    consumed: int
    dead: int
    retried: int
    effects: int


@dataclass(frozen=True, slots=True)
class DemoSummary:
    """What the demo did, counted from the outbox tables and the business tables."""

    transport: str
    db_path: Path
    published: int
    consumed: int
    dead: int
    retried: int
    """Handler failures that were retried (attempts after the first)."""
    effects: int
    """Rows the handlers wrote to ``activity`` (one per consumed event)."""
    duplicate_effects: int
    """Effect rows beyond the first for the same event (0 means exactly once)."""
    handled_rows: int
    """Sum of the business rows' ``handled`` counters."""
    seconds: float
    by_service: dict[str, ServiceCounts] = field(default_factory=dict)

    @property
    def events_per_second(self) -> float:
        return self.published / self.seconds if self.seconds > 0 else 0.0

    def problems(self) -> list[str]:
        """Broken invariants, in words; empty when the run was exactly-once."""
        found = []
        if self.published != self.consumed + self.dead:
            found.append(
                f"published {self.published} != consumed {self.consumed} + dead {self.dead}"
            )
        if self.effects != self.consumed:
            found.append(f"effects {self.effects} != consumed {self.consumed}")
        if self.duplicate_effects:
            found.append(f"{self.duplicate_effects} duplicate effect(s)")
        if self.handled_rows != self.consumed:
            found.append(f"handled business rows {self.handled_rows} != consumed {self.consumed}")
        if self.dead != 1:
            found.append(f"{self.dead} dead letters, expected exactly the poison event")
        return found

    @property
    def ok(self) -> bool:
        return not self.problems()


@dataclass(frozen=True, slots=True)
class _Planned:
    kind: _Kind
    n: int
    poison: bool = False


def _plan(events: int) -> list[_Planned]:
    counters = dict.fromkeys(SERVICES, 0)
    plan: list[_Planned] = []
    for i in range(events - 1):
        kind = KINDS[i % len(KINDS)]
        counters[kind.service] += 1
        plan.append(_Planned(kind, counters[kind.service]))
    # Halfway through: the poison event fails among healthy traffic, not after it.
    plan.insert(len(plan) // 2, _Planned(_NOTIFICATION, 0, poison=True))
    return plan


class _Demo:
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


def _settings(transport: str) -> OutboxSettings:
    values: dict[str, Any] = {
        "retry_unit": 0.05,
        "poll_interval": 0.2,
        "shutdown_timeout": 15.0,
        # Fresh topics and groups per run: on a broker that outlives the run, an
        # earlier run's messages would name outbox ids of another database.
        "topic_prefix": f"demo.{uuid.uuid4().hex[:8]}",
    }
    if transport == "kafka":
        # The embedded broker holds a group's first join for about half the session
        # timeout: a short one keeps the demo's start quick.
        values["kafka"] = {"session_timeout_ms": 6000}
    return OutboxSettings.from_values(**values)


class _DemoProgress(Progress):
    footer = ""

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        if self.footer:
            yield Text(self.footer, style="dim", overflow="ellipsis", no_wrap=True)


def _progress(console: Console) -> _DemoProgress:
    return _DemoProgress(
        TextColumn("[bold]{task.description:<13}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        refresh_per_second=8,
    )


async def run_demo_async(
    events: int = 3000,
    transport: str = "local",
    db_path: Path | None = None,
    console: Console | None = None,
    *,
    timeout: float | None = None,
    transport_url: str | None = None,
) -> DemoSummary:
    """:func:`run_demo` for callers already in an event loop.

    ``transport_url`` is where ``transport="kafka"`` sends (a running broker's
    ``kafka://host:port``); :func:`run_demo` starts an embedded one.
    """
    _check_arguments(events, transport)
    console = console or Console()
    if transport == "kafka" and transport_url is None:
        raise ConfigurationError("transport 'kafka' needs transport_url (kafka://host:port)")
    path = _database_path(db_path)
    url = f"sqlite:///{path}"
    limit = timeout if timeout is not None else 60.0 + events / 25
    outbox = Outbox(
        url,
        transport=transport_url if transport == "kafka" else "local",
        settings=_settings(transport),
    )
    demo = _Demo(outbox, url)
    runner: asyncio.Task[None] | None = None
    try:
        await outbox.migrate_async()
        async with demo.async_engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        plan = _plan(events)
        planned = dict.fromkeys(SERVICES, 0)
        for op in plan:
            planned[op.kind.service] += 1

        console.print(
            f"[bold]outboxer demo[/]: {events} events over {len(SERVICES)} services "
            f"({', '.join(SERVICES)}), transport [cyan]{transport}[/], "
            f"database {escape(outbox.db.safe_url)}"
        )
        ready = asyncio.Event()
        runner = asyncio.create_task(outbox.run_async(ready=ready.set), name="outboxer-demo")
        await _until_ready(ready, runner)
        started = time.monotonic()
        publisher = asyncio.create_task(demo.publish_all(plan), name="outboxer-demo-publish")
        try:
            with _progress(console) as progress:
                await _drive(demo, progress, planned, publisher, runner, started + limit, limit)
        finally:
            if not publisher.done():
                publisher.cancel()
            await asyncio.gather(publisher, return_exceptions=True)
        seconds = time.monotonic() - started
        outbox.stop()
        await asyncio.wait_for(runner, outbox.settings.shutdown_timeout + 10)
        runner = None
        return await _summarise(demo, transport, path, seconds)
    finally:
        if runner is not None:
            outbox.stop()
            await asyncio.wait({runner}, timeout=outbox.settings.shutdown_timeout + 10)
            if not runner.done():
                runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        await demo.close()
        await outbox.aclose()


def _check_arguments(events: int, transport: str) -> None:
    if transport not in TRANSPORTS:
        raise ConfigurationError(f"unknown demo transport {transport!r}: use local or kafka")
    if events < MIN_EVENTS:
        raise ConfigurationError(f"the demo needs at least {MIN_EVENTS} events, got {events}")


def _database_path(db_path: Path | None) -> Path:
    if db_path is None:
        return Path(tempfile.mkdtemp(prefix="outboxer-demo-")) / "demo.db"
    path = db_path.expanduser().resolve()
    if path.exists():
        # Counting effects needs empty tables; never overwrite someone's file.
        raise ConfigurationError(f"{path} already exists; give the demo a new file")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


async def _until_ready(ready: asyncio.Event, runner: asyncio.Task[None]) -> None:
    waiter = asyncio.ensure_future(ready.wait())
    try:
        await asyncio.wait({waiter, runner}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if runner.done():
        runner.result()
        raise DemoError("the engine stopped before it was ready")


async def _drive(
    demo: _Demo,
    progress: _DemoProgress,
    planned: dict[str, int],
    publisher: asyncio.Task[None],
    runner: asyncio.Task[None],
    deadline: float,
    limit: float,
) -> None:
    total = sum(planned.values())
    pub_task = progress.add_task("published", total=total, detail="")
    ids = {s: progress.add_task(s, total=planned[s], detail="") for s in SERVICES}
    stats = demo.outbox.stats
    checked = 0.0
    while True:
        progress.update(pub_task, completed=sum(demo.published.values()))
        for s, task_id in ids.items():
            detail = f"retries {stats.get('retried', s)}  dead {stats.get('dead', s)}"
            progress.update(task_id, completed=demo.settled(s), detail=detail)
        if demo.last_failure:
            progress.footer = f"latest planned failure: notification {demo.last_failure}"
        if publisher.done():
            publisher.result()
            now = time.monotonic()
            # The database check takes the SQLite write lock: not on every tick.
            if now - checked > 0.5:
                checked = now
                if await demo.drained(planned):
                    progress.refresh()
                    return
        if runner.done():
            runner.result()
            raise DemoError("the engine stopped on its own before every event was handled")
        if time.monotonic() > deadline:
            left = {
                s: {k: v for k, v in st.counts.items() if v}
                for s, st in (await demo.statuses()).items()
            }
            raise DemoError(
                f"events not drained within {limit:.0f}s; outbox rows by status: {left}"
            )
        await asyncio.sleep(0.1)


async def _summarise(demo: _Demo, transport: str, path: Path, seconds: float) -> DemoSummary:
    statuses = await demo.statuses()
    effects, unique, handled = await demo.count_effects()
    stats = demo.outbox.stats
    by_service = {
        s: ServiceCounts(
            published=st.total,
            consumed=st.counts.get("consumed", 0),
            dead=st.dead,
            retried=stats.get("retried", s),
            effects=effects.get(s, 0),
        )
        for s, st in statuses.items()
    }
    n_effects = sum(effects.values())
    return DemoSummary(
        transport=transport,
        db_path=path,
        published=sum(c.published for c in by_service.values()),
        consumed=sum(c.consumed for c in by_service.values()),
        dead=sum(c.dead for c in by_service.values()),
        retried=sum(c.retried for c in by_service.values()),
        effects=n_effects,
        duplicate_effects=n_effects - unique,
        handled_rows=handled,
        seconds=seconds,
        by_service=by_service,
    )


def render_summary(summary: DemoSummary, console: Console) -> None:
    """Print the summary table and the exactly-once verdict."""
    table = RichTable(title=f"outboxer demo — {summary.transport} transport", title_justify="left")
    table.add_column("service")
    for name in ("published", "consumed", "retried", "dead", "effects"):
        table.add_column(name, justify="right")
    for service, c in summary.by_service.items():
        table.add_row(
            service,
            str(c.published),
            str(c.consumed),
            str(c.retried),
            f"[red]{c.dead}[/]" if c.dead else "0",
            str(c.effects),
        )
    table.add_section()
    table.add_row(
        "[bold]total",
        f"[bold]{summary.published}",
        f"[bold]{summary.consumed}",
        f"[bold]{summary.retried}",
        f"[bold red]{summary.dead}" if summary.dead else "[bold]0",
        f"[bold]{summary.effects}",
    )
    console.print(table)
    startup = " (including the consumer groups' start-up)" if summary.transport == "kafka" else ""
    console.print(
        f"{summary.published} events in {summary.seconds:.2f}s{startup}: "
        f"[bold]{summary.events_per_second:,.0f} events/s[/]"
    )
    problems = summary.problems()
    if problems:
        console.print(f"[bold red]exactly-once check FAILED:[/] {'; '.join(problems)}")
    else:
        console.print(
            "[green]exactly-once check passed[/]: published = consumed + dead, "
            f"one effect per consumed event, {summary.duplicate_effects} duplicates; "
            "the dead letter is the poison event"
        )
    console.print(f"SQLite database: {escape(str(summary.db_path))}")


async def _until_signal(work: Coroutine[Any, Any, DemoSummary]) -> DemoSummary:
    """Run ``work``; SIGINT/SIGTERM cancel it, so the engine stops cleanly and the
    caller gets :class:`asyncio.CancelledError`."""
    task = asyncio.ensure_future(work)
    with stop_on_signals(asyncio.get_running_loop(), task.cancel):
        return await task


def run_demo(
    events: int = 3000,
    transport: str = "local",
    db_path: Path | None = None,
    console: Console | None = None,
    *,
    timeout: float | None = None,
) -> DemoSummary:
    """Run the demo and print its live progress and summary on ``console``.

    ``db_path`` must not exist yet (default: a new file in a new temporary
    directory, left in place; its path is in the summary). ``transport="kafka"``
    starts the embedded broker for the run. Raises :class:`DemoError` when the
    events do not drain within ``timeout`` seconds (default: 60 s + 40 ms per event).
    """
    _check_arguments(events, transport)
    console = console or Console()
    if transport == "kafka":
        with EmbeddedKafka() as broker:
            summary = asyncio.run(
                _until_signal(
                    run_demo_async(
                        events,
                        transport,
                        db_path,
                        console,
                        timeout=timeout,
                        transport_url=broker.transport_url,
                    )
                )
            )
    else:
        summary = asyncio.run(
            _until_signal(run_demo_async(events, transport, db_path, console, timeout=timeout))
        )
    render_summary(summary, console)
    return summary
