"""The cost of publishing: business transactions per second on PostgreSQL, one after
another on one connection, each inserting one order and committing.

Contenders, interleaved round by round (no relay runs; the publisher is a web
process, the worker runs elsewhere):

- **without publish**: ``INSERT`` an order, ``COMMIT``.
- **with one publish**: the same plus ``Outbox.publish`` of one event on the same
  connection, in the same transaction.
- **with one publish with event_id**: the same with an explicit ``event_id`` (unique
  per table since schema version 4: the id's holder is read, then the database's
  insert-or-nothing writes the row).
- **ten events, publish x10** / **ten events, publish_many**: an order with ten
  events, published one call each, and (when the outbox has it) in one
  ``publish_many`` call; reported in events/s.

And what one publish adds to a transaction, against the raw driver doing the same:
``synchronous_commit`` off on the connection (the disk's noise out), the median
duration of a transaction without publish, with ``Outbox.publish``, and with the
same row written by hand: the very SQL ``publish`` sends (its INSERT and
``pg_notify``, captured once) run with ``Connection.exec_driver_sql``, the envelope
built by ``json.dumps`` (the same keys and separators), its id read back. Also the
median of the call alone.

And what ``pg_notify`` costs publishers at once (report only): ``THREADS`` threads,
each on a connection of its own, commit business transactions with one publish for
a fixed time, with ``notify`` on and off (outboxer), and the raw driver sending the
very SQL of each (the INSERT with and without its ``pg_notify``). NOTIFY takes a
database-wide lock at commit, so notifying transactions commit one at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Integer,
    MetaData,
    Table,
    create_engine,
    func,
    insert,
    select,
)

from bench.core import (
    EVENT,
    Bench,
    Section,
    Target,
    has_publish_many,
    have,
    interleave,
    median,
    say,
    settings,
    spread,
    unique,
)
from outboxer import Outbox

WITHOUT = "business tx without publish"
WITH = "business tx + one publish"
WITH_ID = "business tx + one publish with event_id"
TEN = "business tx + 10 events (publish x10)"
MANY = "business tx + 10 events (publish_many)"

TARGET = 0.90
ADDED_TARGET = 1.10
THREADS = 8


def run(bench: Bench) -> Section:
    k = bench.sizes.publish_tx
    section = Section("publish", "Publishing cost (PostgreSQL)", __doc__ or "")
    if not have("psycopg"):
        section.skip("publish", "psycopg is not installed (pip install '.[postgres]')")
        return section
    with bench.database("postgresql") as url:
        service = unique("p")
        outbox = Outbox(url, settings=settings())
        outbox.register_event(EVENT, service)
        outbox.migrate()
        orders = Table(
            f"{service}_orders",
            MetaData(),
            Column("id", BigInteger, primary_key=True, autoincrement=True),
            Column("n", Integer, nullable=False),
        )
        engine = create_engine(url)
        orders.create(engine)
        table = outbox.table_for(service)
        try:
            bodies: dict[str, Callable[[Connection, int], Any]] = {
                WITHOUT: lambda conn, i: conn.execute(insert(orders).values(n=i)),
                WITH: lambda conn, i: (
                    conn.execute(insert(orders).values(n=i)),
                    outbox.publish(conn, EVENT, {"order": i}, key=f"order-{i}"),
                ),
                WITH_ID: lambda conn, i: (
                    conn.execute(insert(orders).values(n=i)),
                    outbox.publish(
                        conn, EVENT, {"order": i}, key=f"order-{i}", event_id=f"order-{i}-placed"
                    ),
                ),
                TEN: lambda conn, i: (
                    conn.execute(insert(orders).values(n=i)),
                    [outbox.publish(conn, EVENT, {"order": i, "line": j}) for j in range(10)],
                ),
            }
            many = _publish_many(outbox, engine) if has_publish_many() else None
            if many is not None:
                bodies[MANY] = lambda conn, i: (
                    conn.execute(insert(orders).values(n=i)),
                    many(conn, [{"order": i, "line": j} for j in range(10)]),
                )
                section.notes.append("publish_many found on Outbox: measured.")
            elif has_publish_many():
                section.skip(MANY, "publish_many exists but takes none of the forms tried")
            else:
                section.notes.append(
                    "Outbox has no publish_many yet: ten events are ten publish calls; "
                    "the harness measures publish_many as soon as it exists."
                )
            for name in bodies:
                unit = "events/s" if name in (TEN, MANY) else "tx/s"
                size = k if unit == "tx/s" else k // 10 * 10
                section.add(name, unit, size, reference=name == WITHOUT)
            say(f"  publish: {k:,} transactions per run")
            plan = [(-1, name) for name in bodies] + list(interleave(bench.rounds, list(bodies)))
            for r, name in plan:
                run_name = f"{name}, round {r + 1}" if r >= 0 else f"{name}, warm-up"
                count = 20 if r < 0 else (k // 10 if name in (TEN, MANY) else k)
                try:
                    rate = _run(engine, outbox, orders, table, bodies[name], count)
                except Exception as exc:
                    section.failed(run_name, exc)
                    continue
                events = {WITHOUT: 0, WITH: 1, WITH_ID: 1}.get(name, 10)
                ok, detail = _check(engine, orders, table, count, count * events)
                section.check(f"{run_name}: every order and event written", ok, detail)
                if r >= 0:
                    rate *= 1 if events <= 1 else events
                    section.series[name].samples.append(rate)
                    say(f"    {run_name}: {rate:,.0f} {section.series[name].unit}")
            added: dict[str, list[tuple[float, float]]] = {}
            for r in range(bench.rounds):
                try:
                    for name, pair in _added(engine, outbox, orders, table, k).items():
                        added.setdefault(name, []).append(pair)
                except Exception as exc:
                    section.failed(f"added cost, round {r + 1}", exc)
            section.extra["added_us"] = {
                name: [[1e6 * a, 1e6 * b] for a, b in pairs] for name, pairs in added.items()
            }
            _added_targets(section, added)
            try:
                _concurrent(bench, section, url, service, orders)
            except Exception as exc:
                section.failed(f"{THREADS} publishing threads", exc)
        finally:
            engine.dispose()
            outbox.close()
    _targets(section)
    return section


def _added(
    engine: Engine, outbox: Outbox, orders: Table, table: Table, count: int
) -> dict[str, tuple[float, float]]:
    """Median seconds of a whole transaction and of the publishing call alone, for
    no publish, ``Outbox.publish`` and the same row written with the raw driver."""
    import json  # noqa: PLC0415

    sql, template = _publish_sql(engine, outbox)
    envelope = json.loads(template["payload"])

    def raw(conn: Connection, i: int) -> None:
        params = dict(template)
        params["payload"] = json.dumps(
            {**envelope, "aggregate_id": f"order-{i}", "payload": {"order": i}},
            separators=(",", ":"),
        )
        params["message_key"] = f"order-{i}"
        conn.exec_driver_sql(sql, params).scalar()

    def with_publish(conn: Connection, i: int) -> None:
        outbox.publish(conn, EVENT, {"order": i}, key=f"order-{i}")

    out: dict[str, tuple[float, float]] = {}
    for name, call in (("without", None), ("publish", with_publish), ("raw", raw)):
        with engine.begin() as conn:
            conn.execute(orders.delete())
            conn.execute(table.delete())
        whole: list[float] = []
        alone: list[float] = []
        with engine.connect() as conn:
            conn.exec_driver_sql("SET synchronous_commit TO OFF")
            conn.commit()
            for i in range(count):
                began = time.perf_counter()
                with conn.begin():
                    conn.execute(insert(orders).values(n=i))
                    if call is not None:
                        t = time.perf_counter()
                        call(conn, i)
                        alone.append(time.perf_counter() - t)
                whole.append(time.perf_counter() - began)
        out[name] = (median(whole) or 0.0, median(alone) or 0.0)
    return out


def _publish_sql(engine: Engine, outbox: Outbox) -> tuple[str, dict[str, Any]]:
    """The SQL text and parameters one ``publish`` sends (its INSERT, with its
    ``pg_notify`` when notify is on), captured once from a real call."""
    from sqlalchemy import event as sa_event  # noqa: PLC0415

    captured: dict[str, Any] = {}

    def grab(conn: Any, cursor: Any, statement: str, params: Any, *args: Any) -> None:
        if "sql" not in captured and statement.lstrip().startswith(("INSERT", "WITH")):
            captured["sql"], captured["params"] = statement, dict(params)

    sa_event.listen(engine, "before_cursor_execute", grab)
    try:
        with engine.begin() as conn:
            outbox.publish(conn, EVENT, {"order": -1}, key="order--1")
    finally:
        sa_event.remove(engine, "before_cursor_execute", grab)
    return captured["sql"], captured["params"]


def _concurrent(bench: Bench, section: Section, url: str, service: str, orders: Table) -> None:
    """Business transactions/s of ``THREADS`` threads at once, notify on and off."""
    import threading  # noqa: PLC0415

    seconds = max(0.5, min(5.0, bench.sizes.publish_tx / 1000))
    engine = create_engine(url, pool_size=THREADS, max_overflow=0)
    outboxes = {on: Outbox(url, settings=settings(notify=on)) for on in (True, False)}
    sql: dict[bool, tuple[str, dict[str, Any]]] = {}
    try:
        for on, outbox in outboxes.items():
            outbox.register_event(EVENT, service)
            sql[on] = _publish_sql(engine, outbox)
        if "pg_notify" not in sql[True][0] or "pg_notify" in sql[False][0]:
            section.skip(f"{THREADS} publishing threads", "notify does not switch pg_notify")
            return

        def outboxer_body(on: bool) -> Callable[[Connection, int], Any]:
            outbox = outboxes[on]
            return lambda conn, i: outbox.publish(conn, EVENT, {"order": i}, key=f"order-{i}")

        def raw_body(on: bool) -> Callable[[Connection, int], Any]:
            text, template = sql[on]
            return lambda conn, i: conn.exec_driver_sql(text, dict(template)).scalar()

        contenders = {
            "outboxer, notify on": outboxer_body(True),
            "outboxer, notify off": outboxer_body(False),
            "raw driver, with pg_notify": raw_body(True),
            "raw driver, without": raw_body(False),
        }

        def run_threads(body: Callable[[Connection, int], Any]) -> float:
            done = [0] * THREADS
            errors: list[BaseException] = []
            stop = time.perf_counter() + seconds

            def work(n: int) -> None:
                try:
                    with engine.connect() as conn:
                        i = 0
                        while time.perf_counter() < stop:
                            with conn.begin():
                                conn.execute(insert(orders).values(n=i))
                                body(conn, i)
                            i += 1
                        done[n] = i
                except BaseException as exc:  # reported below
                    errors.append(exc)

            threads = [threading.Thread(target=work, args=(n,)) for n in range(THREADS)]
            began = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
            return sum(done) / (time.perf_counter() - began)

        rates: dict[str, list[float]] = {name: [] for name in contenders}
        plan = [(-1, name) for name in contenders] + list(
            interleave(bench.rounds, list(contenders))
        )
        for r, name in plan:
            rate = run_threads(contenders[name])
            if r >= 0:
                rates[name].append(rate)
                say(f"    {THREADS} threads, {name}, round {r + 1}: {rate:,.0f} tx/s")
        section.extra["concurrent_tx_s"] = rates
        for who, notifying, silent in (
            ("outboxer", "outboxer, notify on", "outboxer, notify off"),
            ("raw driver", "raw driver, with pg_notify", "raw driver, without"),
        ):
            ratio = [a / b for a, b in zip(rates[notifying], rates[silent], strict=False) if b]
            section.ratios[f"{THREADS} threads, {who}: notify on / off"] = ratio
            section.targets.append(
                Target(
                    f"{THREADS} threads publishing at once ({who}), business tx/s, "
                    f"pg_notify in each vs none",
                    spread(rates[notifying]),
                    f"without {spread(rates[silent])}",
                    spread(ratio, "{:.2f}"),
                    "report only",
                    None,
                )
            )
    finally:
        for outbox in outboxes.values():
            outbox.close()
        engine.dispose()


def _publish_many(outbox: Outbox, engine: Engine) -> Callable[[Connection, list[Any]], Any] | None:
    """A call of ``Outbox.publish_many`` for ten payloads of one event type."""

    def publish_many(conn: Connection, payloads: list[Any]) -> Any:
        return outbox.publish_many(conn, [(EVENT, p) for p in payloads])

    return publish_many


def _run(
    engine: Engine,
    outbox: Outbox,
    orders: Table,
    table: Table,
    body: Callable[[Connection, int], Any],
    count: int,
) -> float:
    with engine.begin() as conn:
        conn.execute(orders.delete())
        conn.execute(table.delete())
    with engine.connect() as conn:
        start = time.perf_counter()
        for i in range(count):
            with conn.begin():
                body(conn, i)
        took = time.perf_counter() - start
    return count / took


def _check(
    engine: Engine, orders: Table, table: Table, count: int, events: int
) -> tuple[bool, str]:
    with engine.connect() as conn:
        n_orders = conn.execute(select(func.count()).select_from(orders)).scalar_one()
        n_events = conn.execute(select(func.count()).select_from(table)).scalar_one()
    ok = n_orders == count and n_events == events
    return ok, f"orders {n_orders} of {count}, events {n_events} of {events}"


def _added_targets(section: Section, added: dict[str, list[tuple[float, float]]]) -> None:
    """What publish adds to a transaction over what the raw driver's same row adds."""
    if not all(name in added for name in ("without", "publish", "raw")):
        return
    rounds = zip(added["without"], added["publish"], added["raw"], strict=False)
    tx_ratio: list[float] = []
    call_ratio: list[float] = []
    ours: list[float] = []
    theirs: list[float] = []
    for (w, _), (p, pc), (r, rc) in rounds:
        if r - w > 0:
            tx_ratio.append((p - w) / (r - w))
        if rc > 0:
            call_ratio.append(pc / rc)
        ours.append(1e6 * (p - w))
        theirs.append(1e6 * (r - w))
    section.ratios["publish adds / raw driver adds (per transaction)"] = tx_ratio
    section.ratios["publish call / raw driver call"] = call_ratio
    m = median(tx_ratio)
    section.targets.append(
        Target(
            "what one publish adds to a transaction (median us, synchronous_commit off), "
            "vs the same row by the raw driver",
            spread(ours, "{:.0f} us"),
            f"raw {spread(theirs, '{:.0f} us')}; the call alone {spread(call_ratio, '{:.2f}x')}",
            spread(tx_ratio, "{:.2f}x"),
            f"<= {ADDED_TARGET:.2f}x",
            None if m is None else m <= ADDED_TARGET,
        )
    )


def _targets(section: Section) -> None:
    s = section.series
    ratio = [a / b for a, b in zip(s[WITH].samples, s[WITHOUT].samples, strict=False) if b]
    section.ratios["with / without publish"] = ratio
    if WITH_ID in s:
        section.ratios["with event_id / with publish"] = [
            a / b for a, b in zip(s[WITH_ID].samples, s[WITH].samples, strict=False) if b
        ]
    if MANY in s:
        section.ratios["publish_many / publish x10"] = [
            a / b for a, b in zip(s[MANY].samples, s[TEN].samples, strict=False) if b
        ]
    m = median(ratio)
    section.targets.append(
        Target(
            "business transactions/s with one publish vs without",
            spread(s[WITH].samples),
            f"without {spread(s[WITHOUT].samples)}",
            spread(ratio, "{:.2f}"),
            f">= {TARGET:.2f}",
            None if m is None else m >= TARGET,
        )
    )
