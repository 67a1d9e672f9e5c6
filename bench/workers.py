"""Running outboxer under measurement, through its public API only.

- :class:`InProcessWorker`: ``Outbox.run_async`` on an event loop in a thread of the
  benchmark process (the publisher, when there is one, is then in the worker's
  process), with a :class:`Progress` observer that notes the moment a count is reached.
- :class:`WorkerProcess`: ``outboxer --app bench.app:outbox run`` in a process of its
  own, configured by environment variables, stopped with SIGTERM by its pid.
- :func:`publish_paced`: one event per business transaction at a fixed rate, noting
  when each transaction's commit returned.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, insert, select
from sqlalchemy.orm import Session

from bench.core import (
    BROKER_CONFIG,
    EVENT,
    KAFKA_SESSION_TIMEOUT_MS,
    ROOT,
    Bench,
    count_by_id,
    effects_table,
    wait_until,
)
from outboxer import Envelope, Outbox
from outboxer.hooks import Observer

# ---------------------------------------------------------------------------- in-process


@dataclass
class _Goal:
    what: str
    target: int
    done: threading.Event = field(default_factory=threading.Event)
    at: float = 0.0


class Progress(Observer):
    """Counts rows marked published and messages consumed, and notes (with
    ``time.perf_counter()``) the moment a goal is reached, so the benchmark waits
    without polling the database."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts = {"published": 0, "consumed": 0}
        self._goals: list[_Goal] = []
        self.send_seconds: list[float] = []
        """How long each batch took the transport to send (hand over) and acknowledge."""
        self.round_seconds: list[float] = []
        """How long each relay round that claimed rows took (claim, send, mark)."""

    def goal(self, what: str, target: int) -> _Goal:
        goal = _Goal(what, target)
        with self._lock:
            if self.counts[what] >= target:
                goal.at = time.perf_counter()
                goal.done.set()
            else:
                self._goals.append(goal)
        return goal

    def _bump(self, what: str, n: int) -> None:
        if not n:
            return
        now = time.perf_counter()
        with self._lock:
            self.counts[what] += n
            value = self.counts[what]
            for goal in [g for g in self._goals if g.what == what and value >= g.target]:
                goal.at = now
                goal.done.set()
                self._goals.remove(goal)

    def batch_sent(self, service: str, sent: int, published: int, seconds: float) -> None:
        self.send_seconds.append(seconds)
        self._bump("published", published)

    def relay_round(self, service: str, claimed: int, seconds: float) -> None:
        if claimed:
            self.round_seconds.append(seconds)

    def messages_consumed(self, service: str, count: int) -> None:
        self._bump("consumed", count)


class InProcessWorker:
    """``outbox.run_async()`` on its own event loop in a thread of this process."""

    def __init__(self, outbox: Outbox, *, relay: bool = True, consume: bool = True) -> None:
        self.outbox = outbox
        self.progress = Progress()
        outbox.add_observer(self.progress)
        self._relay, self._consume = relay, consume
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self, timeout: float = 60.0) -> InProcessWorker:
        self._thread = threading.Thread(target=self._main, name="bench-worker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"outboxer did not start within {timeout}s")
        if self.error is not None:
            raise RuntimeError(f"outboxer failed to start: {self.error!r}") from self.error
        return self

    def _main(self) -> None:
        try:
            asyncio.run(
                self.outbox.run_async(
                    relay=self._relay, consume=self._consume, ready=self._ready.set
                )
            )
        except BaseException as exc:
            self.error = exc
        finally:
            self._ready.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 60.0) -> None:
        self.outbox.stop()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError("outboxer did not stop in time")
        if self.error is not None:
            raise RuntimeError(f"outboxer ended with {self.error!r}") from self.error


def effect_handler(outbox: Outbox, effects_name: str, *, batch: bool = False) -> None:
    """Register the benchmark handler: one row in the effects table per event, with
    the moment the handler started (synchronous handler, as in the README). With
    ``batch`` it is a batch handler writing a batch's rows in one statement."""
    effects = effects_table(effects_name)
    pid = os.getpid()

    def record(event: Envelope, tx: Session) -> None:
        started = time.time()
        tx.execute(
            insert(effects).values(outbox_id=event.outbox_id, started_at=started, worker=pid)
        )

    def record_all(events: list[Envelope], tx: Session) -> None:
        started = time.time()
        tx.execute(
            insert(effects),
            [{"outbox_id": e.outbox_id, "started_at": started, "worker": pid} for e in events],
        )

    if batch:
        outbox.batch_handler(EVENT)(record_all)
    else:
        outbox.handler(EVENT)(record)


# ---------------------------------------------------------------------------- processes


def outboxer_command() -> list[str]:
    """``outboxer`` as installed next to this interpreter (the CLI users run)."""
    script = shutil.which("outboxer", path=str(Path(sys.executable).parent))
    if script is not None:
        return [script]
    return [sys.executable, "-c", "from outboxer.cli import main; main()"]


class WorkerProcess:
    """``outboxer --app bench.app:outbox run`` in a process of its own.

    ``bench/app.py`` builds the application from ``BENCH_*`` variables; outboxer
    settings come as ``OUTBOXER_*`` variables, as a deployment would set them. When the
    process exits it leaves its ``Outbox.stats`` counters in ``stats_path``.
    """

    def __init__(
        self,
        bench: Bench,
        *,
        url: str,
        service: str,
        effects: str,
        transport: str = "local",
        topic_prefix: str = "bench",
        outboxer_env: dict[str, str] | None = None,
        bench_env: dict[str, str] | None = None,
    ) -> None:
        self.tag = f"{service}-{len(list(bench.tmp.glob('worker-*.log')))}"
        self.log_path = bench.tmp / f"worker-{self.tag}.log"
        self.stats_path = bench.tmp / f"stats-{self.tag}.json"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOXER_", "BENCH_"))}
        paths = [str(ROOT), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
        env.update(
            {
                "PYTHONPATH": os.pathsep.join(paths),
                "BENCH_URL": url,
                "BENCH_SERVICE": service,
                "BENCH_EFFECTS": effects,
                "BENCH_STATS": str(self.stats_path),
                "OUTBOXER_TRANSPORT": transport,
                "OUTBOXER_TOPIC_PREFIX": topic_prefix,
                "OUTBOXER_KAFKA__SESSION_TIMEOUT_MS": str(KAFKA_SESSION_TIMEOUT_MS),
                "OUTBOXER_KAFKA__CONFIG": json.dumps(BROKER_CONFIG),
                **(outboxer_env or {}),
                **(bench_env or {}),
            }
        )
        self._env = env
        self.process: subprocess.Popen[bytes] | None = None
        self._terminated = False

    def start(self) -> WorkerProcess:
        argv = [
            *outboxer_command(),
            "--app",
            "bench.app:outbox",
            "run",
            "--log-level",
            "WARNING",
            "--log-format",
            "plain",
        ]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(  # fixed argv, no shell
                argv,
                cwd=ROOT,
                env=self._env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def status_kb(self, field_name: str) -> int | None:
        """A ``/proc/<pid>/status`` memory field in kB (``VmRSS``, ``VmHWM``)."""
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
        return None

    def terminate(self) -> None:
        """SIGTERM, once: a second one would kill the process before it stopped."""
        if self.process is not None and not self._terminated and self.process.poll() is None:
            self._terminated = True
            os.kill(self.process.pid, signal.SIGTERM)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (outboxer stops cleanly), SIGKILL after ``timeout``; the exit code."""
        proc = self.process
        if proc is None:
            return 0
        if proc.poll() is None:
            self.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        return int(proc.returncode)

    def stats(self) -> dict[str, int]:
        """The process's ``Outbox.stats`` totals, written when it exited."""
        try:
            return {k: int(v) for k, v in json.loads(self.stats_path.read_text()).items()}
        except (OSError, ValueError):
            return {}


def stop_all(workers: Sequence[WorkerProcess]) -> list[str]:
    """Stop every worker (SIGTERM to all first, so they stop in parallel); the
    problems met, as text."""
    problems: list[str] = []
    for w in workers:
        w.terminate()
    for w in workers:
        code = w.stop()
        if code != 0:
            problems.append(f"worker {w.pid} exited with {code}: {w.log_tail(600)}")
    return problems


# ---------------------------------------------------------------------------- publishing


def publish_one(outbox: Outbox, engine: Engine, payload: dict[str, Any]) -> tuple[int, float]:
    """One business transaction that publishes one event; ``(outbox id, time.time()
    when the commit returned)``."""
    with engine.begin() as conn:
        oid = outbox.publish(conn, EVENT, payload)
    return oid, time.time()


def publish_paced(
    outbox: Outbox,
    engine: Engine,
    rate: float,
    seconds: float,
    stop: Callable[[], bool] = lambda: False,
) -> list[tuple[int, float]]:
    """Publish ``rate`` events a second for ``seconds``, one per transaction, on a
    fixed schedule (a late transaction does not shift the ones after it)."""
    count = max(1, round(rate * seconds))
    out: list[tuple[int, float]] = []
    start = time.perf_counter()
    for i in range(count):
        if stop():
            break
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        out.append(publish_one(outbox, engine, {"n": i}))
    return out


def wait_handled(
    engine: Engine, effects_name: str, ids: Sequence[int], timeout: float
) -> dict[int, tuple[float, int]]:
    """Wait until every id in ``ids`` has an effect (or ``timeout``); the effects of
    those ids: ``{outbox id: (handler start, runs)}``."""
    effects = effects_table(effects_name)
    lo, hi = min(ids) - 1, max(ids)

    def complete() -> bool:
        with engine.connect() as conn:
            return len(count_by_id(conn, effects, lo, hi)) >= len(set(ids))

    wait_until(complete, timeout, interval=0.1)
    c = effects.c
    found: dict[int, tuple[float, int]] = {}
    with engine.connect() as conn:
        rows = conn.execute(
            select(c.outbox_id, c.started_at).where(c.outbox_id > lo, c.outbox_id <= hi)
        )
        for oid, started in rows:
            first, runs = found.get(int(oid), (float(started), 0))
            found[int(oid)] = (min(first, float(started)), runs + 1)
    return found
