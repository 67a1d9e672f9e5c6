"""Building blocks for end-to-end tests: apps with effect tables, running, waiting."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
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
)
from sqlalchemy.ext.asyncio import AsyncSession

from outboxer import Envelope, Outbox, Status
from outboxer.transports.base import Transport
from tests.helpers import isolated_settings


@dataclass
class App:
    """An Outbox with services ``svc_0..`` each owning ``<svc>.happened``, and an effects table."""

    outbox: Outbox
    services: list[str]
    effects: Table
    prefix: str
    fail: dict[int, int] = field(default_factory=dict)
    """payload["n"] -> how many times its handler fails before succeeding (-1: always)."""
    attempts: dict[int, int] = field(default_factory=dict)
    sync_handler_calls: list[tuple[str, bool]] = field(default_factory=list)
    """Per call of a sync handler: its thread's name, and whether an event loop was
    running on that thread (a sync handler must never run on the loop)."""

    def event(self, service: str) -> str:
        return f"{service}.happened"


def build_app(
    url: str,
    transport: str | Transport = "local",
    *,
    n_services: int = 1,
    handlers: bool = True,
    prefix: str | None = None,
    sync_handlers: bool = False,
    effects: Table | None = None,
    **settings: Any,
) -> App:
    prefix = prefix or f"t{uuid.uuid4().hex[:8]}"
    values: dict[str, Any] = {
        "retry_unit": 0.02,
        "poll_interval": 0.1,
        "topic_prefix": prefix,
        "kafka": {"session_timeout_ms": 6000},
        "shutdown_timeout": 20.0,
    }
    values.update(settings)
    ob = Outbox(url, transport=transport, settings=isolated_settings(**values))
    services = [f"{prefix}_s{i}" for i in range(n_services)]
    if effects is None:
        md = MetaData()
        effects = Table(
            f"{prefix}_effects",
            md,
            Column("id", Integer, primary_key=True, autoincrement=True),
            Column("outbox_id", Integer, nullable=False),
            Column("service", String(64), nullable=False),
            Column("n", Integer, nullable=False),
        )
        with ob.db.sync_engine.begin() as conn:
            md.create_all(conn)
    app = App(ob, services, effects, prefix)
    for svc in services:
        ob.register_event(app.event(svc), svc)
        if handlers:
            ob.register_handler(
                app.event(svc),
                _sync_handler(app, svc) if sync_handlers else _async_handler(app, svc),
            )
    ob.migrate()
    return app


def _should_fail(app: App, n: int) -> bool:
    plan = app.fail.get(n)
    if plan is None:
        return False
    seen = app.attempts.get(n, 0)
    app.attempts[n] = seen + 1
    return plan < 0 or seen < plan


def _async_handler(app: App, svc: str) -> Callable[[Envelope, AsyncSession], Any]:
    async def handle(event: Envelope, tx: AsyncSession) -> None:
        n = int(event.payload["n"])
        await tx.execute(insert(app.effects).values(outbox_id=event.outbox_id, service=svc, n=n))
        if _should_fail(app, n):
            raise RuntimeError(f"planned failure for n={n}")

    return handle


def _sync_handler(app: App, svc: str) -> Callable[[Envelope, Any], None]:
    def handle(event: Envelope, tx: Any) -> None:
        app.sync_handler_calls.append((threading.current_thread().name, on_event_loop()))
        n = int(event.payload["n"])
        tx.execute(insert(app.effects).values(outbox_id=event.outbox_id, service=svc, n=n))
        if _should_fail(app, n):
            raise RuntimeError(f"planned failure for n={n}")

    return handle


def on_event_loop() -> bool:
    """Whether the calling thread is running an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def publish_many(app: App, count: int, *, start: int = 0, batch: int = 500, **kw: Any) -> None:
    """``count`` events round-robin over the services, ``batch`` per transaction."""
    ob = app.outbox
    with ob.db.sync_engine.connect() as conn:
        for lo in range(start, start + count, batch):
            with conn.begin():
                for n in range(lo, min(lo + batch, start + count)):
                    svc = app.services[n % len(app.services)]
                    ob.publish(conn, app.event(svc), {"n": n}, key=f"k{n % 37}", **kw)


def status_counts(app: App) -> dict[str, int]:
    totals = {s.value: 0 for s in Status}
    for svc in app.services:
        for k, v in app.outbox.store(svc).status().counts.items():
            totals[k] += v
    return totals


def effects(app: App) -> tuple[int, int]:
    """(rows, distinct outbox ids) in the effects table."""
    t = app.effects
    distinct = select(t.c.service, t.c.outbox_id).distinct().subquery()
    with app.outbox.db.sync_engine.connect() as conn:
        rows = conn.execute(select(func.count()).select_from(t)).scalar_one()
        unique = conn.execute(select(func.count()).select_from(distinct)).scalar_one()
    return int(rows), int(unique)


def all_final(app: App) -> bool:
    counts = status_counts(app)
    return counts["pending"] == 0 and counts["published"] == 0


async def run_until(
    outboxes: Iterable[Outbox],
    done: Callable[[], bool],
    *,
    timeout: float = 120.0,
    run_kwargs: dict[str, Any] | None = None,
) -> float:
    """Run every outbox until ``done()`` holds, then stop them; returns seconds taken."""
    obs = list(outboxes)
    tasks = [asyncio.create_task(ob.run_async(**(run_kwargs or {}))) for ob in obs]
    start = time.monotonic()
    try:
        while True:
            for t in tasks:
                if t.done():
                    t.result()  # a loop that died: surface its error
                    raise AssertionError("an outbox stopped on its own")
            if await asyncio.to_thread(done):
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise AssertionError(f"not done after {timeout}s")
            await asyncio.sleep(0.2)
    finally:
        for ob in obs:
            ob.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        for t in tasks:
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]


def drop_app(app: App) -> None:
    ob = app.outbox
    with ob.db.sync_engine.begin() as conn:
        ob.metadata.drop_all(conn)
        app.effects.drop(conn, checkfirst=True)
    ob.close()
