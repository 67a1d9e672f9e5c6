"""Scale: 1, 2 and 4 worker processes (``outboxer run``, local transport) sharing one
PostgreSQL database.

Per run: a fresh service table, the workers started and each seen handling a warm-up
event, then a backlog inserted in one transaction. The total rate is the backlog
divided by the time from its first handler start to its last (so the workers'
discovery of the backlog, a latency matter, does not count). The workers poll every
0.1 s (``OUTBOXER_POLL_INTERVAL``) so they all join the drain at once.

Checks: every event's effect exactly once, and no row sent twice: the rows the
workers claimed (their ``Outbox.stats``, left behind at exit) add up to the rows
there were. A row claimed twice could only follow a lease expiry; the count of such
rows is reported.
"""

from __future__ import annotations

import time

from sqlalchemy import Engine, create_engine, func, select

from bench.core import (
    EVENT,
    Bench,
    Section,
    Target,
    effects_table,
    exactly_once,
    interleave,
    median,
    say,
    settings,
    spread,
    unique,
    wait_until,
)
from bench.workers import WorkerProcess, publish_one, stop_all
from outboxer import Outbox, Status
from outboxer.testing import fill_due

POLL = "0.1"


def _name(k: int) -> str:
    return f"{k} worker process{'es' if k > 1 else ''}"


def _run(
    bench: Bench, url: str, k: int, n: int, section: Section, run_name: str
) -> tuple[float, dict[int, int]] | None:
    service = unique("s")
    effects_name = f"{service}_effects"
    effects = effects_table(effects_name)
    outbox = Outbox(url, settings=settings())
    outbox.register_event(EVENT, service)
    outbox.migrate()
    engine: Engine = create_engine(url)
    effects.create(engine)
    workers = [
        WorkerProcess(
            bench,
            url=url,
            service=service,
            effects=effects_name,
            outboxer_env={"OUTBOXER_POLL_INTERVAL": POLL},
        ).start()
        for _ in range(k)
    ]
    try:
        warm = _warm_up(outbox, engine, effects_name, workers)
        fill_due(outbox, service, n, event_type=EVENT)
        table = outbox.table_for(service)
        with engine.connect() as conn:
            ids = list(conn.execute(select(table.c.id).where(table.c.id > warm)).scalars())

        def done() -> bool:
            with engine.connect() as conn:
                got = conn.execute(
                    select(func.count()).select_from(effects).where(effects.c.outbox_id > warm)
                ).scalar_one()
            return int(got) >= n

        if not wait_until(done, timeout=max(120.0, n / 100), interval=0.2):
            section.check(f"{run_name}: drained", False, "not done in time")
        with engine.connect() as conn:
            rows = conn.execute(
                select(effects.c.outbox_id, effects.c.started_at, effects.c.worker).where(
                    effects.c.outbox_id > warm
                )
            ).all()
    finally:
        problems = stop_all(workers)
        engine.dispose()
    for problem in problems:
        section.check(f"{run_name}: worker stopped cleanly", False, problem)
    counts: dict[int, int] = {}
    shares: dict[int, int] = {}
    for oid, _, pid in rows:
        counts[int(oid)] = counts.get(int(oid), 0) + 1
        shares[int(pid)] = shares.get(int(pid), 0) + 1
    ok, detail = exactly_once(counts, ids)
    section.check(f"{run_name}: every event handled once", ok and len(ids) == n, detail)
    status = outbox.store(service).status().counts
    total_rows = sum(status.values())
    section.check(
        f"{run_name}: every row consumed",
        status.get(Status.CONSUMED.value, 0) == total_rows,
        str(status),
    )
    claimed = sum(w.stats().get("claimed", 0) for w in workers)
    stats_found = all(w.stats() for w in workers)
    section.check(
        f"{run_name}: no row sent twice",
        stats_found and claimed == total_rows,
        f"rows {total_rows}, claimed by the workers {claimed}"
        + ("" if stats_found else " (a worker left no stats)"),
    )
    outbox.close()
    starts = sorted(started for _, started, _ in rows)
    if len(starts) < 2 or starts[-1] <= starts[0]:
        return None
    return (len(starts) - 1) / (starts[-1] - starts[0]), shares


def _warm_up(
    outbox: Outbox, engine: Engine, effects_name: str, workers: list[WorkerProcess]
) -> int:
    """Publish events until every worker has handled one, then wait for the rest of
    them, so the backlog starts clean; the last warm-up id."""
    effects = effects_table(effects_name)
    pids = {w.pid for w in workers}
    seen: set[int] = set()
    published = last = 0
    deadline = time.monotonic() + 90
    while not pids <= seen:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(seen)} of {len(pids)} workers handled a warm-up event")
        for w in workers:
            if not w.running:
                raise RuntimeError(f"worker {w.pid} exited: {w.log_tail()}")
        last = publish_one(outbox, engine, {"warm": True})[0]
        published += 1
        time.sleep(0.05)
        with engine.connect() as conn:
            seen = set(conn.execute(select(effects.c.worker).distinct()).scalars())

    def all_handled() -> bool:
        with engine.connect() as conn:
            got = conn.execute(select(func.count()).select_from(effects)).scalar_one()
        return int(got) >= published

    if not wait_until(all_handled, 30):
        raise TimeoutError("warm-up events not all handled within 30 s")
    return last


def run(bench: Bench) -> Section:
    n = bench.sizes.scale_events
    ks = bench.sizes.scale_workers
    section = Section("scale", "Scale: worker processes on one PostgreSQL database", __doc__ or "")
    names = [_name(k) for k in ks]
    for name in names:
        section.add(name, "events/s", n)
    per_worker: dict[str, list[dict[int, int]]] = {}
    say(f"  scale: {n:,} events per run, {', '.join(names)}")
    with bench.database("postgresql") as url:
        for r, name in interleave(bench.rounds, names):
            k = ks[names.index(name)]
            run_name = f"{name}, round {r + 1}"
            try:
                got = _run(bench, url, k, n, section, run_name)
            except Exception as exc:
                section.failed(run_name, exc)
                continue
            if got is not None:
                rate, shares = got
                section.series[name].samples.append(rate)
                per_worker.setdefault(name, []).append(shares)
                split = "/".join(str(v) for v in sorted(shares.values(), reverse=True))
                say(f"    {run_name}: {rate:,.0f} events/s (per worker {split})")
    section.extra["per_worker"] = {
        name: [sorted(s.values(), reverse=True) for s in v] for name, v in per_worker.items()
    }
    base = section.series[names[0]].samples
    for name in names[1:]:
        ratio = [a / b for a, b in zip(section.series[name].samples, base, strict=False) if b]
        section.ratios[f"{name} / {names[0]}"] = ratio
    rates = ", ".join(f"{name}: {spread(section.series[name].samples)}" for name in names)
    scaling = ", ".join(
        f"{k}: {spread(section.ratios.get(f'{_name(k)} / {names[0]}', []), '{:.2f}x')}"
        for k in ks[1:]
    )
    no_dupes = all(c.ok for c in section.checks if "sent twice" in c.name)
    section.targets.append(
        Target(
            "scale: total events/s with 1, 2, 4 worker processes (local transport)",
            rates,
            f"vs one process: {scaling}",
            "",
            "no row sent twice outside a lease expiry",
            no_dupes if section.checks else None,
        )
    )
    if median(base) is None:
        section.notes.append("No single-process run succeeded; no scaling ratio.")
    return section
