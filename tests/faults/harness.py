"""The fault-scenario harness: real worker processes, a steady publisher, fault
injectors and one audit.

A scenario writes a small application module (:data:`APP_SOURCE`, configured only
by ``OUTBOXER_*`` variables) into its own directory, migrates it with the CLI, and
starts workers as ``python -m outboxer.cli --app faults_app:outbox run`` processes
(all loops, ``--relay-only`` or ``--consume-only``). A publisher thread commits
business transactions (one business row and its event) at a steady rate while the
scenario injects faults: SIGKILL of workers, a broker replaced or down, a database
restarted, its backends killed, consumers joining and leaving, and network faults
through the fault proxy of tests/faults/proxy.py (``worker_url``: the workers and the
publisher reach the database through it, the audit does not). Then it waits,
bounded, until every committed event is settled, stops the workers and audits:

- every outbox row is ``consumed``, or ``dead`` with a ``last_error``;
- effect rows (written by the handlers in their transaction, no unique key) match
  the consumed rows one to one: none missing, none applied twice, none for a row
  that is not consumed;
- every event whose commit the publisher saw has its row, and every row its
  business row (publish is atomic with the business write).

Sizes come from ``OUTBOXER_FAULTS`` (``ci``, the default, or ``full`` for
``make chaos``). No check depends on a sub-second wall-clock gap: every wait is for
a condition, with a generous bound.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, func, select, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import NullPool

from outboxer import Outbox, OutboxSettings
from outboxer.testing import free_port

SIZE = os.environ.get("OUTBOXER_FAULTS", "ci").strip().lower() or "ci"
if SIZE not in ("ci", "full"):
    raise RuntimeError(f"OUTBOXER_FAULTS must be 'ci' or 'full', not {SIZE!r}")
FULL = SIZE == "full"

RESULTS_FILE = Path(__file__).with_name("RESULTS.md")
"""Where ``make chaos`` (full size) writes the figures of its run."""

SERVICES = {"billing": "billing.charged", "shipping": "shipping.requested"}
"""The app's two services and their event types (billing: async handler,
shipping: sync handler)."""

APP_MODULE = "faults_app"
APP_SOURCE = '''\
"""The application of the fault scenarios: everything comes from OUTBOXER_*."""

import os

from sqlalchemy import text

from outboxer import Outbox

outbox = Outbox()
outbox.register_event("billing.charged", "billing")
outbox.register_event("shipping.requested", "shipping")
EFFECT = text("INSERT INTO fault_effects (outbox_id, service, worker) VALUES (:id, :svc, :pid)")
# Events whose handler kills the process (what a segfault in a C extension or the
# OOM killer does: no exception, no cleanup, the transaction dies with the process).
POISON = {int(n) for n in os.environ.get("FAULTS_POISON", "").split(",") if n.strip()}


def poisoned(event):
    if event.payload.get("n") in POISON:
        os._exit(70)


@outbox.handler("billing.charged")
async def charge(event, tx):
    await tx.execute(EFFECT, {"id": event.outbox_id, "svc": "billing", "pid": os.getpid()})
    poisoned(event)


@outbox.handler("shipping.requested")
def ship(event, tx):
    tx.execute(EFFECT, {"id": event.outbox_id, "svc": "shipping", "pid": os.getpid()})
    poisoned(event)
'''

APP_SETTINGS = {
    # Short leases and retry units keep the drains after a fault short.
    "OUTBOXER_LEASE": "5",
    "OUTBOXER_RETRY_UNIT": "0.05",
    "OUTBOXER_POLL_INTERVAL": "0.2",
    "OUTBOXER_ERROR_DELAY": "0.5",
    "OUTBOXER_ERROR_DELAY_MAX": "5",
    "OUTBOXER_SHUTDOWN_TIMEOUT": "15",
    # A replaced memory-only broker loses what it acknowledged: sent again after this.
    "OUTBOXER_REDELIVER_AFTER": "20",
    "OUTBOXER_KAFKA__SESSION_TIMEOUT_MS": "6000",
}

MODES = {"both": [], "relay": ["--relay-only"], "consume": ["--consume-only"]}

LOG_EVENTS = {
    "relay outages": re.compile(r"outage: the transport is unusable"),
    "Kafka producers rebuilt": re.compile(r"rebuilding the Kafka producer"),
    "Kafka consumers rebuilt": re.compile(r"rebuilding the Kafka consumer"),
    "RabbitMQ producers rebuilt": re.compile(r"rebuilding the RabbitMQ producer"),
    "RabbitMQ consumers rebuilt": re.compile(r"rebuilding the RabbitMQ consumer"),
    "NATS connections rebuilt": re.compile(r"rebuilding the NATS (?:connection|subscription)"),
    "Redis clients rebuilt (relay)": re.compile(r"rebuilding the Redis client"),
    "Redis consumer outages": re.compile(r"Redis unreachable for the consumer"),
    "Redis lane leases lost": re.compile(r"lost the lease of Redis lane"),
    "rows sent again after redeliver_after": re.compile(
        r"(\d+) published message\(s\) not consumed within"
    ),
    "messages held after a broker-side failure (no attempt)": re.compile(
        r"(\d+) message\(s\) not acknowledged for a broker-side reason"
    ),
    "messages failed for retry by the broker (attempt)": re.compile(
        r"(\d+) message\(s\) not acknowledged by the broker; will retry"
    ),
    "relay rounds failed": re.compile(r"relay round failed"),
    "consumer batches failed": re.compile(r"consumer batch failed"),
    "messages whose own transaction failed": re.compile(r"breaks its own transaction"),
    "handler calls failed": re.compile(r"handler failed for outbox id"),
    "in-process handoffs failed (messages)": re.compile(r"in-process handoff of (\d+) message"),
    "offset commits failed": re.compile(r"offset commit failed"),
    "database calls cut by the watchdog": re.compile(r"without an answer for \d+s"),
    "relay marks made again after a lost connection": re.compile(
        r"lost while marking \d+ row\(s\) published"
    ),
    "messages tried again after a lost connection (no attempt)": re.compile(
        r"ConnectionLostError: the database connection was lost while handling"
    ),
}
"""Log lines of the workers counted into a scenario's figures (``Figures.engine``)."""

_META = MetaData()
EFFECTS = Table(
    "fault_effects",
    _META,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("outbox_id", Integer, nullable=False),
    Column("service", String(32), nullable=False),
    Column("worker", Integer, nullable=False),
)
ORDERS = Table(
    "fault_orders",
    _META,
    Column("n", Integer, primary_key=True, autoincrement=False),
    Column("service", String(32), nullable=False),
)


def stop_process(proc: subprocess.Popen[bytes], *, grace: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; always reaped."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait(timeout=30)


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, *, every: float = 0.5
) -> float:
    """Poll ``condition`` until it holds; the seconds it took. AssertionError after
    ``timeout``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout:.0f}s")
        time.sleep(every)
    return time.monotonic() - start


def tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# ------------------------------------------------------------------ workers


@dataclass
class Worker:
    """One ``outboxer run`` process."""

    mode: str
    number: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


class Workers:
    """The scenario's worker processes: started, killed, stopped, all by pid."""

    def __init__(self, directory: Path, env: dict[str, str], app: str = APP_MODULE) -> None:
        self.directory = directory
        self.env = env
        self.app = app
        """The module (in ``directory``) whose ``outbox`` the workers run."""
        self.all: list[Worker] = []
        self._count = 0

    @property
    def running(self) -> list[Worker]:
        return [w for w in self.all if w.alive]

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "outboxer.cli", "--app", f"{self.app}:outbox", *args]

    def start(self, mode: str) -> Worker:
        self._count += 1
        log = self.directory / f"worker-{self._count:02d}-{mode}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                self.command("run", "--log-format", "plain", *MODES[mode]),
                cwd=self.directory,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        worker = Worker(mode, self._count, proc, log)
        self.all.append(worker)
        return worker

    def kill(self, worker: Worker) -> None:
        os.kill(worker.pid, signal.SIGKILL)
        worker.process.wait(timeout=30)

    def terminate(self, worker: Worker) -> int:
        stop_process(worker.process)
        return int(worker.process.returncode)

    def stop_all(self) -> None:
        """Stop every running worker: SIGTERM to all, then each is waited for and
        SIGKILLed if it has not exited (every one, even if another step raised)."""
        running = self.running
        for w in running:
            w.process.send_signal(signal.SIGTERM)
        with ExitStack() as stack:
            for w in running:
                stack.callback(stop_process, w.process)

    def log_counts(self) -> Counter[str]:
        """What the workers' logs say the engine did about the faults."""
        counts: Counter[str] = Counter()
        for w in self.all:
            with w.log.open(errors="replace") as lines:
                for line in lines:
                    for what, pattern in LOG_EVENTS.items():
                        found = pattern.search(line)
                        if found:
                            counts[what] += int(found.group(1)) if pattern.groups else 1
        return counts

    def logs(self, lines: int = 25) -> str:
        return "\n".join(
            f"--- worker {w.number} ({w.mode}):\n{tail(w.log, lines)}" for w in self.all
        )


class Supervisor(threading.Thread):
    """Starts a worker again whenever one exits, as systemd or Kubernetes would
    (``restarts`` counts them); stopped before the workers are."""

    def __init__(self, workers: Workers) -> None:
        super().__init__(name="fault-supervisor", daemon=True)
        self.workers = workers
        self.restarts = 0
        self.exit_codes: Counter[int] = Counter()
        self._seen: set[int] = set()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.2):
            for worker in list(self.workers.all):
                if worker.alive or worker.number in self._seen:
                    continue
                self._seen.add(worker.number)
                self.exit_codes[int(worker.process.returncode)] += 1
                self.workers.start(worker.mode)
                self.restarts += 1

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(30)


# ------------------------------------------------------------------ publisher


class Publisher(threading.Thread):
    """Commits ``total`` events at ``rate`` per second, ``per_tx`` per business
    transaction (a business row and its event each). A transaction that fails is
    retried with new numbers; one whose COMMIT failed may or may not have committed
    (``uncertain``), which the audit allows either way."""

    def __init__(
        self, url: str, total: int, rate: float, *, per_tx: int = 10, **settings: Any
    ) -> None:
        super().__init__(name="fault-publisher", daemon=True)
        self.outbox = Outbox(url, settings=OutboxSettings.from_values(**settings))
        for service, event_type in SERVICES.items():
            self.outbox.register_event(event_type, service)
        self.total = total
        self.rate = rate
        self.per_tx = per_tx
        self.confirmed: list[int] = []
        self.uncertain: list[int] = []
        self.failures = 0
        self.error: BaseException | None = None
        self.finished_at: float | None = None
        self.planned_end = time.monotonic() + total / rate
        self._halt = threading.Event()
        self._next = 0

    @property
    def done(self) -> bool:
        return self.finished_at is not None

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        try:
            self._publish()
        except BaseException as exc:
            self.error = exc
        finally:
            self.finished_at = time.monotonic()

    def _publish(self) -> None:
        engine = self.outbox.db.sync_engine
        start = time.monotonic()
        self.planned_end = start + self.total / self.rate
        while len(self.confirmed) < self.total and not self._halt.is_set():
            due = start + len(self.confirmed) / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                self._halt.wait(delay)
            count = min(self.per_tx, self.total - len(self.confirmed))
            numbers = list(range(self._next, self._next + count))
            self._next += count
            state = self._transaction(engine, numbers)
            if state == "committed":
                self.confirmed.extend(numbers)
            else:
                if state == "uncertain":
                    self.uncertain.extend(numbers)
                self.failures += 1
                self._halt.wait(0.5)  # the database is in trouble: a moment before again

    def _transaction(self, engine: Engine, numbers: list[int]) -> str:
        services = list(SERVICES)
        try:
            conn = engine.connect()
        except Exception:
            return "failed"
        try:
            tx = conn.begin()
            try:
                for n in numbers:
                    service = services[n % len(services)]
                    conn.execute(ORDERS.insert().values(n=n, service=service))
                    self.outbox.publish(conn, SERVICES[service], {"n": n}, key=f"k{n % 64}")
            except Exception:
                return "failed"
            try:
                tx.commit()
            except Exception:
                return "uncertain"
            return "committed"
        finally:
            try:
                conn.close()
            except Exception:  # a connection the server killed
                conn.invalidate()

    def close(self) -> None:
        self.outbox.close()


# ------------------------------------------------------------------ a private PostgreSQL


PG_BIN = Path(os.environ.get("OUTBOXER_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


class PrivatePostgres:
    """A PostgreSQL cluster of its own (initdb in a temporary directory, a free
    loopback port, no Unix socket), so a test can restart it without disturbing
    anyone else. As root, initdb and postgres run as the ``postgres`` user."""

    def __init__(self, bin_dir: Path = PG_BIN) -> None:
        self.bin_dir = bin_dir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="outboxer-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._user: dict[str, Any] = {}
        if os.geteuid() == 0:
            self._user = {"user": "postgres", "group": "postgres", "extra_groups": []}
            shutil.chown(self.root, "postgres", "postgres")

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> PrivatePostgres:
        subprocess.run(
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            cwd=self.root,
            **self._user,
        )
        self._spawn()
        return self

    def _spawn(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    str(self.bin_dir / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "unix_socket_directories=",
                    "-c",
                    "max_connections=200",
                    "-c",
                    "fsync=off",  # a scratch cluster; a crash of postgres still recovers
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                **self._user,
            )
        engine = create_engine(self.admin_url, poolclass=NullPool)

        def accepting() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"postgres exited: {tail(self.log)}")
            try:
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
                return True
            except Exception:
                return False

        try:
            wait_for(accepting, 60, "the private PostgreSQL accepting connections")
        finally:
            engine.dispose()

    def stop(self, mode: str = "fast") -> None:
        """Shut down: ``fast`` (SIGINT) or ``immediate`` (SIGQUIT, a crash: recovery
        at the next start); SIGKILL if it has not exited within 60 s."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGQUIT if mode == "immediate" else signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)

    def restart(self, mode: str, down_for: float) -> None:
        self.stop(mode)
        time.sleep(down_for)
        self._spawn()
        self.restarts += 1

    def terminate_backends(self, database: str) -> int:
        """``pg_terminate_backend`` for every other connection to ``database``."""
        engine = create_engine(self.admin_url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                return int(
                    conn.execute(
                        text(
                            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE datname = :db AND pid <> pg_backend_pid()"
                        ),
                        {"db": database},
                    ).scalar_one()
                )
        finally:
            engine.dispose()

    def close(self) -> None:
        proc, self.process = self.process, None
        if proc is not None:
            stop_process(proc, grace=60)  # SIGTERM: a smart shutdown, nobody is left
        shutil.rmtree(self.root, ignore_errors=True)


def kill_mariadb_connections(admin_url: str, database: str) -> int:
    """``KILL CONNECTION`` for every other connection using ``database``."""
    engine = create_engine(admin_url, poolclass=NullPool)
    killed = 0
    try:
        with engine.connect() as conn:
            ids = conn.execute(
                text(
                    "SELECT id FROM information_schema.processlist "
                    "WHERE db = :db AND id <> CONNECTION_ID()"
                ),
                {"db": database},
            ).scalars()
            for cid in list(ids):
                try:
                    conn.execute(text(f"KILL CONNECTION {int(cid)}"))
                    killed += 1
                except Exception:  # ended on its own meanwhile
                    continue
    finally:
        engine.dispose()
    return killed


# ------------------------------------------------------------------ figures


@dataclass
class Figures:
    """What one scenario did and what the audit found."""

    scenario: str
    setup: str
    workers: str
    events: int = 0
    rows: int = 0
    uncertain_commits: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    connections_cut: Counter[str] = field(default_factory=Counter)
    consumed: int = 0
    dead: int = 0
    dead_without_reason: int = 0
    unsettled: int = 0
    missing_rows: int = 0
    missing_effects: int = 0
    applied_twice: int = 0
    effects_of_unconsumed: int = 0
    atomicity_breaks: int = 0
    max_retry_count: int = 0
    rows_with_retries: int = 0
    publish_seconds: float = 0.0
    total_seconds: float = 0.0
    drain_after_last_fault: float | None = None
    drain_after_last_publish: float | None = None
    engine: Counter[str] = field(default_factory=Counter)
    """What the workers logged about the faults (see ``LOG_EVENTS``)."""
    notes: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        """Committed events without their effect: rows missing, rows never settled,
        consumed rows without an effect."""
        return self.missing_rows + self.unsettled + self.missing_effects

    def engine_text(self) -> str:
        return ", ".join(f"{n} {what}" for what, n in self.engine.items() if n) or "nothing"

    def faults_text(self) -> str:
        parts = []
        for kind, n in sorted(self.faults.items()):
            cut = self.connections_cut[kind]
            parts.append(f"{n} {kind}" + (f" ({cut} connections)" if cut else ""))
        return ", ".join(parts) or "none"

    def summary(self) -> str:
        drain = (
            "-" if self.drain_after_last_fault is None else f"{self.drain_after_last_fault:.1f}s"
        )
        return (
            f"{self.scenario} [{self.setup}; {self.workers}]: {self.events} events "
            f"({self.rows} rows, {self.uncertain_commits} in uncertain commits), faults: "
            f"{self.faults_text()}; consumed {self.consumed}, dead {self.dead}, lost {self.lost}, "
            f"applied twice {self.applied_twice}, effects of unconsumed rows "
            f"{self.effects_of_unconsumed}, atomicity breaks {self.atomicity_breaks}, max "
            f"retry_count {self.max_retry_count}; publishing {self.publish_seconds:.0f}s, total "
            f"{self.total_seconds:.0f}s, drained {drain} after the last fault; workers logged: "
            f"{self.engine_text()}"
        )


RESULTS: list[Figures] = []
"""Every scenario's figures in this session (written out by tests/faults/conftest.py)."""


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def results_markdown(results: list[Figures], size: str) -> str:
    machine = f"{os.cpu_count()} cores"
    lines = [
        "# Fault suite results",
        "",
        f"Written by `make chaos` (`OUTBOXER_FAULTS={size}`) at the end of its last run, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, on a machine with {machine}.",
        "Each scenario runs real worker processes (`outboxer run`), a publisher committing "
        "business transactions at a steady rate, and the faults listed; then the audit of "
        "tests/faults/harness.py. *Lost*: committed events without their one effect "
        "(row missing, never settled, or consumed without effect). *Applied twice*: "
        "outbox ids with two or more effect rows. *Drain*: seconds from the end of the "
        "last fault (worker replaced, broker or database back) until every committed "
        "event was consumed or dead.",
        "",
        "| scenario | database, transport | workers | events | faults | lost | applied twice "
        "| dead | max retry_count | drained after last fault | after publishing ended "
        "| total |",
        "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for f in results:
        lines.append(
            f"| {f.scenario} | {f.setup} | {f.workers} | {f.events:,} | {f.faults_text()} "
            f"| {f.lost} | {f.applied_twice} | {f.dead} | {f.max_retry_count} "
            f"| {_seconds(f.drain_after_last_fault)} | {_seconds(f.drain_after_last_publish)} "
            f"| {f.total_seconds:.0f} s |"
        )
    lines += ["", "What the workers logged about the faults:", ""]
    lines += [f"- {f.scenario} ({f.setup}): {f.engine_text()}" for f in results]
    notes = [f"- {f.scenario}: {note}" for f in results for note in f.notes]
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ the scenario


class Scenario:
    """One run: an app directory, its database and transport, workers, a publisher,
    the faults injected (with the time the last one ended) and the audit."""

    def __init__(
        self,
        name: str,
        directory: Path,
        url: str,
        transport: str,
        *,
        setup: str,
        settings: dict[str, str] | None = None,
        seed: int = 6,
        worker_url: str | None = None,
    ) -> None:
        self.name = name
        self.directory = directory
        self.url = url
        self.worker_url = worker_url or url
        """The URL of the workers and the publisher (a fault proxy's, say); the audit
        reads the database at ``url``."""
        self.transport = transport
        self.prefix = f"f{os.getpid()}{random.randrange(10**6)}"
        self.rng = random.Random(seed)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{APP_MODULE}.py").write_text(APP_SOURCE)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOXER_")}
        env.update(APP_SETTINGS)
        env.update(settings or {})
        env.update(
            {
                "OUTBOXER_URL": self.worker_url,
                "OUTBOXER_TRANSPORT": transport,
                "OUTBOXER_TOPIC_PREFIX": self.prefix,
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.env = env
        self.workers = Workers(directory, env)
        self.supervisor: Supervisor | None = None
        self.publisher: Publisher | None = None
        self.figures = Figures(name, setup, "")
        self.started = time.monotonic()
        self.last_fault_end: float | None = None
        self.outbox = Outbox(url, settings=OutboxSettings.from_values(topic_prefix=self.prefix))
        for service, event_type in SERVICES.items():
            self.outbox.register_event(event_type, service)
        self._engine = self.outbox.db.sync_engine

    # -------------------------------------------------------------- set-up

    def migrate(self) -> None:
        """The business and effect tables, then the outbox tables with the CLI."""
        with self._engine.begin() as conn:
            _META.create_all(conn)
        result = subprocess.run(
            self.workers.command("migrate"),
            cwd=self.directory,
            env=self.env,
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr.decode(errors="replace")

    def start_workers(self, modes: list[str]) -> None:
        for mode in modes:
            self.workers.start(mode)
        self.figures.workers = " + ".join(
            f"{n} {m}" for m, n in sorted(Counter(modes).items(), key=lambda kv: kv[0])
        )

    def supervise(self) -> Supervisor:
        """From now on, a worker that exits is started again (its restarts are
        counted in the figures as faults)."""
        self.supervisor = Supervisor(self.workers)
        self.supervisor.start()
        return self.supervisor

    def publish(self, total: int, rate: float, **settings: Any) -> Publisher:
        """Start the publisher (``settings`` of its outbox, e.g. ``max_retry`` of
        the rows it writes)."""
        self.publisher = Publisher(self.worker_url, total, rate, **settings)
        self.publisher.start()
        return self.publisher

    # -------------------------------------------------------------- progress

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def counts(self) -> Counter[str]:
        totals: Counter[str] = Counter()
        with self._engine.connect() as conn:
            for service in SERVICES:
                table = self.outbox.table_for(service)
                for status, n in conn.execute(
                    select(table.c.status, func.count()).group_by(table.c.status)
                ):
                    totals[str(status)] += int(n)
        return totals

    def consumed(self) -> int:
        return self.counts()["consumed"]

    def healthy(self) -> None:
        """Fail at once if the publisher broke (not if it only met a fault)."""
        pub = self.publisher
        if pub is not None and pub.error is not None:
            raise AssertionError(f"the publisher failed: {pub.error!r}") from pub.error

    def pause(self, seconds: float) -> None:
        """Wait ``seconds`` (spacing between faults), watching the publisher."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.healthy()
            time.sleep(min(0.5, max(0.0, end - time.monotonic())))

    def wait_until_working(self, consumed: int = 50, timeout: float = 120) -> None:
        """Until the workers have consumed something (they are up and joined)."""
        self._wait(lambda: self.consumed() >= consumed, timeout, "first events consumed")

    def fault_times(self, count: int, *, lasting: float = 0.0) -> Iterator[int]:
        """Once the workers consume, wait for each of ``count`` moments spread evenly
        over what is left of the planned publishing time (faults that last
        ``lasting`` seconds included), and yield its number."""
        pub = self.publisher
        assert pub is not None
        self.wait_until_working()
        left = max(pub.planned_end - time.monotonic(), 0.0)
        gap = max((left - count * lasting) / (count + 1), 2.0)
        start = time.monotonic()
        for i in range(count):
            self.pause(start + (i + 1) * gap + i * lasting - time.monotonic())
            yield i

    def effects_of(self, worker: Worker) -> Counter[str]:
        """Effect rows ``worker`` applied, per service."""
        query = (
            select(EFFECTS.c.service, func.count())
            .where(EFFECTS.c.worker == worker.pid)
            .group_by(EFFECTS.c.service)
        )
        with self._engine.connect() as conn:
            return Counter({str(svc): int(n) for svc, n in conn.execute(query)})

    def wait_until_consuming(self, worker: Worker, timeout: float = 120) -> float:
        """Until ``worker`` has applied effects of every service: it has partitions of
        every consumer group, so the rebalance its join started is complete."""

        def consuming() -> bool:
            return set(self.effects_of(worker)) == set(SERVICES)

        return self._wait(consuming, timeout, f"worker {worker.number} consuming every service")

    def _wait(self, condition: Callable[[], bool], timeout: float, what: str) -> float:
        def check() -> bool:
            self.healthy()
            return condition()

        try:
            return wait_for(check, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.workers.logs()}") from None

    # -------------------------------------------------------------- faults

    def fault(self, kind: str, connections: int = 0) -> None:
        """Count a fault of ``kind`` that has just ended (``connections``: how many
        database connections it cut)."""
        self.figures.faults[kind] += 1
        self.figures.connections_cut[kind] += connections
        self.last_fault_end = time.monotonic()

    def kill_worker(self, modes: tuple[str, ...] = ("both", "relay", "consume")) -> Worker:
        """SIGKILL a running worker (chosen at random) and start its replacement."""
        victims = [w for w in self.workers.running if w.mode in modes]
        victim = self.rng.choice(victims)
        self.workers.kill(victim)
        self.workers.start(victim.mode)
        self.fault(f"SIGKILL {victim.mode}" if victim.mode != "both" else "SIGKILL worker")
        return victim

    # -------------------------------------------------------------- drain and audit

    def drained(self) -> bool:
        pub = self.publisher
        if pub is None or not pub.done:
            return False
        counts = self.counts()
        return counts["pending"] == 0 and counts["published"] == 0

    def finish(self, timeout: float) -> Figures:
        """Wait until every committed event is settled (or ``timeout`` after the
        publisher finished), stop the workers, audit."""
        self._wait(lambda: self.publisher is not None and self.publisher.done, 3600, "publishing")
        pub = self.publisher
        assert pub is not None
        assert pub.finished_at is not None
        self.figures.publish_seconds = pub.finished_at - self.started
        try:
            wait_for(self.drained, timeout, "drained")
            drained_at = time.monotonic()
            self.figures.drain_after_last_publish = drained_at - pub.finished_at
            if self.last_fault_end is not None:
                self.figures.drain_after_last_fault = drained_at - self.last_fault_end
        except AssertionError:
            self.figures.notes.append(f"not drained within {timeout:.0f}s")
        if self.supervisor is not None:
            self.supervisor.stop()
            if self.supervisor.restarts:
                self.figures.faults["worker died, restarted"] += self.supervisor.restarts
        self.figures.total_seconds = time.monotonic() - self.started
        self.audit()
        self.figures.engine = self.workers.log_counts()
        return self.figures

    def audit(self) -> None:
        f = self.figures
        pub = self.publisher
        assert pub is not None
        confirmed = set(pub.confirmed)
        f.events = len(confirmed)
        f.uncertain_commits = len(pub.uncertain)
        numbers_in_rows: set[int] = set()
        with self._engine.connect() as conn:
            effects: Counter[tuple[str, int]] = Counter()
            for service, oid, n in conn.execute(
                select(EFFECTS.c.service, EFFECTS.c.outbox_id, func.count()).group_by(
                    EFFECTS.c.service, EFFECTS.c.outbox_id
                )
            ):
                effects[(str(service), int(oid))] = int(n)
            orders = {int(n) for n in conn.execute(select(ORDERS.c.n)).scalars()}
            for service in SERVICES:
                table = self.outbox.table_for(service)
                query = select(
                    table.c.id,
                    table.c.status,
                    table.c.retry_count,
                    table.c.last_error,
                    table.c.payload,
                )
                for oid, status, retries, last_error, payload in conn.execute(query):
                    f.rows += 1
                    numbers_in_rows.add(int(json.loads(payload)["payload"]["n"]))
                    applied = effects.pop((service, int(oid)), 0)
                    f.max_retry_count = max(f.max_retry_count, int(retries))
                    f.rows_with_retries += int(retries) > 0
                    if applied > 1:
                        f.applied_twice += 1
                    if status == "consumed":
                        f.consumed += 1
                        f.missing_effects += applied == 0
                    else:
                        f.effects_of_unconsumed += applied > 0
                        if status == "dead":
                            f.dead += 1
                            f.dead_without_reason += not last_error
                        else:
                            f.unsettled += 1
        f.effects_of_unconsumed += len(effects)  # effects of ids that have no row at all
        f.missing_rows = len(confirmed - numbers_in_rows)
        f.atomicity_breaks = len(numbers_in_rows ^ orders)

    def check(self, *, broker_fault: bool = False) -> None:
        """The audit's verdict; for broker faults also: no attempt spent, nothing dead."""
        f = self.figures
        report = f"{f.summary()}\n{self.workers.logs()}"
        assert f.events == (self.publisher.total if self.publisher else 0), report
        assert f.lost == 0, report
        assert f.applied_twice == 0, report
        assert f.effects_of_unconsumed == 0, report
        assert f.dead_without_reason == 0, report
        assert f.atomicity_breaks == 0, report
        if broker_fault:
            assert f.dead == 0, report
            assert f.max_retry_count == 0, report

    def close(self) -> None:
        """Stop the publisher and every worker; each step runs even if one before it
        failed (a worker left running would outlive the test)."""
        with ExitStack() as stack:  # runs the callbacks last first
            stack.callback(self.outbox.close)
            stack.callback(self.workers.stop_all)
            if self.supervisor is not None:
                stack.callback(self.supervisor.stop)
            if self.publisher is not None:
                stack.callback(self.publisher.close)
                stack.callback(self.publisher.join, 60)
                stack.callback(self.publisher.stop)


@contextmanager
def scenario(
    name: str,
    directory: Path,
    url: str,
    transport: str,
    *,
    setup: str,
    settings: dict[str, str] | None = None,
    worker_url: str | None = None,
) -> Iterator[Scenario]:
    """A :class:`Scenario` whose workers and publisher are stopped whatever happens;
    its figures join :data:`RESULTS` once audited."""
    sc = Scenario(
        name, directory, url, transport, setup=setup, settings=settings, worker_url=worker_url
    )
    try:
        with ExitStack() as stack:
            stack.callback(sc.close)
            sc.migrate()
            yield sc
    finally:
        if sc.figures.rows:  # audited, passed or not
            RESULTS.append(sc.figures)


def database_name(url: str) -> str:
    name = make_url(url).database
    assert name
    return name
