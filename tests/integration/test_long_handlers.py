"""Handlers that outlive the claim's lease (a slow HTTP call), on PostgreSQL and
MariaDB with two workers sharing the in-process transport's queue (the table).

A row's lease runs out while its handler still runs. The relay's claim skips rows a
live transaction holds (``FOR UPDATE SKIP LOCKED``), and a second delivery of a
message a live worker is handling is recognised from its handling mark and skipped
without waiting. So: every handler runs once per event, one effect each, and no
transaction waits for a slow handler's lock (sampled from the server while they run).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

from sqlalchemy import create_engine, insert, text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.pool import NullPool

from outboxer import Envelope
from tests.integration.engine_helpers import (
    all_final,
    build_app,
    drop_app,
    effects,
    publish_many,
    run_until,
    status_counts,
)

LEASE = 1.0
SLOW = 4 * LEASE
"""Seconds a slow handler takes: four leases."""
EVENTS = 60


def _longest_lock_wait(engine: Engine) -> float:
    """Seconds the longest lock wait in the database has lasted so far."""
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            query = (
                "SELECT coalesce(max(extract(epoch FROM now() - query_start)), 0) "
                "FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database()"
            )
        else:
            query = (
                "SELECT coalesce(max(TIMESTAMPDIFF(MICROSECOND, trx_wait_started, NOW())), 0)"
                " / 1e6 FROM information_schema.INNODB_TRX WHERE trx_state = 'LOCK WAIT'"
                " AND trx_mysql_thread_id IN"
                " (SELECT id FROM information_schema.PROCESSLIST WHERE db = DATABASE())"
            )
        return float(conn.execute(text(query)).scalar_one())


async def test_handlers_that_outlive_the_lease_run_once_and_nobody_waits(
    server_url: str,
) -> None:
    one = build_app(server_url, "local", lease=LEASE, batch_size=5, handlers=False)
    two = build_app(
        server_url,
        "local",
        lease=LEASE,
        batch_size=5,
        handlers=False,
        prefix=one.prefix,
        effects=one.effects,
    )
    calls: Counter[int] = Counter()
    for app in (one, two):

        @app.outbox.handler(app.event(app.services[0]))
        async def handle(event: Envelope, tx: AsyncSession) -> None:
            calls[event.outbox_id] += 1
            if event.payload["n"] % 10 == 0:
                await asyncio.sleep(SLOW)  # a slow call outside the database
            await tx.execute(
                insert(one.effects).values(
                    outbox_id=event.outbox_id, service=one.services[0], n=event.payload["n"]
                )
            )

    monitor = create_engine(server_url, poolclass=NullPool)
    longest = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            longest[0] = max(longest[0], _longest_lock_wait(monitor))

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        publish_many(one, EVENTS)
        sampler.start()
        await run_until([one.outbox, two.outbox], lambda: all_final(one), timeout=240)
        stop.set()
        sampler.join(30)
        assert status_counts(one)["consumed"] == EVENTS
        assert effects(one) == (EVENTS, EVENTS)
        assert max(calls.values()) == 1, calls
        assert longest[0] < SLOW / 2, f"a transaction waited {longest[0]:.1f}s for a lock"
    finally:
        stop.set()
        monitor.dispose()
        two.outbox.close()
        drop_app(one)
