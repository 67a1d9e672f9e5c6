"""RabbitMQ: the relay against the raw client, and end to end, side by side in one run:
``python -m bench.rabbitmq [--rounds N] [--rows N]``.

- **outboxer relay (rabbitmq)**: ``Outbox.run_async(consume=False)`` on PostgreSQL
  with the ``amqp://`` transport; a backlog of due rows (``fill_due``), timed from the
  worker's start (its connection included) until every row is marked published (each
  confirmed by the broker).
- **raw aio-pika publish, confirms**: the same rows' messages (envelope JSON, the same
  headers, persistent, ``mandatory``, lane routing keys) published with aio-pika on a
  confirming channel, ``batch_size`` at a time concurrently, each batch's confirms
  awaited together: the relay's sending alone, without the database.
- **end-to-end (rabbitmq)**: relay and consumer in one worker, a backlog timed until
  every row is consumed (one handler call each).

A virtual host of the run's own (``rabbitmqctl add_vhost``, deleted at the end) on the
broker at ``OUTBOXER_BENCH_RABBITMQ`` (default 127.0.0.1:5672, guest/guest).
Contenders are interleaved round by round; the medians (min-max) are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import time
import uuid
from typing import Any

from sqlalchemy import select

from bench.core import EVENT, PG_ADMIN, interleave, spread, unique
from outboxer import Envelope, Outbox, OutboxSettings, Status
from outboxer.testing import fill_due, scratch_database
from outboxer.transports.base import OutgoingMessage
from outboxer.transports.rabbitmq.admin import lane_of
from outboxer.transports.rabbitmq.producer import amqp_message
from outboxer.transports.rabbitmq.transport import RabbitMQTransport

HOST = os.environ.get("OUTBOXER_BENCH_RABBITMQ", "127.0.0.1:5672")
RELAY = "outboxer relay (rabbitmq), rows/s"
RAW = "raw aio-pika publish, confirms, rows/s"
E2E = "end-to-end (rabbitmq), events/s"


def _ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "--quiet", *args], check=True, capture_output=True, timeout=60)


def _settings() -> OutboxSettings:
    return OutboxSettings.from_values(
        poll_interval=0.05, topic_prefix=unique("rb"), rabbitmq={"prefetch": 500}
    )


class _Service:
    def __init__(self, db: str, url: str, *, consume: bool) -> None:
        self.service = unique("s")
        self.outbox = Outbox(db, transport=url, settings=_settings())
        self.consumed = 0
        if consume:

            @self.outbox.handler(EVENT, service=self.service)
            def handle(event: Any, tx: Any) -> None:
                self.consumed += 1

        else:
            self.outbox.register_event(EVENT, self.service)
        self.outbox.migrate()
        self.route = self.outbox.routes.route_for_service(self.service)

    def counts(self) -> dict[str, int]:
        return self.outbox.store(self.service).status().counts

    def truncate(self) -> None:
        table = self.outbox.table_for(self.service)
        with self.outbox.db.sync_engine.begin() as conn:
            conn.execute(table.delete())


async def _declare_group(url: str, svc: _Service) -> None:
    """The group's queues, as its first consumer would declare them."""
    transport = svc.outbox.transport
    assert isinstance(transport, RabbitMQTransport)
    other = RabbitMQTransport(url, settings=transport.settings)
    await other.start([svc.route])
    await (await other.subscribe(svc.route)).close()
    await other.close()


async def _until(svc: _Service, status: Status, n: int, consume: bool) -> float:
    task = asyncio.create_task(svc.outbox.run_async(consume=consume))
    start = time.perf_counter()
    try:
        while (await asyncio.to_thread(svc.counts)).get(status.value, 0) < n:
            if task.done():
                task.result()
                raise RuntimeError("the worker stopped")
            if time.perf_counter() - start > 300:
                raise RuntimeError(f"not {status.value} within 300 s")
            await asyncio.sleep(0.01)
        return time.perf_counter() - start
    finally:
        svc.outbox.stop()
        await task


def _messages(svc: _Service) -> list[OutgoingMessage]:
    """The messages the relay sent for the rows now in the table."""
    table = svc.outbox.table_for(svc.service)
    query = select(table.c.id, table.c.payload, table.c.message_key).order_by(table.c.id)
    with svc.outbox.db.sync_engine.connect() as conn:
        rows = conn.execute(query).all()
    return [
        OutgoingMessage.from_envelope(
            Envelope.from_stored(payload, oid, key), key=key, retry_count=0
        )
        for oid, payload, key in rows
    ]


async def _raw(
    url: str, svc: _Service, messages: list[OutgoingMessage], batch: int, lanes: int
) -> float:
    import aio_pika  # noqa: PLC0415 - the extra

    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(svc.route.topic, ensure=False)
        start = time.perf_counter()
        for i in range(0, len(messages), batch):
            await asyncio.gather(
                *(
                    exchange.publish(
                        amqp_message(m), routing_key=str(lane_of(m.key, lanes)), mandatory=True
                    )
                    for m in messages[i : i + batch]
                )
            )
        return time.perf_counter() - start
    finally:
        await connection.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rabbitmq")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=20_000)
    args = parser.parse_args(argv)
    vhost = f"outboxer_bench_{uuid.uuid4().hex[:8]}"
    _ctl("add_vhost", vhost)
    _ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    url = f"amqp://guest:guest@{HOST}/{vhost}"
    samples: dict[str, list[float]] = {RELAY: [], RAW: [], E2E: []}
    try:
        with scratch_database(PG_ADMIN, prefix="outboxer_brmq") as db:
            relay = _Service(db, url, consume=False)
            e2e = _Service(db, url, consume=True)
            asyncio.run(_declare_group(url, relay))
            settings = relay.outbox.settings
            lanes = settings.section("rabbitmq").lanes  # type: ignore[attr-defined]
            print(f"RabbitMQ at {HOST}, {args.rows:,} rows per run, batch {settings.batch_size}")
            for r, name in interleave(args.rounds, list(samples)):
                if name == RELAY:
                    relay.truncate()
                    fill_due(relay.outbox, relay.service, args.rows, event_type=EVENT)
                    took = asyncio.run(_until(relay, Status.PUBLISHED, args.rows, False))
                elif name == RAW:
                    messages = _messages(relay)
                    assert len(messages) == args.rows, len(messages)
                    took = asyncio.run(_raw(url, relay, messages, settings.batch_size, lanes))
                else:
                    e2e.truncate()
                    before = e2e.consumed
                    fill_due(e2e.outbox, e2e.service, args.rows, event_type=EVENT)
                    took = asyncio.run(_until(e2e, Status.CONSUMED, args.rows, True))
                    assert e2e.consumed - before == args.rows, e2e.consumed - before
                rate = args.rows / took
                samples[name].append(rate)
                print(f"  round {r + 1}: {name}: {rate:,.0f}", flush=True)
            for svc in (relay, e2e):
                svc.outbox.close()
    finally:
        _ctl("delete_vhost", vhost)
    print("medians (min-max):")
    for name, values in samples.items():
        print(f"  {name}: {spread(values)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
