from __future__ import annotations

import json

import pytest

from outboxer import ConfigurationError, Envelope, EnvelopeDecodeError, RetryPolicy
from outboxer.backoff import backoff_seconds
from outboxer.database.ops.base import truncate_error
from outboxer.envelope import encode_json
from outboxer.errors import PayloadNotSerializableError, PayloadTooLargeError


@pytest.mark.parametrize(
    ("retry", "seconds"),
    [
        (-1, 1),
        (0, 1),
        (1, 1),
        (2, 4),
        (3, 9),
        (4, 16),
        (5, 25),
        (6, 36),
        (7, 49),
        (8, 64),
        (9, 81),
        (10, 100),
        (11, 100),
        (50, 100),
    ],
)
def test_backoff_table(retry: int, seconds: int) -> None:
    assert backoff_seconds(retry) == seconds
    assert RetryPolicy(unit=0.01).delay(retry) == pytest.approx(seconds * 0.01)


def test_policy_validation() -> None:
    for bad in ({"max_retry": 0}, {"unit": 0}, {"unit": -1.0}, {"cap_attempt": 0}):
        with pytest.raises(ConfigurationError):
            RetryPolicy(**bad)  # type: ignore[arg-type]


def test_truncate_error() -> None:
    assert truncate_error("x" * 2001) == "x" * 2000
    assert truncate_error("short") == "short"


def test_envelope_round_trip() -> None:
    env = Envelope(7, "e-7", "task.created", "v2", "agg", {"a": [1, "é"]})
    assert Envelope.from_json(env.to_json()) == env
    assert json.loads(env.to_json()) == env.to_dict()


def test_stored_envelope_gets_ids() -> None:
    stored = '{"event_id":null,"event_type":"t","event_version":"v1","aggregate_id":"","payload":1}'
    env = Envelope.from_stored(stored, 42, "key-1")
    assert (env.outbox_id, env.event_id, env.aggregate_id) == (42, "42", "key-1")


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfe",
        b"not json",
        b"[1,2]",
        b'{"event_type":"t","payload":1}',
        b'{"outbox_id":"12","event_type":"t","payload":1}',
        b'{"outbox_id":true,"event_type":"t","payload":1}',
        b'{"outbox_id":0,"event_type":"t","payload":1}',
        b'{"outbox_id":9223372036854775808,"event_type":"t","payload":1}',
        b'{"outbox_id":5,"event_type":3,"payload":1}',
        b'{"outbox_id":5,"event_type":"t"}',
        b'{"outbox_id":5,"event_type":"t","event_version":4,"payload":1}',
    ],
)
def test_bad_envelopes(raw: bytes) -> None:
    with pytest.raises(EnvelopeDecodeError):
        Envelope.from_json(raw)


def test_encode_json_limits() -> None:
    assert encode_json({"a": 1}) == '{"a":1}'
    with pytest.raises(PayloadTooLargeError) as info:
        encode_json("é" * 10, max_bytes=15)
    assert info.value.context["size"] == 22
    with pytest.raises(PayloadNotSerializableError):
        encode_json(float("nan"))
    assert encode_json(float("nan"), strict=False) == "NaN"
    assert encode_json({"d": object()}, json_default=lambda o: "custom") == '{"d":"custom"}'
    circular: list[object] = []
    circular.append(circular)
    with pytest.raises(PayloadNotSerializableError):
        encode_json(circular)


@pytest.mark.parametrize("event_id", [None, "evt-9"])
def test_the_wire_forms_parsed_envelope_is_what_its_bytes_decode_to(event_id: str | None) -> None:
    """The relay's fast path keeps the envelope it parsed (``decoded``); an in-process
    hand-over builds the consumer's Envelope from it instead of parsing the bytes
    again, so both must be the same envelope."""
    from outboxer.envelope import wire_event  # noqa: PLC0415

    stored = json.dumps(
        {
            "event_id": event_id,
            "event_type": "order.paid",
            "event_version": "v2",
            "aggregate_id": "order-7",
            "payload": {"amount": 12.5, "items": [1, 2], "note": "é"},
        },
        separators=(",", ":"),
        ensure_ascii=False,
    )
    wire = wire_event(stored, 41, "order-7")
    assert wire.decoded is not None
    from_bytes = Envelope.from_dict(json.loads(wire.value))
    assert Envelope.from_dict(wire.decoded) == from_bytes
    assert from_bytes.outbox_id == 41
    assert from_bytes.event_id == (event_id or "41")
