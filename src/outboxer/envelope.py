"""The envelope: what travels on the wire and what the outbox row's payload holds.

Wire form (JSON object)::

    {"outbox_id": 42, "event_id": "42", "event_type": "task.created",
     "event_version": "v1", "aggregate_id": "task-7", "payload": {...}}

The stored form is the same without ``outbox_id`` (unknown before the insert) and
with ``event_id`` null when the publisher gave none; the relay fills both as it
sends (:meth:`Envelope.from_stored`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

from outboxer.errors import EnvelopeDecodeError, PayloadNotSerializableError, PayloadTooLargeError

DEFAULT_VERSION = "v1"
DEFAULT_MAX_PAYLOAD_BYTES = 1_048_576
MAX_OUTBOX_ID = 2**63 - 1  # BIGINT

JsonDefault = Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class Envelope:
    """One event as handlers receive it."""

    outbox_id: int
    event_id: str
    event_type: str
    event_version: str
    aggregate_id: str
    payload: Any

    def to_dict(self) -> dict[str, Any]:
        return {
            "outbox_id": self.outbox_id,
            "event_id": self.event_id,
            "event_type": self.event_type,
            "event_version": self.event_version,
            "aggregate_id": self.aggregate_id,
            "payload": self.payload,
        }

    def to_json(self) -> bytes:
        """Wire bytes (compact JSON, UTF-8)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Envelope:
        """Decode wire bytes; raises :class:`EnvelopeDecodeError` on anything invalid."""
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise EnvelopeDecodeError(f"envelope is not valid JSON: {exc}") from exc
        return cls.from_dict(obj)

    @classmethod
    def from_dict(cls, obj: Any, *, outbox_id: int | None = None) -> Envelope:
        """Validate a decoded envelope; ``outbox_id`` fills a missing id (stored form)."""
        if not isinstance(obj, dict):
            raise EnvelopeDecodeError(f"envelope must be a JSON object, got {type(obj).__name__}")
        oid = obj.get("outbox_id", outbox_id)
        if oid is None:
            oid = outbox_id
        if isinstance(oid, bool) or not isinstance(oid, int) or not 0 < oid <= MAX_OUTBOX_ID:
            raise EnvelopeDecodeError(f"envelope has no valid outbox_id: {oid!r}", outbox_id=oid)
        event_type = obj.get("event_type")
        if not isinstance(event_type, str):
            raise EnvelopeDecodeError(
                f"envelope event_type must be a string, got {event_type!r}", outbox_id=oid
            )
        event_id = obj.get("event_id")
        if event_id is None or event_id == "":
            event_id = str(oid)
        elif not isinstance(event_id, str | int) or isinstance(event_id, bool):
            raise EnvelopeDecodeError(f"envelope event_id is invalid: {event_id!r}", outbox_id=oid)
        version = obj.get("event_version") or DEFAULT_VERSION
        aggregate_id = obj.get("aggregate_id")
        if not isinstance(version, str) or not isinstance(aggregate_id, str | None):
            raise EnvelopeDecodeError(
                "envelope event_version/aggregate_id must be strings", outbox_id=oid
            )
        if "payload" not in obj:
            raise EnvelopeDecodeError("envelope has no payload", outbox_id=oid)
        return cls(
            outbox_id=oid,
            event_id=str(event_id),
            event_type=event_type,
            event_version=version,
            aggregate_id=aggregate_id if aggregate_id is not None else "",
            payload=obj["payload"],
        )

    @classmethod
    def from_stored(cls, stored: str, outbox_id: int, message_key: str = "") -> Envelope:
        """Decode an outbox row's payload column into the envelope to send."""
        try:
            obj = json.loads(stored)
        except ValueError as exc:
            raise EnvelopeDecodeError(
                f"stored envelope is not valid JSON: {exc}", outbox_id=outbox_id
            ) from exc
        if isinstance(obj, dict):
            obj = dict(obj)
            obj["outbox_id"] = outbox_id
            if obj.get("aggregate_id") in (None, ""):
                obj["aggregate_id"] = message_key
        return cls.from_dict(obj, outbox_id=outbox_id)


_NO_EVENT_ID = '{"event_id":null,'


@dataclass(frozen=True, slots=True)
class WireEvent:
    """A stored row made ready to send: the wire bytes and the fields headers need."""

    value: bytes
    event_id: str
    event_type: str
    event_version: str
    decoded: dict[str, Any] | None = None
    """The same envelope as the object ``value`` encodes, when it was parsed on the
    way (the fast path): an in-process hand-over builds the :class:`Envelope` from it
    instead of parsing ``value`` again."""


def wire_event(stored: str, outbox_id: int, message_key: str) -> WireEvent:
    """The wire form of an outbox row's stored envelope (EnvelopeDecodeError if it is
    not one), without re-encoding the payload.

    Rows written by outboxer store ``{"event_id":..., "event_type":..., ...}``; the
    wire form is the same object with ``outbox_id`` first and ``event_id`` filled,
    byte for byte what :meth:`Envelope.to_json` gives. Anything else (a row written by
    hand) takes the slow path through :class:`Envelope`.
    """
    try:
        obj = json.loads(stored)
    except ValueError as exc:
        raise EnvelopeDecodeError(
            f"stored envelope is not valid JSON: {exc}", outbox_id=outbox_id
        ) from exc
    if not (isinstance(obj, dict) and "payload" in obj and "outbox_id" not in obj):
        return _wire_slowly(stored, outbox_id, message_key)
    event_type, event_id, version = (
        obj.get("event_type"),
        obj.get("event_id"),
        obj.get("event_version"),
    )
    aggregate_id = obj.get("aggregate_id")
    if not (
        isinstance(event_type, str)
        and isinstance(version, str)
        and version
        and isinstance(aggregate_id, str)
        and aggregate_id
        and (event_id is None or (isinstance(event_id, str) and event_id))
    ):
        return _wire_slowly(stored, outbox_id, message_key)
    if event_id is None:
        if not stored.startswith(_NO_EVENT_ID):
            return _wire_slowly(stored, outbox_id, message_key)
        event_id = str(outbox_id)
        text = f'{{"outbox_id":{outbox_id},"event_id":"{event_id}",{stored[len(_NO_EVENT_ID) :]}'
    elif stored.startswith('{"event_id":'):
        text = f'{{"outbox_id":{outbox_id},{stored[1:]}'
    else:
        return _wire_slowly(stored, outbox_id, message_key)
    obj["outbox_id"] = outbox_id
    obj["event_id"] = event_id
    return WireEvent(text.encode(), event_id, event_type, version, obj)


def _wire_slowly(stored: str, outbox_id: int, message_key: str) -> WireEvent:
    env = Envelope.from_stored(stored, outbox_id, message_key)
    return WireEvent(env.to_json(), env.event_id, env.event_type, env.event_version)


def _default_hook(user_default: JsonDefault | None) -> JsonDefault:
    def default(value: Any) -> Any:
        dump = getattr(value, "model_dump", None)
        if callable(dump):  # pydantic v2 models
            return dump(mode="json")
        if is_dataclass(value) and not isinstance(value, type):
            return asdict(value)
        if user_default is not None:
            return user_default(value)
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")

    return default


def encode_json(
    obj: Any,
    *,
    strict: bool = True,
    json_default: JsonDefault | None = None,
    max_bytes: int | None = None,
    event_type: str | None = None,
) -> str:
    """Encode ``obj`` to compact JSON text, or raise a typed payload error.

    ``strict`` refuses NaN and infinities (not valid JSON). Pydantic models and
    dataclass instances are encoded by their fields; anything else the standard
    encoder does not know goes to ``json_default`` or is refused.
    """
    try:
        text = json.dumps(
            obj,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=not strict,
            default=_default_hook(json_default),
        )
        size = len(text.encode())
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        # UnicodeEncodeError (a lone surrogate in a string) is a ValueError too.
        raise PayloadNotSerializableError(
            f"payload is not JSON-serialisable: {exc}", event_type=event_type
        ) from exc
    if max_bytes is not None and size > max_bytes:
        raise PayloadTooLargeError(
            f"encoded event is {size} bytes, larger than the limit of {max_bytes} bytes",
            event_type=event_type,
            size=size,
            limit=max_bytes,
        )
    return text


def build_stored_envelope(
    *,
    event_type: str,
    payload: Any,
    event_id: str | None,
    version: str,
    aggregate_id: str,
) -> dict[str, Any]:
    """The envelope as stored in the outbox row before the id is known."""
    if payload is None:
        raise PayloadNotSerializableError("payload is None", event_type=event_type)
    return {
        "event_id": event_id,
        "event_type": event_type,
        "event_version": version,
        "aggregate_id": aggregate_id,
        "payload": payload,
    }
