"""The RabbitMQ transport's pure parts: lanes, queue arguments, error sorting, names,
settings."""

from __future__ import annotations

import pytest
from aio_pika import exceptions as amqp_errors
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from outboxer.errors import ConfigurationError, InvalidIdentifierError
from outboxer.routing import ServiceRoute
from outboxer.settings import OutboxSettings
from outboxer.transports.rabbitmq import RabbitMQSettings, create
from outboxer.transports.rabbitmq.admin import check_names, lane_of, queue_arguments
from outboxer.transports.rabbitmq.errors import delivery_of, needs_rebuild


def test_lanes_are_stable_and_spread() -> None:
    # crc32, not hash(): the same lane in every process and after restarts.
    assert lane_of("order-1", 8) == 7  # crc32(b"order-1") % 8
    assert lane_of("", 8) == 0
    lanes = {lane_of(f"order-{n}", 8) for n in range(200)}
    assert lanes == set(range(8))


def test_quorum_queues_get_no_delivery_limit_where_the_broker_has_one() -> None:
    quorum = RabbitMQSettings()
    assert queue_arguments(quorum, 3) == {
        "x-queue-type": "quorum",
        "x-single-active-consumer": True,
    }
    assert queue_arguments(quorum, 4)["x-delivery-limit"] == -1
    classic = RabbitMQSettings(queue_type="classic")
    assert "x-delivery-limit" not in queue_arguments(classic, 4)


def test_returns_nacks_and_closed_channels_are_the_brokers_trouble() -> None:
    no_route = Basic.Return(reply_code=312, reply_text="NO_ROUTE", exchange="x", routing_key="1")
    message = DeliveredMessage(delivery=no_route, header=ContentHeader(), body=b"", channel=None)
    returned = amqp_errors.PublishError(message, no_route)
    nacked = amqp_errors.DeliveryError(None, Basic.Nack(delivery_tag=1))
    closed = amqp_errors.ChannelInvalidStateError("channel closed")
    for exc in (returned, nacked, closed, TimeoutError()):
        d = delivery_of(7, exc, 10)
        assert d.outbox_id == 7
        assert d.transient
        assert not d.permanent
        assert d.error
    assert not needs_rebuild(returned)
    assert not needs_rebuild(nacked)
    assert needs_rebuild(closed)


def test_a_message_above_the_brokers_limit_is_permanent() -> None:
    exc = amqp_errors.ChannelPreconditionFailed(
        "PRECONDITION_FAILED - message size 300 is larger than configured max size 200"
    )
    assert delivery_of(1, exc, 300).permanent
    # The others of the batch lost the channel with it: the broker's trouble.
    assert delivery_of(2, exc, 100).transient


def test_names_rabbitmq_cannot_carry_are_refused() -> None:
    check_names(ServiceRoute("s", "s_outbox", "app.s", "app.s.consumer"), 8)
    with pytest.raises(InvalidIdentifierError, match=r"'amq\.'"):
        check_names(ServiceRoute("s", "s_outbox", "amq.s", "app.s.consumer"), 8)
    with pytest.raises(InvalidIdentifierError, match="255 bytes"):
        check_names(ServiceRoute("s", "s_outbox", "t" * 200, "g" * 60), 8)


def test_settings_are_validated_and_the_url_checked() -> None:
    with pytest.raises(ConfigurationError, match="lanes"):
        OutboxSettings.from_values(rabbitmq={"lanes": 0})
    with pytest.raises(ConfigurationError, match="queue_type"):
        OutboxSettings.from_values(rabbitmq={"queue_type": "stream"})
    settings = OutboxSettings.from_values(rabbitmq={"lanes": 3, "prefetch": 50})
    transport = create("amqp://guest:secret@127.0.0.1:5672/app", settings)
    assert transport.settings.lanes == 3
    with pytest.raises(ConfigurationError, match="names no RabbitMQ host"):
        create("amqp://", settings)
