"""CloudEvents 1.0 on the wire: how a service with ``format = "cloudevents"`` writes
its messages, and how they are read back.

Binary content mode (``format = "cloudevents"``): the message value is the event's
data (the payload JSON, ``content-type: application/json``) and the attributes are
headers named by the protocol binding's prefix (``ce_`` for Kafka; a transport may
declare another as ``cloudevents_prefix``). Structured mode
(``format = "cloudevents-structured"``): the value is the whole event as a JSON object
(``content-type: application/cloudevents+json``), data inline.

Attributes: ``id`` the event id (the outbox id when the publisher gave none: unique
within the service, and ``source`` names the service), ``source`` from settings
(default ``/outboxer/<service>``), ``type`` the event type, ``subject`` the message
key, ``time`` the publish time (stored with the row, so a redelivery carries the same),
``datacontenttype`` ``application/json``, ``dataschema`` the ``$id`` of the event's
schema when it has one; outboxer's own fields as extension attributes: ``outboxid``,
``eventversion``, ``aggregateid``.

This module needs no CloudEvents SDK: the tests check it against the SDK.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from outboxer.envelope import Envelope
from outboxer.errors import EnvelopeDecodeError
from outboxer.routing import CLOUDEVENTS_STRUCTURED, ENVELOPE, ServiceRoute

SPECVERSION = "1.0"
PREFIX = "ce_"
"""The Kafka binding's header prefix (also used by the in-process transports)."""
JSON = "application/json"
STRUCTURED_TYPE = "application/cloudevents+json"
TIME_HEADER = "ce_time"
"""The row's ``headers`` key holding the publish time of a CloudEvents service."""
DATASCHEMA_HEADER = "ce_dataschema"
"""The row's ``headers`` key holding the ``$id`` of the event's schema."""
_STORED_KEYS = ["event_id", "event_type", "event_version", "aggregate_id", "payload"]
_READ_PREFIXES = ("ce_", "ce-", "cloudevents:", "cloudevents_")
_REQUIRED = ("id", "source", "type", "specversion")


def default_source(service: str) -> str:
    return f"/outboxer/{service}"


@dataclass(frozen=True, slots=True)
class WireCloudEvent:
    """An outbox row as a CloudEvent: the message value and headers to send, and
    the fields the relay reports."""

    value: bytes
    headers: dict[str, str]
    event_id: str
    event_type: str
    event_version: str


def _parts(stored: str, outbox_id: int, key: str) -> tuple[dict[str, Any], str]:
    """The stored envelope's fields and its payload's JSON text, without encoding the
    payload again when the row is as outboxer writes it."""
    try:
        obj = json.loads(stored)
    except ValueError as exc:
        raise EnvelopeDecodeError(
            f"stored envelope is not valid JSON: {exc}", outbox_id=outbox_id
        ) from exc
    if isinstance(obj, dict) and list(obj) == _STORED_KEYS and stored.endswith("}"):
        # Compact JSON, payload last: its text is what follows the first '"payload":'
        # (a quote inside a string is escaped, so no earlier value can hold that).
        start = stored.find('"payload":') + len('"payload":')
        fields = obj
        data = stored[start:-1]
    else:
        env = Envelope.from_stored(stored, outbox_id, key)
        fields = env.to_dict()
        data = json.dumps(env.payload, separators=(",", ":"), ensure_ascii=False)
    return fields, data


def encode(
    stored: str,
    outbox_id: int,
    key: str,
    row_headers: Mapping[str, str],
    *,
    source: str,
    structured: bool,
    prefix: str = PREFIX,
) -> WireCloudEvent:
    """The CloudEvent of an outbox row (EnvelopeDecodeError if its stored envelope
    is not one). ``row_headers`` (the trace context, the publish time) travel as
    they are, except the attributes stored there."""
    fields, data = _parts(stored, outbox_id, key)
    event_id = fields.get("event_id") or str(outbox_id)
    event_type = fields.get("event_type")
    version = fields.get("event_version") or "v1"
    aggregate_id = fields.get("aggregate_id") or key
    if not isinstance(event_type, str) or not isinstance(event_id, str | int):
        raise EnvelopeDecodeError("stored envelope has no event type", outbox_id=outbox_id)
    attributes: dict[str, str] = {
        "specversion": SPECVERSION,
        "id": str(event_id),
        "source": source,
        "type": event_type,
        "subject": key,
    }
    extra = dict(row_headers)
    for name, header in (("time", TIME_HEADER), ("dataschema", DATASCHEMA_HEADER)):
        stored_value = extra.pop(header, None)
        if stored_value:
            attributes[name] = stored_value
    attributes["outboxid"] = str(outbox_id)
    attributes["eventversion"] = str(version)
    attributes["aggregateid"] = str(aggregate_id)
    if structured:
        head = {**attributes, "datacontenttype": JSON, "outboxid": outbox_id}
        text = json.dumps(head, separators=(",", ":"), ensure_ascii=False)
        value = f'{text[:-1]},"data":{data}}}'.encode()
        extra["content-type"] = STRUCTURED_TYPE
    else:
        value = data.encode()
        extra.update({prefix + name: v for name, v in attributes.items()})
        extra["content-type"] = JSON
    return WireCloudEvent(value, extra, str(event_id), event_type, str(version))


def is_cloudevents(route: ServiceRoute) -> bool:
    return route.format != ENVELOPE


def source_of(route: ServiceRoute) -> str:
    return route.source or default_source(route.service_name)


def encode_for(
    route: ServiceRoute,
    stored: str,
    outbox_id: int,
    key: str,
    row_headers: Mapping[str, str],
    prefix: str = PREFIX,
) -> WireCloudEvent:
    """:func:`encode` with the route's source and content mode."""
    return encode(
        stored,
        outbox_id,
        key,
        row_headers,
        source=source_of(route),
        structured=route.format == CLOUDEVENTS_STRUCTURED,
        prefix=prefix,
    )


# ------------------------------------------------------------------ reading


@dataclass(frozen=True, slots=True)
class ReadCloudEvent:
    """A CloudEvent read from a message: its attributes (extensions included) and
    its data (decoded JSON when the content type is JSON, else text)."""

    attributes: dict[str, Any]
    data: Any


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _content_type(headers: Mapping[str, bytes | str]) -> str:
    for name, value in headers.items():
        if name.lower() == "content-type":
            return _text(value)
    return ""


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return True  # CloudEvents: data without a content type is JSON
    media = content_type.split(";", 1)[0].strip().lower()
    return media == JSON or media.endswith("+json") or media == "text/json"


def _data(raw: bytes | str | None, content_type: str | None) -> Any:
    if raw is None:
        return None
    text = _text(raw)
    if _is_json(content_type):
        try:
            return json.loads(text)
        except ValueError as exc:
            raise EnvelopeDecodeError(f"CloudEvent data is not valid JSON: {exc}") from exc
    return text


def read(value: bytes | None, headers: Mapping[str, bytes | str]) -> ReadCloudEvent:
    """A CloudEvent in either content mode (structured when the content type says
    so, binary otherwise); EnvelopeDecodeError when it is not one."""
    content_type = _content_type(headers)
    if content_type.split(";", 1)[0].strip().lower() == STRUCTURED_TYPE:
        if value is None:
            raise EnvelopeDecodeError("structured CloudEvent without a value")
        try:
            obj = json.loads(value)
        except (ValueError, UnicodeDecodeError) as exc:
            raise EnvelopeDecodeError(f"structured CloudEvent is not JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise EnvelopeDecodeError("structured CloudEvent is not a JSON object")
        attributes = {k: v for k, v in obj.items() if k not in ("data", "data_base64")}
        data: Any = obj.get("data")
        if "data_base64" in obj:
            data = base64.b64decode(obj["data_base64"]).decode("utf-8", "replace")
    else:
        attributes = {}
        for name, raw in headers.items():
            lower = name.lower()
            for prefix in _READ_PREFIXES:
                if lower.startswith(prefix):
                    attributes[lower[len(prefix) :]] = _text(raw)
                    break
        if content_type:
            attributes["datacontenttype"] = content_type
        data = _data(value, content_type or None)
    missing = [a for a in _REQUIRED if not attributes.get(a)]
    if missing:
        raise EnvelopeDecodeError(f"not a CloudEvent: no {', '.join(missing)} attribute")
    if str(attributes["specversion"]) != SPECVERSION:
        raise EnvelopeDecodeError(
            f"CloudEvents specversion {attributes['specversion']!r} is not supported (1.0)"
        )
    return ReadCloudEvent(attributes, data)


def envelope_dict(value: bytes | None, headers: Mapping[str, bytes | str]) -> dict[str, Any]:
    """The envelope (as a dict for :meth:`Envelope.from_dict`) of a CloudEvent that
    outboxer wrote: ``outbox_id`` from the ``outboxid`` extension (absent: a foreign
    event, which ``from_dict`` refuses)."""
    event = read(value, headers)
    attrs = event.attributes
    raw_id = attrs.get("outboxid")
    outbox_id: Any = raw_id
    if isinstance(raw_id, str) and raw_id.isdigit():
        outbox_id = int(raw_id)
    return {
        "outbox_id": outbox_id,
        "event_id": str(attrs["id"]),
        "event_type": attrs["type"],
        "event_version": attrs.get("eventversion") or "v1",
        "aggregate_id": attrs.get("aggregateid") or attrs.get("subject") or "",
        "payload": event.data,
    }
