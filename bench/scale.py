"""Scale: 1, 2 and 4 worker processes (``outboxer run``, local transport) sharing one
PostgreSQL database.

Each layout gets its own service table and its own workers, started once and each
seen handling a warm-up event; the layouts then take turns, round by round: a
backlog is inserted in one transaction and drained. The total rate is the backlog
divided by the time from its first handler start to its last (so the workers'
discovery of the backlog, a latency matter, does not count). The workers poll every
0.1 s (``OUTBOXER_POLL_INTERVAL``) so they all join the drain at once; the idle
layouts' workers keep polling meanwhile (one indexed claim per worker per 0.1 s).

Checks: every event's effect exactly once per run, and no row sent twice: the rows
each layout's workers claimed (their ``Outbox.stats``, left behind at exit) add up
to the rows there were. A row claimed twice could only follow a lease expiry (30 s,
far longer than a batch takes here).
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


class _Layout:
    """``k`` worker processes on a service table of their own."""

    def __init__(self, bench: Bench, url: str, k: int) -> None:
        self.k = k
        self.name = _name(k)
        self.service = unique("s")
        self.effects_name = f"{self.service}_effects"
        self.effects = effects_table(self.effects_name)
        self.outbox = Outbox(url, settings=settings())
        self.outbox.register_event(EVENT, self.service)
        self.outbox.migrate()
        self.table = self.outbox.table_for(self.service)
        self.engine: Engine = create_engine(url)
        self.effects.create(self.engine)
        self.workers = [
            WorkerProcess(
                bench,
                url=url,
                service=self.service,
                effects=self.effects_name,
                outboxer_env={"OUTBOXER_POLL_INTERVAL": POLL},
            ).start()
            for _ in range(k)
        ]

    def _handled(self, above: int = 0) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count())
                    .select_from(self.effects)
                    .where(self.effects.c.outbox_id > above)
                ).scalar_one()
            )

    def warm_up(self, timeout: float = 90.0) -> None:
        """Publish events until every worker has handled one, then wait for the rest
        of them, so that the first backlog starts clean."""
        pids = {w.pid for w in self.workers}
        seen: set[int] = set()
        published = 0
        deadline = time.monotonic() + timeout
        while not pids <= seen:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name}: {len(seen)} of {len(pids)} workers handled a warm-up event"
                )
            for w in self.workers:
                if not w.running:
                    raise RuntimeError(f"worker {w.pid} exited: {w.log_tail()}")
            publish_one(self.outbox, self.engine, {"warm": True})
            published += 1
            time.sleep(0.05)
            with self.engine.connect() as conn:
                seen = set(conn.execute(select(self.effects.c.worker).distinct()).scalars())
        if not wait_until(lambda: self._handled() >= published, 30):
            raise TimeoutError(f"{self.name}: warm-up events not all handled within 30 s")

    def run(self, n: int, section: Section, run_name: str) -> tuple[float, dict[int, int]] | None:
        with self.engine.connect() as conn:
            above = int(
                conn.execute(select(func.coalesce(func.max(self.table.c.id), 0))).scalar_one()
            )
        fill_due(self.outbox, self.service, n, event_type=EVENT)
        with self.engine.connect() as conn:
            ids = list(
                conn.execute(select(self.table.c.id).where(self.table.c.id > above)).scalars()
            )
        if not wait_until(lambda: self._handled(above) >= n, max(120.0, n / 100), 0.1):
            section.check(f"{run_name}: drained", False, "not done in time")
        with self.engine.connect() as conn:
            c = self.effects.c
            rows = conn.execute(
                select(c.outbox_id, c.started_at, c.worker).where(c.outbox_id > above)
            ).all()
        counts: dict[int, int] = {}
        shares: dict[int, int] = {}
        for oid, _, pid in rows:
            counts[int(oid)] = counts.get(int(oid), 0) + 1
            shares[int(pid)] = shares.get(int(pid), 0) + 1
        ok, detail = exactly_once(counts, ids)
        section.check(f"{run_name}: every event handled once", ok and len(ids) == n, detail)
        starts = sorted(float(started) for _, started, _ in rows)
        if len(starts) < 2 or starts[-1] <= starts[0]:
            return None
        return (len(starts) - 1) / (starts[-1] - starts[0]), shares

    def stop(self, section: Section) -> None:
        """Stop the workers; check that they stopped cleanly, that every row was
        consumed, and that the rows they claimed add up to the rows there were."""
        try:
            problems = stop_all(self.workers)
            for problem in problems:
                section.check(f"{self.name}: worker stopped cleanly", False, problem)
            status = self.outbox.store(self.service).status().counts
            rows = sum(status.values())
            section.check(
                f"{self.name}: every row consumed",
                status.get(Status.CONSUMED.value, 0) == rows,
                str(status),
            )
            stats = [w.stats() for w in self.workers]
            claimed = sum(st.get("claimed", 0) for st in stats)
            section.check(
                f"{self.name}: no row sent twice",
                all(stats) and claimed == rows,
                f"rows {rows}, claimed by the workers {claimed}"
                + ("" if all(stats) else " (a worker left no stats)"),
            )
        finally:
            self.engine.dispose()
            self.outbox.close()


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
        layouts: dict[str, _Layout] = {}
        try:
            for k in ks:
                layouts[_name(k)] = _Layout(bench, url, k)
            for layout in layouts.values():
                layout.warm_up()
            for r, name in interleave(bench.rounds, names):
                run_name = f"{name}, round {r + 1}"
                try:
                    got = layouts[name].run(n, section, run_name)
                except Exception as exc:
                    section.failed(run_name, exc)
                    continue
                if got is not None:
                    rate, shares = got
                    section.series[name].samples.append(rate)
                    per_worker.setdefault(name, []).append(shares)
                    split = "/".join(str(v) for v in sorted(shares.values(), reverse=True))
                    say(f"    {run_name}: {rate:,.0f} events/s (per worker {split})")
        except Exception as exc:
            section.failed("scale", exc)
        finally:
            for layout in layouts.values():
                try:
                    layout.stop(section)
                except Exception as exc:
                    section.failed(f"{layout.name}: stop", exc)
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
