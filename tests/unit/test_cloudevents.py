"""CloudEvents on the wire, checked against the CloudEvents SDK for Python: its Kafka
binding reads what outboxer writes (binary and structured), and outboxer reads what
it writes."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from outboxer import ConfigurationError, EnvelopeDecodeError, ServiceRoute
from outboxer.cloudevents import (
    DATASCHEMA_HEADER,
    TIME_HEADER,
    encode,
    encode_for,
    envelope_dict,
    read,
)
from outboxer.envelope import Envelope, build_stored_envelope, encode_json
from outboxer.routing import RouteRegistry, ServiceOverride
from outboxer.settings import OutboxSettings
from outboxer.transports.adapters import CloudEvents
from outboxer.transports.base import IncomingMessage
from outboxer.transports.memory import StoredMessage

PAYLOAD = {"order_id": "o-1", "total": 12.5, "note": 'a "payload": inside', "lines": [1, 2]}
TIME = "2026-12-05T10:11:12.345678Z"


def _stored(event_id: str | None = None, payload: Any = PAYLOAD) -> str:
    return encode_json(
        build_stored_envelope(
            event_type="order.placed",
            payload=payload,
            event_id=event_id,
            version="v2",
            aggregate_id="order-7",
        )
    )


def _route(fmt: str, source: str | None = None) -> ServiceRoute:
    return ServiceRoute(
        "orders", "orders_outbox", "t.orders", "t.orders.c", format=fmt, source=source
    )


def _sdk_message(value: bytes, headers: dict[str, str], key: str = "order-7") -> Any:
    return ce_kafka.KafkaMessage(
        headers={k: v.encode() for k, v in headers.items()}, key=key.encode(), value=value
    )


def _incoming(value: bytes, headers: dict[str, str], key: str = "order-7") -> IncomingMessage:
    return IncomingMessage(
        _route("cloudevents"), value, key.encode(), {k: v.encode() for k, v in headers.items()}
    )


def test_binary_mode_is_read_by_the_sdk() -> None:
    row_headers = {
        "traceparent": "00-abc-def-01",
        TIME_HEADER: TIME,
        DATASCHEMA_HEADER: "https://x/s",
    }
    event = encode_for(_route("cloudevents", "/shop/orders"), _stored(), 42, "order-7", row_headers)
    assert event.headers["traceparent"] == "00-abc-def-01"  # the trace context travels
    assert TIME_HEADER in event.headers  # as the ce_time attribute header
    sdk = ce_kafka.from_binary(_sdk_message(event.value, event.headers), JSONFormat())
    assert sdk.get_specversion() == "1.0"
    assert sdk.get_id() == "42"  # no event id given: the outbox id
    assert sdk.get_source() == "/shop/orders"
    assert sdk.get_type() == "order.placed"
    assert sdk.get_subject() == "order-7"
    assert sdk.get_time() == datetime(2026, 12, 5, 10, 11, 12, 345678, tzinfo=UTC)
    assert sdk.get_datacontenttype() == "application/json"
    assert sdk.get_dataschema() == "https://x/s"
    assert sdk.get_data() == PAYLOAD
    assert sdk.get_extension("outboxid") == "42"
    assert sdk.get_extension("eventversion") == "v2"
    assert sdk.get_extension("aggregateid") == "order-7"


def test_structured_mode_is_read_by_the_sdk() -> None:
    event = encode_for(
        _route("cloudevents-structured"), _stored("evt-1"), 42, "order-7", {TIME_HEADER: TIME}
    )
    assert event.headers["content-type"] == "application/cloudevents+json"
    sdk = ce_kafka.from_structured(_sdk_message(event.value, event.headers), JSONFormat())
    assert sdk.get_id() == "evt-1"
    assert sdk.get_source() == "/outboxer/orders"  # the default source names the service
    assert sdk.get_type() == "order.placed"
    assert sdk.get_subject() == "order-7"
    assert sdk.get_time() == datetime(2026, 12, 5, 10, 11, 12, 345678, tzinfo=UTC)
    assert sdk.get_data() == PAYLOAD
    assert sdk.get_extension("outboxid") == 42
    # The SDK's generic reader (content type decides) agrees.
    again = ce_kafka.from_kafka(_sdk_message(event.value, event.headers), JSONFormat())
    assert again.get_data() == PAYLOAD


@pytest.mark.parametrize("structured", [False, True])
def test_outboxer_reads_its_own_events_back_as_envelopes(structured: bool) -> None:
    event = encode(_stored(), 42, "order-7", {}, source="/o", structured=structured)
    obj = envelope_dict(event.value, {k: v.encode() for k, v in event.headers.items()})
    assert Envelope.from_dict(obj) == Envelope(42, "42", "order.placed", "v2", "order-7", PAYLOAD)


def test_the_id_is_stable_across_redeliveries() -> None:
    # A row without an event id is sent twice (a retry, a redelivery): same id, same
    # time (stored with the row), same bytes.
    headers = {TIME_HEADER: TIME}
    first = encode(_stored(), 7, "k", headers, source="/o", structured=False)
    second = encode(_stored(), 7, "k", headers, source="/o", structured=False)
    assert first == second
    assert first.headers["ce_id"] == "7"


def test_rows_not_written_by_outboxer_take_the_slow_path() -> None:
    by_hand = json.dumps({"payload": {"x": 1}, "event_type": "order.placed"})
    event = encode(by_hand, 9, "key-9", {}, source="/o", structured=False)
    assert json.loads(event.value) == {"x": 1}
    assert (event.headers["ce_id"], event.headers["ce_subject"]) == ("9", "key-9")
    with pytest.raises(EnvelopeDecodeError):
        encode("{not json", 9, "k", {}, source="/o", structured=False)
    with pytest.raises(EnvelopeDecodeError):
        encode('{"no": "payload"}', 9, "k", {}, source="/o", structured=True)


def _sdk_event(**extra: Any) -> CloudEvent:
    attributes = {
        "id": "ev-1",
        "source": "https://other.example/svc",
        "type": "invoice.paid",
        "specversion": "1.0",
        "subject": "inv-3",
        "datacontenttype": "application/json",
        "time": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        **extra,
    }
    return CloudEvent({k: v for k, v in attributes.items() if v is not None}, {"amount": 10})


def _from_sdk(message: Any) -> IncomingMessage:
    return IncomingMessage(_route("cloudevents"), message.value, None, message.headers)


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_the_adapter_reads_what_the_sdk_writes(mode: str) -> None:
    convert = ce_kafka.to_binary if mode == "binary" else ce_kafka.to_structured
    message = convert(_sdk_event(), JSONFormat())
    got = CloudEvents()(_from_sdk(message))
    assert (got.event_id, got.event_type, got.key, got.payload) == (
        "ev-1",
        "invoice.paid",
        "inv-3",
        {"amount": 10},
    )
    assert (got.version, got.aggregate_id) == ("v1", "inv-3")
    with_source = CloudEvents(id_with_source=True)(_from_sdk(message))
    assert with_source.event_id == "https://other.example/svc ev-1"


def test_the_adapter_reads_outboxers_extensions_and_foreign_keys() -> None:
    message = ce_kafka.to_binary(
        _sdk_event(subject=None, eventversion="v3", aggregateid="agg"), JSONFormat()
    )
    incoming = IncomingMessage(_route("cloudevents"), message.value, b"k-1", message.headers)
    got = CloudEvents()(incoming)
    assert (got.key, got.version, got.aggregate_id) == ("k-1", "v3", "agg")


def test_text_data_and_what_is_not_a_cloudevent() -> None:
    attrs = {"ce_id": "1", "ce_source": "/s", "ce_type": "t", "ce_specversion": "1.0"}
    text = read(
        b"plain words", {**{k: v.encode() for k, v in attrs.items()}, "content-type": b"text/plain"}
    )
    assert text.data == "plain words"
    with pytest.raises(EnvelopeDecodeError, match="no id"):
        read(b"{}", {"ce_source": b"/s", "ce_type": b"t", "ce_specversion": b"1.0"})
    with pytest.raises(EnvelopeDecodeError, match="specversion"):
        read(b"{}", {k: v.encode() for k, v in {**attrs, "ce_specversion": "0.3"}.items()})
    with pytest.raises(EnvelopeDecodeError, match="not JSON"):
        read(b"{oops", {"content-type": b"application/cloudevents+json"})
    # An envelope message read as a CloudEvent is not one.
    with pytest.raises(EnvelopeDecodeError):
        envelope_dict(b'{"outbox_id": 1}', {})


def test_format_and_source_are_checked_where_they_are_declared() -> None:
    with pytest.raises(ConfigurationError, match="unknown format"):
        _route("avro")
    with pytest.raises(ConfigurationError, match="invalid CloudEvents source"):
        _route("cloudevents", "has space")
    with pytest.raises(ConfigurationError):
        OutboxSettings.from_values(services={"orders": {"format": "xml"}})
    settings = OutboxSettings.from_values(
        services={"orders": {"format": "cloudevents", "source": "/shop"}}
    )
    routes = RouteRegistry(overrides=settings.overrides())
    route = routes.route_for_service("orders")
    assert (route.format, route.source) == ("cloudevents", "/shop")
    code = RouteRegistry(overrides={"orders": ServiceOverride(format="cloudevents")})
    declared = code.register_service("orders", format="cloudevents-structured")
    assert declared.format == "cloudevents-structured"


@pytest.mark.parametrize("structured", [False, True])
def test_the_in_memory_broker_gives_envelopes_of_cloudevents(structured: bool) -> None:
    event = encode(_stored("e-1"), 5, "order-7", {}, source="/o", structured=structured)
    headers = {k: v.encode() for k, v in event.headers.items()}
    stored = StoredMessage("t", 0, b"order-7", event.value, headers)
    assert stored.envelope() == Envelope(5, "e-1", "order.placed", "v2", "order-7", PAYLOAD)
