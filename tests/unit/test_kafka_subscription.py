"""The Kafka subscription's own guards, on a fake librdkafka consumer (no broker)."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import pytest
from confluent_kafka import KafkaError, KafkaException

from outboxer.routing import ServiceRoute
from outboxer.transports.kafka import KafkaSettings
from outboxer.transports.kafka import subscription as kafka_subscription


class FakeConsumer:
    """Stands for ``confluent_kafka.Consumer``: a build fails while ``failing`` is set
    (as it does while the broker's address cannot be resolved); ``poll`` gives nothing."""

    failing: ClassVar[int] = 0
    built: ClassVar[int] = 0

    def __init__(self, config: dict[str, Any]) -> None:
        if FakeConsumer.failing:
            FakeConsumer.failing -= 1
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "broker unreachable"))
        FakeConsumer.built += 1
        self.closed = False

    def subscribe(self, topics: list[str]) -> None:
        pass

    def poll(self, timeout: float) -> None:
        return None

    def consume(self, n: int, timeout: float) -> list[Any]:
        return []

    def assignment(self) -> list[Any]:
        return []

    def close(self) -> None:
        self.closed = True


class QuietAdmin:
    def ensure_topics_quietly(self, topics: Any) -> None:
        pass


async def test_a_consumer_that_failed_to_build_is_built_later(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(kafka_subscription, "Consumer", FakeConsumer)
    monkeypatch.setattr(kafka_subscription, "_BUILD_RETRY_FIRST", 0.01)
    monkeypatch.setattr(FakeConsumer, "built", 0)
    route = ServiceRoute("svc", "svc_outbox", "t.svc", "t.svc.g")
    sub = kafka_subscription.KafkaSubscription(route, {}, KafkaSettings(), QuietAdmin())  # type: ignore[arg-type]
    await sub.open()
    assert FakeConsumer.built == 1
    # A rebuild during an outage: the new consumer cannot be built (three times).
    monkeypatch.setattr(FakeConsumer, "failing", 3)
    with caplog.at_level(logging.DEBUG, logger=kafka_subscription.__name__):
        await sub._rebuild("planted")
        assert sub._consumer is None
        for _ in range(200):
            assert await sub.receive(10, 0.05) == []
            if sub._consumer is not None:
                break
    assert sub._consumer is not None, "the subscription stayed without a consumer"
    assert FakeConsumer.built == 2
    assert FakeConsumer.failing == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "failed" in r.message]
    assert len(warnings) == 1, [r.message for r in warnings]  # once at the start of it
    assert any("built again" in r.message for r in caplog.records)
    await sub.close()
