"""The Kafka transport against the real Kafka-protocol broker."""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest

from outboxer import Envelope, Status, TransportError
from outboxer.routing import ServiceRoute
from outboxer.testing import EmbeddedKafka, free_port
from outboxer.transports.base import OutgoingMessage
from outboxer.transports.kafka import KafkaSettings, KafkaTransport
from tests.helpers import read_topic
from tests.integration.engine_helpers import all_final, build_app, drop_app, run_until

pytestmark = pytest.mark.kafka


def _route() -> ServiceRoute:
    name = f"k{uuid.uuid4().hex[:8]}"
    return ServiceRoute(name, f"{name}_outbox", f"test.{name}", f"test.{name}.g")


def _message(n: int, key: str = "key-1") -> OutgoingMessage:
    env = Envelope(n, f"evt-{n}", "thing.happened", "v2", "agg-9", {"n": n})
    return OutgoingMessage.from_envelope(env, key=key, retry_count=0)


async def test_send_carries_key_value_and_headers(kafka_broker: EmbeddedKafka) -> None:
    route = _route()
    transport = KafkaTransport(kafka_broker.bootstrap_servers)
    await transport.start([route])
    try:
        deliveries = await transport.send(route, [_message(1), _message(2, key="other")])
        assert [d.ok for d in deliveries] == [True, True]
        assert [d.outbox_id for d in deliveries] == [1, 2]
    finally:
        await transport.close()
    msgs = read_topic(kafka_broker.bootstrap_servers, route.topic, 2)
    assert len(msgs) == 2
    by_id = {Envelope.from_json(m.value()).outbox_id: m for m in msgs}  # type: ignore[attr-defined]
    first = by_id[1]
    assert first.key() == b"key-1"  # type: ignore[attr-defined]
    assert dict(first.headers()) == {  # type: ignore[attr-defined]
        "event_id": b"evt-1",
        "event_type": b"thing.happened",
        "event_version": b"v2",
    }
    assert Envelope.from_json(first.value()).payload == {"n": 1}  # type: ignore[attr-defined]


async def _send_until_delivered(
    transport: KafkaTransport, route: ServiceRoute, first: int, within: float
) -> int:
    """Send one message at a time until one is acknowledged; the next free number."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    n = first
    while True:
        (delivery,) = await transport.send(route, [_message(n)])
        n += 1
        if delivery.ok:
            return n
        assert delivery.transient, delivery.error  # the broker's trouble, not the message's
        assert loop.time() < deadline, f"nothing delivered {within}s after the broker came back"
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("gap", [0.0, 8.0], ids=["instant-swap", "down-8s"])
async def test_producer_recovers_when_the_broker_is_replaced(gap: float) -> None:
    """A fresh broker on the same address has lost every topic and producer id: the
    idempotent producer is stuck (instant swap) or fails fatally (after a gap); either
    way it is rebuilt and delivers again without a restart."""
    route = _route()
    broker = EmbeddedKafka().start()
    transport = KafkaTransport(broker.bootstrap_servers, lease=5.0)
    try:
        await transport.start([route])
        n = await _send_until_delivered(transport, route, 1, 30)
        broker.stop()
        if gap:
            sending = asyncio.ensure_future(transport.send(route, [_message(n)]))
            await asyncio.sleep(gap)
        broker = EmbeddedKafka(port=broker.port).start()
        if gap:
            (lost,) = await sending
            assert lost.transient
            n += 1
        await _send_until_delivered(transport, route, n, 60)
        assert transport.producer_rebuilds >= 1
    finally:
        await transport.close()
        broker.stop()


async def test_an_unreachable_broker_is_a_clear_error_within_the_wait(
    caplog: pytest.LogCaptureFixture,
) -> None:
    route = _route()
    transport = KafkaTransport(
        f"127.0.0.1:{free_port()}", settings=KafkaSettings(topic_wait_timeout=3.0)
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TransportError, match="unreachable"):
        await transport.start([route])
    # Bounded by topic_wait_timeout (plus one metadata request), not librdkafka's defaults.
    assert loop.time() - started < 30
    await transport.close()


async def test_missing_topic_without_creation_is_a_clear_error(
    kafka_broker: EmbeddedKafka, caplog: pytest.LogCaptureFixture
) -> None:
    route = _route()
    transport = KafkaTransport(
        kafka_broker.bootstrap_servers,
        settings=KafkaSettings(create_topics=False, topic_wait_timeout=1.5),
    )
    with caplog.at_level(logging.WARNING), pytest.raises(TransportError, match=route.topic):
        await transport.start([route])
    assert "waiting for Kafka topics" in caplog.text
    await transport.close()


async def test_message_too_large_ends_dead_not_retried(
    pg_database: object, kafka_broker: EmbeddedKafka
) -> None:
    # The outbox accepts up to 4 MB here, the producer only librdkafka's default 1 MB.
    app = build_app(
        pg_database.url,  # type: ignore[attr-defined]
        kafka_broker.transport_url,
        max_payload_bytes=4_000_000,
        max_retry=20,
    )
    try:
        with app.outbox.db.sync_engine.begin() as conn:
            big = app.outbox.publish(
                conn, app.event(app.services[0]), {"n": 1, "blob": "x" * 1_500_000}
            )
            small = app.outbox.publish(conn, app.event(app.services[0]), {"n": 2})
        await run_until([app.outbox], lambda: all_final(app), timeout=120)
        st = app.outbox.store(app.services[0])
        dead = st.get_by_id(big)
        assert dead is not None
        assert dead.status is Status.DEAD
        assert dead.retry_count == 0
        assert dead.last_error is not None
        assert "MSG_SIZE_TOO_LARGE" in dead.last_error
        ok = st.get_by_id(small)
        assert ok is not None
        assert ok.status is Status.CONSUMED
        assert app.outbox.stats.get("send_dead") == 1
    finally:
        drop_app(app)
