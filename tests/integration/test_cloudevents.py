"""CloudEvents through the real Kafka-protocol broker: a service with ``format =
"cloudevents"`` is read by the CloudEvents SDK off the topic and handled by outboxer's
own consumer; an inbox reads what the SDK produces (binary and structured), each event
applied once."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from confluent_kafka import Producer
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select
from sqlalchemy.orm import Session

from outboxer import Envelope, Outbox, Status
from outboxer.testing import EmbeddedKafka
from tests.helpers import isolated_settings, read_topic
from tests.integration.engine_helpers import run_until

pytestmark = pytest.mark.kafka

EVENTS = 30


def _settings(prefix: str, **extra: Any) -> Any:
    return isolated_settings(
        retry_unit=0.02,
        poll_interval=0.1,
        topic_prefix=prefix,
        kafka={"session_timeout_ms": 6000},
        shutdown_timeout=20.0,
        **extra,
    )


def _effects(prefix: str) -> Table:
    return Table(
        f"{prefix}_fx",
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("event_id", String(200), nullable=False),
        Column("n", Integer, nullable=False),
    )


def _sdk(message: Any) -> Any:
    kafka_message = ce_kafka.KafkaMessage(
        headers=dict(message.headers() or []), key=message.key(), value=message.value()
    )
    return ce_kafka.from_kafka(kafka_message, JSONFormat())


@pytest.mark.parametrize("fmt", ["cloudevents", "cloudevents-structured"])
async def test_a_cloudevents_service_is_read_by_the_sdk_and_by_outboxer(
    pg_database: Any, kafka_broker: EmbeddedKafka, fmt: str
) -> None:
    prefix = f"c{uuid.uuid4().hex[:8]}"
    settings = _settings(prefix, services={"orders": {"format": fmt, "source": "/shop/orders"}})
    ob = Outbox(pg_database.url, transport=kafka_broker.transport_url, settings=settings)
    ob.register_event(
        "order.placed",
        "orders",
        schema={"$id": "https://shop.example/order.placed/v1", "type": "object"},
    )
    fx = _effects(prefix)
    with ob.db.sync_engine.begin() as conn:
        fx.metadata.create_all(conn)
    ob.migrate()
    seen: list[Envelope] = []

    @ob.handler("order.placed")
    def record(event: Envelope, tx: Session) -> None:
        seen.append(event)
        tx.execute(insert(fx).values(event_id=event.event_id, n=event.payload["n"]))

    before = datetime.now(UTC)
    with ob.db.sync_engine.begin() as conn:
        for n in range(EVENTS):
            event_id = f"order-{n}" if n % 2 else None  # half without an event id
            ob.publish(conn, "order.placed", {"n": n}, key=f"k-{n}", event_id=event_id)
    try:

        def done() -> bool:
            return ob.store("orders").status().counts[Status.CONSUMED.value] == EVENTS

        await run_until([ob], done, timeout=120)
        with ob.db.sync_engine.connect() as conn:
            got = conn.execute(select(fx.c.n).order_by(fx.c.n)).scalars().all()
            assert got == list(range(EVENTS))  # each applied once
        by_n = {e.payload["n"]: e for e in seen}
        assert by_n[1].event_id == "order-1"
        assert by_n[0].event_id == str(by_n[0].outbox_id)
        assert by_n[3].aggregate_id == "k-3"

        route = ob.routes.route_for_service("orders")
        messages = await asyncio.to_thread(
            read_topic, kafka_broker.bootstrap_servers, route.topic, EVENTS
        )
        events = [_sdk(m) for m in messages]
        assert len(events) == EVENTS
        assert len({e.get_id() for e in events}) == EVENTS  # ids unique in the source
        for message, event in zip(messages, events, strict=True):
            n = event.get_data()["n"]
            assert event.get_source() == "/shop/orders"
            assert event.get_type() == "order.placed"
            assert event.get_subject() == f"k-{n}" == message.key().decode()
            assert event.get_id() == (
                f"order-{n}" if n % 2 else str(event.get_extension("outboxid"))
            )
            assert event.get_dataschema() == "https://shop.example/order.placed/v1"
            assert event.get_datacontenttype() == "application/json"
            assert before <= event.get_time() <= datetime.now(UTC)
            headers = dict(message.headers() or [])
            if fmt == "cloudevents":
                assert headers["ce_type"] == b"order.placed"
            else:
                assert headers["content-type"] == b"application/cloudevents+json"
    finally:
        with ob.db.sync_engine.begin() as conn:
            fx.drop(conn)
            ob.metadata.drop_all(conn)
        ob.close()


@pytest.mark.parametrize("mode", ["binary", "structured"])
async def test_an_inbox_reads_what_the_sdk_writes(
    pg_database: Any, kafka_broker: EmbeddedKafka, mode: str
) -> None:
    prefix = f"s{uuid.uuid4().hex[:8]}"
    topic = f"{prefix}.invoices"
    consumer = Outbox(
        pg_database.url, transport=kafka_broker.transport_url, settings=_settings(prefix)
    )
    consumer.register_inbox("invoices", consumer="ledger", topic=topic, format="cloudevents")
    consumer.register_event("invoice.paid", "invoices")
    fx = _effects(prefix)
    with consumer.db.sync_engine.begin() as conn:
        fx.metadata.create_all(conn)
    consumer.migrate()

    @consumer.handler("invoice.paid")
    def record(event: Envelope, tx: Session) -> None:
        assert event.aggregate_id == f"inv-{event.payload['n']}"
        tx.execute(insert(fx).values(event_id=event.event_id, n=event.payload["n"]))

    convert = ce_kafka.to_binary if mode == "binary" else ce_kafka.to_structured
    producer = Producer({"bootstrap.servers": kafka_broker.bootstrap_servers})
    for n in range(20):
        event = CloudEvent(
            {
                "id": f"pay-{n}",
                "source": "https://billing.example",
                "type": "invoice.paid",
                "subject": f"inv-{n}",
                "specversion": "1.0",
                "datacontenttype": "application/json",
                "partitionkey": f"inv-{n}",
            },
            {"n": n},
        )
        message = convert(event, JSONFormat())
        for _ in range(2 if n % 5 == 0 else 1):  # some delivered twice
            producer.produce(
                topic, key=message.key, value=message.value, headers=list(message.headers.items())
            )
    producer.produce(topic, key=b"x", value=b"not a cloud event")
    assert producer.flush(30) == 0
    try:

        def done() -> bool:
            counts = consumer.store("invoices").status().counts
            return counts[Status.CONSUMED.value] == 20

        await run_until([consumer], done, timeout=120)
        with consumer.db.sync_engine.connect() as conn:
            got = conn.execute(select(fx.c.n).order_by(fx.c.n)).scalars().all()
            ids = conn.execute(select(func.count(fx.c.event_id.distinct()))).scalar_one()
        assert got == list(range(20))
        assert ids == 20
        assert consumer.stats.get("undecodable") == 1
    finally:
        with consumer.db.sync_engine.begin() as conn:
            fx.drop(conn)
            consumer.metadata.drop_all(conn)
        consumer.close()
