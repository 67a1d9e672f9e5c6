"""Event contracts without a database: schema checks, the AsyncAPI document, and the
compatibility check."""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Any

import pytest

from outboxer import ConfigurationError, InvalidEventError, SchemaViolationError
from outboxer.contracts import (
    ChannelSpec,
    Contracts,
    asyncapi_document,
    breaking_changes,
)
from outboxer.routing import default_route

ORDER: dict[str, Any] = {
    "type": "object",
    "required": ["order_id", "total", "lines"],
    "properties": {
        "order_id": {"type": "string"},
        "total": {"type": "number"},
        "note": {"type": "string"},
        "lines": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["sku", "qty"],
                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
            },
        },
    },
}
GOOD = {"order_id": "o-1", "total": 12.5, "lines": [{"sku": "A", "qty": 2}]}


def _contracts() -> Contracts:
    c = Contracts()
    c.register("order.placed", None, ORDER)
    return c


def test_a_matching_payload_passes_and_unknown_types_are_not_checked() -> None:
    c = _contracts()
    c.check("order.placed", None, GOOD)
    c.check("order.placed", "v1", GOOD)
    c.check("other.event", None, {"anything": object()})


def test_a_violation_names_the_type_the_version_and_the_path() -> None:
    c = _contracts()
    bad = copy.deepcopy(GOOD)
    bad["lines"][0]["qty"] = "two"
    with pytest.raises(SchemaViolationError) as info:
        c.check("order.placed", None, bad)
    err = info.value
    assert isinstance(err, InvalidEventError)
    assert isinstance(err, ValueError)
    assert (err.event_type, err.version, err.path) == ("order.placed", "v1", "$.lines[0].qty")
    assert "$.lines[0].qty" in str(err)
    with pytest.raises(SchemaViolationError, match="'total' is a required property"):
        c.check("order.placed", None, {"order_id": "o", "lines": []})


def test_versions_have_their_own_schema_and_an_unknown_version_is_refused() -> None:
    c = _contracts()
    v2 = {**ORDER, "required": ["order_id"]}
    c.register("order.placed", "v2", v2)
    c.check("order.placed", "v2", {"order_id": "o"})
    with pytest.raises(SchemaViolationError):
        c.check("order.placed", "v1", {"order_id": "o"})
    with pytest.raises(SchemaViolationError, match="no schema for version v3") as info:
        c.check("order.placed", "v3", GOOD)
    assert info.value.path == "$"


@dataclass
class _Line:
    sku: str
    qty: int


def test_models_and_tuples_are_checked_in_their_json_form() -> None:
    c = _contracts()
    c.check("order.placed", None, {"order_id": "o", "total": 1, "lines": (_Line("A", 1),)})
    with pytest.raises(SchemaViolationError) as info:
        c.check("order.placed", None, {"order_id": "o", "total": 1, "lines": (_Line("A", "x"),)})  # type: ignore[arg-type]
    assert info.value.path == "$.lines[0].qty"


def test_bad_schemas_are_refused_at_registration() -> None:
    c = Contracts()
    with pytest.raises(ConfigurationError, match="not a valid JSON Schema"):
        c.register("a.b", None, {"type": "no-such-type"})
    with pytest.raises(ConfigurationError, match="must be a JSON Schema object"):
        c.register("a.b", None, ["not", "a", "schema"])  # type: ignore[arg-type]
    c.register("a.b", None, ORDER)
    c.register("a.b", "v1", copy.deepcopy(ORDER))  # the same again: a no-op
    with pytest.raises(ConfigurationError, match="already has another schema"):
        c.register("a.b", None, {"type": "object"})


def test_without_jsonschema_a_schema_fails_with_the_install_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "jsonschema", None)
    c = Contracts()
    with pytest.raises(ConfigurationError, match=r"pip install 'outboxer\[schemas\]'"):
        c.register("a.b", None, ORDER)
    c.check("a.b", None, {"unchecked": True})  # nothing was registered


def _doc(schema: dict[str, Any] | None, *types: str) -> dict[str, Any]:
    c = Contracts()
    if schema is not None:
        c.register("order.placed", None, schema)
    route = default_route("orders")
    spec = ChannelSpec(route, list(types or ["order.placed"]), sends=True, receives=True)
    return asyncapi_document([spec], c, title="t")


def test_the_asyncapi_document_has_channels_operations_and_messages() -> None:
    doc = _doc(ORDER, "order.placed", "order.cancelled")
    assert doc["asyncapi"] == "3.0.0"
    assert doc["channels"]["orders"]["address"] == "outboxer.orders"
    assert set(doc["channels"]["orders"]["messages"]) == {"order.placed.v1", "order.cancelled.v1"}
    assert doc["operations"]["send_orders"]["action"] == "send"
    assert doc["operations"]["receive_orders"]["action"] == "receive"
    message = doc["components"]["messages"]["order.placed.v1"]
    assert message["payload"]["properties"]["payload"] == {
        "$ref": "#/components/schemas/order.placed.v1"
    }
    assert doc["components"]["schemas"]["order.placed.v1"] == ORDER
    assert "order.cancelled.v1" not in doc["components"]["schemas"]


def _changed(**edits: Any) -> dict[str, Any]:
    schema = copy.deepcopy(ORDER)
    for path, value in edits.items():
        target = schema
        *parents, last = path.split("__")
        for part in parents:
            target = target[part]
        if value is None:
            del target[last]
        else:
            target[last] = value
    return schema


@pytest.mark.parametrize(
    ("edits", "path", "what"),
    [
        ({"required": ["order_id", "lines"]}, "$.total", "required field no longer required"),
        (
            {"required": ["order_id", "lines"], "properties__total": None},
            "$.total",
            "required field removed",
        ),
        ({"properties__total": {"type": "string"}}, "$.total", "type changed"),
        (
            {"properties__lines__items__properties__qty": {"type": "number"}},
            "$.lines[].qty",
            "type changed from integer to number",
        ),
        ({"properties__note": {"type": "integer"}}, "$.note", "type changed"),
    ],
)
def test_breaking_changes_are_found(edits: dict[str, Any], path: str, what: str) -> None:
    changes = breaking_changes(_doc(ORDER), _doc(_changed(**edits)))
    breaking = [c for c in changes if c.breaking]
    assert len(breaking) == 1, changes
    assert breaking[0].path == path
    assert what in breaking[0].what


@pytest.mark.parametrize(
    "edits",
    [
        {"properties__extra": {"type": "string"}},  # a new optional field
        {"properties__note": None},  # an optional field removed
        {"properties__total": {"type": "integer"}},  # narrowed: every integer is a number
        {"required": ["order_id", "total", "lines", "note"]},  # more required
    ],
)
def test_compatible_changes_pass(edits: dict[str, Any]) -> None:
    assert not [c for c in breaking_changes(_doc(ORDER), _doc(_changed(**edits))) if c.breaking]


def test_a_removed_message_breaks_and_an_added_one_does_not() -> None:
    both = _doc(ORDER, "order.placed", "order.cancelled")
    one = _doc(ORDER, "order.placed")
    removed = breaking_changes(both, one)
    assert [(c.event_type, c.what, c.breaking) for c in removed] == [
        ("order.cancelled", "message removed", True)
    ]
    assert [c.breaking for c in breaking_changes(one, both)] == [False]


def test_check_refuses_what_is_not_an_asyncapi_3_document() -> None:
    with pytest.raises(ConfigurationError, match="AsyncAPI 3"):
        breaking_changes({"openapi": "3.1.0"}, _doc(ORDER))


@pytest.mark.parametrize("fmt", ["cloudevents", "cloudevents-structured"])
def test_a_cloudevents_service_is_described_as_it_travels(fmt: str) -> None:
    c = Contracts()
    c.register("order.placed", None, ORDER)
    spec = ChannelSpec(default_route("orders"), ["order.placed"], True, False, wire_format=fmt)
    message = asyncapi_document([spec], c)["components"]["messages"]["order.placed.v1"]
    ref = {"$ref": "#/components/schemas/order.placed.v1"}
    if fmt == "cloudevents":
        assert message["payload"] == ref
        assert message["headers"]["properties"]["ce_type"] == {"const": "order.placed"}
        assert "ce_id" in message["headers"]["required"]
    else:
        assert message["contentType"] == "application/cloudevents+json"
        assert message["payload"]["properties"]["data"] == ref
    # The check reads the event's schema the same way in every format.
    assert not breaking_changes(asyncapi_document([spec], c), _doc(ORDER))
