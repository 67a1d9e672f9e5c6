"""Adapters: how a consumer reads an event from a message that outboxer did not write.

An inbox consumer (a service consumed here from another database) turns each
received message into an :class:`InboxEvent` with an adapter: a callable taking the
:class:`~outboxer.transports.base.IncomingMessage` and returning the event, ``None``
for a message that is not an event (skipped quietly), or raising for a message it
cannot read (logged, counted, skipped: it never blocks its partition).

Shipped:

- :func:`outboxer_envelope` (the default): messages written by outboxer's relay.
- :class:`CloudEvents`: CloudEvents 1.0 in binary or structured content mode (what
  a service with ``format = "cloudevents"`` sends, and what other producers write).
- :class:`Debezium`: messages produced by Debezium's outbox event router with its
  defaults: the event id in the ``id`` header, the key the aggregate id, the value
  the payload column, as text or JSON, wrapped in a ``{"schema", "payload"}``
  envelope when the JSON converter writes schemas, and encoded a second time as a
  JSON string when the column held text. Debezium puts no event type on the message
  by default: give the adapter a fixed ``event_type``, or the header the router
  was told to place it in (``table.fields.additional.placement=type:header:eventType``).

Writing one: a function ``(message) -> InboxEvent`` that reads the id, type, key and
payload wherever the producer puts them. The event id is what makes a redelivery
harmless: it must be the same every time the same event is delivered.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from outboxer.cloudevents import is_cloudevents, read
from outboxer.envelope import DEFAULT_VERSION, Envelope
from outboxer.errors import EnvelopeDecodeError
from outboxer.routing import ServiceRoute
from outboxer.transports.base import IncomingMessage


@dataclass(frozen=True, slots=True)
class InboxEvent:
    """An event read from a message, before the inbox stores it."""

    event_id: str
    event_type: str
    key: str
    payload: Any
    version: str = DEFAULT_VERSION
    aggregate_id: str = ""


Adapter = Callable[[IncomingMessage], InboxEvent | None]


def outboxer_envelope(message: IncomingMessage) -> InboxEvent:
    """An event from an outboxer envelope (what outboxer's relay sends)."""
    if message.value is None:
        raise EnvelopeDecodeError("message has no value")
    env = Envelope.from_json(message.value)
    key = _text(message.key) if message.key is not None else env.aggregate_id
    return InboxEvent(
        event_id=env.event_id,
        event_type=env.event_type,
        key=key,
        payload=env.payload,
        version=env.event_version,
        aggregate_id=env.aggregate_id,
    )


class CloudEvents:
    """Adapter for CloudEvents 1.0, binary content mode (attributes in ``ce_``
    headers, or ``ce-``/``cloudEvents:`` ones) or structured (``content-type:
    application/cloudevents+json``).

    Event id: the ``id`` attribute (redeliveries of one event carry the same); type:
    ``type``; key: ``subject``, else the message key; payload: ``data`` (JSON when the
    content type is JSON or absent, else text); version and aggregate id: outboxer's
    ``eventversion`` and ``aggregateid`` extensions when present. ``id_with_source``:
    the event id is ``<source> <id>`` (CloudEvents makes only the pair unique; use it
    when several producers share the topic).
    """

    def __init__(self, *, id_with_source: bool = False) -> None:
        self.id_with_source = id_with_source

    def __call__(self, message: IncomingMessage) -> InboxEvent:
        event = read(message.value, message.headers)
        attrs = event.attributes
        event_id = str(attrs["id"])
        if self.id_with_source:
            event_id = f"{attrs['source']} {event_id}"
        key = attrs.get("subject")
        if not isinstance(key, str) or not key:
            key = _text(message.key) if message.key is not None else event_id
        return InboxEvent(
            event_id=event_id,
            event_type=str(attrs["type"]),
            key=key,
            payload=event.data,
            version=str(attrs.get("eventversion") or DEFAULT_VERSION),
            aggregate_id=str(attrs.get("aggregateid") or key),
        )


def default_adapter(route: ServiceRoute) -> Adapter:
    """How an inbox reads a route's messages when no adapter was given."""
    return CloudEvents() if is_cloudevents(route) else outboxer_envelope


class Debezium:
    """Adapter for Debezium's outbox event router (see the module docstring).

    ``event_type``: the type of every event on the topic, or None to read it from
    ``type_header``. ``id_header``: where the router puts the event id (``id``).
    """

    def __init__(
        self,
        *,
        event_type: str | None = None,
        type_header: str = "eventType",
        id_header: str = "id",
    ) -> None:
        self.event_type = event_type
        self.type_header = type_header
        self.id_header = id_header

    def __call__(self, message: IncomingMessage) -> InboxEvent:
        raw_id = message.headers.get(self.id_header)
        if not raw_id:
            raise EnvelopeDecodeError(f"message has no {self.id_header!r} header (the event id)")
        event_id = _unquote(_text(raw_id))
        event_type = self.event_type
        if event_type is None:
            raw_type = message.headers.get(self.type_header)
            if not raw_type:
                raise EnvelopeDecodeError(
                    f"message has no {self.type_header!r} header and the adapter has no "
                    "event_type (Debezium puts no type on messages by default)"
                )
            event_type = _unquote(_text(raw_type))
        key = _unwrap_key(message.key)
        if message.value is None:
            raise EnvelopeDecodeError("message has no value (a tombstone)", event_id=event_id)
        return InboxEvent(
            event_id=event_id,
            event_type=event_type,
            key=key,
            payload=_unwrap_payload(message.value),
            aggregate_id=key,
        )


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _unquote(text: str) -> str:
    # A header written by a JSON header converter is a JSON string.
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            value = json.loads(text)
        except ValueError:
            return text
        if isinstance(value, str):
            return value
    return text


def _unwrap_key(raw: bytes | None) -> str:
    """The aggregate id: plain text, a JSON string, or a schema-wrapped one."""
    if raw is None:
        return ""
    text = _text(raw)
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, dict) and "payload" in value and "schema" in value:
        value = value["payload"]
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _unwrap_payload(raw: bytes) -> Any:
    """The payload column's value: JSON, maybe schema-wrapped, maybe a JSON string
    holding JSON (a text column through the JSON converter); else the text itself."""
    text = _text(raw)
    try:
        value = json.loads(text)
    except ValueError:
        return text  # the String converter with a text payload that is not JSON
    if isinstance(value, dict) and set(value) == {"schema", "payload"}:
        value = value["payload"]
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value
