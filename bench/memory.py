"""Memory of one ``outboxer run`` process (local transport, PostgreSQL) over a long
stream of events.

The benchmark keeps a backlog in front of the worker (``fill_due`` in chunks while
fewer than half a chunk is pending) until the planned number of events is inserted,
and samples the worker's resident set (``VmRSS`` in ``/proc/<pid>/status``) twice a
second. Reported: the peak (``VmHWM``) before the worker is stopped, the RSS after
warm-up (the first 10 % of the events) and at the end. Runs once (not a comparison);
the worker polls every 0.1 s so that a gap between two chunks never idles it.
"""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import Engine, Table, create_engine, func, select

from bench.core import (
    EVENT,
    Bench,
    Section,
    Target,
    effects_table,
    say,
    settings,
    unique,
    wait_until,
)
from bench.workers import WorkerProcess, publish_one
from outboxer import Outbox, Status
from outboxer.testing import fill_due

PEAK_TARGET_MB = 200.0
FLAT_TARGET = 0.10
"""RSS at the end at most this much above the RSS after warm-up."""
WARM_UP = 0.10
SAMPLE_EVERY = 0.5


def _pending(engine: Engine, outbox: Outbox, service: str) -> int:
    table = outbox.table_for(service)
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count())
                .select_from(table)
                .where(table.c.status == Status.PENDING.value)
            ).scalar_one()
        )


def run(bench: Bench) -> Section:
    total = bench.sizes.memory_events
    section = Section("memory", "Memory of `outboxer run`", __doc__ or "")
    if not Path("/proc/self/status").exists():
        section.skip("memory", "needs /proc (Linux)")
        return section
    chunk = min(50_000, max(total // 10, 1000))
    say(f"  memory: {total:,} events through one worker, fed {chunk:,} at a time")
    with bench.database("postgresql") as url:
        service = unique("m")
        effects_name = f"{service}_effects"
        effects = effects_table(effects_name)
        outbox = Outbox(url, settings=settings())
        outbox.register_event(EVENT, service)
        outbox.migrate()
        engine = create_engine(url)
        effects.create(engine)
        worker = WorkerProcess(
            bench,
            url=url,
            service=service,
            effects=effects_name,
            outboxer_env={"OUTBOXER_POLL_INTERVAL": "0.1"},
        ).start()
        samples: list[tuple[float, int, float]] = []  # (seconds, events consumed, RSS MB)
        peak_kb: int | None = None
        try:
            publish_one(outbox, engine, {"warm": True})
            if not wait_until(
                lambda: _count(engine, effects_name) >= 1 or not worker.running, 60, 0.1
            ):
                raise TimeoutError("the worker handled nothing within 60 s")
            filled = 1
            start = time.monotonic()
            next_sample = 0.0
            while True:
                if not worker.running:
                    raise RuntimeError(f"worker exited: {worker.log_tail()}")
                pending = _pending(engine, outbox, service)
                if filled < total and pending < chunk // 2:
                    n = min(chunk, total - filled)
                    fill_due(outbox, service, n, event_type=EVENT)
                    filled += n
                    pending += n
                now = time.monotonic() - start
                if now >= next_sample:
                    rss = worker.status_kb("VmRSS")
                    if rss is not None:
                        samples.append((now, filled - pending, rss / 1024))
                    next_sample = now + SAMPLE_EVERY
                if filled >= total and pending == 0:
                    break
                time.sleep(0.1)
            wait_until(lambda: _count(engine, effects_name) >= total, 60, 0.2)
            rss = worker.status_kb("VmRSS")
            if rss is not None:
                samples.append((time.monotonic() - start, total, rss / 1024))
            peak_kb = worker.status_kb("VmHWM")
            seconds = time.monotonic() - start
        except Exception as exc:
            section.failed("memory run", exc)
            seconds = 0.0
        finally:
            code = worker.stop()
        section.check("worker stopped cleanly", code == 0, f"exit code {code}")
        ok, detail = _exactly_once(engine, outbox.table_for(service), effects_name)
        section.check(f"{total:,} events: every event handled once", ok, detail)
        engine.dispose()
        outbox.close()
    _summarise(section, total, samples, peak_kb, seconds)
    return section


def _exactly_once(engine: Engine, table: Table, effects_name: str) -> tuple[bool, str]:
    """Every outbox row has exactly one effect (counted in SQL: a million ids stay
    in the database)."""
    e = effects_table(effects_name).c
    per_id = select(e.outbox_id, func.count().label("k")).group_by(e.outbox_id).subquery()
    with engine.connect() as conn:
        rows = conn.execute(select(func.count()).select_from(table)).scalar_one()
        missing = conn.execute(
            select(func.count())
            .select_from(table.outerjoin(per_id, per_id.c.outbox_id == table.c.id))
            .where(per_id.c.outbox_id.is_(None))
        ).scalar_one()
        twice = conn.execute(
            select(func.count()).select_from(per_id).where(per_id.c.k > 1)
        ).scalar_one()
        extra = conn.execute(
            select(func.count())
            .select_from(per_id.outerjoin(table, per_id.c.outbox_id == table.c.id))
            .where(table.c.id.is_(None))
        ).scalar_one()
    ok = not (missing or twice or extra)
    return ok, f"{rows} events: {missing} missing, {twice} applied twice, {extra} unexpected"


def _count(engine: Engine, effects_name: str) -> int:
    effects = effects_table(effects_name)
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(effects)).scalar_one())


def _summarise(
    section: Section,
    total: int,
    samples: list[tuple[float, int, float]],
    peak_kb: int | None,
    seconds: float,
) -> None:
    section.extra["rss"] = samples
    if not samples or peak_kb is None:
        section.targets.append(
            Target(f"memory of `outboxer run`, {total:,} events", "-", "", "", "", None)
        )
        return
    warm = next((mb for _, done, mb in samples if done >= total * WARM_UP), samples[0][2])
    end = samples[-1][2]
    peak = peak_kb / 1024
    growth = (end - warm) / warm if warm else 0.0
    section.extra.update(
        {"peak_mb": peak, "warm_mb": warm, "end_mb": end, "seconds": seconds, "events": total}
    )
    section.targets.append(
        Target(
            f"memory: peak RSS of `outboxer run` over {total:,} events",
            f"peak {peak:.0f} MB; after warm-up {warm:.0f} MB, at the end {end:.0f} MB "
            f"({growth:+.1%})",
            "",
            "",
            f"peak <= {PEAK_TARGET_MB:.0f} MB and flat (end <= warm-up +{FLAT_TARGET:.0%})",
            peak <= PEAK_TARGET_MB and growth <= FLAT_TARGET,
        )
    )
