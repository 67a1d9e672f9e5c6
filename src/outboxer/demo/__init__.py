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
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from outboxer.demo.app import (
    FLAKY_EVERY,
    FLAKY_FAILURES,
    KINDS,
    MIN_EVENTS,
    POISON_MAX_RETRY,
    SERVICES,
    TRANSPORTS,
    DemoError,
    DemoFailure,
    DemoSystem,
    HideDemoFailures,
    metadata,
    plan_events,
)
from outboxer.demo.report import (
    DemoProgress,
    DemoSummary,
    ServiceCounts,
    progress_display,
    render_summary,
)
from outboxer.errors import ConfigurationError
from outboxer.outbox import Outbox
from outboxer.settings import OutboxSettings
from outboxer.signals import stop_on_signals
from outboxer.testing import EmbeddedKafka

logger = logging.getLogger(__name__)

__all__ = [
    "FLAKY_EVERY",
    "FLAKY_FAILURES",
    "KINDS",
    "POISON_MAX_RETRY",
    "SERVICES",
    "DemoError",
    "DemoFailure",
    "DemoSummary",
    "HideDemoFailures",
    "ServiceCounts",
    "render_summary",
    "run_demo",
    "run_demo_async",
]


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
    if transport == "nats":
        # The demo's streams are deleted at its end; in memory meanwhile.
        values["nats"] = {"storage": "memory"}
    return OutboxSettings.from_values(**values)


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
    ``kafka://host:port``); :func:`run_demo` starts an embedded one. For
    ``transport="nats"`` or ``"redis"`` it is the running server (default: its
    :data:`DEMO_URLS` entry); the run's streams are deleted at its end. For
    ``transport="rabbitmq"``, a running broker; the run's exchanges and queues are
    deleted at its end.
    """
    _check_arguments(events, transport)
    console = console or Console()
    if transport == "kafka" and transport_url is None:
        raise ConfigurationError("transport 'kafka' needs transport_url (kafka://host:port)")
    if transport in DEMO_URLS:
        transport_url = transport_url or DEMO_URLS[transport]
    path = _database_path(db_path)
    url = f"sqlite:///{path}"
    limit = timeout if timeout is not None else 60.0 + events / 25
    outbox = Outbox(
        url,
        transport=transport_url if transport != "local" else "local",
        settings=_settings(transport),
    )
    demo = DemoSystem(outbox, url)
    runner: asyncio.Task[None] | None = None
    try:
        await outbox.migrate_async()
        async with demo.async_engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        plan = plan_events(events)
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
            with progress_display(console) as progress:
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
        if transport == "nats":
            await _delete_destinations(outbox)
        if transport == "rabbitmq":
            await _delete_topology(outbox)
        await outbox.aclose()
        if transport == "redis" and transport_url is not None:
            await _delete_redis_keys(transport_url, outbox.settings.topic_prefix)


DEMO_URLS = {
    "nats": "nats://127.0.0.1:4222",
    "redis": "redis://127.0.0.1:6379/0",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/",
}
"""The server of ``outboxer demo --transport nats|redis|rabbitmq`` unless told otherwise."""


async def _delete_topology(outbox: Outbox) -> None:
    """Delete the run's RabbitMQ exchanges and queues (each run has a topic prefix of
    its own)."""
    delete = getattr(outbox.transport, "delete_topology", None)
    if delete is None:
        return
    try:
        await delete()
    except Exception as exc:  # noqa: BLE001 - the summary matters more than the cleanup
        logger.warning("could not delete the demo's RabbitMQ exchanges and queues: %s", exc)


async def _delete_redis_keys(url: str, prefix: str) -> None:
    """The run's streams and lane leases (all named after its own topic prefix)."""
    from redis.asyncio import Redis  # noqa: PLC0415 - the extra is needed only here

    client = Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}.*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def _delete_destinations(outbox: Outbox) -> None:
    """Delete the run's streams: they outlive the run on the user's server."""
    delete = getattr(outbox.transport, "delete_destinations", None)
    if delete is not None:
        await delete(sorted({r.topic for r in outbox.routes.routes()}))


def _check_arguments(events: int, transport: str) -> None:
    if transport not in TRANSPORTS:
        raise ConfigurationError(
            f"unknown demo transport {transport!r}: use {', '.join(TRANSPORTS)}"
        )
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
    demo: DemoSystem,
    progress: DemoProgress,
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


async def _summarise(demo: DemoSystem, transport: str, path: Path, seconds: float) -> DemoSummary:
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
    transport_url: str | None = None,
) -> DemoSummary:
    """Run the demo and print its live progress and summary on ``console``.

    ``db_path`` must not exist yet (default: a new file in a new temporary
    directory, left in place; its path is in the summary). ``transport="kafka"``
    starts the embedded broker for the run; ``transport="nats"`` or ``"redis"`` uses the
    running server at ``transport_url`` (default: :data:`DEMO_URLS`) and deletes the
    run's streams at the end. Raises :class:`DemoError` when the
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
            _until_signal(
                run_demo_async(
                    events,
                    transport,
                    db_path,
                    console,
                    timeout=timeout,
                    transport_url=transport_url,
                )
            )
        )
    render_summary(summary, console)
    return summary
