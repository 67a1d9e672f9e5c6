"""The NATS transport's pure parts: its URL, its settings, lanes, error sorting."""

from __future__ import annotations

import pytest

from outboxer.errors import ConfigurationError, InvalidIdentifierError
from outboxer.routing import ServiceRoute
from outboxer.settings import OutboxSettings
from outboxer.transports.base import OutgoingMessage
from outboxer.transports.nats import NatsSettings, create, parse_url
from outboxer.transports.nats.admin import durable_name, lane_of, stream_name
from outboxer.transports.nats.client import js_errors, nats_errors
from outboxer.transports.nats.errors import delivery_of
from outboxer.transports.nats.producer import headers_of


def test_urls() -> None:
    assert parse_url("nats://127.0.0.1:4222") == (("nats://127.0.0.1:4222",), None, None)
    assert parse_url("nats://u:p%40ss@h1:4222,h2:4223/") == (
        ("nats://h1:4222", "nats://h2:4223"),
        "u",
        "p@ss",
    )


@pytest.mark.parametrize("url", ["nats://", "nats://host", "nats://host:port", "nats://h:0"])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ConfigurationError):
        parse_url(url)


def test_settings_are_checked_when_the_transport_is_built() -> None:
    with pytest.raises(ConfigurationError, match="lanes"):
        create("nats://h:4222", OutboxSettings.from_values(nats={"lanes": 0}))
    with pytest.raises(ConfigurationError, match="duplicate_window"):
        create(
            "nats://h:4222",
            OutboxSettings.from_values(redeliver_after=60, nats={"duplicate_window": 120}),
        )
    transport = create("nats://h:4222", OutboxSettings.from_values(lease=2.0))
    assert transport.publish_timeout == pytest.approx(1.6)
    assert transport.settings == NatsSettings()


def test_lanes_are_stable_and_spread() -> None:
    lanes = [lane_of(f"key-{n}", 4) for n in range(400)]
    assert set(lanes) == {0, 1, 2, 3}
    assert lane_of("order-17", 4) == 0  # CRC-32 (zlib.crc32(b"order-17") % 4), not per process
    assert lane_of("anything", 1) == 0
    assert stream_name("orders.events") == "orders_events"
    assert durable_name("orders.consumer", 2) == "orders_consumer_2"


def test_routes_nats_cannot_name_are_refused() -> None:
    transport = create("nats://h:4222", OutboxSettings.from_values())
    transport.check_route(ServiceRoute("s", "s_outbox", "a.b-c_d", "g.x"))
    with pytest.raises(InvalidIdentifierError):
        transport.check_route(ServiceRoute("s", "s_outbox", "a.", "g"))


def test_errors_are_sorted() -> None:
    assert delivery_of(1, nats_errors.MaxPayloadError()).permanent
    too_big = js_errors.APIError(code=400, err_code=10054, description="message size exceeds")
    assert delivery_of(1, too_big).permanent
    for transient in (
        nats_errors.TimeoutError(),
        nats_errors.NoRespondersError(),
        js_errors.NoStreamResponseError(),
        nats_errors.ConnectionClosedError(),
        js_errors.ServiceUnavailableError(code=503),
    ):
        d = delivery_of(1, transient)
        assert d.transient, transient
        assert not d.permanent, transient
        assert not d.ok, transient


def test_headers_carry_the_dedup_id_and_cannot_be_overridden() -> None:
    m = OutgoingMessage(
        7, 2, "k", b"{}", "ev-1", "t", "v1", {"traceparent": "00-x", "Nats-Msg-Id": "forged"}
    )
    headers = headers_of(m)
    assert headers["Nats-Msg-Id"] == "ev-1:2"
    assert headers["Outboxer-Key"] == "k"
    assert headers["traceparent"] == "00-x"
    assert headers["event_type"] == "t"
