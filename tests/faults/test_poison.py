"""Poison messages that kill the worker process, with real processes.

The handlers of a few events call ``os._exit`` (what a segfault in a C extension,
the OOM killer or a native ``MemoryError`` does: no exception, no cleanup, the
transaction dies with the process). A supervisor starts every worker that exits
again, as systemd or Kubernetes would. Each poison event must end ``dead`` after
``max_retry`` crashes pinned on it, with a reason that says so, while every other
event is consumed exactly once and no worker is restarted by hand: on the
in-process transport, through Kafka (the offset moves past it) and into an inbox.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.pool import NullPool

from outboxer import Outbox, OutboxSettings
from outboxer.database.ops import crash_reason
from outboxer.testing import EmbeddedKafka
from tests.faults.harness import (
    EFFECTS,
    FULL,
    SERVICES,
    Scenario,
    Supervisor,
    Workers,
    scenario,
    wait_for,
)

MAX_RETRY = 3
"""Crashes after which a poison event is dead (small: every crash is a restart)."""


@dataclass(frozen=True)
class Size:
    events: int
    rate: float
    poison: int
    """Poison events among them (alternating between the async and the sync handler)."""
    drain_timeout: float = 600.0


SIZES = {
    "ci": {
        "local": Size(400, 80, 2),
        "kafka": Size(400, 80, 2),
        "inbox": Size(300, 60, 2),
    },
    "full": {
        "local": Size(5_000, 200, 6, 1200),
        "kafka": Size(5_000, 200, 6, 1200),
        "inbox": Size(3_000, 150, 4, 1200),
    },
}["full" if FULL else "ci"]

pytestmark = [pytest.mark.faults, pytest.mark.timeout(3600 if FULL else 900)]


def _poison(size: Size) -> list[int]:
    """Event numbers whose handler kills its worker, spread over the run (consecutive
    pairs: one for each service's handler, async and sync)."""
    step = size.events // (size.poison // 2 + 1)
    numbers = []
    for i in range(size.poison // 2):
        first = step * (i + 1)
        numbers += [first, first + 1]
    return numbers


def _settings(poison: list[int]) -> dict[str, str]:
    # The rows carry their max_retry from the publisher; the inbox's rows from the
    # consumer's settings.
    return {"FAULTS_POISON": ",".join(map(str, poison)), "OUTBOXER_MAX_RETRY": str(MAX_RETRY)}


def _check_poison(sc: Scenario, poison: list[int], supervisor: Supervisor) -> None:
    """The scenario's audit, plus: each poison event is dead with the crash reason after
    exactly max_retry attempts and no effect; nothing else is dead."""
    sc.check()
    found: dict[int, tuple[str, int, int, str | None]] = {}
    with sc.outbox.db.sync_engine.connect() as conn:
        for service in SERVICES:
            t = sc.outbox.table_for(service)
            for row in conn.execute(
                select(t.c.payload, t.c.status, t.c.retry_count, t.c.crashes, t.c.last_error)
            ):
                n = int(json.loads(row.payload)["payload"]["n"])
                if n in poison or row.status == "dead":
                    found[n] = (row.status, row.retry_count, row.crashes, row.last_error)
    report = f"{sc.figures.summary()}\n{found}\n{sc.workers.logs()}"
    expected = ("dead", MAX_RETRY, MAX_RETRY, crash_reason(MAX_RETRY))
    assert found == dict.fromkeys(poison, expected), report
    assert sc.figures.dead == len(poison), report
    # Every crash was a real process death (exit code 70 from the handler), and no
    # worker died of anything else.
    assert set(supervisor.exit_codes) == {70}, report
    # Each poison event needs MAX_RETRY deaths; one death may count for several (the
    # copies in both services, each handled alone by its own consumer in that process).
    assert supervisor.restarts >= MAX_RETRY, report


def test_poison_kills_its_worker_postgresql_local(
    pg_scratch: str, tmp_path: Path, fault_results: None
) -> None:
    size = SIZES["local"]
    poison = _poison(size)
    with scenario(
        "poison message kills its worker",
        tmp_path,
        pg_scratch,
        "local",
        setup="PostgreSQL, in-process",
        settings=_settings(poison),
    ) as sc:
        sc.start_workers(["both", "both"])
        supervisor = sc.supervise()
        sc.publish(size.events, size.rate, max_retry=MAX_RETRY)
        sc.finish(size.drain_timeout)
        _check_poison(sc, poison, supervisor)


def test_poison_kills_its_worker_postgresql_kafka(
    pg_scratch: str, broker: EmbeddedKafka, tmp_path: Path, fault_results: None
) -> None:
    size = SIZES["kafka"]
    poison = _poison(size)
    with scenario(
        "poison message kills its worker",
        tmp_path,
        pg_scratch,
        broker.transport_url,
        setup="PostgreSQL, Kafka",
        settings=_settings(poison),
    ) as sc:
        sc.start_workers(["relay", "consume", "consume"])
        supervisor = sc.supervise()
        sc.publish(size.events, size.rate, max_retry=MAX_RETRY)
        sc.finish(size.drain_timeout)
        _check_poison(sc, poison, supervisor)


INBOX_MODULE = "faults_inbox_app"
INBOX_SOURCE = '''\
"""The fault scenarios' consumer with a database of its own: both services of the
producer consumed into inboxes here. Everything else comes from OUTBOXER_*."""

import os

from sqlalchemy import text

from outboxer import Outbox

outbox = Outbox()
outbox.register_inbox("billing", consumer="audit")
outbox.register_inbox("shipping", consumer="audit")
outbox.register_event("billing.charged", "billing")
outbox.register_event("shipping.requested", "shipping")
EFFECT = text("INSERT INTO fault_effects (outbox_id, service, worker) VALUES (:id, :svc, :pid)")
POISON = {int(n) for n in os.environ.get("FAULTS_POISON", "").split(",") if n.strip()}


def poisoned(event):
    if event.payload.get("n") in POISON:
        os._exit(70)


@outbox.handler("billing.charged")
async def charge(event, tx):
    await tx.execute(EFFECT, {"id": event.payload["n"], "svc": "billing", "pid": os.getpid()})
    poisoned(event)


@outbox.handler("shipping.requested")
def ship(event, tx):
    tx.execute(EFFECT, {"id": event.payload["n"], "svc": "shipping", "pid": os.getpid()})
    poisoned(event)
'''


def test_poison_kills_its_worker_inbox(
    pg_scratch: str,
    mariadb_scratch: str,
    broker: EmbeddedKafka,
    tmp_path: Path,
    fault_results: None,
) -> None:
    """Producer on PostgreSQL (a relay-only worker), consumer with its own MariaDB
    database (inboxes); the consumer's workers are the ones that die."""
    size = SIZES["inbox"]
    poison = _poison(size)
    with scenario(
        "poison message kills its worker",
        tmp_path / "producer",
        pg_scratch,
        broker.transport_url,
        setup="PostgreSQL -> Kafka -> MariaDB inbox",
        settings=_settings(poison),
    ) as sc:
        sc.start_workers(["relay"])
        consumer_dir = tmp_path / "consumer"
        consumer_dir.mkdir()
        (consumer_dir / f"{INBOX_MODULE}.py").write_text(textwrap.dedent(INBOX_SOURCE))
        env = {**sc.env, "OUTBOXER_URL": mariadb_scratch}
        consumers = Workers(consumer_dir, env, app=INBOX_MODULE)
        engine = create_engine(mariadb_scratch, poolclass=NullPool)
        EFFECTS.create(engine)
        inbox = Outbox(mariadb_scratch, settings=OutboxSettings.from_values(topic_prefix=sc.prefix))
        for service in SERVICES:
            inbox.register_inbox(service, consumer="audit")
        supervisor = Supervisor(consumers)
        try:
            result = subprocess.run(
                consumers.command("migrate"),
                cwd=consumer_dir,
                env=env,
                capture_output=True,
                timeout=120,
                check=False,
            )
            assert result.returncode == 0, result.stderr.decode(errors="replace")
            consumers.start("both")
            consumers.start("both")
            supervisor.start()
            publisher = sc.publish(size.events, size.rate, max_retry=MAX_RETRY)

            def settled() -> Counter[str]:
                counts: Counter[str] = Counter()
                with engine.connect() as conn:
                    for service in SERVICES:
                        t = inbox.table_for(service)
                        for status, n in conn.execute(
                            select(t.c.status, func.count()).group_by(t.c.status)
                        ):
                            counts[str(status)] += int(n)
                return counts

            def done() -> bool:
                counts = settled()
                return publisher.done and counts["consumed"] + counts["dead"] >= len(
                    publisher.confirmed
                )

            wait_for(done, size.drain_timeout, "inbox settled")
            supervisor.stop()
            with engine.connect() as conn:
                effects = Counter(
                    (str(svc), int(n))
                    for svc, n in conn.execute(select(EFFECTS.c.service, EFFECTS.c.outbox_id))
                )
                rows: dict[int, tuple[str, int, int, str | None]] = {}
                for service in SERVICES:
                    t = inbox.table_for(service)
                    for row in conn.execute(
                        select(
                            t.c.payload, t.c.status, t.c.retry_count, t.c.crashes, t.c.last_error
                        )
                    ):
                        n = int(json.loads(row.payload)["payload"]["n"])
                        assert n not in rows, f"event {n} stored twice"
                        rows[n] = (row.status, row.retry_count, row.crashes, row.last_error)
            report = f"{rows if len(rows) < 50 else len(rows)}\n{consumers.logs()}"
            assert set(rows) == set(publisher.confirmed), report
            expected = ("dead", MAX_RETRY, MAX_RETRY, crash_reason(MAX_RETRY))
            assert {n: rows[n] for n in poison} == dict.fromkeys(poison, expected), report
            assert all(rows[n][0] == "consumed" for n in rows if n not in poison), report
            applied = {n for (_, n), count in effects.items()}
            assert max(effects.values()) == 1, report  # none applied twice
            assert applied == set(rows) - set(poison), report
            assert set(supervisor.exit_codes) == {70}, report
            # Each poison event needs MAX_RETRY deaths; one death may count for several (the
            # copies in both services, each handled alone by its own consumer in that process).
            assert supervisor.restarts >= MAX_RETRY, report
            sc.figures.events = len(publisher.confirmed)
            sc.figures.rows = len(rows)
            sc.figures.consumed = sum(1 for r in rows.values() if r[0] == "consumed")
            sc.figures.dead = len(poison)
            sc.figures.max_retry_count = max(r[1] for r in rows.values())
            sc.figures.faults["worker died, restarted"] += supervisor.restarts
            assert publisher.finished_at is not None
            sc.figures.publish_seconds = publisher.finished_at - sc.started
            sc.figures.total_seconds = sc.elapsed
            sc.figures.workers = "1 relay (producer) + 2 both (inbox consumer)"
        finally:
            supervisor.stop()
            consumers.stop_all()
            with engine.begin() as conn:
                inbox.metadata.drop_all(conn)
                EFFECTS.drop(conn, checkfirst=True)
            inbox.close()
            engine.dispose()
