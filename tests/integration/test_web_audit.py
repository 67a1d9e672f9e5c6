"""The console's audit page and the edit of a dead letter over HTTP on SQLite,
PostgreSQL and MariaDB: CSRF and read-only as for every change, the checks of the
new payload, the audit rows naming the console's client, data from outside shown
as text."""

from __future__ import annotations

import json

from sqlalchemy.orm import Session
from starlette.testclient import TestClient

from outboxer import Status
from outboxer.web import create_app
from tests.helpers import drop_tables, make_outbox
from tests.integration.test_web import ORIGIN, XSS, Console, _csrf
from tests.integration.test_web import console as console  # noqa: PLC0414 - the fixture


def test_edit_requeue_and_the_audit_page(console: Console) -> None:
    client = console.client()
    store = console.outbox.store(console.mails)
    page = client.get("/audit")
    assert page.status_code == 200
    assert 'id="audit-empty"' in page.text
    message = client.get(f"/messages/{console.mails}/{console.xss_id}")
    assert 'id="edit-payload"' in message.text
    assert 'id="trail-empty"' in message.text
    assert "<script>alert" not in message.text  # the payload in the form is text

    edit = {"service": console.mails, "id": str(console.xss_id)}
    # No CSRF token: refused, nothing changes.
    refused = client.post("/dead/edit", data={**edit, "payload": '{"note": "fixed"}'})
    assert refused.status_code == 403
    csrf = _csrf(client)
    bad = client.post("/dead/edit", data={**edit, "csrf": csrf, "payload": "{not json"})
    assert bad.status_code == 400
    assert "not valid JSON" in bad.text
    row = store.get_by_id(console.xss_id)
    assert row is not None
    assert row.status is Status.DEAD

    done = client.post(
        "/dead/edit",
        data={**edit, "csrf": csrf, "payload": json.dumps({"note": "fixed", "html": XSS})},
        follow_redirects=False,
    )
    assert done.status_code == 303, done.text
    assert done.headers["location"] == f"/messages/{console.mails}/{console.xss_id}?edited=1"
    row = store.get_by_id(console.xss_id)
    assert row is not None
    assert (row.status, row.requeue_count) == (Status.PENDING, 1)
    assert row.envelope().payload == {"note": "fixed", "html": XSS}
    # Not dead any more: a second edit is refused.
    again = client.post("/dead/edit", data={**edit, "csrf": csrf, "payload": "{}"})
    assert again.status_code == 400
    assert "not dead" in again.text

    other = console.dead_ids[1]
    requeued = client.post(
        "/dead/requeue",
        data={"csrf": csrf, "one": f"{console.mails}:{other}", "next": "/dead"},
        follow_redirects=False,
    )
    assert requeued.status_code == 303

    shown = client.get(f"/messages/{console.mails}/{console.xss_id}?edited=1")
    assert 'id="edit-result"' in shown.text
    assert 'id="trail"' in shown.text
    assert "console:testclient" in shown.text
    assert 'id="edit-payload"' not in shown.text  # only dead letters are edited
    assert "<script>alert" not in shown.text

    page = client.get("/audit")
    assert page.status_code == 200
    actions = list(page.text.split('class="action">')[1:])
    assert [a.split("<", 1)[0] for a in actions] == ["requeue", "edit"]
    assert f'href="/messages/{console.mails}/{other}"' in page.text
    filtered = client.get("/audit", params={"action": "edit", "service": console.mails})
    assert filtered.text.count('class="action">') == 1
    unknown = client.get("/audit", params={"action": "delete"})
    assert unknown.status_code == 400
    assert "unknown audit action" in unknown.text
    entries = console.outbox.admin.audit(services=[console.mails]).entries
    assert [(e.action, e.actor, e.outbox_ids) for e in entries] == [
        ("requeue", "console:testclient", [other]),
        ("edit", "console:testclient", [console.xss_id]),
    ]


def test_read_only_console_offers_no_edit(console: Console) -> None:
    client = console.client(read_only=True)
    page = client.get(f"/messages/{console.mails}/{console.xss_id}")
    assert page.status_code == 200
    assert 'id="edit-payload"' not in page.text
    csrf = _csrf(client)
    data = {"csrf": csrf, "service": console.mails, "id": str(console.xss_id), "payload": "{}"}
    assert client.post("/dead/edit", data=data).status_code == 403
    assert client.get("/audit").status_code == 200
    assert console.outbox.store(console.mails).status().dead == 2


def test_blocked_keys_page_and_its_actions(db_url: str, service: str) -> None:
    ob = make_outbox(db_url, retry_unit=60)
    ob.register_service(service, ordered=True)
    ob.register_event(f"{service}.entry", service)
    ob.migrate()
    try:
        with Session(ob.db.sync_engine) as session, session.begin():
            a, _ = (ob.publish(session, f"{service}.entry", {"n": n}, key=XSS) for n in range(2))
        ob.store(service).mark_failed_for_retry(a, f"RuntimeError: {XSS}")
        app = create_app(ob, cache_seconds=0, chart_cache_seconds=0)
        client = TestClient(app, base_url=ORIGIN, headers={"Origin": ORIGIN})
        page = client.get("/keys")
        assert page.status_code == 200
        assert 'id="keys"' in page.text
        assert "<script>alert" not in page.text
        assert f'href="/messages/{service}/{a}"' in page.text
        csrf = _csrf(client)
        form = {"csrf": csrf, "service": service, "key": XSS}
        parking = client.post(
            "/keys/action", data={**form, "action": "park"}, follow_redirects=False
        )
        assert parking.status_code == 303
        parked = client.get("/keys", params={"service": service})
        assert 'class="release"' in parked.text
        no_csrf = client.post("/keys/action", data={**form, "csrf": "", "action": "release"})
        assert no_csrf.status_code == 403
        done = client.post(
            "/keys/action", data={**form, "action": "release"}, follow_redirects=False
        )
        assert done.status_code == 303
        assert "done=release" in done.headers["location"]
        bad = client.post("/keys/action", data={**form, "action": "skip", "reason": " "})
        assert bad.status_code == 400
        assert "reason" in bad.text
        skip = {**form, "action": "skip", "reason": "wrong amount"}
        assert client.post("/keys/action", data=skip).status_code == 200  # redirected
        assert 'id="keys-empty"' in client.get("/keys").text
        entries = ob.admin.audit(services=[service]).entries
        assert [(e.action, e.actor) for e in entries] == [
            ("skip", "console:testclient"),
            ("release", "console:testclient"),
            ("park", "console:testclient"),
        ]
        read_only = TestClient(
            create_app(ob, read_only=True), base_url=ORIGIN, headers={"Origin": ORIGIN}
        )
        assert "Park" not in read_only.get("/keys").text
    finally:
        drop_tables(ob)
        ob.close()


def test_trace_page(console: Console) -> None:
    client = console.client()
    message = client.get(f"/messages/{console.mails}/{console.xss_id}")
    assert 'href="/trace?event_id=ev-xss"' in message.text
    page = client.get("/trace", params={"event_id": "ev-xss"})
    assert page.status_code == 200
    steps = [s.split("<", 1)[0] for s in page.text.split('class="step">')[1:]]
    assert steps == ["created", "dead"]
    assert "<script>alert" not in page.text
    assert "RuntimeError: &lt;script&gt;" in page.text
    empty = client.get("/trace", params={"event_id": "nothing-here"})
    assert 'id="trace-empty"' in empty.text
    assert client.get("/trace").status_code == 200
