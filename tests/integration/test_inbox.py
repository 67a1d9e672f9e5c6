"""Consumers with their own database (the inbox), through the real Kafka-protocol broker.

The producer writes its outbox in one database; the consumer stores every event it
receives in an inbox in another database and handles it there. Duplicates on the
topic, a consumer killed between its commit and its offset commit, and failing
handlers: each effect applies exactly once.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select
from sqlalchemy.orm import Session

from outboxer import Envelope, Outbox, RoutingError, Status
from outboxer.testing import EmbeddedKafka, InMemoryTransport, drain
from outboxer.transports.adapters import Debezium
from outboxer.transports.base import OutgoingMessage
from tests.helpers import isolated_settings
from tests.integration.engine_helpers import run_until

pytestmark = pytest.mark.kafka

EVENTS = 300


def _settings(prefix: str, **extra: Any) -> Any:
    values: dict[str, Any] = {
        "retry_unit": 0.02,
        "poll_interval": 0.1,
        "topic_prefix": prefix,
        "kafka": {"session_timeout_ms": 6000},
        "shutdown_timeout": 20.0,
        **extra,
    }
    return isolated_settings(**values)


def _effects(prefix: str) -> Table:
    return Table(
        f"{prefix}_fx",
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("event_id", String(64), nullable=False),
        Column("n", Integer, nullable=False),
    )


class Pair:
    """An orders service (producer) and a billing service (inbox consumer)."""

    def __init__(self, producer_url: str, consumer_url: str, broker: EmbeddedKafka) -> None:
        self.prefix = f"i{uuid.uuid4().hex[:8]}"
        self.producer = Outbox(
            producer_url, transport=broker.transport_url, settings=_settings(self.prefix)
        )
        self.producer.register_event("order.placed", "orders")
        self.producer.migrate()
        self.consumer = Outbox(
            consumer_url, transport=broker.transport_url, settings=_settings(self.prefix)
        )
        self.consumer.register_inbox("orders", consumer="billing")
        self.consumer.register_event("order.placed", "orders")
        self.fx = _effects(self.prefix)
        with self.consumer.db.sync_engine.begin() as conn:
            self.fx.metadata.create_all(conn)
        self.consumer.migrate()
        self.flaky: dict[int, int] = {}

        @self.consumer.handler("order.placed")
        def bill(event: Envelope, tx: Session) -> None:
            n = event.payload["n"]
            tx.execute(insert(self.fx).values(event_id=event.event_id, n=n))
            left = self.flaky.get(n, 0)
            if left:
                self.flaky[n] = left - 1
                raise RuntimeError(f"planned failure of {n}")

    def publish(self, count: int) -> None:
        with self.producer.db.sync_engine.begin() as conn:
            for n in range(count):
                self.producer.publish(conn, "order.placed", {"n": n}, key=f"order-{n % 17}")

    def effects(self) -> tuple[int, int]:
        distinct = select(self.fx.c.event_id).distinct().subquery()
        with self.consumer.db.sync_engine.connect() as conn:
            rows = conn.execute(select(func.count()).select_from(self.fx)).scalar_one()
            unique = conn.execute(select(func.count()).select_from(distinct)).scalar_one()
        return int(rows), int(unique)

    def inbox(self) -> dict[str, int]:
        return self.consumer.store("orders").status().counts

    def drop(self) -> None:
        with self.consumer.db.sync_engine.begin() as conn:
            self.fx.drop(conn)
            self.consumer.metadata.drop_all(conn)
        with self.producer.db.sync_engine.begin() as conn:
            self.producer.metadata.drop_all(conn)
        self.consumer.close()
        self.producer.close()


def _duplicate(broker: EmbeddedKafka, topic: str, values: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": broker.bootstrap_servers})
    for value in values:
        producer.produce(topic, value=value, key=b"dup")
    assert producer.flush(30) == 0


@pytest.mark.parametrize("direction", ["postgresql->mariadb", "mariadb->postgresql"])
async def test_inbox_applies_each_event_once(
    request: pytest.FixtureRequest, kafka_broker: EmbeddedKafka, direction: str
) -> None:
    fixture = {"postgresql": "pg_database", "mariadb": "mysql_database"}
    source, target = direction.split("->")
    pair = Pair(
        request.getfixturevalue(fixture[source]).url,
        request.getfixturevalue(fixture[target]).url,
        kafka_broker,
    )
    pair.flaky = {7: 1, 11: 2}
    try:
        pair.publish(EVENTS)
        # Copies of some events on the topic, as a broker retry or a replay would.
        stored = pair.producer.store("orders")
        copies = []
        for oid in (1, 2, 3, 50, 51):
            row = stored.get_by_id(oid)
            assert row is not None
            copies.append(row.envelope().to_json())
        _duplicate(kafka_broker, pair.producer.routes.route_for_service("orders").topic, copies)

        def done() -> bool:  # ends on over-consumption too, which the asserts then show
            return pair.inbox()[Status.CONSUMED.value] >= EVENTS

        await run_until([pair.producer, pair.consumer], done, timeout=180)
        assert pair.effects() == (EVENTS, EVENTS)
        counts = pair.inbox()
        assert counts[Status.CONSUMED.value] == EVENTS
        assert counts[Status.PENDING.value] == 0
        assert counts[Status.DEAD.value] == 0
        inbox = pair.consumer.table_for("orders")
        with pair.consumer.db.sync_engine.connect() as conn:
            most = conn.execute(select(func.max(inbox.c.retry_count))).scalar_one()
        assert most == 2  # the flaky handler's failures were retried in the inbox
        # The producer's rows end published: final for a service consumed elsewhere.
        assert pair.producer.store("orders").status().counts[Status.PUBLISHED.value] == EVENTS
    finally:
        pair.drop()


KILLER_APP = """
import os, signal, sys
from sqlalchemy import Column, Integer, MetaData, String, Table, insert
from outboxer import Outbox, OutboxSettings
from outboxer.transports.kafka.transport import KafkaSubscription

url, transport, prefix, die = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "die"
fx = Table(f"{prefix}_fx", MetaData(), Column("id", Integer, primary_key=True),
           Column("event_id", String(64)), Column("n", Integer))
outbox = Outbox(url, transport=transport, settings=OutboxSettings.from_values(
    topic_prefix=prefix, retry_unit=0.02, poll_interval=0.1, batch_size=40,
    kafka={"session_timeout_ms": 6000}))
outbox.register_inbox("orders", consumer="billing")

@outbox.handler("order.placed", service="orders")
def bill(event, tx):
    tx.execute(insert(fx).values(event_id=event.event_id, n=event.payload["n"]))

if die:
    async def ack_then_die(self, messages):
        # The batch's transaction has committed; the offset is never committed.
        os.kill(os.getpid(), signal.SIGKILL)
    KafkaSubscription.ack = ack_then_die

outbox.run(relay=False)
"""


def test_consumer_killed_between_commit_and_offset_commit(
    pg_database: Any, mysql_database: Any, kafka_broker: EmbeddedKafka, tmp_path: Path
) -> None:
    pair = Pair(pg_database.url, mysql_database.url, kafka_broker)
    app = tmp_path / "killer.py"
    app.write_text(textwrap.dedent(KILLER_APP))
    argv = [sys.executable, str(app), mysql_database.url, kafka_broker.transport_url, pair.prefix]
    try:
        pair.publish(EVENTS)
        asyncio.run(_relay_all(pair))
        # The first consumer commits its first batch, then dies before the offset commit.
        victim = subprocess.run([*argv, "die"], capture_output=True, timeout=120, check=False)
        assert victim.returncode == -signal.SIGKILL, victim.stderr.decode()[-2000:]
        first = pair.inbox()[Status.CONSUMED.value]
        assert 0 < first < EVENTS
        # A new consumer in the same group starts from the last committed offset (none):
        # it receives the committed batch again, and the inbox makes it a no-op.
        log = tmp_path / "survivor.log"
        with log.open("wb") as out:
            survivor = subprocess.Popen([*argv, "live"], stdout=out, stderr=subprocess.STDOUT)
            try:
                finished = asyncio.run(_wait(lambda: pair.inbox()[Status.CONSUMED.value] == EVENTS))
                assert finished, log.read_text()[-3000:]
            finally:
                survivor.send_signal(signal.SIGTERM)
                survivor.wait(60)
        assert pair.effects() == (EVENTS, EVENTS)
    finally:
        pair.drop()


async def _relay_all(pair: Pair) -> None:
    def published() -> bool:
        return pair.producer.store("orders").status().counts[Status.PUBLISHED.value] == EVENTS

    await run_until([pair.producer], published)


async def _wait(condition: Any, timeout: float = 120.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if await asyncio.to_thread(condition):
            return True
        await asyncio.sleep(0.2)
    return False


def _debezium_message(n: int, form: str) -> tuple[bytes, bytes, list[tuple[str, Any]]]:
    """A message as Debezium's outbox event router writes it (key, value, headers)."""
    event_id = str(uuid.UUID(int=n + 1))
    payload = json.dumps({"id": n, "customerId": 123}).replace(":", ": ")  # jsonb's text
    if form == "json":  # JsonConverter without schemas: the text payload as a JSON string
        key, value = json.dumps(f"order-{n}"), json.dumps(payload)
    elif form == "schemas":  # JsonConverter with schemas
        key = json.dumps({"schema": {"type": "string", "optional": False}, "payload": f"order-{n}"})
        value = json.dumps(
            {
                "schema": {"type": "string", "optional": True, "name": "io.debezium.data.Json"},
                "payload": payload,
            }
        )
    else:  # StringConverter
        key, value = f"order-{n}", payload
    headers: list[tuple[str, Any]] = [("id", event_id.encode()), ("eventType", b"OrderCreated")]
    return key.encode(), value.encode(), headers


@pytest.mark.parametrize("form", ["json", "schemas", "string"])
async def test_debezium_events_into_the_inbox(
    pg_database: Any, kafka_broker: EmbeddedKafka, form: str
) -> None:
    prefix = f"d{uuid.uuid4().hex[:8]}"
    topic = f"outbox.event.{prefix}"
    consumer = Outbox(
        pg_database.url, transport=kafka_broker.transport_url, settings=_settings(prefix)
    )
    consumer.register_inbox("orders", consumer="billing", topic=topic, adapter=Debezium())
    consumer.register_event("OrderCreated", "orders")
    fx = _effects(prefix)
    with consumer.db.sync_engine.begin() as conn:
        fx.metadata.create_all(conn)
    consumer.migrate()

    @consumer.handler("OrderCreated")
    def record(event: Envelope, tx: Session) -> None:
        assert event.aggregate_id == f"order-{event.payload['id']}"
        tx.execute(insert(fx).values(event_id=event.event_id, n=event.payload["id"]))

    producer = Producer({"bootstrap.servers": kafka_broker.bootstrap_servers})
    for n in range(20):
        key, value, headers = _debezium_message(n, form)
        producer.produce(topic, key=key, value=value, headers=headers)
        if n % 5 == 0:  # delivered twice
            producer.produce(topic, key=key, value=value, headers=headers)
    producer.produce(topic, key=b"x", value=b"{broken", headers=[("eventType", b"OrderCreated")])
    assert producer.flush(30) == 0
    try:

        def done() -> bool:
            return consumer.store("orders").status().counts[Status.CONSUMED.value] == 20

        await run_until([consumer], done, timeout=120)
        with consumer.db.sync_engine.connect() as conn:
            got = conn.execute(select(fx.c.n).order_by(fx.c.n)).scalars().all()
        assert got == list(range(20))
        assert consumer.stats.get("undecodable") == 1  # the broken one, skipped
    finally:
        with consumer.db.sync_engine.begin() as conn:
            fx.drop(conn)
            consumer.metadata.drop_all(conn)
        consumer.close()


async def test_an_event_delivered_again_is_applied_once(db_url: str, tmp_path: Path) -> None:
    """Copies of events on the topic, in the batch of their original and after it was
    consumed: one inbox row and one effect per event. Waits for the broker to have
    every message acknowledged (not for a count), so over-consumption is seen."""
    broker = InMemoryTransport()
    prefix = f"d{uuid.uuid4().hex[:8]}"
    producer = Outbox(
        f"sqlite:///{tmp_path}/producer.db", transport=broker, settings=_settings(prefix)
    )
    producer.register_event("order.placed", "orders")
    producer.migrate()
    consumer = Outbox(db_url, transport=broker, settings=_settings(prefix))
    route = consumer.register_inbox("orders", consumer=f"{prefix}_billing")
    consumer.register_event("order.placed", "orders")
    fx = _effects(prefix)
    with consumer.db.sync_engine.begin() as conn:
        fx.metadata.create_all(conn)
    consumer.migrate()

    @consumer.handler("order.placed")
    def bill(event: Envelope, tx: Session) -> None:
        tx.execute(insert(fx).values(event_id=event.event_id, n=event.payload["n"]))

    def inbox_rows() -> int:
        with consumer.db.sync_engine.connect() as conn:
            t = consumer.table_for("orders")
            return int(conn.execute(select(func.count()).select_from(t)).scalar_one())

    def settled() -> bool:
        counts = consumer.store("orders").status().counts
        return (
            counts[Status.CONSUMED.value] >= count
            and counts[Status.PENDING.value] == 0
            and broker.pending() == 0
        )

    async def copy(*indexes: int) -> None:
        sent = broker.messages(route.topic)
        await broker.send(
            route,
            [
                OutgoingMessage.from_envelope(
                    sent[i].envelope(), key=(sent[i].key or b"").decode(), retry_count=0
                )
                for i in indexes
            ],
        )

    count = 5
    try:
        with producer.db.sync_engine.begin() as conn:
            for n in range(count):
                producer.publish(conn, "order.placed", {"n": n}, key=f"order-{n}")
        await drain(producer)
        await copy(0, 0, 1)  # read with their originals
        await run_until([consumer], settled, timeout=60)
        await copy(0, 2)  # after their originals were consumed
        await run_until([consumer], settled, timeout=60)

        assert len(broker.messages(route.topic)) == count + 5
        assert inbox_rows() == count
        assert consumer.store("orders").status().counts[Status.CONSUMED.value] == count
        with consumer.db.sync_engine.connect() as conn:
            applied = conn.execute(select(fx.c.n, func.count()).group_by(fx.c.n)).all()
        assert sorted(applied) == [(n, 1) for n in range(count)]  # exactly one effect each
    finally:
        with consumer.db.sync_engine.begin() as conn:
            fx.drop(conn)
            consumer.metadata.drop_all(conn)
        consumer.close()
        producer.close()


def test_an_inbox_service_is_not_published_here(tmp_path: Path) -> None:
    ob = Outbox(f"sqlite:///{tmp_path}/x.db", transport="memory", settings=_settings("p"))
    ob.register_inbox("orders", consumer="billing")
    ob.register_event("order.placed", "orders")
    ob.migrate()
    with ob.db.sync_engine.begin() as conn, pytest.raises(RoutingError, match="inbox"):
        ob.publish(conn, "order.placed", {"n": 1})
    route = ob.routes.route_for_service("orders")
    assert (route.table_name, route.group_id) == ("billing_orders_inbox", "p.orders.billing")
    assert route.topic == "p.orders"
    ob.close()
