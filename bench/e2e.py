"""End-to-end throughput: a backlog of events, each handled by a handler that inserts
one row, on PostgreSQL.

Contenders, interleaved round by round:

- **outboxer (local)** and **outboxer (kafka)**: ``Outbox.run_async()`` (relay and
  consumer in one process), started once per transport and warmed up. Per run a
  backlog is inserted (``fill_due``) and one more event published, whose commit wakes
  the relay; timed from the backlog's commit until the consumer reported the last
  event consumed (its handler's row and the consumed mark committed together).
- **outboxer (redis)**: the same with the Redis Streams transport (a running server,
  ``OUTBOXER_BENCH_REDIS_URL``), relay and consumer in one process.
- **outboxer (local, batch handler)**: the same with a batch handler
  (``Outbox.batch_handler``) that writes a batch's rows in one statement, as the
  README shows; same effects, same exactly-once check.
- **outboxer (local, ordered=True)**: the per-event handler on a service declared
  ``ordered=True`` (a key's events in publish order across failures); the backlog has
  64 keys. Its ratio to the unordered run is the cost of ordering.
- **outboxer (nats)**: the same with the NATS JetStream transport.
- **same work, raw claim (reference)**: what one worker could do with the same handler
  code: the claim and the consumed mark as SQL on psycopg (the relay's claim
  statement, in autocommit), and per batch one SQLAlchemy ``Session`` transaction
  that decodes each event's payload, runs the handler's INSERT and marks the batch
  consumed; at batch 100 and at batch 1000. outboxer (local, also at batch 1000) is
  compared with it each at its best, round by round.
- **same work and guarantees, raw claim (reference)**: the same at batch 1000, plus
  the two statements by which outboxer keeps its promises, as SQL on the same
  connections: the handling mark committed before any handler runs (poison
  protection: one autocommit UPDATE, ``synchronous_commit`` off as outboxer's) and the
  batch's rows locked in id order at the start of its transaction (``SELECT ... FOR
  UPDATE``: a row being handled is seen as such). outboxer's ratio to it is the cost
  of its Python per event (loops, hand-over, decoding, hooks, guards), with the
  database's work the same on both sides.
- **procrastinate** (its own database): the same number of jobs deferred in one
  batch (untimed), then ``run_worker_async(concurrency=20, wait=False)`` timed until
  it returns with the queue empty; its task inserts the same row. Its task's insert
  commits apart from the job's status (procrastinate's at-least-once), so its work per
  event is lighter than outboxer's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any

from sqlalchemy import create_engine, insert, select, text
from sqlalchemy.orm import Session

from bench.core import (
    EVENT,
    Bench,
    Section,
    Target,
    count_by_id,
    effects_table,
    exactly_once,
    have,
    interleave,
    median,
    pg_conninfo,
    say,
    settings,
    spread,
    truncate,
    unique,
)
from bench.relay import CLAIM_SQL, StatementCounter, batch_times
from bench.workers import InProcessWorker, effect_handler, publish_one
from outboxer import Outbox, Status
from outboxer.testing import fill_due

LOCAL = "outboxer (local)"
LOCAL_BIG = "outboxer (local), batch 1000"
CEILING = "same work, raw claim (reference)"
CEILING_BIG = "same work, raw claim (reference), batch 1000"
GUARDED = "same work and guarantees, raw claim (reference), batch 1000"
BIG_BATCH = 1_000
WORKER_TARGET = 0.90
BATCH = "outboxer (local, batch handler)"
ORDERED = "outboxer (local, ordered=True)"
KAFKA = "outboxer (kafka)"
NATS = "outboxer (nats)"
REDIS = "outboxer (redis)"
PROCRASTINATE = "procrastinate (concurrency 20)"
CONCURRENCY = 20

RATIO_TARGET = 50.0
RATE_TARGET = 10_000.0


class _Engine:
    """One outboxer contender: its outbox, service, effects table and running worker."""

    def __init__(
        self,
        url: str,
        transport: str,
        *,
        batch: bool = False,
        ordered: bool = False,
        batch_size: int | None = None,
    ) -> None:
        self.service = unique("e")
        self.effects = f"{self.service}_effects"
        values = {} if batch_size is None else {"batch_size": batch_size}
        self.outbox = Outbox(
            url, transport=transport, topic_prefix=unique("bench"), settings=settings(**values)
        )
        if ordered:
            self.outbox.register_service(self.service, ordered=True)
        self.outbox.register_event(EVENT, self.service)
        effect_handler(self.outbox, self.effects, batch=batch)
        self.outbox.migrate()
        with self.outbox.db.sync_engine.begin() as conn:
            effects_table(self.effects).create(conn)
        self.app_engine = create_engine(url)
        self.worker = InProcessWorker(self.outbox).start()
        self.counters = [
            StatementCounter(self.outbox.db.sync_engine),
            StatementCounter(self.outbox.db.async_engine.sync_engine),
        ]

    def statements(self) -> int:
        return sum(c.count for c in self.counters)

    def warm_up(self, timeout: float = 60.0) -> None:
        """One event through, so the consumer (a Kafka group member) is ready."""
        goal = self.worker.progress.goal("consumed", self.worker.progress.counts["consumed"] + 1)
        publish_one(self.outbox, self.app_engine, {"warm": True})
        if not goal.done.wait(timeout):
            raise TimeoutError(f"warm-up event not consumed within {timeout}s")

    def run(self, n: int, section: Section, run_name: str) -> tuple[float, int] | None:
        table = self.outbox.table_for(self.service)
        truncate(self.outbox.db.sync_engine, table.name, self.effects)
        progress = self.worker.progress
        goal = progress.goal("consumed", progress.counts["consumed"] + n)
        fill_due(self.outbox, self.service, n - 1, event_type=EVENT)
        before = self.statements()
        start = time.perf_counter()
        publish_one(self.outbox, self.app_engine, {"kick": True})  # its commit wakes the relay
        if not goal.done.wait(max(120.0, n / 200)):
            section.check(f"{run_name}: drained", False, "not done in time")
            return None
        took = goal.at - start
        statements = self.statements() - before
        with self.outbox.db.sync_engine.connect() as conn:
            ids = list(conn.execute(select(table.c.id)).scalars())
            counts = count_by_id(conn, effects_table(self.effects), 0, 2**62)
        ok, detail = exactly_once(counts, ids)
        section.check(f"{run_name}: every event handled once", ok and len(ids) == n, detail)
        status = self.outbox.store(self.service).status().counts
        section.check(
            f"{run_name}: every row consumed",
            status.get(Status.CONSUMED.value, 0) == n,
            str(status),
        )
        return n / took, statements

    def close(self) -> None:
        try:
            self.worker.stop()
        finally:
            self.app_engine.dispose()
            self.outbox.close()


# ---------------------------------------------------------------------------- the reference

CONSUMED_SQL = """
UPDATE {table} SET status = 'consumed', consumed_at = statement_timestamp(),
                   last_error = NULL, next_retry_at = NULL,
                   updated_at = statement_timestamp(), handling = 0
 WHERE id = ANY(:ids)
"""
MARK_HANDLING_SQL = """
UPDATE {table} SET handling = 1
 WHERE id IN (SELECT id FROM {table}
               WHERE id = ANY(%(ids)s) AND status NOT IN ('consumed', 'dead') AND handling = 0
               ORDER BY id FOR UPDATE)
   AND set_config('synchronous_commit', 'off', true) IS NOT NULL
RETURNING id
"""
LOCK_SQL = """
SELECT id, status, event_type, retry_count, created_at, message_key FROM {table}
 WHERE id = ANY(:ids) ORDER BY id FOR UPDATE
"""


class _Reference:
    """The same work without outboxer's loops: raw claim, one Session per batch."""

    def __init__(self, url: str, batch_size: int, *, guarded: bool = False) -> None:
        self.batch_size = batch_size
        self.guarded = guarded
        self.service = unique("c")
        self.effects = effects_table(f"{self.service}_effects")
        self.outbox = Outbox(url, transport="local", settings=settings())
        self.outbox.register_event(EVENT, self.service)
        self.outbox.migrate()
        self.engine = create_engine(url)
        self.effects.create(self.engine)
        self.conninfo = pg_conninfo(url)

    def run(self, n: int, section: Section, run_name: str) -> float:
        import psycopg  # noqa: PLC0415 - PostgreSQL only
        from psycopg import sql  # noqa: PLC0415

        table = self.outbox.table_for(self.service)
        truncate(self.engine, table.name, self.effects.name)
        fill_due(self.outbox, self.service, n, event_type=EVENT)
        claim = sql.SQL(CLAIM_SQL).format(
            table=sql.Identifier(table.name), returning=sql.SQL("id, payload")
        )
        quoted = self.engine.dialect.identifier_preparer.quote(table.name)
        consumed = text(CONSUMED_SQL.format(table=quoted))
        mark = sql.SQL(MARK_HANDLING_SQL).format(table=sql.Identifier(table.name))
        lock = text(LOCK_SQL.format(table=quoted))
        effects, pid = self.effects, os.getpid()
        lease = self.outbox.settings.lease
        start = time.perf_counter()
        with psycopg.connect(self.conninfo, autocommit=True) as raw, Session(self.engine) as tx:
            while True:
                rows = raw.execute(claim, {"lease": lease, "limit": self.batch_size}).fetchall()
                if not rows:
                    break
                if self.guarded:
                    raw.execute(mark, {"ids": [r[0] for r in rows]}).fetchall()
                with tx.begin():
                    if self.guarded:
                        tx.execute(lock, {"ids": [r[0] for r in rows]}).all()
                    for oid, payload in rows:
                        json.loads(payload)  # the event, as a handler receives it
                        started = time.time()
                        tx.execute(
                            insert(effects).values(outbox_id=oid, started_at=started, worker=pid)
                        )
                    tx.execute(consumed, {"ids": [r[0] for r in rows]})
        took = time.perf_counter() - start
        with self.engine.connect() as conn:
            ids = list(conn.execute(select(table.c.id)).scalars())
            counts = count_by_id(conn, effects, 0, 2**62)
        ok, detail = exactly_once(counts, ids)
        section.check(f"{run_name}: every event handled once", ok and len(ids) == n, detail)
        return n / took

    def close(self) -> None:
        self.engine.dispose()
        self.outbox.close()


# ---------------------------------------------------------------------------- procrastinate


class _Procrastinate:
    """procrastinate on its own database, its schema applied once."""

    def __init__(self, url: str) -> None:
        import procrastinate  # noqa: PLC0415 - bench extra

        self.version = getattr(procrastinate, "__version__", "")
        self.conninfo = pg_conninfo(url)
        self.engine = create_engine(url)
        with self.engine.begin() as conn:
            effects_table("effects").create(conn)
        logging.getLogger("procrastinate").setLevel(logging.WARNING)
        asyncio.run(self._schema())

    def _app(self) -> Any:
        import procrastinate  # noqa: PLC0415

        connector = procrastinate.PsycopgConnector(
            conninfo=self.conninfo, min_size=CONCURRENCY + 2, max_size=CONCURRENCY + 2
        )
        app = procrastinate.App(connector=connector)
        pid = os.getpid()

        async def insert_effect(context: Any, n: int) -> None:
            started = time.time()
            await context.app.connector.execute_query_async(
                "INSERT INTO effects (outbox_id, started_at, worker) VALUES (%(n)s, %(t)s, %(w)s)",
                n=n,
                t=started,
                w=pid,
            )

        # Not a decorator: without procrastinate installed (make test) mypy sees Any.
        task = app.task(name="insert_effect", pass_context=True)(insert_effect)
        return app, task

    async def _schema(self) -> None:
        app, _ = self._app()
        async with app.open_async():
            await app.schema_manager.apply_schema_async()

    async def _drain(self, n: int) -> float:
        app, task = self._app()
        async with app.open_async():
            await task.batch_defer_async(*({"n": i} for i in range(1, n + 1)))
            start = time.perf_counter()
            await app.run_worker_async(
                concurrency=CONCURRENCY,
                wait=False,
                install_signal_handlers=False,
                listen_notify=False,
            )
            return time.perf_counter() - start

    def run(self, n: int, section: Section, run_name: str) -> float:
        truncate(self.engine, "procrastinate_jobs", "effects", cascade=True)
        took = asyncio.run(self._drain(n))
        with self.engine.connect() as conn:
            counts = count_by_id(conn, effects_table("effects"), 0, 2**62)
            jobs: dict[str, int] = {
                str(status): int(k)
                for status, k in conn.execute(
                    text("SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1")
                )
            }
        ok, detail = exactly_once(counts, range(1, n + 1))
        section.check(f"{run_name}: every job's row inserted once", ok, detail)
        section.check(f"{run_name}: every job succeeded", jobs == {"succeeded": n}, f"{jobs}")
        return n / took

    def close(self) -> None:
        self.engine.dispose()


# ---------------------------------------------------------------------------- the measure


def run(bench: Bench) -> Section:
    sizes = bench.sizes
    n, n_proc = sizes.e2e_events, sizes.procrastinate_jobs
    section = Section("e2e", "End-to-end throughput (PostgreSQL)", __doc__ or "")
    if not have("psycopg"):
        section.skip("e2e", "psycopg is not installed (pip install '.[postgres]')")
        return section
    engines: dict[str, _Engine] = {}
    references: dict[str, _Reference] = {}
    proc: _Procrastinate | None = None
    statements: dict[str, list[float]] = {}
    with bench.database("postgresql") as url, bench.database("postgresql") as proc_url:
        try:
            engines[LOCAL] = _Engine(url, "local")
            engines[LOCAL_BIG] = _Engine(url, "local", batch_size=BIG_BATCH)
            references[CEILING] = _Reference(url, 100)
            references[CEILING_BIG] = _Reference(url, BIG_BATCH)
            references[GUARDED] = _Reference(url, BIG_BATCH, guarded=True)
            engines[BATCH] = _Engine(url, "local", batch=True)
            engines[ORDERED] = _Engine(url, "local", ordered=True)
            broker = bench.kafka()
            if broker is None:
                section.skip(KAFKA, bench.kafka_missing())
            else:
                engines[KAFKA] = _Engine(url, broker.transport_url)
            nats_url = bench.nats()
            if nats_url is None:
                section.skip(NATS, bench.nats_missing())
            else:
                engines[NATS] = _Engine(url, nats_url)
            redis_url = bench.redis()
            if redis_url is None:
                section.skip(REDIS, bench.redis_missing())
            else:
                engines[REDIS] = _Engine(url, redis_url)
            if have("procrastinate"):
                proc = _Procrastinate(proc_url)
            else:
                section.skip(
                    "procrastinate", "not installed (the bench extra: pip install -e '.[bench]')"
                )
            for e in engines.values():
                e.warm_up()
            names = [*engines, *references, *([PROCRASTINATE] if proc else [])]
            for name in names:
                size = n_proc if name == PROCRASTINATE else n
                note = f"version {proc.version}" if name == PROCRASTINATE and proc else ""
                reference = name in (PROCRASTINATE, CEILING, CEILING_BIG, GUARDED)
                section.add(name, "events/s", size, note, reference=reference)
            say(f"  e2e: {n:,} events per outboxer run, {n_proc:,} jobs per procrastinate run")
            plan = [(-1, name) for name in names] + list(interleave(bench.rounds, names))
            for r, name in plan:
                run_name = f"{name}, round {r + 1}" if r >= 0 else f"{name}, warm-up"
                try:
                    if name == PROCRASTINATE:
                        assert proc is not None
                        rate: float | None = proc.run(
                            min(n_proc, 20) if r < 0 else n_proc, section, run_name
                        )
                    elif name in references:
                        rate = references[name].run(min(n, 100) if r < 0 else n, section, run_name)
                    else:
                        got = engines[name].run(min(n, 100) if r < 0 else n, section, run_name)
                        rate = None
                        if got is not None:
                            rate, stmts = got
                            if r >= 0:
                                statements.setdefault(name, []).append(stmts / n)
                except Exception as exc:
                    section.failed(run_name, exc)
                    continue
                if r >= 0 and rate is not None:
                    section.series[name].samples.append(rate)
                    say(f"    {run_name}: {rate:,.0f} events/s")
        finally:
            section.extra["batches"] = {name: batch_times(e.worker) for name, e in engines.items()}
            for e in engines.values():
                e.close()
            for ref in references.values():
                ref.close()
            if proc is not None:
                proc.close()
    section.extra["statements_per_event"] = {k: median(v) for k, v in statements.items()}
    _targets(section)
    return section


def _targets(section: Section) -> None:
    s = section.series

    def samples(name: str) -> list[float]:
        return s[name].samples if name in s else []

    ratio = [a / b for a, b in zip(samples(LOCAL), samples(PROCRASTINATE), strict=False) if b]
    section.ratios["outboxer local / procrastinate"] = ratio
    kratio = [a / b for a, b in zip(samples(KAFKA), samples(PROCRASTINATE), strict=False) if b]
    section.ratios["outboxer kafka / procrastinate"] = kratio
    rratio = [a / b for a, b in zip(samples(REDIS), samples(KAFKA), strict=False) if b]
    section.ratios["outboxer redis / outboxer kafka"] = rratio
    bratio = [a / b for a, b in zip(samples(BATCH), samples(PROCRASTINATE), strict=False) if b]
    section.ratios["outboxer local, batch handler / procrastinate"] = bratio

    def best(a: str, b: str) -> list[float]:
        return [max(x, y) for x, y in zip(samples(a), samples(b), strict=False)]

    worker, reference = best(LOCAL, LOCAL_BIG), best(CEILING, CEILING_BIG)
    wratio = [a / b for a, b in zip(worker, reference, strict=False) if b]
    section.ratios["outboxer local / same work with a raw claim (each at its best batch)"] = wratio
    gratio = [a / b for a, b in zip(worker, samples(GUARDED), strict=False) if b]
    section.ratios["outboxer local / same work and guarantees with a raw claim"] = gratio
    mw = median(wratio)
    section.targets.append(
        Target(
            "one worker, local transport, handler inserts a row, vs the same handler with a "
            "raw claim (each at its best of batch 100 and 1000)",
            spread(worker),
            f"raw claim {spread(reference)}",
            spread(wratio, "{:.2f}"),
            f">= {WORKER_TARGET:.2f}",
            None if mw is None else mw >= WORKER_TARGET,
        )
    )
    section.targets.append(
        Target(
            "the same worker vs the same handler, a raw claim and outboxer's two guarding "
            "statements (handling mark, row lock): what outboxer's Python costs",
            spread(worker),
            f"raw claim + guards {spread(samples(GUARDED))}",
            spread(gratio, "{:.2f}"),
            "report only",
            None,
        )
    )
    m = median(ratio)
    section.targets.append(
        Target(
            "end-to-end events/s, local transport, handler inserts a row, vs procrastinate",
            spread(samples(LOCAL)),
            f"procrastinate {spread(samples(PROCRASTINATE))}",
            spread(ratio, "{:.1f}x"),
            f">= {RATIO_TARGET:.0f}x",
            None if m is None else m >= RATIO_TARGET,
        )
    )
    mb = median(bratio)
    section.targets.append(
        Target(
            "end-to-end events/s, local transport, batch handler inserts the rows, "
            "vs procrastinate",
            spread(samples(BATCH)),
            f"procrastinate {spread(samples(PROCRASTINATE))}",
            spread(bratio, "{:.1f}x"),
            f">= {RATIO_TARGET:.0f}x",
            None if mb is None else mb >= RATIO_TARGET,
        )
    )
    oratio = [a / b for a, b in zip(samples(ORDERED), samples(LOCAL), strict=False) if b]
    section.ratios["outboxer local, ordered=True / unordered"] = oratio
    section.targets.append(
        Target(
            "cost of per-key ordering: end-to-end events/s, local, ordered=True vs not (64 keys)",
            spread(samples(ORDERED)),
            f"unordered {spread(samples(LOCAL))}",
            spread(oratio, "{:.2f}"),
            "report only",
            None,
        )
    )
    nratio = [a / b for a, b in zip(samples(NATS), samples(PROCRASTINATE), strict=False) if b]
    section.ratios["outboxer nats / procrastinate"] = nratio
    for name in (LOCAL, BATCH, KAFKA, NATS, REDIS):
        rate = median(samples(name))
        section.targets.append(
            Target(
                f"end-to-end events/s, {name}",
                spread(samples(name)),
                "",
                "",
                f">= {RATE_TARGET:,.0f}/s",
                None if rate is None else rate >= RATE_TARGET,
            )
        )
