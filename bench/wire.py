"""What event contracts and CloudEvents cost on the hot path, side by side in one run:
``python -m bench.wire [--rounds N] [--events N]``.

- **publish**: business transactions per second on PostgreSQL (INSERT an order,
  publish one event, COMMIT), the event type without a schema and with one (the same
  event, a JSON Schema of five typed properties, two required); and the check alone,
  in microseconds per event, without any database.
- **relay**: rows per second a relay claims, sends (the in-memory broker) and marks
  published on PostgreSQL, for a service in each format (envelope, CloudEvents
  binary, CloudEvents structured); and the encoding of a stored row into its message
  alone, in microseconds per row.

Contenders are interleaved round by round; the medians (min-max) are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import BigInteger, Column, Integer, MetaData, Table, create_engine, insert

from bench.core import PG_ADMIN, interleave, spread, unique
from outboxer import Outbox, OutboxSettings
from outboxer.cloudevents import encode_for
from outboxer.envelope import build_stored_envelope, encode_json, wire_event
from outboxer.routing import ServiceRoute
from outboxer.testing import InMemoryTransport, drain, scratch_database

SCHEMA = {
    "type": "object",
    "required": ["order", "customer"],
    "properties": {
        "order": {"type": "integer"},
        "customer": {"type": "string"},
        "total": {"type": "number"},
        "currency": {"type": "string", "enum": ["EUR", "USD"]},
        "lines": {"type": "array", "items": {"type": "object"}},
    },
}


def _payload(i: int) -> dict[str, Any]:
    return {
        "order": i,
        "customer": f"c-{i % 97}",
        "total": 12.5 + i,
        "currency": "EUR",
        "lines": [{"sku": "A-1", "qty": 2}, {"sku": "B-7", "qty": 1}],
    }


def _rate(fn: Callable[[], None], count: int) -> float:
    started = time.perf_counter()
    fn()
    return count / (time.perf_counter() - started)


def _micro(fn: Callable[[int], Any], count: int) -> float:
    started = time.perf_counter()
    for i in range(count):
        fn(i)
    return (time.perf_counter() - started) / count * 1e6


def publish(url: str, rounds: int, count: int) -> dict[str, list[float]]:
    plain, checked = unique("plain"), unique("schema")
    outbox = Outbox(url, settings=OutboxSettings.from_values())
    outbox.register_event("order.placed", plain)
    outbox.register_event("order.checked", checked, schema=SCHEMA)
    outbox.migrate()
    orders = Table(
        unique("orders_"),
        MetaData(),
        Column("id", BigInteger, primary_key=True, autoincrement=True),
        Column("n", Integer, nullable=False),
    )
    engine = create_engine(url)
    orders.create(engine)
    events = {"publish without schema": "order.placed", "publish with schema": "order.checked"}
    samples: dict[str, list[float]] = {name: [] for name in events}
    micro: dict[str, list[float]] = {f"check only, {name}": [] for name in events}

    def body(event_type: str) -> Callable[[], None]:
        def run() -> None:
            with engine.connect() as conn:
                for i in range(count):
                    with conn.begin():
                        conn.execute(insert(orders).values(n=i))
                        outbox.publish(conn, event_type, _payload(i), key=f"order-{i}")

        return run

    check = outbox.contracts.check
    try:
        for _, name in interleave(rounds, list(events)):
            samples[name].append(_rate(body(events[name]), count))
            event_type = events[name]

            def check_one(i: int, event_type: str = event_type) -> None:
                check(event_type, None, _payload(i))

            micro[f"check only, {name}"].append(_micro(check_one, 20_000))
    finally:
        orders.drop(engine)
        engine.dispose()
        with outbox.db.sync_engine.begin() as conn:
            outbox.metadata.drop_all(conn)
        outbox.close()
    return {**samples, **micro}


FORMATS = {
    "relay envelope": "envelope",
    "relay CloudEvents binary": "cloudevents",
    "relay CloudEvents structured": "cloudevents-structured",
}


def relay(url: str, rounds: int, count: int) -> dict[str, list[float]]:
    outbox = Outbox(
        url,
        transport=InMemoryTransport(),
        settings=OutboxSettings.from_values(poll_interval=0.05),
    )
    services = {}
    for name, fmt in FORMATS.items():
        service = unique("r")
        outbox.register_service(service, format=fmt)
        outbox.register_event(f"{service}.placed", service)
        services[name] = service
    outbox.migrate()
    samples: dict[str, list[float]] = {name: [] for name in FORMATS}

    def fill(service: str) -> None:
        with outbox.db.sync_engine.begin() as conn:
            outbox.publish_many(conn, [(f"{service}.placed", _payload(i)) for i in range(count)])

    try:
        for _, name in interleave(rounds, list(FORMATS)):
            fill(services[name])
            started = time.perf_counter()
            asyncio.run(drain(outbox, services=[services[name]], timeout=600))
            samples[name].append(count / (time.perf_counter() - started))
    finally:
        with outbox.db.sync_engine.begin() as conn:
            outbox.metadata.drop_all(conn)
        outbox.close()
    return samples


def encoding(rounds: int) -> dict[str, list[float]]:
    rows = [
        encode_json(
            build_stored_envelope(
                event_type="order.placed",
                payload=_payload(i),
                event_id=None,
                version="v1",
                aggregate_id=f"order-{i}",
            )
        )
        for i in range(2000)
    ]
    headers = {"ce_time": "2026-12-05T10:11:12.345678Z"}
    routes = {
        fmt: ServiceRoute("orders", "orders_outbox", "t.orders", "g", format=fmt)
        for fmt in FORMATS.values()
    }
    encoders: dict[str, Callable[[int], Any]] = {
        "encode only, relay envelope": lambda i: wire_event(rows[i % 2000], i + 1, "k"),
    }
    for name, fmt in list(FORMATS.items())[1:]:

        def encoded(i: int, route: ServiceRoute = routes[fmt]) -> Any:
            return encode_for(route, rows[i % 2000], i + 1, "k", headers)

        encoders[f"encode only, {name}"] = encoded
    samples: dict[str, list[float]] = {name: [] for name in encoders}
    for _, name in interleave(rounds, list(encoders)):
        samples[name].append(_micro(encoders[name], 50_000))
    return samples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.wire", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--events", type=int, default=2000, help="per run")
    args = parser.parse_args(argv)
    results: dict[str, tuple[str, list[float]]] = {}
    with scratch_database(PG_ADMIN, prefix="outboxer_bench") as url:
        for name, values in publish(url, args.rounds, args.events).items():
            results[name] = ("µs/event" if name.startswith("check") else "tx/s", values)
        for name, values in relay(url, args.rounds, args.events * 5).items():
            results[name] = ("rows/s", values)
    for name, values in encoding(args.rounds).items():
        results[name] = ("µs/row", values)
    width = max(len(n) for n in results)
    print(f"{'measure':<{width}}  median (min-max), {args.rounds} rounds")
    for name, (unit, values) in results.items():
        fmt = "{:,.2f}" if unit.startswith("µs") else "{:,.0f}"
        print(f"{name:<{width}}  {spread(values, fmt)} {unit}")


if __name__ == "__main__":
    main()
