"""The web console over HTTP (Starlette's TestClient) on SQLite, PostgreSQL and
MariaDB: every page, search and paging, requeue and purge, CSRF, read-only, the
token, and escaping of data from outside. The browser tests drive the same pages
through Chromium (test_web_browser.py)."""

from __future__ import annotations

import logging
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session
from starlette.testclient import TestClient

from outboxer import Outbox, Status
from outboxer.errors import ConfigurationError
from outboxer.testing import free_port
from outboxer.web import Throttle, create_app
from tests.helpers import drop_tables, make_outbox, unavailable, unique_service
from tests.integration.test_cli import child_env, cli_command

XSS = "<script>alert(1)</script>"
IMG = '<img src=x onerror="window.__xss=1">'
ORIGIN = "http://127.0.0.1:8089"


@dataclass
class Console:
    outbox: Outbox
    orders: str
    mails: str
    dead_ids: list[int]
    xss_id: int

    def client(self, base: str = ORIGIN, **kw: object) -> TestClient:
        """A client as a browser on the console's page: its own Host and Origin."""
        app = create_app(self.outbox, cache_seconds=0, chart_cache_seconds=0, **kw)  # type: ignore[arg-type]
        return TestClient(app, base_url=base, headers={"Origin": base})


@pytest.fixture
def console(db_url: str) -> Iterator[Console]:
    yield from _console(db_url)


@pytest.fixture
def sqlite_console(tmp_path: Path) -> Iterator[Console]:
    """For the access rules that do not depend on the database (the host, changes'
    origin and every page are checked on all three with ``console``)."""
    yield from _console(f"sqlite:///{tmp_path / 'outbox.db'}")


def _console(db_url: str) -> Iterator[Console]:
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
    # An empty (or short) cookie equal to the field is none of the console's.
    for value in ("", "short"):
        forged = TestClient(client.app, base_url=ORIGIN, headers={"Origin": ORIGIN})
        forged.cookies.set("outboxer_csrf", value)
        refused = forged.post("/dead/requeue", data={"csrf": value, "one": f"{console.mails}:1"})
        assert refused.status_code == 403, value
        assert "CSRF" in refused.text

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


# --------------------------------------------------------------------- hardening

TOKEN = "s3cret-token-for-tests"
FOREIGN = ("attacker.example:8089", "attacker.example", "127.0.0.1.attacker.example:8089")


class Clock:
    """The throttle's clock, moved by the test (no waiting)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _signed_in(console: Console, client: TestClient, token: str = TOKEN) -> str:
    """Sign ``client`` in through the form; its CSRF token."""
    csrf = _csrf(client)
    done = client.post("/login", data={"csrf": csrf, "token": token}, follow_redirects=False)
    assert done.status_code == 303, done.text
    return csrf


@pytest.mark.parametrize("token", [None, TOKEN], ids=["no-token", "token"])
def test_a_foreign_host_is_refused_on_every_route(console: Console, token: str | None) -> None:
    """What a browser sends after DNS rebinding: the console's address, another site's
    name. Refused before anything else, even with the token, a session and CSRF."""
    client = console.client(token=token)
    auth = {"Authorization": f"Bearer {TOKEN}"} if token else {}
    csrf = _signed_in(console, client) if token else _csrf(client)
    dead = f"{console.mails}:{console.xss_id}"
    pages = [
        "/",
        "/overview/services",
        "/api/activity",
        "/messages",
        f"/messages?q={console.mails}",
        f"/messages/{console.mails}/{console.xss_id}",
        "/dead",
        "/login",
        "/login?next=/dead",
        "/static/console.js",
        "/no-such-page",
    ]
    changes = [
        ("/dead/requeue", {"one": dead}),
        ("/dead/requeue-all", {"service": console.mails}),
        ("/dead/purge", {"older_than": "0s"}),
        ("/login", {"token": TOKEN}),
    ]
    for host in FOREIGN:
        headers = {**auth, "Host": host, "Origin": f"http://{host}"}
        for path in pages:
            page = client.get(path, headers=headers, follow_redirects=False)
            assert page.status_code == 400, (host, path, page.status_code)
            assert console.mails not in page.text
            assert "set-cookie" not in page.headers
            assert page.headers["x-frame-options"] == "DENY"
        for path, data in changes:
            done = client.post(
                path, data={"csrf": csrf, **data}, headers=headers, follow_redirects=False
            )
            assert done.status_code == 400, (host, path, done.status_code)
            assert "set-cookie" not in done.headers
    assert console.outbox.store(console.mails).status().dead == 2
    # The same requests with the console's own name work (the refusals were the host's).
    assert client.get("/dead", headers=auth).status_code == 200
    assert client.get("/dead", headers={**auth, "Host": "localhost:8089"}).status_code == 200


def test_the_console_answers_to_loopback_and_to_its_given_names(sqlite_console: Console) -> None:
    client = sqlite_console.client(allowed_hosts=["console.example.com", "10.1.2.3"])
    for host in (
        "localhost",
        "LOCALHOST.:8089",
        "127.0.0.1",
        "127.0.0.2:8089",
        "[::1]:8089",
        "console.example.com",
        "Console.Example.com:443",
        "10.1.2.3:8089",
    ):
        assert client.get("/dead", headers={"Host": host}).status_code == 200, host
    for host in (
        "example.com",
        "console.example.com.attacker.example",
        "evil-console.example.com",
        "10.1.2.4",
        "127.0.0.1:notaport",
        "[::1",
        "",
        "a b",
    ):
        assert client.get("/dead", headers={"Host": host}).status_code == 400, host


@pytest.mark.parametrize(
    "names", [["*"], ["console.example.com:443"], ["http://console.example.com"], ["a b/c"]]
)
def test_allowed_hosts_must_be_names(sqlite_console: Console, names: list[str]) -> None:
    with pytest.raises(ConfigurationError):
        sqlite_console.client(allowed_hosts=names)


def test_changes_must_come_from_the_console_itself(console: Console) -> None:
    """Origin (or, without it, Referer) must be the console: scheme, name and port."""
    client = console.client()
    csrf = _csrf(client)
    dead = f"{console.mails}:{console.xss_id}"
    store = console.outbox.store(console.mails)
    for origin in (
        "http://attacker.example:8089",
        "http://127.0.0.1:9999",  # another program on this host
        "https://127.0.0.1:8089",  # another scheme
        "http://127.0.0.1.attacker.example:8089",
        "null",
        "",
    ):
        refused = client.post(
            "/dead/requeue", data={"csrf": csrf, "one": dead}, headers={"Origin": origin}
        )
        assert refused.status_code == 403, origin
        assert "own pages" in refused.text
    # No Origin: the Referer decides; neither: refused.
    bare = TestClient(client.app, base_url=ORIGIN, cookies=client.cookies)
    for referer, status in (
        (None, 403),
        ("http://attacker.example:8089/dead", 403),
        (f"{ORIGIN}/dead?service={console.mails}", 303),
    ):
        headers = {"Referer": referer} if referer else {}
        done = bare.post(
            "/dead/requeue",
            data={"csrf": csrf, "one": dead},
            headers=headers,
            follow_redirects=False,
        )
        assert done.status_code == status, referer
        if status == 403:
            assert store.get_by_id(console.xss_id).status is Status.DEAD  # type: ignore[union-attr]
    assert store.get_by_id(console.xss_id).status is Status.PENDING  # type: ignore[union-attr]


def test_sign_in_from_another_origin_is_refused(sqlite_console: Console) -> None:
    client = sqlite_console.client(token=TOKEN)
    csrf = _csrf(client)
    refused = client.post(
        "/login",
        data={"csrf": csrf, "token": TOKEN},
        headers={"Origin": "http://attacker.example:8089"},
        follow_redirects=False,
    )
    assert refused.status_code == 403
    assert "outboxer_session" not in refused.headers.get("set-cookie", "")


def _headers_ok(response: Any, what: str) -> None:
    headers = response.headers
    assert "frame-ancestors 'none'" in headers["content-security-policy"], what
    assert headers["x-frame-options"] == "DENY", what
    assert headers["referrer-policy"] == "same-origin", what
    assert headers["x-content-type-options"] == "nosniff", what


def test_security_headers_on_every_response(sqlite_console: Console) -> None:
    clock = Clock()
    client = sqlite_console.client(token=TOKEN, throttle=Throttle(free=1, clock=clock))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    seen = {
        "page": client.get("/dead", headers=auth),
        "static": client.get("/static/console.js"),
        "login page": client.get("/login"),
        "redirect to login": client.get("/dead", follow_redirects=False),
        "401": client.get("/api/activity"),
        "404": client.get("/no-such-page", headers=auth),
        "foreign host": client.get("/", headers={"Host": "attacker.example"}),
        "foreign origin": client.post("/login", headers={"Origin": "http://attacker.example"}),
        "wrong bearer": client.get("/api/activity", headers={"Authorization": "Bearer no"}),
        "429": client.get("/api/activity", headers=auth),
    }

    def broken() -> None:
        raise RuntimeError("the database went away")

    sqlite_console.outbox.admin.status = broken  # type: ignore[method-assign, assignment]
    crashing = TestClient(
        client.app, base_url=ORIGIN, raise_server_exceptions=False, client=("192.0.2.50", 1)
    )
    seen["500"] = crashing.get("/", headers=auth)
    assert seen["500"].status_code == 500
    assert seen["page"].status_code == 200
    assert seen["404"].status_code == 404
    assert seen["foreign host"].status_code == 400
    assert seen["429"].status_code == 429
    for what, response in seen.items():
        _headers_ok(response, what)


def _wrong(client: TestClient, csrf: str) -> Any:
    return client.post("/login", data={"csrf": csrf, "token": "guess-" + "x" * 20})


def test_fifty_wrong_sign_ins_are_throttled_growing_then_reset(
    sqlite_console: Console, caplog: pytest.LogCaptureFixture
) -> None:
    from outboxer.metrics import PrometheusMetrics  # noqa: PLC0415 - the prometheus extra

    metrics = PrometheusMetrics()
    sqlite_console.outbox.add_observer(metrics)
    clock = Clock()
    throttle = Throttle(clock=clock)  # 5 free, then 10 s, doubling
    app = create_app(sqlite_console.outbox, token=TOKEN, throttle=throttle)
    client = TestClient(
        app, base_url=ORIGIN, headers={"Origin": ORIGIN}, client=("203.0.113.7", 40000)
    )
    csrf = _csrf(client)
    caplog.set_level(logging.WARNING, logger="outboxer.web.security")

    answers = [_wrong(client, csrf) for _ in range(50)]
    codes = [a.status_code for a in answers]
    assert codes == [401] * 5 + [429] * 45
    assert {a.headers["retry-after"] for a in answers[5:]} == {"10"}
    assert "try again in 10 s" in answers[5].text
    # Locked out means the right token too (or guessing would go on).
    right = client.post("/login", data={"csrf": csrf, "token": TOKEN}, follow_redirects=False)
    assert right.status_code == 429
    assert "outboxer_session" not in right.headers.get("set-cookie", "")
    bearer = client.get("/", headers={"Authorization": f"Bearer {TOKEN}"})
    assert bearer.status_code == 429
    # Another address is not locked out.
    other = TestClient(
        app, base_url=ORIGIN, headers={"Origin": ORIGIN}, client=("198.51.100.9", 40000)
    )
    assert _wrong(other, _csrf(other)).status_code == 401

    # Each failure after a lock-out locks again, twice as long.
    clock.now += 9.5
    assert _wrong(client, csrf).headers["retry-after"] == "1"
    waits = []
    for _ in range(4):
        clock.now += int(waits[-1] if waits else 10)
        assert _wrong(client, csrf).status_code == 401
        locked = _wrong(client, csrf)
        assert locked.status_code == 429
        waits.append(int(locked.headers["retry-after"]))
    assert waits == [20, 40, 80, 160]

    # Once the lock-out ends, the right token signs in and forgets the failures.
    clock.now += 160
    _signed_in(sqlite_console, client)
    assert client.get("/dead").status_code == 200
    assert [_wrong(client, csrf).status_code for _ in range(6)] == [401] * 5 + [429]
    # So does an hour without failures.
    clock.now += 3600
    assert _wrong(client, csrf).status_code == 401

    failures = 5 + 4 + 5 + 1  # answered 401 from 203.0.113.7; the 429s count nothing
    lines = [r for r in caplog.records if getattr(r, "client", None) == "203.0.113.7"]
    assert sum("sign-in failed" in r.getMessage() for r in lines) == failures
    lockouts = [r.getMessage() for r in lines if "locked out" in r.getMessage()]
    assert len(lockouts) == 1 + 4 + 1  # once per lock-out, not per refused attempt
    assert "203.0.113.7" in lockouts[0]
    assert "for 10 s after 5 failures" in lockouts[0]
    value = metrics.registry.get_sample_value
    assert value("outboxer_web_sign_ins_failed_total", {"method": "form"}) == failures + 1
    assert value("outboxer_web_sign_in_lockouts_total") == 6


def test_bearer_guessing_is_throttled_and_a_session_keeps_working(
    sqlite_console: Console,
) -> None:
    clock = Clock()
    client = sqlite_console.client(token=TOKEN, throttle=Throttle(clock=clock))
    browser = TestClient(client.app, base_url=ORIGIN, headers={"Origin": ORIGIN})  # same address
    _signed_in(sqlite_console, browser)
    guesses = [
        client.get("/api/activity", headers={"Authorization": f"Bearer guess-{i}"})
        for i in range(20)
    ]
    assert [g.status_code for g in guesses] == [401] * 5 + [429] * 15
    assert guesses[-1].headers["retry-after"] == "10"
    # A browser signed in before keeps its session: only sign-ins are throttled.
    assert browser.get("/dead").status_code == 200


def test_forwarded_headers_only_from_trusted_proxies(sqlite_console: Console) -> None:
    """Without a trusted proxy, X-Forwarded-For does not pick the address the throttle
    counts; from one, it does (IPv6 per /64), and X-Forwarded-Proto makes cookies Secure."""
    clock = Clock()
    direct = sqlite_console.client(token=TOKEN, throttle=Throttle(clock=clock))
    first = direct.get("/login")
    assert "secure" not in first.headers["set-cookie"].lower()
    csrf = _csrf(direct)
    codes = [
        direct.post(
            "/login",
            data={"csrf": csrf, "token": "nope"},
            headers={"X-Forwarded-For": f"198.51.100.{i}", "X-Forwarded-Proto": "https"},
        ).status_code
        for i in range(10)
    ]
    assert codes == [401] * 5 + [429] * 5

    app = create_app(
        sqlite_console.outbox,
        token=TOKEN,
        allowed_hosts=["console.example.com"],
        trusted_proxies=["127.0.0.1", "10.0.0.0/8"],
        throttle=Throttle(clock=clock),
    )
    # A TLS proxy on this host: it says https, and who the client is.
    proxied = TestClient(
        app,
        base_url="http://console.example.com",
        headers={"Origin": "https://console.example.com", "X-Forwarded-Proto": "https"},
        client=("127.0.0.1", 40000),
    )
    first = proxied.get("/login")
    assert first.status_code == 200
    assert "Secure" in first.headers["set-cookie"]
    csrf = first.cookies["outboxer_csrf"]

    def sign_in(forwarded_for: str, token: str = "nope") -> Any:
        return proxied.post(
            "/login",
            data={"csrf": csrf, "token": token},
            # A Secure cookie is not sent over the test's plain HTTP: as the proxy would.
            headers={"X-Forwarded-For": forwarded_for, "Cookie": f"outboxer_csrf={csrf}"},
            follow_redirects=False,
        )

    # The client is the rightmost address that is not a trusted proxy.
    assert [sign_in("192.0.2.1, 10.1.1.1").status_code for _ in range(6)] == [401] * 5 + [429]
    assert sign_in("192.0.2.2").status_code == 401
    assert sign_in("192.0.2.2, 192.0.2.1").status_code == 429
    # IPv6 addresses count per /64.
    assert [sign_in(f"2001:db8:1:2::{i + 1}").status_code for i in range(5)] == [401] * 5
    assert sign_in("2001:db8:1:2:ffff::1").status_code == 429
    assert sign_in("2001:db8:1:3::1").status_code == 401
    signed_in = sign_in("192.0.2.3", TOKEN)
    assert signed_in.status_code == 303
    session = [c for c in signed_in.headers.get_list("set-cookie") if "outboxer_session=" in c]
    assert len(session) == 1
    assert "Secure" in session[0]
    assert "HttpOnly" in session[0]
    # Behind that proxy the page's origin is https://...: plain http is another origin.
    csrf_post = proxied.post(
        "/login",
        data={"csrf": csrf, "token": TOKEN},
        headers={"Origin": "http://console.example.com", "Cookie": f"outboxer_csrf={csrf}"},
    )
    assert csrf_post.status_code == 403


def test_secure_cookies_over_https(sqlite_console: Console) -> None:
    client = sqlite_console.client("https://127.0.0.1:8443", token=TOKEN)
    first = client.get("/login")
    assert "Secure" in first.headers["set-cookie"]
    csrf = first.cookies["outboxer_csrf"]
    done = client.post("/login", data={"csrf": csrf, "token": TOKEN}, follow_redirects=False)
    assert done.status_code == 303
    assert "Secure" in done.headers["set-cookie"]
    assert client.get("/dead").status_code == 200
    plain = sqlite_console.client(token=TOKEN)
    plain.get("/login")
    done = plain.post(
        "/login",
        data={"csrf": plain.cookies["outboxer_csrf"], "token": TOKEN},
        follow_redirects=False,
    )
    assert done.status_code == 303
    assert "secure" not in done.headers["set-cookie"].lower()


# --------------------------------------------------------------------- the command

CONSOLE_APP = """\
from outboxer import Outbox

outbox = Outbox({url!r})
outbox.register_event("order.created", "{svc}")
"""


def _refused(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in child_env().items() if not k.startswith("OUTBOXER_WEB_")}
    return subprocess.run(
        [*cli_command(), "--app", "nowhere:outbox", "web", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--host", "0.0.0.0", "--token", "abc"], {}),
        (["--host", "10.1.2.3"], {"OUTBOXER_WEB_TOKEN": "fifteen-chars-x"}),
        (["--token", "abc", "--trusted-proxy", "127.0.0.1"], {}),
        (["--token", "abc", "--allowed-host", "console.example.com"], {}),
        (["--token", "abc"], {"OUTBOXER_WEB_ALLOWED_HOSTS": "localhost,console.example.com"}),
    ],
    ids=["bind-any", "env-token", "behind-a-proxy", "allowed-host", "allowed-host-env"],
)
def test_cli_refuses_a_weak_token_off_loopback(args: list[str], env: dict[str, str]) -> None:
    result = _refused(*args, **env)
    assert result.returncode == 2, result.stderr
    message = " ".join(result.stderr.split())
    assert "off loopback" in message
    assert "at least 16 random characters" in message
    assert "--token generate" in message


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--allowed-host", "*"], "not a host name or address"),
        (["--allowed-host", "console.example.com:443"], "without a port"),
        (["--trusted-proxy", "proxy.example"], "not an address or network of a proxy"),
        (["--token", " padded-token-of-16+"], "white space"),
    ],
)
def test_cli_refuses_bad_names_and_tokens(args: list[str], expected: str) -> None:
    result = _refused(*args)
    assert result.returncode == 2, result.stderr
    assert expected in " ".join(result.stderr.split())


def _console_app(tmp_path: Path) -> str:
    """A SQLite app module ``consoleapp`` in ``tmp_path``, migrated; its service."""
    svc = unique_service()
    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    (tmp_path / "consoleapp.py").write_text(CONSOLE_APP.format(url=url, svc=svc))
    setup = make_outbox(url)
    setup.register_event("order.created", svc)
    setup.migrate()
    setup.close()
    return svc


def _start_console(tmp_path: Path, port: int, *args: str, **env: str) -> subprocess.Popen[str]:
    log = (tmp_path / "web.log").open("w")
    proc = subprocess.Popen(
        [*cli_command(), "--app", "consoleapp:outbox", "web", "--port", str(port), *args],
        cwd=tmp_path,
        env={**child_env(), **env},
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    log.close()
    return proc


def _wait_started(proc: subprocess.Popen[str], http: Any, tmp_path: Path) -> None:
    import httpx2  # noqa: PLC0415 - a dev dependency

    deadline = time.monotonic() + 60
    while True:
        try:
            if http.get("/static/console.css").status_code == 200:
                return
        except httpx2.TransportError:
            pass
        assert proc.poll() is None, (tmp_path / "web.log").read_text()
        assert time.monotonic() < deadline, "the console did not start"
        time.sleep(0.2)


def _stop(proc: subprocess.Popen[str]) -> str:
    """Stop the console by its pid; what it printed on stdout since."""
    proc.send_signal(signal.SIGTERM)
    try:
        rest, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, _ = proc.communicate()
    return rest


def test_cli_generated_token_allowed_hosts_and_throttle_in_a_real_process(
    tmp_path: Path,
) -> None:
    """``outboxer web --token generate`` as a process, asked over plain HTTP."""
    import httpx2  # noqa: PLC0415 - a dev dependency

    svc = _console_app(tmp_path)
    port = free_port()
    proc = _start_console(
        tmp_path,
        port,
        OUTBOXER_WEB_TOKEN="generate",
        OUTBOXER_WEB_ALLOWED_HOSTS="console.example.com other.example",
    )
    rest = ""
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("console token (shown only now): "), first
        token = first.split(": ", 1)[1].strip()
        assert len(token) >= 40
        base = f"http://127.0.0.1:{port}"
        with httpx2.Client(base_url=base, timeout=10) as http:
            _wait_started(proc, http, tmp_path)
            auth = {"Authorization": f"Bearer {token}"}
            assert http.get("/").status_code == 303
            assert http.get("/", headers=auth).status_code == 200
            for host in ("console.example.com", f"other.example:{port}"):
                assert http.get("/", headers={**auth, "Host": host}).status_code == 200
            foreign = http.get("/", headers={**auth, "Host": f"attacker.example:{port}"})
            assert foreign.status_code == 400
            assert svc not in foreign.text
            guesses = [
                http.get("/api/activity", headers={"Authorization": f"Bearer guess{i}"})
                for i in range(6)
            ]
            assert [g.status_code for g in guesses] == [401] * 5 + [429]
            assert guesses[-1].headers["retry-after"] == "10"
            # X-Forwarded-For from a peer that is no trusted proxy changes nothing.
            spoofed = http.get("/api/activity", headers={**auth, "X-Forwarded-For": "198.51.100.1"})
            assert spoofed.status_code == 429
    finally:
        rest = _stop(proc)
    logged = (tmp_path / "web.log").read_text()
    assert token not in rest
    assert token not in logged  # shown once, on stdout, never in the log
    assert "console sign-in failed from 127.0.0.1" in logged
    assert logged.count("locked out for 10 s") == 1
    assert "refused a request for host 'attacker.example:" in logged


def test_cli_serves_https_with_secure_cookies(tmp_path: Path) -> None:
    """``--tls-cert``/``--tls-key``: HTTPS directly; the cookies are Secure and a
    change's Origin must be the https:// one."""
    import ssl  # noqa: PLC0415

    import httpx2  # noqa: PLC0415 - a dev dependency

    openssl = shutil.which("openssl")
    if openssl is None:
        unavailable("openssl (to make a test certificate) is not installed")
    assert openssl is not None
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    bad = _refused("--tls-cert", str(cert))
    assert bad.returncode == 2
    assert "go together" in bad.stderr
    bad = _refused("--tls-cert", str(cert), "--tls-key", str(cert))
    assert bad.returncode == 2
    assert "cannot serve HTTPS" in " ".join(bad.stderr.split())

    _console_app(tmp_path)
    port = free_port()
    proc = _start_console(
        tmp_path, port, "--tls-cert", str(cert), "--tls-key", str(key), OUTBOXER_WEB_TOKEN=TOKEN
    )
    base = f"https://127.0.0.1:{port}"
    trust = ssl.create_default_context(cafile=str(cert))
    try:
        with httpx2.Client(base_url=base, timeout=10, verify=trust) as http:
            _wait_started(proc, http, tmp_path)
            http.cookies.clear()  # as a browser arriving on the sign-in page
            first = http.get("/login")
            assert first.status_code == 200
            assert "Secure" in first.headers["set-cookie"]
            csrf = http.cookies["outboxer_csrf"]
            form = {"csrf": csrf, "token": TOKEN}
            plain = http.post("/login", data=form, headers={"Origin": f"http://127.0.0.1:{port}"})
            assert plain.status_code == 403
            done = http.post("/login", data=form, headers={"Origin": base})
            assert done.status_code == 303
            session = [c for c in done.headers.get_list("set-cookie") if "outboxer_session" in c]
            assert len(session) == 1
            assert "Secure" in session[0]
            assert http.get("/dead").status_code == 200
    finally:
        _stop(proc)
    assert f"on https://127.0.0.1:{port}/" in (tmp_path / "web.log").read_text()


WITHOUT_PROMETHEUS = """\
import sys

sys.modules["prometheus_client"] = None  # as if the prometheus extra were not installed
from starlette.testclient import TestClient

from outboxer import Outbox
from outboxer.web import create_app

outbox = Outbox({url!r})
outbox.register_event("order.created", "orders")
outbox.migrate()
client = TestClient(create_app(outbox, token="t" * 16), base_url="http://127.0.0.1")
client.get("/login")
form = {{"csrf": client.cookies["outboxer_csrf"], "token": "wrong"}}
origin = {{"Origin": "http://127.0.0.1"}}
codes = [client.post("/login", data=form, headers=origin).status_code for _ in range(6)]
print(codes, "prometheus_client" in sys.modules and sys.modules["prometheus_client"] is not None)
"""


def test_the_console_and_its_throttle_work_without_prometheus_client(tmp_path: Path) -> None:
    script = tmp_path / "no_prometheus.py"
    script.write_text(WITHOUT_PROMETHEUS.format(url=f"sqlite:///{tmp_path / 'outbox.db'}"))
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[401, 401, 401, 401, 401, 429] False"
