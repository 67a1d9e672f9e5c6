"""Growth: the claim and end to end on a table that holds 1,000,000 consumed rows, the
claim with 100,000 due rows (a deep due index), and how long a worker process takes
from its start to its first event handled, on PostgreSQL (the start-up on SQLite too).

The big table is filled once, by one server-side ``INSERT ... SELECT generate_series``
of rows shaped as outboxer writes them (the row of ``RowBuilder.event`` for ``{"n":
i}``, key ``k<i % 64>``, status ``consumed``, created 10 ms apart before now, no due
time), then ``VACUUM ANALYZE`` (the server's autovacuum may be off). It is one
service table used by every PostgreSQL part below in turn (each part's ``Outbox``
on it, the part before stopped); its twin, the empty table, is ``TRUNCATE``d before
each run. After each run on the big table its rows stay, consumed, and it is vacuumed
(untimed), so it grows by the run's rows: both tables start each run clean.

- **Relay on an empty vs a big table**: ``Outbox.run_async(consume=False)`` with the
  in-memory broker (transport ``memory``: the database is the only thing that
  differs), started once per table. Per run a backlog is inserted (``fill_due``) and
  one more event published, whose commit wakes the relay; timed, as in the relay
  section, from that commit until the relay reported the last row marked published.
  Checks: every row of the run published, each sent to the broker once, the old
  consumed rows untouched. The relay's published rows are then marked consumed, as a
  consumer would have.
- **One claim with 100,000 due rows vs 1,000**: the relay's claim
  (``op_claim_to_send``, the statement it sends, batch 100 and 1000) on a table of
  1,000 due rows, one of 100,000, and the big table with 1,000 due rows more. Each
  claim runs in a transaction that is rolled back (so every claim finds the same due
  rows; a lease of an hour keeps the rolled-back versions out of the due range), and
  only its statement is timed (the transaction is begun by an untimed ``SELECT 1``).
  The table is vacuumed (untimed) before every 10th claim, as autovacuum would keep
  it: the dead versions of rolled-back claims would otherwise pile up, most in the
  small tables, whose plan they turn into a sequential scan.
  The sample of a run is the median of its claims; the p99 is over every claim of
  every round. Checks: every claim took the rows it should (the batch, or all due).
- **End to end on an empty vs a big table**: one warm worker (``Outbox.run_async()``,
  local transport, the handler inserting one row per event) per table, timed as in
  the end-to-end section until the consumer reported the last event consumed.
  Checks: every event's row exactly once, every row of the run consumed, the old
  consumed rows untouched.
- **Worker start-up**: one event published, then ``outboxer --app bench.app:outbox
  run`` started (``WorkerProcess``, default settings: a deployment's restart) and
  timed from just before the process was spawned (``time.time()``) to the moment its
  handler started on that event (``time.time()`` in the handler, stored in its row);
  then stopped with SIGTERM by its pid (the time to exit noted too). For context,
  the same interpreter running ``python -c "import outboxer"`` and ``python -c
  pass``, from spawn to exit. Checks: every event handled exactly once, each worker
  exited with 0. One untimed start of each first (the file cache).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from typing import Any

from sqlalchemy import Engine, Table, create_engine, func, select, text

from bench.core import (
    EVENT,
    ROOT,
    Bench,
    Section,
    Target,
    count_by_id,
    effects_table,
    exactly_once,
    have,
    max_id,
    median,
    percentile,
    say,
    settings,
    spread,
    truncate,
    unique,
    wait_until,
    warm_then_interleave,
)
from bench.workers import InProcessWorker, WorkerProcess, effect_handler, publish_one
from outboxer import Outbox, Status
from outboxer.database.ops.transitions import op_claim_to_send
from outboxer.testing import fill_due

EMPTY = "empty table"
TARGET = 0.90
"""The big table keeps at least this share of the empty table's rate."""
SHALLOW = 1_000
"""Due rows of the shallow claim layouts."""
CLAIM_BATCHES = (100, 1_000)
CLAIM_LEASE = 3600.0
VACUUM_EVERY = 10
"""Claims between two vacuums of a claim layout's table (untimed)."""
BACKENDS = ("postgresql", "sqlite")
IMPORT = 'python -c "import outboxer"'
BARE = 'python -c "pass"'

FILL_SQL = """
INSERT INTO {table} (event_type, service_name, topic, message_key, payload, status,
                     retry_count, max_retry, next_retry_at, published_at, consumed_at,
                     created_at, updated_at, requeue_count, handling, crashes)
SELECT :event_type, :service_name, :topic, 'k' || (g % 64),
       replace(replace(:payload, :key_mark, 'k' || (g % 64)), :n_mark, g::text),
       'consumed', 0, :max_retry, NULL, ts, ts, ts, ts, 0, 0, 0
  FROM generate_series(1, :n) AS g,
       LATERAL (SELECT statement_timestamp() - (:n - g) * interval '10 milliseconds' AS ts) AS l
"""
KEY_MARK = "GROWTHKEY"
N_MARK = -770077


def _big(n: int) -> str:
    return f"{n:,} consumed rows"


def _relay(layout: str) -> str:
    return f"relay (memory broker), {layout}"


def _e2e(layout: str) -> str:
    return f"end to end (local), {layout}"


def _claim(batch: int, layout: str) -> str:
    return f"claim, batch {batch:,}, {layout}"


def _start(backend: str) -> str:
    return f"worker start-up to first event, {backend}"


# ---------------------------------------------------------------------------- tables


def _quoted(engine: Engine, table: Table) -> str:
    return engine.dialect.identifier_preparer.quote(table.name)


def vacuum(engine: Engine, table: Table) -> None:
    """``VACUUM ANALYZE`` (autovacuum's work, done now: it may be off on the server)."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f"VACUUM ANALYZE {_quoted(engine, table)}"))


def fill_consumed(outbox: Outbox, service: str, n: int) -> float:
    """Insert ``n`` consumed rows into ``service``'s table with one server-side
    statement, then vacuum it; the seconds it took."""
    route = outbox.routes.route_for_service(service)
    row = outbox.storage.rows.event(route, EVENT, {"n": N_MARK}, key=KEY_MARK)
    if KEY_MARK not in row["payload"] or str(N_MARK) not in row["payload"]:
        raise ValueError(f"unexpected payload shape: {row['payload']}")
    table = outbox.table_for(service)
    engine = outbox.db.sync_engine
    start = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(
            text(FILL_SQL.format(table=_quoted(engine, table))),
            {
                "event_type": row["event_type"],
                "service_name": row["service_name"],
                "topic": row["topic"],
                "payload": row["payload"],
                "key_mark": KEY_MARK,
                "n_mark": str(N_MARK),
                "max_retry": row["max_retry"],
                "n": n,
            },
        )
    vacuum(engine, table)
    return time.perf_counter() - start


def _statuses(engine: Engine, table: Table, above: int) -> dict[str, int]:
    c = table.c
    with engine.connect() as conn:
        rows = conn.execute(select(c.status, func.count()).where(c.id > above).group_by(c.status))
        return {str(s): int(k) for s, k in rows}


def _consume_all(engine: Engine, table: Table, above: int) -> None:
    """What a consumer would do to every row above id ``above`` (untimed)."""
    c = table.c
    with engine.begin() as conn:
        conn.execute(
            table.update()
            .where(c.id > above, c.status != Status.CONSUMED.value)
            .values(
                status=Status.CONSUMED.value,
                consumed_at=func.statement_timestamp(),
                updated_at=func.statement_timestamp(),
                next_retry_at=None,
            )
        )


class _Tables:
    """The service tables of the PostgreSQL parts: the empty one and the big one."""

    def __init__(self, url: str, consumed: int) -> None:
        self.url = url
        self.consumed = consumed
        self.empty = unique("ge")
        self.big = unique("gb")
        self.big_name = _big(consumed)
        outbox = Outbox(url, transport="local", settings=settings())
        try:
            for service in (self.empty, self.big):
                outbox.register_event(f"{service}.made", service)
            outbox.migrate()
            self.fill_seconds = fill_consumed(outbox, self.big, consumed)
            self.old_max = max_id(outbox.db.sync_engine, outbox.table_for(self.big))
        finally:
            outbox.close()

    def service(self, layout: str) -> str:
        return self.empty if layout == EMPTY else self.big

    def old_rows_kept(self, engine: Engine, table: Table) -> tuple[bool, str]:
        """Whether the big table's first rows are all still there, consumed."""
        c = table.c
        with engine.connect() as conn:
            kept = conn.execute(
                select(func.count()).where(c.id <= self.old_max, c.status == Status.CONSUMED.value)
            ).scalar_one()
        return kept == self.consumed, f"{kept:,} of {self.consumed:,} old rows consumed"


# ---------------------------------------------------------------------------- relay, e2e


class _Layout:
    """One warm outboxer on one of the tables: a relay to the in-memory broker, or a
    worker (relay and consumer, local transport) whose handler inserts a row."""

    def __init__(self, tables: _Tables, layout: str, *, consume: bool) -> None:
        self.tables = tables
        self.layout = layout
        self.consume = consume
        self.service = tables.service(layout)
        self.outbox = Outbox(
            tables.url,
            transport="local" if consume else "memory",
            topic_prefix=unique("bench"),
            settings=settings(),
        )
        self.outbox.register_event(EVENT, self.service)
        self.effects = effects_table(f"{self.service}_effects")
        if consume:
            effect_handler(self.outbox, self.effects.name)
        self.table = self.outbox.table_for(self.service)
        self.engine = self.outbox.db.sync_engine
        if consume:
            self.effects.create(self.engine, checkfirst=True)
        self.app_engine = create_engine(tables.url)
        self.worker = InProcessWorker(self.outbox, consume=consume).start()

    @property
    def big(self) -> bool:
        return self.layout != EMPTY

    def run(self, n: int, section: Section, run_name: str) -> float | None:
        what = "consumed" if self.consume else "published"
        # Both start clean: the empty table and the effects of the last run emptied.
        names = [
            *([] if self.big else [self.table.name]),
            *([self.effects.name] if self.consume else []),
        ]
        if names:
            truncate(self.engine, *names)
        above = max_id(self.engine, self.table)
        progress = self.worker.progress
        goal = progress.goal(what, progress.counts[what] + n)
        fill_due(self.outbox, self.service, n - 1, event_type=EVENT)
        start = time.perf_counter()
        publish_one(self.outbox, self.app_engine, {"kick": True})  # its commit wakes the relay
        if not goal.done.wait(max(120.0, n / 200)):
            section.check(f"{run_name}: drained", False, "not done in time")
            return None
        took = goal.at - start
        self._check(n, above, section, run_name)
        if self.big:
            _consume_all(self.engine, self.table, above)
            vacuum(self.engine, self.table)
        return n / took

    def _check(self, n: int, above: int, section: Section, run_name: str) -> None:
        done = Status.CONSUMED.value if self.consume else Status.PUBLISHED.value
        status = _statuses(self.engine, self.table, above)
        section.check(
            f"{run_name}: every row {done}",
            status.get(done, 0) == n and sum(status.values()) == n,
            str(status),
        )
        with self.engine.connect() as conn:
            ids = list(
                conn.execute(select(self.table.c.id).where(self.table.c.id > above)).scalars()
            )
        if self.consume:
            with self.engine.connect() as conn:
                counts = count_by_id(conn, self.effects, above, 2**62)
            ok, detail = exactly_once(counts, ids)
            section.check(f"{run_name}: every event handled once", ok and len(ids) == n, detail)
        else:
            transport: Any = self.outbox.transport
            sent: dict[int, int] = {}
            for m in transport.messages():
                oid = m.envelope().outbox_id
                if oid > above:
                    sent[oid] = sent.get(oid, 0) + 1
            transport.clear()
            ok, detail = exactly_once(sent, ids)
            section.check(f"{run_name}: every row sent once", ok and len(ids) == n, detail)
        if self.big:
            ok, detail = self.tables.old_rows_kept(self.engine, self.table)
            section.check(f"{run_name}: old consumed rows untouched", ok, detail)

    def close(self) -> None:
        try:
            self.worker.stop()
        finally:
            self.app_engine.dispose()
            self.outbox.close()


def _drain_part(
    bench: Bench,
    section: Section,
    tables: _Tables,
    n: int,
    *,
    consume: bool,
) -> None:
    """The relay part (``consume`` False) or the end-to-end part, both tables."""
    label = _e2e if consume else _relay
    layouts: dict[str, _Layout] = {}
    names = [label(EMPTY), label(tables.big_name)]
    for name in names:
        section.add(name, "events/s" if consume else "rows/s", n)
    try:
        for layout in (EMPTY, tables.big_name):
            layouts[label(layout)] = _Layout(tables, layout, consume=consume)
        # One untimed pass of each: connection pools, statement caches, the handler.
        for r, name, run_name in warm_then_interleave(bench.rounds, names):
            try:
                rate = layouts[name].run(min(n, 50) if r < 0 else n, section, run_name)
            except Exception as exc:
                section.failed(run_name, exc)
                continue
            if r >= 0 and rate is not None:
                section.series[name].samples.append(rate)
                say(f"    {run_name}: {rate:,.0f} {section.series[name].unit}")
    finally:
        for layout_ in layouts.values():
            try:
                layout_.close()
            except Exception as exc:
                section.failed(f"{layout_.layout}: stop", exc)
    big, empty = section.series[names[1]].samples, section.series[names[0]].samples
    section.ratios[f"{names[1]} / {EMPTY}"] = [a / b for a, b in zip(big, empty, strict=False) if b]


# ---------------------------------------------------------------------------- claims


class _ClaimTable:
    """A service table with due rows, claimed again and again by rolled-back claims."""

    def __init__(self, url: str, service: str, layout: str, due: int) -> None:
        self.layout = layout
        self.due = due
        self.service = service
        self.outbox = Outbox(url, transport="local", settings=settings())
        self.outbox.register_event(EVENT, service)
        self.outbox.migrate()
        self.table = self.outbox.table_for(service)
        fill_due(self.outbox, service, due, event_type=EVENT)
        vacuum(self.outbox.db.sync_engine, self.table)
        self.route = self.outbox.routes.route_for_service(service)

    def claims(self, batch: int, count: int) -> tuple[list[float], list[int]]:
        """``count`` claims of ``batch`` rows: seconds of each statement, rows taken."""
        storage = self.outbox.storage
        engine = self.outbox.db.sync_engine
        seconds: list[float] = []
        taken: list[int] = []
        with engine.connect() as conn:
            for i in range(count):
                if i % VACUUM_EVERY == 0:
                    vacuum(engine, self.table)
                tx = conn.begin()
                try:
                    conn.exec_driver_sql("SELECT 1")
                    op = op_claim_to_send(storage.op_context(self.route), batch, CLAIM_LEASE)
                    start = time.perf_counter()
                    rows = storage.connector.run(op, conn)
                    seconds.append(time.perf_counter() - start)
                    taken.append(len(rows))
                finally:
                    tx.rollback()
        return seconds, taken

    def close(self) -> None:
        self.outbox.close()


def _claim_part(bench: Bench, section: Section, tables: _Tables, due: int) -> None:
    count = bench.sizes.growth_claims
    deep_name = f"{due:,} due"
    shallow_name = f"{SHALLOW:,} due"
    big_name = f"{SHALLOW:,} due + {tables.big_name}"
    claim_tables: dict[str, _ClaimTable] = {}
    every: dict[str, list[float]] = {}
    try:
        claim_tables[shallow_name] = _ClaimTable(tables.url, unique("gs"), shallow_name, SHALLOW)
        claim_tables[deep_name] = _ClaimTable(tables.url, unique("gd"), deep_name, due)
        claim_tables[big_name] = _ClaimTable(tables.url, tables.big, big_name, SHALLOW)
        names = {_claim(b, layout): (b, layout) for b in CLAIM_BATCHES for layout in claim_tables}
        for name in names:
            section.add(name, "µs per claim", count)
        batches = ", ".join(f"{b:,}" for b in CLAIM_BATCHES)
        say(f"  growth: claims, {count} per run, layout and batch ({batches})")
        for r, name, run_name in warm_then_interleave(bench.rounds, list(names)):
            batch, layout = names[name]
            t = claim_tables[layout]
            try:
                seconds, taken = t.claims(batch, count if r >= 0 else min(count, 5))
            except Exception as exc:
                section.failed(run_name, exc)
                continue
            want = min(batch, t.due)
            section.check(
                f"{run_name}: every claim took {want} rows",
                all(k == want for k in taken),
                f"rows taken: {sorted(set(taken))}",
            )
            if r >= 0:
                us = [s * 1e6 for s in seconds]
                every.setdefault(name, []).extend(us)
                section.series[name].samples.append(statistics.median(us))
                say(f"    {run_name}: median {statistics.median(us):,.0f} µs")
    finally:
        # The big table's due rows go, consumed, before the end-to-end part.
        if big_name in claim_tables:
            t = claim_tables[big_name]
            _consume_all(t.outbox.db.sync_engine, t.table, tables.old_max)
            vacuum(t.outbox.db.sync_engine, t.table)
        for t in claim_tables.values():
            t.close()
    section.extra["claims_us"] = {
        name: {"p50": percentile(v, 50), "p99": percentile(v, 99), "claims": len(v)}
        for name, v in every.items()
        if v
    }
    for name, d in section.extra["claims_us"].items():
        section.notes.append(
            f"{name}: p50 {d['p50']:,.0f} µs, p99 {d['p99']:,.0f} µs over {d['claims']} claims."
        )
    for batch in CLAIM_BATCHES:
        for layout in (deep_name, big_name):
            a = section.series[_claim(batch, layout)].samples
            b = section.series[_claim(batch, shallow_name)].samples
            section.ratios[f"claim, batch {batch:,}: {layout} / {shallow_name}"] = [
                x / y for x, y in zip(a, b, strict=False) if y
            ]


# ---------------------------------------------------------------------------- start-up


class _StartUp:
    """A service table on one database, for workers started one at a time."""

    def __init__(self, bench: Bench, url: str, backend: str) -> None:
        self.bench = bench
        self.url = url
        self.backend = backend
        self.service = unique("gw")
        self.effects = effects_table(f"{self.service}_effects")
        self.outbox = Outbox(url, transport="local", settings=settings())
        self.outbox.register_event(EVENT, self.service)
        self.outbox.migrate()
        self.engine = create_engine(url)
        self.effects.create(self.engine)
        self.ids: list[int] = []
        self.stop_ms: list[float] = []

    def start_once(self, section: Section, run_name: str) -> float | None:
        """Publish one event, start a worker, wait for the event's row: the ms from
        the spawn to the handler's start."""
        oid, _ = publish_one(self.outbox, self.engine, {"start": len(self.ids)})
        self.ids.append(oid)
        worker = WorkerProcess(
            self.bench, url=self.url, service=self.service, effects=self.effects.name
        )
        spawned = time.time()
        worker.start()
        try:
            c = self.effects.c

            def handled() -> float | None:
                with self.engine.connect() as conn:
                    return conn.execute(
                        select(func.min(c.started_at)).where(c.outbox_id == oid)
                    ).scalar_one_or_none()

            if not wait_until(lambda: handled() is not None or not worker.running, 60):
                section.check(f"{run_name}: event handled", False, "not within 60 s")
                return None
            started = handled()
            if started is None:
                section.check(f"{run_name}: event handled", False, worker.log_tail(600))
                return None
        finally:
            stopping = time.perf_counter()
            code = worker.stop()
            self.stop_ms.append((time.perf_counter() - stopping) * 1000)
            section.check(f"{run_name}: worker exited with 0", code == 0, worker.log_tail(600))
        return (float(started) - spawned) * 1000

    def check(self, section: Section) -> None:
        with self.engine.connect() as conn:
            counts = count_by_id(conn, self.effects, 0, 2**62)
        ok, detail = exactly_once(counts, self.ids)
        section.check(f"start-up, {self.backend}: every event handled once", ok, detail)

    def close(self) -> None:
        self.engine.dispose()
        self.outbox.close()


def _spawn_ms(code: str) -> float:
    """Milliseconds from spawning this interpreter with ``-c code`` to its exit."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)  # fixed argv
    return (time.perf_counter() - start) * 1000


def _start_part(bench: Bench, section: Section) -> None:
    rounds = bench.sizes.growth_starts
    names = [_start(b) for b in BACKENDS]
    for name in names:
        section.add(name, "ms", 1)
    section.add(IMPORT, "ms", 1, reference=True)
    section.add(BARE, "ms", 1, reference=True)
    say(f"  growth: worker start-up, {rounds} start(s) per database")
    with bench.database("postgresql") as pg_url, bench.database("sqlite") as lite_url:
        starts: dict[str, _StartUp] = {}
        try:
            for backend, url in zip(BACKENDS, (pg_url, lite_url), strict=True):
                starts[_start(backend)] = _StartUp(bench, url, backend)
            everything = [*names, IMPORT, BARE]
            for r, name, run_name in warm_then_interleave(rounds, everything):
                try:
                    if name == IMPORT:
                        ms: float | None = _spawn_ms("import outboxer")
                    elif name == BARE:
                        ms = _spawn_ms("pass")
                    else:
                        ms = starts[name].start_once(section, run_name)
                except Exception as exc:
                    section.failed(run_name, exc)
                    continue
                if r >= 0 and ms is not None:
                    section.series[name].samples.append(ms)
                    say(f"    {run_name}: {ms:,.0f} ms")
            for s in starts.values():
                s.check(section)
                if s.stop_ms:
                    section.notes.append(
                        f"Worker stop (SIGTERM to exit), {s.backend}: "
                        f"{spread(s.stop_ms)} ms over {len(s.stop_ms)} stops."
                    )
        finally:
            for s in starts.values():
                s.close()


# ---------------------------------------------------------------------------- the measure


def run(bench: Bench) -> Section:
    sizes = bench.sizes
    consumed, due = sizes.growth_consumed, sizes.growth_due
    section = Section(
        "growth",
        "Growth: a big table, a deep due index, a worker's start-up (PostgreSQL, SQLite)",
        __doc__ or "",
    )
    if not have("psycopg"):
        section.skip("growth", "psycopg is not installed (pip install '.[postgres]')")
        return section
    with bench.database("postgresql") as url:
        tables: _Tables | None = None
        try:
            say(f"  growth: filling {consumed:,} consumed rows")
            tables = _Tables(url, consumed)
            section.notes.append(
                f"{consumed:,} consumed rows inserted and vacuumed in {tables.fill_seconds:.1f} s."
            )
            say(f"  growth: relay, {sizes.relay_rows:,} rows per run")
            _drain_part(bench, section, tables, sizes.relay_rows, consume=False)
            _claim_part(bench, section, tables, due)
            say(f"  growth: end to end, {sizes.e2e_events:,} events per run")
            _drain_part(bench, section, tables, sizes.e2e_events, consume=True)
        except Exception as exc:
            section.failed("growth", exc)
    try:
        _start_part(bench, section)
    except Exception as exc:
        section.failed("growth: start-up", exc)
    _targets(section, consumed, due)
    return section


def _targets(section: Section, consumed: int, due: int) -> None:
    s = section.series

    def samples(name: str) -> list[float]:
        return s[name].samples if name in s else []

    big = _big(consumed)
    for label, what in ((_relay, "relay rows/s"), (_e2e, "end-to-end events/s")):
        ratio = section.ratios.get(f"{label(big)} / {EMPTY}", [])
        m = median(ratio)
        section.targets.append(
            Target(
                f"{what} with {big} in the table vs an empty table",
                spread(samples(label(big))),
                f"empty table {spread(samples(label(EMPTY)))}",
                spread(ratio, "{:.2f}"),
                f">= {TARGET:.2f}",
                None if m is None else m >= TARGET,
            )
        )
    claims = section.extra.get("claims_us", {})

    def p50_p99(name: str) -> str:
        d = claims.get(name)
        return "-" if d is None else f"p50 {d['p50'] / 1000:.2f} ms, p99 {d['p99'] / 1000:.2f} ms"

    shallow = f"{SHALLOW:,} due"
    for batch in CLAIM_BATCHES:
        for layout in (f"{due:,} due", f"{SHALLOW:,} due + {big}"):
            ratio = section.ratios.get(f"claim, batch {batch:,}: {layout} / {shallow}", [])
            section.targets.append(
                Target(
                    f"one claim of {batch:,}, {layout} vs {shallow}",
                    p50_p99(_claim(batch, layout)),
                    f"{shallow}: {p50_p99(_claim(batch, shallow))}",
                    spread(ratio, "{:.2f}"),
                    "report only",
                    None,
                )
            )
    for backend in BACKENDS:
        section.targets.append(
            Target(
                f"worker start-up, process start to the first event handled, {backend} (ms)",
                spread(samples(_start(backend))),
                f"import outboxer {spread(samples(IMPORT))}, bare interpreter "
                f"{spread(samples(BARE))}",
                "",
                "report only",
                None,
            )
        )
