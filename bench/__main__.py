"""Relay cost: outboxer's claim/batch-mark relay against the seed's per-message relay.

Both relays move the same number of pending rows to ``published`` through the same
no-op transport on the same database, one after the other in one run, and the
statements each sends are counted. Then end-to-end drain rates of the in-process
engine (handler writing one row per event) are printed.

Run: ``make bench`` (or ``.venv/bin/python -m bench [--events N] [--backends ...]``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, event, text

from outboxer import Outbox, OutboxSettings, Status
from outboxer.testing import fill_due, scratch_database

PG_ADMIN = os.environ.get(
    "OUTBOXER_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
MYSQL_ADMIN = os.environ.get("OUTBOXER_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")


@contextmanager
def database(backend: str) -> Iterator[str]:
    """A throw-away database for one backend, dropped afterwards."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            yield f"sqlite:///{tmp}/bench.db"
        return
    admin = PG_ADMIN if backend == "postgresql" else MYSQL_ADMIN
    with scratch_database(admin, prefix="outboxer_bench") as url:
        yield url


class StatementCounter:
    def __init__(self, engine: Engine) -> None:
        self.count = 0
        event.listen(engine, "before_cursor_execute", self._hit)

    def _hit(self, *args: Any) -> None:
        self.count += 1


def seed_style_relay(ob: Outbox, service: str) -> None:
    """The seed's loop: list due rows, then per message: send, mark published."""
    st = ob.store(service)
    while True:
        due = st.list_due_messages(limit=100)
        if not due:
            return
        for msg in due:
            msg.envelope()  # decode as the seed does before sending
            st.mark_published(msg.id)


def outboxer_relay(ob: Outbox, service: str) -> None:
    """outboxer's loop: claim a batch with a lease, send, mark the batch in one statement."""
    st = ob.store(service)
    while True:
        claimed = st.claim_due(limit=100, lease=30)
        if not claimed:
            return
        for msg in claimed:
            msg.envelope()
        st.mark_published_many([m.id for m in claimed], expect_retry_count=0)


@dataclass
class Run:
    seconds: float
    statements: int


def measure(url: str, n: int, relay: Callable[[Outbox, str], None]) -> Run:
    ob = Outbox(url, settings=OutboxSettings.from_values())
    service = f"b{uuid.uuid4().hex[:8]}"
    ob.register_event("bench.e", service)
    ob.migrate()
    fill_due(ob, service, n, event_type="bench.e")
    counter = StatementCounter(ob.db.sync_engine)
    start = time.perf_counter()
    relay(ob, service)
    took = time.perf_counter() - start
    assert ob.store(service).status().counts[Status.PUBLISHED.value] == n
    with ob.db.sync_engine.begin() as conn:
        ob.metadata.drop_all(conn)
    ob.close()
    return Run(took, counter.count)


async def drain(url: str, n: int) -> float:
    """Events/s of the in-process engine, handler writing one row per event."""
    ob = Outbox(url, settings=OutboxSettings.from_values(poll_interval=0.05))
    service = f"d{uuid.uuid4().hex[:8]}"
    ob.register_event("bench.e", service)
    effects = f"{service}_effects"
    with ob.db.sync_engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {effects} (outbox_id BIGINT)"))

    @ob.handler("bench.e")
    def handle(event: Any, tx: Any) -> None:
        tx.execute(text(f"INSERT INTO {effects} (outbox_id) VALUES (:o)"), {"o": event.outbox_id})

    ob.migrate()
    fill_due(ob, service, n, event_type="bench.e")
    task = asyncio.create_task(ob.run_async())
    start = time.perf_counter()
    st = ob.store(service)
    while (await st.status_async()).counts[Status.CONSUMED.value] < n:  # noqa: ASYNC110
        await asyncio.sleep(0.05)  # the database is the source of truth
    took = time.perf_counter() - start
    ob.stop()
    await task
    with ob.db.sync_engine.begin() as conn:
        ob.metadata.drop_all(conn)
        conn.execute(text(f"DROP TABLE {effects}"))
    ob.close()
    return n / took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql", "mariadb"])
    args = parser.parse_args()
    n = args.events
    print(f"relay: {n} pending rows to published, no-op transport, same database, one run\n")
    header = (
        f"{'backend':<11} {'seed msg/s':>11} {'outboxer msg/s':>15} {'speed-up':>9} "
        f"{'seed stmts/msg':>15} {'outboxer stmts/msg':>19}"
    )
    print(header)
    print("-" * len(header))
    drains: dict[str, float] = {}
    for backend in args.backends:
        with database(backend) as url:
            seed = measure(url, n, seed_style_relay)
            ours = measure(url, n, outboxer_relay)
            print(
                f"{backend:<11} {n / seed.seconds:>11.0f} {n / ours.seconds:>15.0f} "
                f"{seed.seconds / ours.seconds:>8.1f}x {seed.statements / n:>15.2f} "
                f"{ours.statements / n:>19.3f}"
            )
            drains[backend] = asyncio.run(drain(url, n))
    print(f"\nend to end, in-process transport, sync handler writing one row ({n} events):")
    for backend, rate in drains.items():
        print(f"  {backend:<11} {rate:>8.0f} events/s")


if __name__ == "__main__":
    main()
