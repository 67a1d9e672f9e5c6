"""Latency from a business transaction's commit to the start of the event's handler.

The publisher commits one event per transaction at a fixed rate and notes when each
commit returned (``time.time()``); the handler notes when it started, in the row it
inserts. Both clocks are this machine's wall clock.

Layouts (each worker started once, warmed up with one event, then fed in rounds):

- **same process** (500/s): ``Outbox.run_async`` on a thread of the benchmark
  process, which also publishes, so the publishing transaction's commit can wake the
  relay directly.
- **other process** (20, 200 and 1,000 events/s; one worker per rate):
  ``outboxer --app bench.app:outbox run`` in its own process; the benchmark process
  only publishes. That worker learns of new rows from whatever cross-process wake-up
  the engine has (PostgreSQL's LISTEN/NOTIFY; MariaDB and SQLite have none and poll).
  Targets: PostgreSQL p50 <= 5 ms and p99 <= 25 ms at every rate; MariaDB and SQLite
  p50 <= 15 ms and p99 <= 100 ms from 200/s (at 20/s they are reported only).
- **the database's floor** (reference, no target; PostgreSQL, every rate):
  ``bench/rawchain.py`` in a process of its own runs the worker's chain of statements
  (the claim, the handling mark, then the batch transaction's lock before the handler)
  on the raw driver, woken by the same notification, the events published by outboxer
  as in the other layouts: what the statements cost without outboxer's Python.
- **where it goes** (other process): the worker notes when the relay had each row in
  hand (the public ``message_sending`` report), which splits commit -> handler start
  into commit -> claimed (the wake-up and the claim) and claimed -> handler start.
- **the broker's floor** (reference, no target): confluent-kafka producing and
  consuming in this process with the client settings of outboxer's Kafka transport,
  no database: the part of the Kafka layouts' latency that is the broker's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url

from bench.core import (
    EVENT,
    ROOT,
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
from outboxer.database.dialects import dialect_for

P50_TARGET_MS = 5.0
P99_TARGET_MS = 25.0
POLLED_P50_TARGET_MS = 15.0
POLLED_P99_TARGET_MS = 100.0
"""Databases without notifications (MariaDB, SQLite), other process, from 200/s."""


def _stats(lat: list[float], sent: list[tuple[int, float]]) -> dict[str, float]:
    elapsed = sent[-1][1] - sent[0][1] if len(sent) > 1 else 0.0
    return {
        "events": float(len(lat)),
        "achieved_rate": (len(sent) - 1) / elapsed if elapsed > 0 else 0.0,
        "p50": percentile(lat, 50),
        "p90": percentile(lat, 90),
        "p99": percentile(lat, 99),
        "max": max(lat),
    }


@dataclass
class _Layout:
    """One layout: a worker, the outbox that publishes, and what was measured."""

    name: str
    backend: str
    transport: str
    same_process: bool
    rate: float
    seconds: float
    judged: bool = True
    """Whether a latency target applies."""
    p50_target: float = P50_TARGET_MS
    p99_target: float = P99_TARGET_MS
    outbox: Outbox | None = None
    engine: Engine | None = None
    effects: str = ""
    inproc: InProcessWorker | None = None
    proc: WorkerProcess | None = None
    latencies_ms: list[float] = field(default_factory=list)
    per_round: list[dict[str, float]] = field(default_factory=list)
    timeline: list[tuple[int, float, float]] = field(default_factory=list)
    """(outbox id, commit returned, handler started) of every event handled."""
    stages: dict[str, list[float]] = field(default_factory=dict)
    """Other process: commit -> claimed (the relay holds the row) and claimed -> handler
    start, ms, from the worker's ``message_sending`` reports (read at its exit)."""

    def start(self, bench: Bench, url: str) -> None:
        service = unique("l")
        self.effects = f"{service}_effects"
        prefix = unique("bench")
        broker = bench.kafka() if self.transport == "kafka" else None
        transport = broker.transport_url if broker is not None else "local"
        wake = wake_settings()
        self.outbox = outbox = Outbox(
            url, transport=transport, topic_prefix=prefix, settings=settings(**wake)
        )
        outbox.register_event(EVENT, service)
        outbox.migrate()
        self.engine = create_engine(url)
        effects_table(self.effects).create(self.engine)
        if self.same_process:
            effect_handler(outbox, self.effects)
            self.inproc = InProcessWorker(outbox).start()
        else:
            env = {f"OUTBOXER_{k.upper()}": "true" for k in wake}
            self.stages_path = bench.tmp / f"stages-{service}.json"
            self.proc = WorkerProcess(
                bench,
                url=url,
                service=service,
                effects=self.effects,
                transport=transport,
                topic_prefix=prefix,
                outboxer_env=env,
                bench_env={"BENCH_STAGES": str(self.stages_path)},
            ).start()

    def warm_up(self, timeout: float = 90.0) -> None:
        """Publish an event every 0.2 s until one is handled (a Kafka consumer has
        joined its group, a worker process is up)."""
        outbox, engine = self.outbox, self.engine
        assert outbox is not None
        assert engine is not None
        deadline = time.monotonic() + timeout
        ids: list[int] = []
        while time.monotonic() < deadline:
            if self.proc is not None and not self.proc.running:
                raise RuntimeError(f"worker exited: {self.proc.log_tail()}")
            ids.append(publish_one(outbox, engine, {"warm": True})[0])
            if wait_until(lambda: bool(wait_handled(engine, self.effects, ids, 0)), 0.2):
                return
        raise TimeoutError(f"{self.name}: no warm-up event handled within {timeout}s")

    def round(self, section: Section, run_name: str) -> dict[str, float] | None:
        assert self.outbox is not None
        assert self.engine is not None
        sent = publish_paced(self.outbox, self.engine, self.rate, self.seconds)
        ids = [oid for oid, _ in sent]
        found = wait_handled(self.engine, self.effects, ids, timeout=60.0)
        missing = [oid for oid in ids if oid not in found]
        twice = [oid for oid, (_, runs) in found.items() if runs > 1]
        section.check(
            f"{run_name}: every event handled once",
            not missing and not twice,
            f"{len(ids)} events: {len(missing)} missing, {len(twice)} handled twice",
        )
        lat = [(found[oid][0] - committed) * 1000 for oid, committed in sent if oid in found]
        self.timeline += [
            (oid, committed, found[oid][0]) for oid, committed in sent if oid in found
        ]
        if not lat:
            return None
        self.latencies_ms.extend(lat)
        self.per_round.append(_stats(lat, sent))
        return self.per_round[-1]

    def close(self) -> list[str]:
        problems: list[str] = []
        try:
            if self.inproc is not None:
                self.inproc.stop()
            if self.proc is not None:
                code = self.proc.stop()
                if code != 0:
                    problems.append(f"{self.name}: worker exited with {code}")
                self._read_stages()
        finally:
            if self.engine is not None:
                self.engine.dispose()
            if self.outbox is not None:
                self.outbox.close()
        return problems

    def _read_stages(self) -> None:
        try:
            claimed = {
                int(k): float(v) for k, v in json.loads(self.stages_path.read_text()).items()
            }
        except (OSError, ValueError):
            return
        pairs = [(claimed[oid], c, h) for oid, c, h in self.timeline if oid in claimed]
        self.stages = {
            "commit -> claimed": [(at - c) * 1000 for at, c, _ in pairs],
            "claimed -> handler": [(h - at) * 1000 for at, _, h in pairs],
        }


class _RawChain(_Layout):
    """The floor of the other-process PostgreSQL layouts: ``bench/rawchain.py`` runs
    the worker's chain of statements (claim, handling mark, lock + handler + consumed
    mark) on the raw driver in a process of its own, woken by the same notification;
    the events are published by outboxer as in every layout."""

    def start(self, bench: Bench, url: str) -> None:
        service = unique("r")
        self.effects = f"{service}_effects"
        self.outbox = outbox = Outbox(
            url,
            transport="local",
            topic_prefix=unique("bench"),
            settings=settings(**wake_settings()),
        )
        route = outbox.register_event(EVENT, service)
        outbox.migrate()
        self.engine = create_engine(url)
        effects_table(self.effects).create(self.engine)
        channel = dialect_for("postgresql").notify_channel(route.table_name)
        if channel is None:
            raise RuntimeError(f"no notification channel for {route.table_name}")
        conninfo = make_url(url).set(drivername="postgresql").render_as_string(False)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        self.log = bench.tmp / f"rawchain-{service}.log"
        with self.log.open("wb") as log:
            self.raw = subprocess.Popen(  # fixed argv, no shell
                [
                    sys.executable,
                    "-m",
                    "bench.rawchain",
                    conninfo,
                    route.table_name,
                    channel,
                    self.effects,
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def warm_up(self, timeout: float = 90.0) -> None:
        if self.raw.poll() is not None:
            raise RuntimeError(f"raw chain exited: {self.log.read_text()[-600:]}")
        super().warm_up(timeout)

    def close(self) -> list[str]:
        problems: list[str] = []
        try:
            if self.raw.poll() is None:
                self.raw.send_signal(signal.SIGTERM)
                try:
                    self.raw.wait(30)
                except subprocess.TimeoutExpired:
                    self.raw.kill()
                    self.raw.wait(10)
            if self.raw.returncode != 0:
                problems.append(f"{self.name}: exited with {self.raw.returncode}")
        finally:
            problems += super().close()
        return problems


class _BrokerFloor(_Layout):
    """The broker's own latency, for reference: confluent-kafka produces a timestamp
    and a consumer in this process receives it, with the producer and consumer
    settings of outboxer's Kafka transport, and no database."""

    def start(self, bench: Bench, url: str) -> None:
        from confluent_kafka import Consumer, Producer  # noqa: PLC0415 - optional

        broker = bench.kafka()
        assert broker is not None
        # An outbox only to read its transport's client settings (public attribute).
        self.outbox = outbox = Outbox(
            url, transport=broker.transport_url, topic_prefix=unique("bench"), settings=settings()
        )
        route = outbox.register_event(EVENT, unique("f"))
        transport = outbox.transport
        self.topic = route.topic
        from confluent_kafka import admin as kafka_admin  # noqa: PLC0415

        new_topic = kafka_admin.NewTopic  # type: ignore[attr-defined]  # not in __all__
        admin = kafka_admin.AdminClient({"bootstrap.servers": broker.bootstrap_servers})
        partitions = int(getattr(getattr(transport, "settings", None), "partitions", 3))
        topic = new_topic(self.topic, num_partitions=partitions, replication_factor=-1)
        admin.create_topics([topic])[self.topic].result(30)
        producer_config = getattr(transport, "producer_config", None)
        consumer_config = getattr(transport, "consumer_config", None)
        if not (callable(producer_config) and callable(consumer_config)):
            raise RuntimeError("the Kafka transport no longer offers its client settings")
        self.producer = Producer(producer_config())
        self.consumer = Consumer(consumer_config(route))
        self.consumer.subscribe([self.topic])
        self.received: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._consume, name="bench-floor", daemon=True)
        self._thread.start()
        self._next = 0

    def _consume(self) -> None:
        while not self._stop.is_set():
            msg = self.consumer.poll(0.1)
            if msg is None or msg.error() is not None:
                continue
            now = time.time()
            self.received.setdefault(int(msg.key() or b"0"), now)

    def _send(self) -> tuple[int, float]:
        self._next += 1
        n = self._next
        self.producer.produce(self.topic, key=str(n).encode(), value=b"x")
        self.producer.poll(0)
        return n, time.time()

    def warm_up(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            n, _ = self._send()
            self.producer.flush(5)
            if wait_until(lambda n=n: n in self.received, 0.5):  # type: ignore[misc]
                return
        raise TimeoutError(f"{self.name}: the consumer received nothing within {timeout}s")

    def round(self, section: Section, run_name: str) -> dict[str, float] | None:
        count = max(1, round(self.rate * self.seconds))
        sent: list[tuple[int, float]] = []
        start = time.perf_counter()
        for i in range(count):
            delay = start + i / self.rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent.append(self._send())
        self.producer.flush(30)
        wait_until(lambda: all(n in self.received for n, _ in sent), 30)
        missing = [n for n, _ in sent if n not in self.received]
        section.check(f"{run_name}: every message received", not missing, f"{len(missing)} missing")
        lat = [(self.received[n] - t) * 1000 for n, t in sent if n in self.received]
        if not lat:
            return None
        self.latencies_ms.extend(lat)
        self.per_round.append(_stats(lat, sent))
        return self.per_round[-1]

    def close(self) -> list[str]:
        self._stop.set()
        self._thread.join(10)
        self.consumer.close()
        self.producer.flush(10)
        if self.outbox is not None:
            self.outbox.close()
        return []


def _layouts(bench: Bench, section: Section) -> list[_Layout]:
    sizes = bench.sizes
    kafka = bench.kafka() is not None
    if not kafka:
        section.skip("Kafka layouts", bench.kafka_missing())
    fast, slow = (sizes.fast_rate, sizes.fast_seconds), (sizes.slow_rate, sizes.slow_seconds)
    out: list[_Layout] = []
    for transport in ("local", "kafka") if kafka else ("local",):
        name = f"same process, postgresql, {transport}"
        out.append(_Layout(name, "postgresql", transport, True, *fast))
    if kafka:
        name = "same process, no database: raw confluent-kafka (the broker's floor)"
        out.append(_BrokerFloor(name, "sqlite", "kafka", True, *fast, judged=False))
    for backend in sizes.cross_process_backends:
        for rate in sizes.cross_rates:
            # Fewer seconds at higher rates: 15 s at 20/s, 6.7 s at 200/s, 3.8 s at 1,000/s.
            seconds = sizes.slow_seconds * min(1.0, (sizes.slow_rate / rate) ** 0.35)
            name = f"other process, {backend}, local, {rate:g}/s"
            if backend == "postgresql":
                layout = _Layout(name, backend, "local", False, rate, seconds)
            else:
                layout = _Layout(
                    name,
                    backend,
                    "local",
                    False,
                    rate,
                    seconds,
                    judged=rate >= 200,
                    p50_target=POLLED_P50_TARGET_MS,
                    p99_target=POLLED_P99_TARGET_MS,
                )
            out.append(layout)
            if backend == "postgresql":
                name = f"other process, postgresql, raw driver chain (the floor), {rate:g}/s"
                out.append(_RawChain(name, backend, "raw", False, rate, seconds, judged=False))
    if sizes.cross_process_kafka and kafka:
        out.append(_Layout("other process, postgresql, kafka", "postgresql", "kafka", False, *slow))
    return out


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
                    layout.start(bench, urls[layout.backend])
                except Exception as exc:
                    section.failed(f"{layout.name}: start", exc)
            for layout in layouts:
                if layout.outbox is None:
                    continue
                try:
                    layout.warm_up()
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
                    stats = layout.round(section, run_name)
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
        judged = layout.judged
        p50, p99 = pooled[50], pooled[99]
        rounds_p50 = [r["p50"] for r in layout.per_round]
        rounds_p99 = [r["p99"] for r in layout.per_round]
        where = "in the worker's process" if layout.same_process else "in another process"
        if isinstance(layout, _BrokerFloor):
            measure = f"reference: Kafka produce -> consume, no database, {layout.rate:.0f}/s"
        elif isinstance(layout, _RawChain):
            measure = (
                f"floor: commit -> handler start, the worker's statements on the raw driver "
                f"in another process, {layout.rate:.0f}/s, postgresql"
            )
        else:
            measure = (
                f"commit -> handler start, publisher {where}, {layout.rate:.0f}/s, "
                f"{layout.backend}, {layout.transport}"
            )
        section.targets.append(
            Target(
                measure,
                f"p50 {p50:.1f} ms, p99 {p99:.1f} ms (max {max(lat):.0f} ms, {len(lat)} events)",
                f"rounds: p50 {min(rounds_p50):.1f}-{max(rounds_p50):.1f}, "
                f"p99 {min(rounds_p99):.1f}-{max(rounds_p99):.1f} ms",
                "",
                f"p50 <= {layout.p50_target:.0f} ms, p99 <= {layout.p99_target:.0f} ms"
                if judged
                else "report only",
                (p50 <= layout.p50_target and p99 <= layout.p99_target) if judged else None,
            )
        )
        if layout.stages:
            parts = [
                f"{stage} p50 {percentile(v, 50):.1f}, p99 {percentile(v, 99):.1f} ms"
                for stage, v in layout.stages.items()
                if v
            ]
            dist[layout.name]["stages_ms"] = {
                stage: {q: percentile(v, q) for q in (50, 90, 99)}
                for stage, v in layout.stages.items()
                if v
            }
            section.targets.append(
                Target(
                    f"where it goes: {measure}",
                    "; ".join(parts),
                    "claimed: the relay holds the row (wake-up and claim done); after it, "
                    "the hand-over (in process, or through the broker), the handling mark "
                    "and the batch transaction's lock",
                    "",
                    "report only",
                    None,
                )
            )
    section.extra["latency"] = dist
