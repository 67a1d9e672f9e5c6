"""Event contracts: a JSON Schema per event type and version, checked on publish;
the application's services, channels and messages as an AsyncAPI 3 document; and
the check that tells whether a change of those schemas breaks consumers.

Validation uses ``jsonschema`` (the ``schemas`` extra), imported when the first
schema is registered: an application without schemas never loads it, and a schema
given without it installed is refused at registration with the install hint.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from outboxer.envelope import DEFAULT_VERSION, encode_json
from outboxer.errors import ConfigurationError, SchemaViolationError
from outboxer.routing import (
    CLOUDEVENTS_STRUCTURED,
    ENVELOPE,
    ServiceRoute,
    validate_event_type,
)

ASYNCAPI_VERSION = "3.0.0"
_COMPONENT_KEY = re.compile(r"[^A-Za-z0-9._-]")
_PLAIN = (dict, list, str, int, float, bool)


@dataclass(frozen=True, slots=True)
class _Contract:
    schema: Mapping[str, Any]
    is_valid: Callable[[Any], bool]
    errors: Callable[[Any], Iterable[Any]]


def _validator(schema: Mapping[str, Any], event_type: str, version: str) -> _Contract:
    try:
        import jsonschema  # noqa: PLC0415 - optional: only applications with schemas load it
    except ImportError:
        raise ConfigurationError(
            f"a schema for event type {event_type!r} needs the jsonschema package: "
            "pip install 'outboxer[schemas]'",
            event_type=event_type,
        ) from None
    if not isinstance(schema, Mapping):
        raise ConfigurationError(
            f"the schema of event type {event_type!r} must be a JSON Schema object (a "
            f"mapping), got {type(schema).__name__}",
            event_type=event_type,
            version=version,
        )
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ConfigurationError(
            f"the schema of event type {event_type!r} ({version}) is not a valid JSON "
            f"Schema: {exc.message}",
            event_type=event_type,
            version=version,
        ) from exc
    checker = cls(schema)
    return _Contract(schema, checker.is_valid, checker.iter_errors)


def json_path(parts: Iterable[Any]) -> str:
    """``$.items[0].sku`` for the path ``["items", 0, "sku"]``."""
    out = "$"
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


class Contracts:
    """The payload schemas of an application's event types, by version."""

    def __init__(self) -> None:
        self._contracts: dict[tuple[str, str], _Contract] = {}
        self._types: set[str] = set()
        self._lock = threading.Lock()

    def prepare(self, event_type: str, version: str | None, schema: Mapping[str, Any]) -> Any:
        """Check ``schema`` (and that jsonschema is installed) without registering
        it; the value to give :meth:`add`."""
        event_type = validate_event_type(event_type)
        version = (version or "").strip() or DEFAULT_VERSION
        contract = _validator(schema, event_type, version)
        existing = self._contracts.get((event_type, version))
        if existing is not None and existing.schema != schema:
            raise ConfigurationError(
                f"event type {event_type!r} already has another schema for version {version}",
                event_type=event_type,
                version=version,
            )
        return (event_type, version, contract)

    def add(self, prepared: Any) -> None:
        event_type, version, contract = prepared
        with self._lock:
            self._contracts.setdefault((event_type, version), contract)
            self._types.add(event_type)

    def register(self, event_type: str, version: str | None, schema: Mapping[str, Any]) -> None:
        """Validate ``event_type``'s payloads of ``version`` against ``schema``."""
        self.add(self.prepare(event_type, version, schema))

    def schema(self, event_type: str, version: str = DEFAULT_VERSION) -> Mapping[str, Any] | None:
        contract = self._contracts.get((event_type, version))
        return None if contract is None else contract.schema

    def versions(self, event_type: str) -> dict[str, Mapping[str, Any]]:
        """The schemas of ``event_type``, by version."""
        return {v: c.schema for (t, v), c in self._contracts.items() if t == event_type}

    def check(self, event_type: str, version: str | None, payload: Any) -> None:
        """Raise :class:`SchemaViolationError` if ``payload`` breaks the schema of
        ``event_type`` at ``version``; event types without a schema pass."""
        if event_type not in self._types:
            return
        version = (version or "").strip() if isinstance(version, str) else None
        version = version or DEFAULT_VERSION
        contract = self._contracts.get((event_type, version))
        if contract is None:
            known = ", ".join(sorted(self.versions(event_type)))
            raise SchemaViolationError(
                f"event type {event_type!r} has no schema for version {version} (schemas: {known})",
                event_type=event_type,
                version=version,
                path="$",
            )
        if type(payload) in _PLAIN and contract.is_valid(payload):
            return
        # A model, a dataclass or a tuple is checked in its JSON form, as stored.
        document = _json_form(payload)
        if contract.is_valid(document):
            return
        first = _best(contract.errors(document))
        path = json_path(first.absolute_path) if first is not None else "$"
        reason = first.message if first is not None else "invalid"
        raise SchemaViolationError(
            f"payload of {event_type!r} ({version}) does not match its schema at {path}: {reason}",
            event_type=event_type,
            version=version,
            path=path,
        )


def _json_form(payload: Any) -> Any:
    try:
        return json.loads(encode_json(payload, strict=False))
    except (ValueError, TypeError):
        return payload  # not JSON at all: the schema check names it, the encoder later


def _best(errors: Iterable[Any]) -> Any:
    import jsonschema  # noqa: PLC0415 - installed: a contract exists

    return jsonschema.exceptions.best_match(errors)


# ------------------------------------------------------------------ AsyncAPI


def component_key(event_type: str, version: str) -> str:
    """The AsyncAPI component name of a message (``[A-Za-z0-9._-]+``)."""
    return _COMPONENT_KEY.sub("_", f"{event_type}.{version}")


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """What the document says about one service: its route, its event types, whether
    this application sends them (its own outbox) and receives them (handlers)."""

    route: ServiceRoute
    event_types: list[str]
    sends: bool
    receives: bool
    wire_format: str = ENVELOPE


def _envelope_schema(data: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["outbox_id", "event_id", "event_type", "event_version", "payload"],
        "properties": {
            "outbox_id": {"type": "integer"},
            "event_id": {"type": "string"},
            "event_type": {"type": "string"},
            "event_version": {"type": "string"},
            "aggregate_id": {"type": "string"},
            "payload": data,
        },
    }


def _cloudevent_message(
    wire_format: str, event_type: str, version: str, data: Mapping[str, Any]
) -> dict[str, Any]:
    """A CloudEvents service's message: the attributes as ``ce_`` headers and the data
    as the payload (binary), or the whole event as the payload (structured)."""
    attributes: dict[str, Any] = {
        "specversion": {"const": "1.0"},
        "id": {"type": "string"},
        "source": {"type": "string"},
        "type": {"const": event_type},
        "subject": {"type": "string"},
        "time": {"type": "string", "format": "date-time"},
        "dataschema": {"type": "string"},
        "outboxid": {"type": ["integer", "string"]},
        "eventversion": {"const": version},
        "aggregateid": {"type": "string"},
    }
    required = ["specversion", "id", "source", "type"]
    if wire_format == CLOUDEVENTS_STRUCTURED:
        return {
            "x-outboxer-format": wire_format,
            "contentType": "application/cloudevents+json",
            "payload": {
                "type": "object",
                "required": [*required, "data"],
                "properties": {
                    **attributes,
                    "datacontenttype": {"const": "application/json"},
                    "data": data,
                },
            },
        }
    return {
        "x-outboxer-format": wire_format,
        "headers": {
            "type": "object",
            "required": [f"ce_{name}" for name in required],
            "properties": {f"ce_{name}": schema for name, schema in attributes.items()},
        },
        "payload": data,
    }


def asyncapi_document(
    channels: Iterable[ChannelSpec],
    contracts: Contracts,
    *,
    title: str = "outboxer application",
    version: str = "1.0.0",
) -> dict[str, Any]:
    """The AsyncAPI 3 document of ``channels``: one channel per service (its topic),
    a send operation for a service this application publishes, a receive operation
    for one it handles, and a message per event type and schema version.

    A message's payload is what travels: the envelope (``wire_format`` "envelope")
    with the event's schema under ``payload``; for CloudEvents in binary mode the data
    itself, the attributes as ``ce_`` headers; in structured mode the whole event.
    The event's own schema is also ``components.schemas[<type>.<version>]``, which
    :func:`breaking_changes` compares.
    """
    doc_channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for spec in channels:
        name = _COMPONENT_KEY.sub("_", spec.route.service_name)
        refs: dict[str, Any] = {}
        for event_type in sorted(spec.event_types):
            versions: dict[str, Mapping[str, Any] | None] = {DEFAULT_VERSION: None}
            versions = {**contracts.versions(event_type)} or versions
            for ver, schema in sorted(versions.items()):
                key = component_key(event_type, ver)
                data: dict[str, Any] = {}
                if schema is not None:
                    schemas[key] = dict(schema)
                    data = {"$ref": f"#/components/schemas/{key}"}
                message: dict[str, Any] = {
                    "name": event_type,
                    "title": f"{event_type} ({ver})",
                    "contentType": "application/json",
                    "x-outboxer-event-type": event_type,
                    "x-outboxer-event-version": ver,
                    "payload": _envelope_schema(data),
                }
                if spec.wire_format != ENVELOPE:
                    message.update(_cloudevent_message(spec.wire_format, event_type, ver, data))
                messages[key] = message
                refs[key] = {"$ref": f"#/components/messages/{key}"}
        doc_channels[name] = {
            "address": spec.route.topic,
            "description": f"events of service {spec.route.service_name} "
            f"(outbox table {spec.route.table_name})",
            "messages": refs,
        }
        own = [{"$ref": f"#/channels/{name}/messages/{key}"} for key in refs]
        for action, wanted in (("send", spec.sends), ("receive", spec.receives)):
            if wanted:
                operations[f"{action}_{name}"] = {
                    "action": action,
                    "channel": {"$ref": f"#/channels/{name}"},
                    "messages": own,
                }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {"title": title, "version": version},
        "defaultContentType": "application/json",
        "channels": doc_channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


# ------------------------------------------------------------------ compatibility


@dataclass(frozen=True, slots=True)
class Change:
    """One difference between two documents; ``breaking`` for consumers."""

    event_type: str
    version: str
    path: str
    what: str
    breaking: bool

    def __str__(self) -> str:
        kind = "breaking" if self.breaking else "compatible"
        return f"{kind}: {self.event_type} {self.version} {self.path}: {self.what}"


def _messages(doc: Mapping[str, Any]) -> dict[tuple[str, str], Mapping[str, Any] | None]:
    """(event type, version) -> its payload schema (None: no schema)."""
    if not isinstance(doc, Mapping) or not str(doc.get("asyncapi", "")).startswith("3."):
        raise ConfigurationError("not an AsyncAPI 3 document (no 'asyncapi: 3.x' field)")
    components = doc.get("components") or {}
    schemas = components.get("schemas") or {}
    out: dict[tuple[str, str], Mapping[str, Any] | None] = {}
    for key, message in (components.get("messages") or {}).items():
        event_type = message.get("x-outboxer-event-type", message.get("name", key))
        version = message.get("x-outboxer-event-version", DEFAULT_VERSION)
        out[(event_type, version)] = schemas.get(key)
    return out


def _types(schema: Mapping[str, Any]) -> set[str] | None:
    kind = schema.get("type")
    if kind is None:
        return None
    return {kind} if isinstance(kind, str) else set(kind)


def _compare(old: Mapping[str, Any], new: Mapping[str, Any], path: str) -> list[tuple[str, str]]:
    """(path, what) of each change that breaks a consumer reading ``old``."""
    found: list[tuple[str, str]] = []
    old_types, new_types = _types(old), _types(new)
    # An integer is a number: narrowing number to integer breaks nothing.
    accepted = old_types | {"integer"} if old_types and "number" in old_types else old_types
    if accepted is not None and (new_types is None or not new_types <= accepted):
        was = "/".join(sorted(old_types or ()))
        now = "/".join(sorted(new_types)) if new_types else "any type"
        return [(path, f"type changed from {was} to {now}")]
    old_props = old.get("properties") or {}
    new_props = new.get("properties") or {}
    new_required = set(new.get("required") or ())
    for name in old.get("required") or ():
        if name not in new_required:
            what = "removed" if name not in new_props else "no longer required"
            found.append((f"{path}.{name}", f"required field {what}"))
    # A field a consumer may read (required or not) must keep a type it expects.
    for name, old_sub in old_props.items():
        new_sub = new_props.get(name)
        if isinstance(old_sub, Mapping) and isinstance(new_sub, Mapping):
            found.extend(_compare(old_sub, new_sub, f"{path}.{name}"))
    old_items, new_items = old.get("items"), new.get("items")
    if isinstance(old_items, Mapping) and isinstance(new_items, Mapping):
        found.extend(_compare(old_items, new_items, f"{path}[]"))
    return found


def breaking_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    """The changes from document ``old`` to ``new`` (both from
    :func:`asyncapi_document`): a message removed, a required field removed or made
    optional, a field's type changed to one a consumer of ``old`` does not expect
    (through nested objects and array items) are breaking; new messages and fields,
    removed optional fields and narrowed types are not. ``$ref`` inside a schema is
    not followed."""
    before, after = _messages(old), _messages(new)
    changes: list[Change] = []
    for (event_type, version), schema in sorted(before.items()):
        if (event_type, version) not in after:
            changes.append(Change(event_type, version, "$", "message removed", True))
            continue
        now = after[(event_type, version)]
        if schema is None:
            continue
        if now is None:
            changes.append(Change(event_type, version, "$", "schema removed", False))
            continue
        for path, what in _compare(schema, now, "$"):
            changes.append(Change(event_type, version, path, what, True))
    for event_type, version in sorted(set(after) - set(before)):
        changes.append(Change(event_type, version, "$", "message added", False))
    return changes
