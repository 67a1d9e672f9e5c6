"""The audit trail and the edit of dead letters, on SQLite, PostgreSQL and MariaDB:
each operator action writes its audit row in its own transaction (no row without
the change, no change without the row), the edit checks the new payload as publish
does, retention keeps the trail, and ``outboxer migrate`` adds the table to an
existing database."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.orm import Session

from outboxer import Outbox, Status
from outboxer.database.schema import AUDIT_TABLE
from outboxer.errors import (
    ConfigurationError,
    MessageNotFoundError,
    PayloadNotSerializableError,
    PayloadTooLargeError,
    SchemaViolationError,
    StoreError,
)
from tests.helpers import drop_tables, isolated_settings, make_outbox

SCHEMA = {
    "type": "object",
    "required": ["amount"],
    "properties": {"amount": {"type": "integer", "minimum": 0}},
}


@pytest.fixture
def ob(db_url: str, service: str) -> Iterator[Outbox]:
    outbox = make_outbox(db_url, settings=isolated_settings(max_payload_bytes=2000))
    outbox.register_event(f"{service}.paid", service, schema=SCHEMA)
    outbox.register_event(f"{service}.noted", service)
    outbox.migrate()
    yield outbox
    drop_tables(outbox)
    outbox.close()


def _publish(ob: Outbox, event: str, payloads: list[Any], **kw: Any) -> list[int]:
    with Session(ob.db.sync_engine) as session, session.begin():
        return [ob.publish(session, event, p, **kw) for p in payloads]


def _dead(ob: Outbox, service: str, ids: list[int]) -> None:
    store = ob.store(service)
    for oid in ids:
        store.mark_dead(oid, "RuntimeError: boom")


def test_requeue_purge_and_cancel_write_one_audit_row_each(ob: Outbox, service: str) -> None:
    a, b, c = _publish(ob, f"{service}.noted", [{"n": 1}, {"n": 2}, {"n": 3}])
    [waiting] = _publish(ob, f"{service}.noted", [{"n": 4}], event_id=f"{service}-e4")
    _dead(ob, service, [a, b])

    assert ob.admin.requeue([a], services=[service], actor="alice") == {service: 1}
    assert ob.admin.purge(dead_older_than=0, services=[service], actor="bob").total == 1
    assert ob.admin.cancel(f"{service}-e4", service=service, actor="carol") is True
    # Nothing matched: no row is written.
    assert ob.admin.requeue(None, services=[service], actor="dave") == {service: 0}

    page = ob.admin.audit(services=[service])
    got = [(e.action, e.actor, e.outbox_ids) for e in page.entries]
    assert got == [("cancel", "carol", [waiting]), ("purge", "bob", [b]), ("requeue", "alice", [a])]
    assert page.next_before is None
    purge = page.entries[1]
    assert purge.detail == {"deleted": 1, "event_type": None, "older_than": 0, "status": "dead"}
    assert all(e.service_name == service for e in page.entries)
    assert [e.id for e in ob.admin.audit(services=[service], outbox_id=a).entries] == [
        page.entries[2].id
    ]
    first = ob.admin.audit(services=[service], limit=2)
    assert [e.action for e in first.entries] == ["cancel", "purge"]
    rest = ob.admin.audit(services=[service], limit=2, before=first.next_before)
    assert [e.action for e in rest.entries] == ["requeue"]
    with pytest.raises(ConfigurationError, match="unknown audit action"):
        ob.admin.audit(action="delete")

    # The row requeued is pending again; the retention sweep (no actor) writes no
    # audit row and never deletes one.
    row = ob.store(service).get_by_id(a)
    assert row is not None
    assert (row.status, row.requeue_count) == (Status.PENDING, 1)
    ob.store(service).mark_consumed(c)
    assert ob.admin.purge(consumed_older_than=0, services=[service]).total == 2  # + cancelled
    assert len(ob.admin.audit(services=[service]).entries) == 3
    assert ob.admin.purge_audit(older_than=3600) == 0
    with pytest.raises(ConfigurationError):
        ob.admin.purge_audit(older_than=0)


def test_an_action_whose_audit_row_fails_is_rolled_back(ob: Outbox, service: str) -> None:
    [a] = _publish(ob, f"{service}.noted", [{"n": 1}])
    _dead(ob, service, [a])
    with ob.db.sync_engine.begin() as conn:
        conn.execute(text(f"DROP TABLE {AUDIT_TABLE}"))
    with pytest.raises(StoreError):
        ob.admin.requeue([a], services=[service], actor="alice")
    row = ob.store(service).get_by_id(a)
    assert row is not None
    assert (row.status, row.requeue_count) == (Status.DEAD, 0)

    # `migrate` creates the table again in an existing database, rows untouched.
    ob.migrate()
    assert AUDIT_TABLE in inspect(ob.db.sync_engine).get_table_names()
    assert ob.admin.requeue([a], services=[service], actor="alice") == {service: 1}
    assert [e.outbox_ids for e in ob.admin.audit(services=[service]).entries] == [[a]]


def test_edit_checks_the_payload_then_requeues_it_audited(ob: Outbox, service: str) -> None:
    [a] = _publish(ob, f"{service}.paid", [{"amount": 5}], event_id=f"{service}-p1")
    [b] = _publish(ob, f"{service}.noted", [{"n": 1}])
    _dead(ob, service, [a])
    before = ob.store(service).get_by_id(a)
    assert before is not None

    with pytest.raises(MessageNotFoundError, match="not dead"):
        ob.admin.edit(b, {"n": 2}, service=service, actor="alice")
    with pytest.raises(SchemaViolationError, match=r"\$\.amount"):
        ob.admin.edit(a, {"amount": -1}, service=service, actor="alice")
    with pytest.raises(PayloadTooLargeError):
        ob.admin.edit(a, {"amount": 1, "pad": "x" * 3000}, service=service, actor="alice")
    with pytest.raises(PayloadNotSerializableError):
        ob.admin.edit(a, {"amount": 1, "bad": {1, 2}}, service=service, actor="alice")
    with pytest.raises(PayloadNotSerializableError):
        ob.admin.edit(a, {"amount": 1, "x": float("nan")}, service=service, actor="alice")
    still = ob.store(service).get_by_id(a)
    assert still is not None
    assert (still.status, still.payload) == (Status.DEAD, before.payload)
    assert ob.admin.audit(services=[service]).entries == []

    edited = ob.admin.edit(a, {"amount": 7}, service=service, actor="alice")
    assert (edited.status, edited.retry_count, edited.requeue_count) == (Status.PENDING, 0, 1)
    envelope = edited.envelope()
    assert (envelope.payload, envelope.event_id) == ({"amount": 7}, f"{service}-p1")
    [entry] = ob.admin.audit(services=[service]).entries
    assert (entry.action, entry.actor, entry.outbox_ids) == ("edit", "alice", [a])
    assert entry.payload_before == before.payload
    assert entry.payload_after == edited.payload
    assert json.loads(entry.payload_after or "")["payload"] == {"amount": 7}
    # Edited once: no longer dead, so a second edit is refused.
    with pytest.raises(MessageNotFoundError):
        ob.admin.edit(a, {"amount": 8}, service=service, actor="alice")
