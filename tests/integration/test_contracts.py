"""Event contracts with real databases and the real command line: a payload that
breaks its schema is refused before any SQL; ``outboxer schemas export`` and
``outboxer schemas check`` as processes."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, event, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from outboxer import Event, Outbox, SchemaViolationError
from tests.integration.test_cli import child_env, cli_command

ORDER: dict[str, Any] = {
    "type": "object",
    "required": ["order_id", "total"],
    "properties": {"order_id": {"type": "string"}, "total": {"type": "number"}},
}


@contextmanager
def _no_sql(conn: Connection) -> Iterator[None]:
    seen: list[str] = []

    def record(*args: Any) -> None:
        seen.append(str(args[2]))

    event.listen(conn, "before_cursor_execute", record)
    try:
        yield
    finally:
        event.remove(conn, "before_cursor_execute", record)
    assert seen == [], f"SQL ran before the error: {seen}"


def _contract(ob: Outbox, service: str) -> str:
    """``<service>.created`` (the fixture's event type) with a schema for v1 and v2."""
    et = f"{service}.created"
    ob.register_event(et, service, schema=ORDER)
    ob.register_event(et, service, schema={"type": "object"}, version="v2")
    return et


def _count(ob: Outbox, service: str) -> int:
    table = ob.table_for(service)
    with ob.db.sync_engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def test_a_payload_breaking_its_schema_is_refused_before_any_sql(
    outbox: Outbox, service: str
) -> None:
    contracted, et = outbox, _contract(outbox, service)
    with contracted.db.sync_engine.connect() as conn, conn.begin():
        with _no_sql(conn), pytest.raises(SchemaViolationError) as info:
            contracted.publish(conn, et, {"order_id": "o-1", "total": "12"})
        assert (info.value.event_type, info.value.version, info.value.path) == (
            et,
            "v1",
            "$.total",
        )
        with _no_sql(conn), pytest.raises(SchemaViolationError):
            contracted.publish_many(conn, [Event(et, {"order_id": "o-2", "total": 1}), (et, {})])
        # The transaction is still usable; v2 has a schema of its own.
        contracted.publish(conn, et, {"order_id": "o-3", "total": 3})
        contracted.publish(conn, et, {"anything": True}, version="v2")
    assert _count(contracted, service) == 2


async def test_publish_async_checks_the_schema_too(aoutbox: Outbox, service: str) -> None:
    contracted, et = aoutbox, _contract(aoutbox, service)
    async with AsyncSession(contracted.db.async_engine) as session, session.begin():
        with pytest.raises(SchemaViolationError, match=r"\$\.order_id"):
            await contracted.publish_async(session, et, {"order_id": 7, "total": 1})
        await contracted.publish_async(session, et, {"order_id": "o-1", "total": 1})
        with pytest.raises(SchemaViolationError):
            await contracted.publish_many_async(session, [(et, {"total": 1})])
    assert _count(contracted, service) == 1


APP = """\
from outboxer import Outbox, OutboxSettings

outbox = Outbox({url!r}, settings=OutboxSettings.from_values(topic_prefix="t"))
ORDER = {schema!r}
outbox.register_event("order.placed", "orders", schema=ORDER)
outbox.register_event("order.cancelled", "orders")


@outbox.handler("order.placed")
def ship(event, tx):
    pass
"""


def _write_app(directory: Path, schema: dict[str, Any], *, cancelled: bool = True) -> str:
    name = f"contracts_app_{uuid.uuid4().hex[:8]}"
    source = APP.format(url=f"sqlite:///{directory / 'app.db'}", schema=schema)
    if not cancelled:
        source = source.replace('outbox.register_event("order.cancelled", "orders")\n', "")
    (directory / f"{name}.py").write_text(source)
    return f"{name}:outbox"


def _cli(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*cli_command(), *args],
        cwd=directory,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_schemas_export_and_check_as_processes(tmp_path: Path) -> None:
    spec = _write_app(tmp_path, ORDER)
    done = _cli(tmp_path, "--app", spec, "schemas", "export", "--output", "old.json")
    assert done.returncode == 0, done.stderr
    assert "1 channel(s), 2 message(s), 1 schema(s)" in done.stderr
    doc = json.loads((tmp_path / "old.json").read_text())
    assert doc["asyncapi"] == "3.0.0"
    assert doc["channels"]["orders"]["address"] == "t.orders"
    assert set(doc["operations"]) == {"send_orders", "receive_orders"}
    assert doc["components"]["schemas"]["order.placed.v1"] == ORDER
    on_stdout = _cli(tmp_path, "--app", spec, "schemas", "export")
    assert json.loads(on_stdout.stdout) == doc

    same = _cli(tmp_path, "--app", spec, "schemas", "check", "old.json")
    assert same.returncode == 0, same.stdout + same.stderr
    assert "no breaking change" in same.stdout

    # A new optional field: compatible.
    wider = {**ORDER, "properties": {**ORDER["properties"], "note": {"type": "string"}}}
    fine = _cli(tmp_path, "--app", _write_app(tmp_path, wider), "schemas", "check", "old.json")
    assert fine.returncode == 0, fine.stdout + fine.stderr

    # total retyped, order_id no longer required, order.cancelled gone: breaking.
    worse = {
        "type": "object",
        "required": ["total"],
        "properties": {"order_id": {"type": "string"}, "total": {"type": "string"}},
    }
    spec2 = _write_app(tmp_path, worse, cancelled=False)
    broken = _cli(tmp_path, "--app", spec2, "schemas", "check", "old.json")
    assert broken.returncode == 5, broken.stdout + broken.stderr
    assert "3 breaking change(s)" in broken.stdout
    as_json = _cli(tmp_path, "--app", spec2, "schemas", "check", "old.json", "--json")
    assert as_json.returncode == 5
    found = {
        (c["event_type"], c["path"], c["change"]) for c in json.loads(as_json.stdout)["changes"]
    }
    assert found == {
        ("order.cancelled", "$", "message removed"),
        ("order.placed", "$.order_id", "required field no longer required"),
        ("order.placed", "$.total", "type changed from number to string"),
    }

    missing = _cli(tmp_path, "--app", spec, "schemas", "check", "nope.json")
    assert missing.returncode == 2
    assert "cannot read nope.json" in missing.stderr
