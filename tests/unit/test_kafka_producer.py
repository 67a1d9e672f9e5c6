"""The Kafka producer's own guards, on a fake librdkafka producer (no broker)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
from confluent_kafka import KafkaError, KafkaException

from outboxer.routing import ServiceRoute
from outboxer.transports.base import Delivery, OutgoingMessage
from outboxer.transports.kafka import KafkaSettings, KafkaTransport
from outboxer.transports.kafka import producer as kafka_producer

WAIT = 10.0
"""Bound (seconds) of a wait for the producer's poll thread."""


class FakeProducer:
    """Stands for ``confluent_kafka.Producer``: ``produce`` queues the delivery
    callback, ``poll`` reports every queued message delivered. The first instance's
    first ``poll`` raises a fatal error, as librdkafka does when, for example, an
    idempotent producer is fenced."""

    instances: ClassVar[list[FakeProducer]] = []

    def __init__(self, config: dict[str, Any]) -> None:
        self.fails_first_poll = not FakeProducer.instances
        self.polls = 0
        self.produced = 0
        self.polled_after_failing = threading.Event()
        self._pending: list[Callable[[KafkaError | None, Any], None]] = []
        self._lock = threading.Lock()
        self._idle = threading.Event()
        FakeProducer.instances.append(self)

    def produce(self, topic: str, *, on_delivery: Any, **kw: Any) -> None:
        with self._lock:
            self._pending.append(on_delivery)
            self.produced += 1

    def poll(self, timeout: float) -> int:
        self.polls += 1
        if self.fails_first_poll and self.polls == 1:
            raise KafkaException(KafkaError(KafkaError._FATAL, "producer fenced", fatal=True))
        if self.fails_first_poll:
            self.polled_after_failing.set()
        with self._lock:
            pending, self._pending = self._pending, []
        for callback in pending:
            callback(None, None)
        if not pending:
            self._idle.wait(min(timeout, 0.01))  # a real poll blocks up to its timeout
        return len(pending)

    def flush(self, timeout: float) -> int:
        return 0

    def __len__(self) -> int:
        return 0


@pytest.fixture
def fake_producers(monkeypatch: pytest.MonkeyPatch) -> list[FakeProducer]:
    FakeProducer.instances = []
    monkeypatch.setattr(kafka_producer, "Producer", FakeProducer)
    return FakeProducer.instances


def _message(outbox_id: int) -> OutgoingMessage:
    return OutgoingMessage(outbox_id, 0, "k", b"{}", str(outbox_id), "t.created", "v1")


async def test_a_fatal_error_raised_by_poll_rebuilds_the_producer(
    fake_producers: list[FakeProducer],
) -> None:
    transport = KafkaTransport("127.0.0.1:1", settings=KafkaSettings(create_topics=False))
    route = ServiceRoute("svc", "svc_outbox", "t.svc", "t.svc.g")
    try:
        assert await transport.send(route, [_message(1)]) == [Delivery(1)]
        [first] = fake_producers
        # The poll thread went on polling after the fatal error: its handling is over.
        assert first.polled_after_failing.wait(WAIT)

        assert await transport.send(route, [_message(2)]) == [Delivery(2)]
        assert transport.producer_rebuilds == 1
        assert [p.produced for p in fake_producers] == [1, 1]  # the second on a new producer
    finally:
        await transport.close()
