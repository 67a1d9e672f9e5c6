"""The web console over HTTP (Starlette's TestClient) on SQLite, PostgreSQL and
MariaDB: every page, search and paging, requeue and purge, CSRF, read-only, the
token, and escaping of data from outside. The browser tests drive the same pages
through Chromium (test_web_browser.py)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy.orm import Session
from starlette.testclient import TestClient

from outboxer import Outbox, Status
from outboxer.web import create_app
from tests.helpers import drop_tables, make_outbox, unique_service
from tests.integration.test_cli import child_env, cli_command

XSS = "<script>alert(1)</script>"
IMG = '<img src=x onerror="window.__xss=1">'


@dataclass
class Console:
    outbox: Outbox
    orders: str
    mails: str
    dead_ids: list[int]
    xss_id: int

    def client(self, **kw: object) -> TestClient:
        return TestClient(create_app(self.outbox, cache_seconds=0, chart_cache_seconds=0, **kw))  # type: ignore[arg-type]


@pytest.fixture
def console(db_url: str) -> Iterator[Console]:
    orders, mails = unique_service(), unique_service()
    ob = make_outbox(db_url, retry_unit=0.05)
    ob.register_event("order.created", orders)
    ob.register_event("mail.sent", mails)
    ob.migrate()
    with Session(ob.db.sync_engine) as session, session.begin():
        for i in range(120):
            ob.publish(session, "order.created", {"i": i}, key=f"order-{i % 3}")
        xss_id = ob.publish(
            session, "mail.sent", {"note": XSS, "html": IMG}, key=XSS, event_id="ev-xss"
        )
        mail_ids = [ob.publish(session, "mail.sent", {"i": i}, key=f"mail-{i}") for i in range(3)]
    store = ob.store(mails)
    store.mark_dead(xss_id, f"RuntimeError: {XSS}\nsecond line of the trace")
    store.mark_dead(mail_ids[0], "ValueError: no such address\n  at line 3")
    ob.store(orders).mark_consumed(1)
    yield Console(ob, orders, mails, [xss_id, mail_ids[0]], xss_id)
    drop_tables(ob)
    ob.close()


def _csrf(client: TestClient) -> str:
    client.get("/")
    token = client.cookies.get("outboxer_csrf")
    assert token
    return token


def _ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'<a href="/messages/[^/"]+/(\d+)">', html)]


def test_pages_render_and_escape(console: Console) -> None:
    client = console.client()
    seen = []
    home = client.get("/")
    assert home.status_code == 200
    assert console.orders in home.text
    assert console.mails in home.text
    assert "/static/htmx.min.js" in home.text
    assert 'id="activity"' in home.text
    assert "script-src 'self'" in home.headers["content-security-policy"]
    for path in (
        "/",
        "/overview/services",
        f"/messages?q={XSS}",
        f"/messages/{console.mails}/{console.xss_id}",
        "/dead",
    ):
        page = client.get(path, params=None)
        assert page.status_code == 200, (path, page.text)
        seen.append(page.text)
        # Data from outside is text: never markup.
        assert "<script>alert" not in page.text
        assert "<img src=x" not in page.text
    message = seen[3]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in message
    assert "second line of the trace" in message  # the full last error
    assert "&#34;ev-xss&#34;" in message  # the envelope, pretty JSON
    dead = seen[4]
    assert "RuntimeError: &lt;script&gt;alert(1)&lt;/script&gt;" in dead
    assert "second line of the trace" not in dead  # the reason's first line only
    assert 'id="requeue-all"' in dead
    assert 'id="purge"' in dead


def test_activity_counts_the_last_hour(console: Console) -> None:
    doc = console.client().get("/api/activity").json()
    assert len(doc["t"]) == len(doc["published"]) == 60
    assert doc["t"] == sorted(doc["t"])
    assert sum(doc["consumed"]) == 1
    assert sum(doc["published"]) == 1  # consumed in process: handed over once
    assert sum(doc["failed"]) == 2


def test_search_by_key_event_type_event_id_and_id(console: Console) -> None:
    client = console.client()

    def found(**params: str) -> list[int]:
        page = client.get("/messages", params=params)
        assert page.status_code == 200, page.text
        return _ids(page.text)

    assert found(q=XSS) == [console.xss_id]
    assert found(q="ev-xss", by="event_id") == [console.xss_id]
    mail_ids = found(q="mail.sent", by="event_type")
    assert len(mail_ids) == 4
    assert mail_ids == sorted(mail_ids, reverse=True)
    assert found(q="mail.sent", by="event_type", status="dead") == sorted(
        console.dead_ids, reverse=True
    )
    # An event published without an id has its outbox id as event id.
    assert console.xss_id + 1 in found(q=str(console.xss_id + 1), by="event_id")
    assert found(q="7", by="id", service=console.orders) == [7]
    assert found(q="order-1", service=console.mails) == []
    bad = client.get("/messages", params={"q": "seven", "by": "id"})
    assert bad.status_code == 400
    assert "outbox id is a number" in bad.text
    assert client.get(f"/messages/{console.orders}/99999").status_code == 404


def test_messages_page_by_id_without_gaps(console: Console) -> None:
    client = console.client()
    url: str | None = f"/messages?service={console.orders}"
    pages: list[list[int]] = []
    while url is not None:
        page = client.get(url.replace("&amp;", "&"))
        assert page.status_code == 200
        pages.append(_ids(page.text))
        more = re.search(r'<a href="([^"]+)" id="older">', page.text)
        url = more.group(1) if more else None
    assert [len(p) for p in pages] == [50, 50, 20]
    everything = [i for p in pages for i in p]
    assert everything == list(range(120, 0, -1))


def test_requeue_one_selection_and_all_then_purge(console: Console) -> None:
    client = console.client()
    store = console.outbox.store(console.mails)
    # No CSRF token: refused, nothing changes.
    refused = client.post("/dead/requeue", data={"one": f"{console.mails}:{console.xss_id}"})
    assert refused.status_code == 403
    assert store.get_by_id(console.xss_id).status is Status.DEAD  # type: ignore[union-attr]
    wrong = client.post("/dead/requeue", data={"csrf": "x" * 43, "ids": "a:1"})
    assert wrong.status_code == 403

    csrf = _csrf(client)
    done = client.post(
        "/dead/requeue",
        data={"csrf": csrf, "one": f"{console.mails}:{console.xss_id}", "next": "/dead"},
        follow_redirects=False,
    )
    assert done.status_code == 303
    assert done.headers["location"] == "/dead?requeued=1"
    row = store.get_by_id(console.xss_id)
    assert row is not None
    assert row.status is Status.PENDING
    assert row.requeue_count == 1
    # A selection: a dead letter and one that is not dead (refused as a whole).
    alive = console.dead_ids[1] + 1
    selection = [f"{console.mails}:{console.dead_ids[1]}", f"{console.mails}:{alive}"]
    bad = client.post("/dead/requeue", data={"csrf": csrf, "ids": selection})
    assert bad.status_code == 400
    assert "no dead letter with id" in bad.text
    # All of a filter.
    store.mark_dead(console.xss_id, "again")
    done = client.post(
        "/dead/requeue-all",
        data={"csrf": csrf, "service": console.mails, "event_type": "mail.sent"},
        follow_redirects=False,
    )
    assert done.status_code == 303
    assert "requeued=2" in done.headers["location"]
    assert store.status().dead == 0
    # Purge: dead letters of the filter that died long enough ago.
    store.mark_dead(console.xss_id, "for good")
    kept = client.post(
        "/dead/purge",
        data={"csrf": csrf, "service": console.mails, "older_than": "1h"},
        follow_redirects=False,
    )
    assert kept.status_code == 303
    assert "purged=0" in kept.headers["location"]
    gone = client.post(
        "/dead/purge",
        data={"csrf": csrf, "service": console.mails, "older_than": "0s"},
        follow_redirects=False,
    )
    assert "purged=1" in gone.headers["location"]
    assert store.get_by_id(console.xss_id) is None
    bad_age = client.post("/dead/purge", data={"csrf": csrf, "older_than": "soon"})
    assert bad_age.status_code == 400


def test_cancel_a_waiting_event(console: Console) -> None:
    ob = console.outbox
    with Session(ob.db.sync_engine) as session, session.begin():
        later = ob.publish(session, "mail.sent", {"to": "x"}, event_id="ev-later", delay=600)
    client = console.client()
    page = f"/messages/{console.mails}/{later}"
    shown = client.get(page).text
    assert 'id="cancel"' in shown
    assert "scheduled for" in shown
    overview = client.get("/overview/services").text
    assert '<th class="n">scheduled</th>' in overview
    form = {"service": console.mails, "event_id": "ev-later", "next": page}
    assert client.post("/messages/cancel", data=form).status_code == 403  # no CSRF token
    csrf = _csrf(client)
    done = client.post("/messages/cancel", data={"csrf": csrf, **form}, follow_redirects=False)
    assert done.status_code == 303
    assert done.headers["location"] == f"{page}?cancelled=1"
    row = ob.store(console.mails).get_by_id(later)
    assert row is not None
    assert row.status is Status.CANCELLED
    after = client.get(done.headers["location"]).text
    assert "Cancelled: it will not be sent." in after
    assert 'id="cancel"' not in after
    # Not waiting any more: said so, nothing changes.
    again = client.post("/messages/cancel", data={"csrf": csrf, **form}, follow_redirects=False)
    assert again.headers["location"] == f"{page}?cancelled=0"
    unknown = client.post("/messages/cancel", data={"csrf": csrf, **form, "service": "nobody"})
    assert unknown.status_code == 400


def test_read_only_offers_and_accepts_no_change(console: Console) -> None:
    client = console.client(read_only=True)
    for path in ("/dead", f"/messages/{console.mails}/{console.xss_id}"):
        page = client.get(path)
        assert page.status_code == 200
        assert 'id="read-only"' in page.text
        assert '<form method="post"' not in page.text
        assert "Requeue" not in page.text
    csrf = _csrf(client)
    for path, data in (
        ("/dead/requeue", {"one": f"{console.mails}:{console.xss_id}"}),
        ("/dead/requeue-all", {"service": console.mails}),
        ("/dead/purge", {"older_than": "0s"}),
        ("/messages/cancel", {"service": console.mails, "event_id": "ev-xss"}),
    ):
        assert client.post(path, data={"csrf": csrf, **data}).status_code == 403
    assert console.outbox.store(console.mails).status().dead == 2


def test_no_sign_in_without_a_token(console: Console) -> None:
    page = console.client().get("/login?next=/dead", follow_redirects=False)
    assert page.status_code == 303
    assert page.headers["location"] == "/dead"


def test_token_is_required(console: Console) -> None:
    client = console.client(token="s3cret-token")
    first = client.get("/dead", follow_redirects=False)
    assert first.status_code == 303
    assert first.headers["location"] == "/login?next=/dead"
    assert client.get("/api/activity").status_code == 401
    assert client.get("/static/console.js").status_code == 200
    assert client.get("/", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
    wrong = client.get("/", headers={"Authorization": "Bearer nope"}, follow_redirects=False)
    assert wrong.status_code == 303
    csrf = _csrf(client)
    denied = client.post("/login", data={"csrf": csrf, "token": "nope", "next": "/dead"})
    assert denied.status_code == 401
    assert "wrong token" in denied.text
    assert client.post("/login", data={"token": "s3cret-token"}).status_code == 403  # no CSRF
    signed_in = client.post(
        "/login",
        data={"csrf": csrf, "token": "s3cret-token", "next": "https://evil.example/"},
        follow_redirects=False,
    )
    assert signed_in.status_code == 303
    assert signed_in.headers["location"] == "/"
    cookie = signed_in.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "samesite=strict" in cookie.lower()
    assert "s3cret-token" not in cookie
    assert client.get("/dead").status_code == 200


def test_cli_refuses_a_public_address_without_a_token(tmp_path: object) -> None:
    env = {k: v for k, v in child_env().items() if k != "OUTBOXER_WEB_TOKEN"}
    result = subprocess.run(
        [*cli_command(), "--app", "nowhere:outbox", "web", "--host", "0.0.0.0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "without a token" in result.stderr
    assert "OUTBOXER_WEB_TOKEN" in result.stderr


def test_page_time_measure_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """bench/web.py (the 1,000,000-row measure of docs/decisions.md) at a tiny size,
    so it cannot rot. Nothing about time is asserted."""
    from bench import web as web_bench  # noqa: PLC0415

    assert web_bench.main(["--rows", "3000", "--repeat", "1", "--db", "sqlite"]) == 0
    out = capsys.readouterr().out
    assert "| search by key |" in out
