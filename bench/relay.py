"""Relay throughput: a backlog of due rows on PostgreSQL, until every row is published.

Contenders, interleaved round by round, each on its own table of one database:

- **outboxer relay (kafka)**: ``Outbox.run_async(consume=False)`` with the Kafka
  transport, started once; per run a backlog is inserted (``fill_due``) and one more
  event published, whose commit wakes the relay. Timed from the backlog's commit
  until the relay reported the last row marked published.
- **database ceiling**: the claim and mark statements outboxer sends on PostgreSQL,
  written out in SQL and run with psycopg in a loop of the same batch size: no
  broker, no framework. Also at batch 1000; the relay (also run at batch 1000) is
  compared with the ceiling each at its best of the two, round by round.
- **outboxer store claim+mark**: the same loop through ``Store.claim_due`` and
  ``Store.mark_published_many`` (SQLAlchemy and outboxer's row mapping, no broker).
- **one-at-a-time relay (kafka)**: list due ids, then per message read the row,
  produce it and wait for the broker's acknowledgement (``flush``), mark it published.
- **raw confluent-kafka produce**: the same messages produced with the producer
  settings of outboxer's Kafka transport, then one ``flush`` (the broker's ceiling).
- **outboxer relay (nats)**: as the Kafka relay, with the NATS JetStream transport.
- **raw nats-py publish**: the same messages published with plain nats-py to the same
  stream and lanes, a batch size at a time (the relay's concurrency), each awaiting
  its PubAck (the server's ceiling at that concurrency).
- **outboxer relay (redis)**: as the Kafka relay, with the Redis Streams transport
  (a running server, ``OUTBOXER_BENCH_REDIS_URL``).
- **raw redis-py XADD pipeline**: the same entries (same lanes, same fields) added
  with redis-py's asyncio client, one non-transactional pipeline per batch of
  ``batch_size``, each awaited before the next (the server's ceiling for that shape).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sqlalchemy import Engine, create_engine, event, select, text

from bench.core import (
    EVENT,
    Bench,
    Section,
    Target,
    have,
    interleave,
    median,
    pg_conninfo,
    say,
    settings,
    spread,
    unique,
)
from bench.workers import InProcessWorker, publish_one
from outboxer import Outbox, OutboxMessage, Status
from outboxer.routing import ServiceRoute
from outboxer.testing import fill_due

OUTBOXER = "outboxer relay (kafka)"
OUTBOXER_BIG = "outboxer relay (kafka), batch 1000"
CEILING = "database ceiling (raw SQL, psycopg)"
CEILING_BIG = "database ceiling (raw SQL, psycopg), batch 1000"
BIG_BATCH = 1_000
STORE = "outboxer store claim+mark (no broker)"
NAIVE = "one-at-a-time relay (kafka)"
PRODUCE = "raw confluent-kafka produce"
NATS_RELAY = "outboxer relay (nats)"
NATS_PUBLISH = "raw nats-py publish (PubAcks)"
REDIS_RELAY = "outboxer relay (redis)"
REDIS_RAW = "raw redis-py XADD pipeline"

Message = tuple[str, bytes, list[tuple[str, str | bytes | None]]]
"""A Kafka message as (key, value, headers)."""

RELAY_TARGET = 0.90
NAIVE_TARGET = 30.0

CLAIM_SQL = """
UPDATE {table} SET next_retry_at = statement_timestamp() + make_interval(secs => %(lease)s),
                   updated_at = statement_timestamp()
 WHERE id IN (SELECT id FROM {table}
               WHERE status = 'pending' AND next_retry_at IS NOT NULL
                 AND next_retry_at <= statement_timestamp()
               ORDER BY next_retry_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
RETURNING {returning}
"""
MARK_SQL = """
UPDATE {table} SET status = 'published', published_at = statement_timestamp(),
                   last_error = NULL, next_retry_at = NULL, updated_at = statement_timestamp()
 WHERE id = ANY(%(ids)s) AND status NOT IN ('consumed', 'dead') AND retry_count = %(rc)s
"""


class StatementCounter:
    """Counts the statements an engine sends (SQLAlchemy's cursor event)."""

    def __init__(self, engine: Engine) -> None:
        self.count = 0
        event.listen(engine, "before_cursor_execute", self._hit)

    def _hit(self, *args: Any) -> None:
        self.count += 1


def _statuses(outbox: Outbox, service: str) -> dict[str, int]:
    return dict(outbox.store(service).status().counts)


def _truncate(outbox: Outbox, service: str) -> None:
    table = outbox.table_for(service)
    with outbox.db.sync_engine.begin() as conn:
        quoted = conn.dialect.identifier_preparer.quote(table.name)
        conn.execute(text(f"TRUNCATE {quoted}"))


class _Contender:
    """One relay contender on its own service table."""

    def __init__(
        self, url: str, name: str, transport: str = "local", batch: int | None = None
    ) -> None:
        self.name = name
        self.service = unique("r")
        values = {} if batch is None else {"batch_size": batch}
        self.outbox = Outbox(
            url, transport=transport, topic_prefix=unique("bench"), settings=settings(**values)
        )
        self.outbox.register_event(EVENT, self.service)
        self.outbox.migrate()

    @property
    def batch(self) -> int:
        return self.outbox.settings.batch_size

    def fill(self, n: int) -> None:
        _truncate(self.outbox, self.service)
        fill_due(self.outbox, self.service, n, event_type=EVENT)

    def check_published(self, section: Section, run: str, n: int) -> bool:
        counts = _statuses(self.outbox, self.service)
        published = counts.get(Status.PUBLISHED.value, 0)
        return section.check(
            f"{run}: every row published once",
            published == n and sum(counts.values()) == n,
            f"{counts}",
        )


def _ceiling_run(c: _Contender) -> None:
    import psycopg  # noqa: PLC0415 - PostgreSQL only
    from psycopg import sql  # noqa: PLC0415

    table = sql.Identifier(c.outbox.table_for(c.service).name)
    claim = sql.SQL(CLAIM_SQL).format(table=table, returning=sql.SQL("*"))
    mark = sql.SQL(MARK_SQL).format(table=table)
    lease = c.outbox.settings.lease
    with psycopg.connect(pg_conninfo(c.outbox.db.safe_url)) as conn:
        while True:
            rows = conn.execute(claim, {"lease": lease, "limit": c.batch}).fetchall()
            conn.commit()
            if not rows:
                return
            conn.execute(mark, {"ids": [r[0] for r in rows], "rc": 0})
            conn.commit()


def _store_run(c: _Contender) -> None:
    st = c.outbox.store(c.service)
    lease = c.outbox.settings.lease
    while True:
        claimed = st.claim_due(limit=c.batch, lease=lease)
        if not claimed:
            return
        st.mark_published_many([m.id for m in claimed], expect_retry_count=0)


class _Kafka:
    """A producer with the settings of outboxer's Kafka transport, and the topic."""

    def __init__(self, relay: Outbox, service: str) -> None:
        from confluent_kafka import Producer  # noqa: PLC0415 - optional

        config = getattr(relay.transport, "producer_config", None)
        self.config: dict[str, Any] = (
            config()
            if callable(config)
            else {"enable.idempotence": True, "acks": "all", "linger.ms": 5}
        )
        self.topic = relay.routes.route_for_service(service).topic
        self.producer = Producer(self.config)
        self.errors: list[str] = []
        self.acked = 0

    def delivered(self, err: Any, msg: Any) -> None:
        if err is None:
            self.acked += 1
        else:
            self.errors.append(str(err))


def _headers(env: Any) -> list[tuple[str, str | bytes | None]]:
    return [
        ("event_id", env.event_id.encode()),
        ("event_type", env.event_type.encode()),
        ("event_version", env.event_version.encode()),
    ]


def _naive_run(c: _Contender, kafka: _Kafka) -> None:
    """The seed's relay: list due ids, then per message read, send and wait, mark."""
    st = c.outbox.store(c.service)
    while True:
        due = [m.id for m in st.list_due_messages(limit=c.batch)]
        if not due:
            return
        for oid in due:
            row = st.get_by_id(oid)
            assert row is not None
            env = row.envelope()
            kafka.producer.produce(
                kafka.topic,
                value=env.to_json(),
                key=row.message_key,
                headers=_headers(env),
                on_delivery=kafka.delivered,
            )
            kafka.producer.flush()
            st.mark_published(oid)


def _produce_run(kafka: _Kafka, messages: list[Message]) -> None:
    produce, poll = kafka.producer.produce, kafka.producer.poll
    for i, (key, value, headers) in enumerate(messages):
        produce(kafka.topic, value=value, key=key, headers=headers, on_delivery=kafka.delivered)
        if i % 1000 == 999:
            poll(0)
    kafka.producer.flush()


def _envelopes(c: _Contender) -> list[Message]:
    table = c.outbox.table_for(c.service)
    with c.outbox.db.sync_engine.connect() as conn:
        rows = conn.execute(select(table).order_by(table.c.id)).mappings().all()
    out = []
    for r in rows:
        env = OutboxMessage.from_mapping(dict(r)).envelope()
        out.append((r["message_key"], env.to_json(), _headers(env)))
    return out


def _claim_sql(c: _Contender) -> list[str]:
    """The statements outboxer's store sends for one claim and one mark."""
    seen: list[str] = []

    def grab(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(" ".join(statement.split()))

    engine = c.outbox.db.sync_engine
    c.fill(1)
    event.listen(engine, "before_cursor_execute", grab)
    try:
        st = c.outbox.store(c.service)
        claimed = st.claim_due(limit=c.batch, lease=c.outbox.settings.lease)
        st.mark_published_many([m.id for m in claimed], expect_retry_count=0)
    finally:
        event.remove(engine, "before_cursor_execute", grab)
    return seen


def run(bench: Bench) -> Section:
    sizes = bench.sizes
    n, n_naive = sizes.relay_rows, sizes.naive_rows
    section = Section(
        "relay",
        "Relay throughput (PostgreSQL, Kafka)",
        __doc__ or "",
    )
    if not have("psycopg"):
        section.skip("relay", "psycopg is not installed (pip install '.[postgres]')")
        return section
    broker = bench.kafka()
    if broker is None:
        section.skip("Kafka contenders", bench.kafka_missing())
    with bench.database("postgresql") as url:
        ceiling = _Contender(url, CEILING)
        store = _Contender(url, STORE)
        section.extra["outboxer_sql"] = _claim_sql(store)
        contenders: dict[str, Any] = {
            CEILING: ceiling,
            CEILING_BIG: _Contender(url, CEILING_BIG, batch=BIG_BATCH),
            STORE: store,
        }
        workers: list[InProcessWorker] = []
        worker: InProcessWorker | None = None
        kafka: _Kafka | None = None
        app_engine = create_engine(url)
        if broker is not None:
            relay = _Contender(url, OUTBOXER, transport=broker.transport_url)
            worker = InProcessWorker(relay.outbox, consume=False).start()
            counter = StatementCounter(relay.outbox.db.async_engine.sync_engine)
            kafka = _Kafka(relay.outbox, relay.service)
            contenders[OUTBOXER] = relay
            big = _Contender(url, OUTBOXER_BIG, transport=broker.transport_url, batch=BIG_BATCH)
            workers.append(InProcessWorker(big.outbox, consume=False).start())
            contenders[OUTBOXER_BIG] = big
            contenders[NAIVE] = _Contender(url, NAIVE)
            contenders[PRODUCE] = _Contender(url, PRODUCE)
        nats_url = bench.nats()
        nats_worker: InProcessWorker | None = None
        if nats_url is None:
            section.skip("NATS contenders", bench.nats_missing())
        else:
            nats_relay = _Contender(url, NATS_RELAY, transport=nats_url)
            nats_worker = InProcessWorker(nats_relay.outbox, consume=False).start()
            contenders[NATS_RELAY] = nats_relay
            contenders[NATS_PUBLISH] = _Contender(url, NATS_PUBLISH)
        redis_url = bench.redis()
        redis_worker: InProcessWorker | None = None
        if redis_url is None:
            section.skip("Redis contenders", bench.redis_missing())
        else:
            redis_relay = _Contender(url, REDIS_RELAY, transport=redis_url)
            redis_worker = InProcessWorker(redis_relay.outbox, consume=False).start()
            contenders[REDIS_RELAY] = redis_relay
            contenders[REDIS_RAW] = _Contender(url, REDIS_RAW)
        batch = ceiling.batch
        for name in contenders:
            size = n_naive if name == NAIVE else n
            section.add(
                name,
                "rows/s",
                size,
                reference=name in (CEILING, CEILING_BIG, NAIVE, PRODUCE, NATS_PUBLISH),
            )
        say(f"  relay: {n:,} rows per run ({n_naive:,} for the one-at-a-time relay), batch {batch}")
        try:
            # One untimed pass of each contender: connection pools, statement caches.
            plan = [(-1, name) for name in contenders]
            plan += list(interleave(bench.rounds, list(contenders)))
            for r, name in plan:
                c = contenders[name]
                size = min(n, 50) if r < 0 else (n_naive if name == NAIVE else n)
                run_name = f"{name}, round {r + 1}" if r >= 0 else f"{name}, warm-up"
                try:
                    if name in (NATS_RELAY, NATS_PUBLISH):
                        rate = _one_nats(
                            c, name, size, nats_worker, nats_url, app_engine, section, run_name
                        )
                    elif name in (REDIS_RELAY, REDIS_RAW):
                        rate = _redis_one(
                            c, name, size, redis_url, redis_worker, app_engine, section, run_name
                        )
                    elif name == OUTBOXER_BIG:
                        rate = _relay_run(c, size, workers[0], app_engine, section, run_name)
                    else:
                        rate = _one(c, name, size, kafka, worker, app_engine, section, run_name)
                except Exception as exc:
                    section.failed(run_name, exc)
                    continue
                if r >= 0 and rate is not None:
                    section.series[name].samples.append(rate)
                    say(f"    {run_name}: {rate:,.0f} rows/s")
            if worker is not None:
                rows = bench.rounds * n + min(n, 50)
                section.extra["relay_statements_per_row"] = counter.count / rows
                section.extra["relay_batches"] = batch_times(worker)
        finally:
            for w in workers:
                w.stop()
            if worker is not None:
                worker.stop()
            if nats_worker is not None:
                nats_worker.stop()
            if redis_worker is not None:
                redis_worker.stop()
            app_engine.dispose()
            for c in contenders.values():
                c.outbox.close()
    _ratios(section, bench.rounds)
    return section


def _one(
    c: _Contender,
    name: str,
    size: int,
    kafka: _Kafka | None,
    worker: InProcessWorker | None,
    app_engine: Engine,
    section: Section,
    run_name: str,
) -> float | None:
    if name == OUTBOXER:
        assert worker is not None
        return _relay_run(c, size, worker, app_engine, section, run_name)
    c.fill(size)
    if name in (CEILING, CEILING_BIG):
        start = time.perf_counter()
        _ceiling_run(c)
        took = time.perf_counter() - start
    elif name == STORE:
        start = time.perf_counter()
        _store_run(c)
        took = time.perf_counter() - start
    elif name == NAIVE:
        assert kafka is not None
        acked = kafka.acked
        start = time.perf_counter()
        _naive_run(c, kafka)
        took = time.perf_counter() - start
        section.check(
            f"{run_name}: every message acknowledged",
            kafka.acked - acked == size and not kafka.errors,
            f"{kafka.acked - acked} of {size}, errors {kafka.errors[:3]}",
        )
    else:
        assert kafka is not None
        messages = _envelopes(c)
        acked = kafka.acked
        start = time.perf_counter()
        _produce_run(kafka, messages)
        took = time.perf_counter() - start
        section.check(
            f"{run_name}: every message acknowledged",
            kafka.acked - acked == size and not kafka.errors,
            f"{kafka.acked - acked} of {size}, errors {kafka.errors[:3]}",
        )
        return size / took
    c.check_published(section, run_name, size)
    return size / took


def _relay_run(
    c: _Contender,
    size: int,
    worker: InProcessWorker,
    app_engine: Engine,
    section: Section,
    run_name: str,
) -> float | None:
    """A backlog relayed by outboxer's running relay: rows/s until the last mark."""
    _truncate(c.outbox, c.service)
    goal = worker.progress.goal("published", worker.progress.counts["published"] + size)
    fill_due(c.outbox, c.service, size - 1, event_type=EVENT)
    start = time.perf_counter()
    publish_one(c.outbox, app_engine, {"kick": True})  # its commit wakes the relay
    if not goal.done.wait(120):
        section.check(f"{run_name}: relay finished", False, "not done within 120 s")
        return None
    took = goal.at - start
    c.check_published(section, run_name, size)
    return size / took


def _one_nats(
    c: _Contender,
    name: str,
    size: int,
    worker: InProcessWorker | None,
    nats_url: str | None,
    app_engine: Engine,
    section: Section,
    run_name: str,
) -> float | None:
    from bench import natsbench  # noqa: PLC0415 - optional

    if name == NATS_RELAY:
        assert worker is not None
        return _relay_run(c, size, worker, app_engine, section, run_name)
    assert nats_url is not None
    c.fill(size)
    messages = _envelopes(c)
    destination = c.outbox.routes.route_for_service(c.service).topic
    from outboxer.transports.nats import NatsSettings  # noqa: PLC0415 - optional

    lanes = NatsSettings().lanes
    _ensure_stream(nats_url, destination)
    took, acked, errors = natsbench.publish_raw(
        nats_url, destination, messages, concurrency=c.batch, lanes=lanes
    )
    section.check(
        f"{run_name}: every message acknowledged",
        acked == size and not errors,
        f"{acked} of {size}, errors {errors[:3]}",
    )
    return size / took


def _ensure_stream(nats_url: str, destination: str) -> None:
    """The destination's stream as outboxer's transport declares it."""
    import asyncio  # noqa: PLC0415

    from outboxer.transports.nats import create  # noqa: PLC0415 - optional

    async def declare() -> None:
        transport = create(nats_url, settings())
        route = ServiceRoute("bench_raw", "bench_raw_outbox", destination, f"{destination}.g")
        try:
            await transport.start([route])
        finally:
            await transport.close()

    asyncio.run(declare())


def _redis_one(
    c: _Contender,
    name: str,
    size: int,
    url: str | None,
    worker: InProcessWorker | None,
    app_engine: Engine,
    section: Section,
    run_name: str,
) -> float | None:
    """One run of a Redis contender: the relay (timed as the Kafka relay is), or the
    raw pipelines of the same entries."""
    if name == REDIS_RELAY:
        assert worker is not None
        return _relay_run(c, size, worker, app_engine, section, run_name)
    assert url is not None
    c.fill(size)
    took, added = asyncio.run(_redis_raw(c, url))
    section.check(f"{run_name}: every entry added", added == size, f"{added} of {size} entry ids")
    return size / took


async def _redis_raw(c: _Contender, url: str) -> tuple[float, int]:
    """XADD the contender's rows as outboxer's transport would (its lanes and fields),
    one pipeline per batch; returns (seconds, entry ids received)."""
    from redis.asyncio import Redis  # noqa: PLC0415 - optional

    from outboxer.transports.base import OutgoingMessage  # noqa: PLC0415
    from outboxer.transports.redis.admin import Topology  # noqa: PLC0415
    from outboxer.transports.redis.producer import fields_of  # noqa: PLC0415
    from outboxer.transports.redis.settings import RedisSettings  # noqa: PLC0415

    topology = Topology(RedisSettings.parse(c.outbox.settings.section("redis")))
    destination = c.outbox.routes.route_for_service(c.service).topic
    entries = [
        (
            topology.stream(destination, topology.lane_of(key)),
            fields_of(OutgoingMessage(i, 0, key, value, "", "", "", {})),
            headers,
        )
        for i, (key, value, headers) in enumerate(_envelopes(c))
    ]
    client = Redis.from_url(url)
    added = 0
    try:
        start = time.perf_counter()
        for i in range(0, len(entries), c.batch):
            pipe = client.pipeline(transaction=False)
            for stream, fields, headers in entries[i : i + c.batch]:
                for name, value in headers:
                    fields[b"h:" + name.encode()] = (
                        value if isinstance(value, bytes) else str(value).encode()
                    )
                pipe.xadd(stream, fields)  # type: ignore[arg-type]
            added += sum(1 for r in await pipe.execute() if r)
        took = time.perf_counter() - start
    finally:
        await client.aclose()
    return took, added


def batch_times(worker: InProcessWorker) -> dict[str, float | None]:
    """Median milliseconds of a relay round (claim, send, mark) and of its send (until
    the broker acknowledged the batch), as the relay reports them to its observers."""
    rounds, sends = worker.progress.round_seconds, worker.progress.send_seconds
    round_s, send_s = median(rounds), median(sends)
    return {
        "round_ms": None if round_s is None else 1000 * round_s,
        "send_ms": None if send_s is None else 1000 * send_s,
        "batches": float(len(rounds)),
    }


def _ratios(section: Section, rounds: int) -> None:
    s = section.series

    def per_round(a: str, b: str) -> list[float]:
        xs, ys = s[a].samples if a in s else [], s[b].samples if b in s else []
        return [x / y for x, y in zip(xs, ys, strict=False) if y]

    def best(a: str, b: str) -> list[float]:
        xs, ys = s[a].samples if a in s else [], s[b].samples if b in s else []
        if not ys:
            return list(xs)
        return [max(x, y) for x, y in zip(xs, ys, strict=False)]

    if OUTBOXER in s:
        # Each side at its best batch size (100 or 1000), round by round.
        ceilings, relays = best(CEILING, CEILING_BIG), best(OUTBOXER, OUTBOXER_BIG)
        pairs = zip(relays, ceilings, strict=False)
        section.ratios["relay / ceiling"] = [x / y for x, y in pairs if y]
        section.ratios["relay / ceiling, both batch 100"] = per_round(OUTBOXER, CEILING)
        section.ratios["relay / one-at-a-time"] = per_round(OUTBOXER, NAIVE)
        section.ratios["relay / raw produce"] = per_round(OUTBOXER, PRODUCE)
    if NATS_RELAY in s:
        section.ratios["nats relay / raw nats-py publish"] = per_round(NATS_RELAY, NATS_PUBLISH)
    if REDIS_RELAY in s:
        section.ratios["redis relay / raw XADD pipeline"] = per_round(REDIS_RELAY, REDIS_RAW)
    section.ratios["store claim+mark / ceiling"] = per_round(STORE, CEILING)
    r1 = section.ratios.get("relay / ceiling", [])
    r2 = section.ratios.get("relay / one-at-a-time", [])
    out = s[OUTBOXER].samples if OUTBOXER in s else []
    best_out, best_ceiling = best(OUTBOXER, OUTBOXER_BIG), best(CEILING, CEILING_BIG)
    m1, m2 = median(r1), median(r2)
    nats_ratio = section.ratios.get("nats relay / raw nats-py publish", [])
    nats_out = s[NATS_RELAY].samples if NATS_RELAY in s else []
    nats_raw = s[NATS_PUBLISH].samples if NATS_PUBLISH in s else []
    redis_ratio = section.ratios.get("redis relay / raw XADD pipeline", [])
    redis_targets = (
        [
            Target(
                f"relay rows/s, {s[REDIS_RELAY].size:,} rows, Redis, vs raw redis-py pipelines",
                spread(s[REDIS_RELAY].samples),
                f"raw XADD pipelines {spread(s[REDIS_RAW].samples)}",
                spread(redis_ratio, "{:.2f}"),
                "report only",
                None,
            )
        ]
        if REDIS_RELAY in s
        else []
    )
    section.targets = [
        Target(
            f"relay rows/s, {s[CEILING].size:,} rows, Kafka, vs the database ceiling "
            "(each at its best of batch 100 and 1000)",
            spread(best_out),
            f"ceiling {spread(best_ceiling)}",
            spread(r1, "{:.2f}"),
            f">= {RELAY_TARGET:.2f}",
            None if m1 is None else m1 >= RELAY_TARGET,
        ),
        Target(
            "relay vs a one-message-at-a-time relay",
            spread(out),
            f"one-at-a-time {spread(s[NAIVE].samples) if NAIVE in s else '-'}",
            spread(r2, "{:.1f}x"),
            f">= {NAIVE_TARGET:.0f}x",
            None if m2 is None else m2 >= NAIVE_TARGET,
        ),
    ]
    section.targets.append(
        Target(
            f"relay rows/s, {s[CEILING].size:,} rows, NATS JetStream, vs raw nats-py publish",
            spread(nats_out),
            f"raw nats-py {spread(nats_raw)}",
            spread(nats_ratio, "{:.2f}"),
            "report only",
            None,
        )
    )
    section.targets += redis_targets
