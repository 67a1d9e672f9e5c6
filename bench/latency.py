"""Latency from a business transaction's commit to the start of the event's handler.

The publisher commits one event per transaction at a fixed rate and notes when each
commit returned (``time.time()``); the handler notes when it started, in the row it
inserts. Both clocks are this machine's wall clock.

Layouts (each worker started once, warmed up with one event, then fed in rounds):

- **same process** (500/s): ``Outbox.run_async`` on a thread of the benchmark
  process, which also publishes, so the publishing transaction's commit can wake the
  relay directly.
- **other process** (20/s): ``outboxer --app bench.app:outbox run`` in its own
  process; the benchmark process only publishes. That worker learns of new rows from
  whatever cross-process wake-up the engine has (with none, its poll: 1 s by default).
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, create_engine

from bench.core import (
    EVENT,
    Bench,
    Section,
    Target,
    effects_table,
    interleave,
    percentile,
    say,
    settings,
    unique,
    wait_until,
    wake_settings,
    wake_sources,
)
from bench.workers import (
    InProcessWorker,
    WorkerProcess,
    effect_handler,
    publish_one,
    publish_paced,
    wait_handled,
)
from outboxer import Outbox

P50_TARGET_MS = 5.0
P99_TARGET_MS = 25.0


@dataclass
class _Layout:
    """One layout: a worker, the outbox that publishes, and what was measured."""

    name: str
    backend: str
    transport: str
    same_process: bool
    rate: float
    seconds: float
    outbox: Outbox | None = None
    engine: Engine | None = None
    effects: str = ""
    inproc: InProcessWorker | None = None
    proc: WorkerProcess | None = None
    latencies_ms: list[float] = field(default_factory=list)
    per_round: list[dict[str, float]] = field(default_factory=list)

    def close(self) -> list[str]:
        problems: list[str] = []
        try:
            if self.inproc is not None:
                self.inproc.stop()
            if self.proc is not None:
                code = self.proc.stop()
                if code != 0:
                    problems.append(f"{self.name}: worker exited with {code}")
        finally:
            if self.engine is not None:
                self.engine.dispose()
            if self.outbox is not None:
                self.outbox.close()
        return problems


def _layouts(bench: Bench, section: Section) -> list[_Layout]:
    sizes = bench.sizes
    kafka = bench.kafka() is not None
    if not kafka:
        section.skip("Kafka layouts", bench.kafka_missing())
    out: list[_Layout] = []
    for transport in ("local", "kafka"):
        if transport == "kafka" and not kafka:
            continue
        out.append(
            _Layout(
                f"same process, postgresql, {transport}",
                "postgresql",
                transport,
                True,
                sizes.fast_rate,
                sizes.fast_seconds,
            )
        )
    for backend in sizes.cross_process_backends:
        out.append(
            _Layout(
                f"other process, {backend}, local",
                backend,
                "local",
                False,
                sizes.slow_rate,
                sizes.slow_seconds,
            )
        )
    if sizes.cross_process_kafka and kafka:
        out.append(
            _Layout(
                "other process, postgresql, kafka",
                "postgresql",
                "kafka",
                False,
                sizes.slow_rate,
                sizes.slow_seconds,
            )
        )
    return out


def _start(bench: Bench, layout: _Layout, url: str) -> None:
    service = unique("l")
    layout.effects = f"{service}_effects"
    prefix = unique("bench")
    broker = bench.kafka() if layout.transport == "kafka" else None
    transport = broker.transport_url if broker is not None else "local"
    wake = wake_settings()
    layout.outbox = outbox = Outbox(
        url, transport=transport, topic_prefix=prefix, settings=settings(**wake)
    )
    outbox.register_event(EVENT, service)
    outbox.migrate()
    layout.engine = create_engine(url)
    effects_table(layout.effects).create(layout.engine)
    if layout.same_process:
        effect_handler(outbox, layout.effects)
        layout.inproc = InProcessWorker(outbox).start()
    else:
        env = {f"OUTBOXER_{k.upper()}": "true" for k in wake}
        layout.proc = WorkerProcess(
            bench,
            url=url,
            service=service,
            effects=layout.effects,
            transport=transport,
            topic_prefix=prefix,
            outboxer_env=env,
        ).start()


def _warm_up(layout: _Layout, timeout: float = 90.0) -> None:
    """Publish an event every 0.2 s until one is handled (a Kafka consumer has joined
    its group, a worker process is up)."""
    assert layout.outbox is not None
    assert layout.engine is not None
    deadline = time.monotonic() + timeout
    ids: list[int] = []
    engine = layout.engine
    while time.monotonic() < deadline:
        if layout.proc is not None and not layout.proc.running:
            raise RuntimeError(f"worker exited: {layout.proc.log_tail()}")
        ids.append(publish_one(layout.outbox, engine, {"warm": True})[0])
        if wait_until(lambda: bool(wait_handled(engine, layout.effects, ids, 0)), 0.2):
            return
    raise TimeoutError(f"{layout.name}: no warm-up event handled within {timeout}s")


def _round(layout: _Layout, section: Section, run_name: str) -> dict[str, float] | None:
    assert layout.outbox is not None
    assert layout.engine is not None
    sent = publish_paced(layout.outbox, layout.engine, layout.rate, layout.seconds)
    ids = [oid for oid, _ in sent]
    found = wait_handled(layout.engine, layout.effects, ids, timeout=60.0)
    missing = [oid for oid in ids if oid not in found]
    twice = [oid for oid, (_, runs) in found.items() if runs > 1]
    section.check(
        f"{run_name}: every event handled once",
        not missing and not twice,
        f"{len(ids)} events: {len(missing)} missing, {len(twice)} handled twice",
    )
    lat = [(found[oid][0] - committed) * 1000 for oid, committed in sent if oid in found]
    if not lat:
        return None
    layout.latencies_ms.extend(lat)
    elapsed = sent[-1][1] - sent[0][1] if len(sent) > 1 else 0.0
    stats = {
        "events": float(len(lat)),
        "achieved_rate": (len(sent) - 1) / elapsed if elapsed > 0 else 0.0,
        "p50": percentile(lat, 50),
        "p90": percentile(lat, 90),
        "p99": percentile(lat, 99),
        "max": max(lat),
    }
    layout.per_round.append(stats)
    return stats


def run(bench: Bench) -> Section:
    section = Section("latency", "Commit -> handler start", __doc__ or "")
    wake = wake_settings()
    sources = wake_sources()
    section.notes.append(
        "Wake-up sources in this engine: "
        + (", ".join(sources) or "none")
        + "; LISTEN/NOTIFY settings: "
        + (", ".join(f"{k}=true" for k in wake) or "none found (no such setting yet)")
        + ". Other-process layouts run with the default poll interval."
    )
    layouts = _layouts(bench, section)
    urls: dict[str, str] = {}
    problems: list[str] = []
    with ExitStack() as databases:
        try:
            for layout in layouts:
                try:
                    if layout.backend not in urls:
                        urls[layout.backend] = databases.enter_context(
                            bench.database(layout.backend)
                        )
                    _start(bench, layout, urls[layout.backend])
                except Exception as exc:
                    section.failed(f"{layout.name}: start", exc)
            for layout in layouts:
                if layout.outbox is None:
                    continue
                try:
                    _warm_up(layout)
                except Exception as exc:
                    section.failed(f"{layout.name}: warm-up", exc)
                    layout.outbox = None
            live = [lay for lay in layouts if lay.outbox is not None]
            by_name = {lay.name: lay for lay in live}
            say(
                "  latency: "
                + ", ".join(f"{lay.name} {lay.rate:.0f}/s for {lay.seconds:g}s" for lay in live)
            )
            for r, name in interleave(bench.rounds, list(by_name)):
                layout = by_name[name]
                run_name = f"{name}, round {r + 1}"
                try:
                    stats = _round(layout, section, run_name)
                except Exception as exc:
                    section.failed(run_name, exc)
                    continue
                if stats:
                    say(
                        f"    {run_name}: p50 {stats['p50']:.1f} ms, p99 {stats['p99']:.1f} ms, "
                        f"max {stats['max']:.1f} ms ({stats['achieved_rate']:.0f}/s)"
                    )
        finally:
            for layout in layouts:
                try:
                    problems += layout.close()
                except Exception as exc:
                    section.failed(f"{layout.name}: stop", exc)
    for problem in problems:
        section.check("worker stopped cleanly", False, problem)
    _summarise(section, layouts)
    return section


def _summarise(section: Section, layouts: list[_Layout]) -> None:
    dist: dict[str, Any] = {}
    for layout in layouts:
        lat = layout.latencies_ms
        if not lat:
            continue
        pooled = {q: percentile(lat, q) for q in (50, 90, 99)}
        dist[layout.name] = {
            "rate": layout.rate,
            "events": len(lat),
            "p50": pooled[50],
            "p90": pooled[90],
            "p99": pooled[99],
            "max": max(lat),
            "per_round": layout.per_round,
            "samples_ms": lat,
        }
        judged = layout.backend == "postgresql"
        p50, p99 = pooled[50], pooled[99]
        rounds_p50 = [r["p50"] for r in layout.per_round]
        rounds_p99 = [r["p99"] for r in layout.per_round]
        where = "in the worker's process" if layout.same_process else "in another process"
        section.targets.append(
            Target(
                f"commit -> handler start, publisher {where}, {layout.rate:.0f}/s, "
                f"{layout.backend}, {layout.transport}",
                f"p50 {p50:.1f} ms, p99 {p99:.1f} ms (max {max(lat):.0f} ms, {len(lat)} events)",
                f"rounds: p50 {min(rounds_p50):.1f}-{max(rounds_p50):.1f}, "
                f"p99 {min(rounds_p99):.1f}-{max(rounds_p99):.1f} ms",
                "",
                f"p50 <= {P50_TARGET_MS:.0f} ms, p99 <= {P99_TARGET_MS:.0f} ms"
                if judged
                else "report only",
                (p50 <= P50_TARGET_MS and p99 <= P99_TARGET_MS) if judged else None,
            )
        )
    section.extra["latency"] = dist
