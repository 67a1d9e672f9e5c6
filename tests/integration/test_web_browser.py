"""The web console as a person uses it: a headless Chromium (Debian's ``chromium``
and ``chromium-driver``, driven by Selenium) against ``outboxer web`` running as a
real process on a real database, with ``outboxer run`` working beside it.

Skipped with the reason when Chromium is missing locally (``make test`` installs it
with scripts/ensure-browser.sh); under ``CI=true`` a missing browser fails. The
screenshots are saved in each test's temporary folder; the overview taken on the
demo's data is copied to docs/web-overview.png when OUTBOXER_WRITE_SCREENSHOT=1.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from rich.console import Console as RichConsole
from sqlalchemy.orm import Session

from outboxer import Outbox, Status
from outboxer.demo import KINDS, run_demo
from outboxer.testing import free_port
from tests.helpers import drop_tables, isolated_settings, unavailable, unique_service
from tests.integration.test_cli import child_env, cli_command

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("OUTBOXER_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("OUTBOXER_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "web-overview.png"
XSS = "<script>alert(1)</script>"
IMG = '<img src=x onerror="window.__xss=1">'
WAIT = 60.0
REBOUND = "rebound.attacker.test"

APP = """\
from pathlib import Path

from outboxer import Outbox

outbox = Outbox({url!r}, topic_prefix="t", retry_unit=0.02)
outbox.register_event("order.created", "{svc}")
FAILING = Path(__file__).with_name("failing")


@outbox.handler("order.created")
def handle(event, tx):
    if event.payload.get("fail") and FAILING.exists():
        raise RuntimeError(FAILING.read_text())
"""

DEMO_APP = """\
from outboxer import Outbox
from outboxer.demo import KINDS

outbox = Outbox({url!r})
for kind in KINDS:
    outbox.register_event(kind.event_type, kind.service)
"""

CONFIG = "poll_interval = 0.1\nerror_delay = 0.2\n"


# --------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        unavailable(
            f"Chromium for the browser tests is not installed ({', '.join(missing)} missing): "
            "run scripts/ensure-browser.sh (make test does) or apt-get install chromium "
            "chromium-driver"
        )
    from selenium import webdriver  # noqa: PLC0415 - only when the browser is there
    from selenium.webdriver.chrome.service import Service  # noqa: PLC0415

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in CI containers
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,900",
        "--lang=en-US",
        # What DNS rebinding achieves: another site's name resolving to the console.
        f"--host-resolver-rules=MAP {REBOUND} 127.0.0.1",
    ):
        options.add_argument(arg)
    browser = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    browser.set_page_load_timeout(WAIT)
    try:
        yield browser
    finally:
        browser.quit()


def wait_until(browser: Any, what: str, condition: Callable[[Any], Any]) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException  # noqa: PLC0415
    from selenium.webdriver.support.ui import WebDriverWait  # noqa: PLC0415

    # htmx may swap an element out between finding it and reading it: read again at
    # the next poll rather than fail.
    return WebDriverWait(
        browser, WAIT, poll_frequency=0.25, ignored_exceptions=(StaleElementReferenceException,)
    ).until(condition, message=what)


def chart_drawn(browser: Any) -> bool:
    from selenium.webdriver.common.by import By  # noqa: PLC0415

    return browser.find_element(By.ID, "activity").get_attribute("data-ready") == "1"


def no_alert(browser: Any) -> bool:
    from selenium.common.exceptions import NoAlertPresentException  # noqa: PLC0415

    try:
        browser.switch_to.alert  # noqa: B018 - raises when there is none
    except NoAlertPresentException:
        return True
    return False


# --------------------------------------------------------------------- processes


@dataclass
class Processes:
    dir: Path
    started: list[subprocess.Popen[str]] = field(default_factory=list)

    def start(self, *args: str, log: str, **env: str) -> subprocess.Popen[str]:
        out = (self.dir / log).open("w")
        proc = subprocess.Popen(
            [*cli_command(), *args],
            cwd=self.dir,
            env={**child_env(), **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
        out.close()
        self.started.append(proc)
        return proc

    def web(self, app: str, *args: str, **env: str) -> str:
        port = free_port()
        proc = self.start("--app", app, "web", "--port", str(port), *args, log="web.log", **env)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + WAIT
        while True:
            try:
                with urllib.request.urlopen(base + "/static/console.css", timeout=5):
                    return base
            except OSError:
                if proc.poll() is not None:
                    raise AssertionError((self.dir / "web.log").read_text()) from None
                assert time.monotonic() < deadline, "the console did not start"
                time.sleep(0.2)

    def stop_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.started:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture(params=("sqlite", "postgresql"))
def browser_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'outbox.db'}"
    db = request.getfixturevalue("pg_database")
    return str(db.url)


@dataclass
class ShopApp:
    dir: Path
    svc: str
    outbox: Outbox

    def publish(self, payload: dict[str, Any], **kw: Any) -> int:
        with Session(self.outbox.db.sync_engine) as session, session.begin():
            return self.outbox.publish(session, "order.created", payload, **kw)

    def row(self, outbox_id: int) -> Any:
        return self.outbox.store(self.svc).get_by_id(outbox_id)


def _shop(tmp_path: Path, url: str) -> ShopApp:
    svc = unique_service()
    (tmp_path / "shopapp.py").write_text(APP.format(url=url, svc=svc))
    (tmp_path / "outboxer.toml").write_text(CONFIG)
    ob = Outbox(url, settings=isolated_settings(topic_prefix="t"))
    ob.register_event("order.created", svc)
    ob.migrate()
    return ShopApp(tmp_path, svc, ob)


@pytest.fixture
def shop(browser_db: str, tmp_path: Path) -> Iterator[ShopApp]:
    app = _shop(tmp_path, browser_db)
    yield app
    drop_tables(app.outbox)
    app.outbox.close()


@pytest.fixture
def sqlite_shop(tmp_path: Path) -> Iterator[ShopApp]:
    """Escaping and access rules do not depend on the database: SQLite only (the
    HTTP tests check every page on all three)."""
    app = _shop(tmp_path, f"sqlite:///{tmp_path / 'outbox.db'}")
    yield app
    app.outbox.close()


def shot(browser: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    assert browser.save_screenshot(str(path))
    return path


# --------------------------------------------------------------------- scenarios


def test_find_a_dead_letter_by_key_requeue_it_and_watch_it_consumed(
    driver: Any, shop: ShopApp, processes: Processes, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By  # noqa: PLC0415

    (tmp_path / "failing").write_text("payment service down\n  at charge(card)")
    ok_ids = [shop.publish({"n": i}, key=f"order-{i}") for i in range(5)]
    dead_id = shop.publish({"n": 99, "fail": True}, key="order-lost-99", max_retry=1)
    processes.start("--app", "shopapp:outbox", "--config", "outboxer.toml", "run", log="run.log")
    deadline = time.monotonic() + WAIT
    while shop.row(dead_id).status is not Status.DEAD:
        assert time.monotonic() < deadline, (tmp_path / "run.log").read_text()
        time.sleep(0.2)
    assert all(shop.row(i).status is Status.CONSUMED for i in ok_ids)
    (tmp_path / "failing").unlink()  # the payment service is back

    base = processes.web("shopapp:outbox")
    driver.get(base + "/")
    table = driver.find_element(By.ID, "services")
    assert shop.svc in table.text
    wait_until(
        driver,
        "chart drawn",
        lambda d: d.find_element(By.ID, "activity").get_attribute("data-ready"),
    )
    shot(driver, tmp_path, "overview")

    # Find it by its key.
    driver.find_element(By.LINK_TEXT, "Messages").click()
    box = wait_until(driver, "search box", lambda d: d.find_element(By.NAME, "q"))
    box.send_keys("order-lost-99")
    box.submit()
    rows = wait_until(
        driver, "search results", lambda d: d.find_elements(By.CSS_SELECTOR, "#messages tbody tr")
    )
    assert len(rows) == 1
    assert "dead" in rows[0].text
    rows[0].find_element(By.LINK_TEXT, str(dead_id)).click()
    status = wait_until(driver, "message page", lambda d: d.find_element(By.ID, "status"))
    assert status.text == "dead"
    assert (
        "payment service down\n  at charge(card)" in driver.find_element(By.ID, "last-error").text
    )
    shot(driver, tmp_path, "dead-letter")

    # Requeue it; `outboxer run` consumes it now.
    driver.find_element(By.ID, "requeue").click()
    wait_until(driver, "requeued notice", lambda d: "Requeued 1" in d.page_source)

    def consumed(d: Any) -> bool:
        d.refresh()
        return bool(d.find_element(By.ID, "status").text == "consumed")

    wait_until(driver, "the requeued message consumed", consumed)
    assert "requeued 1 time(s)" in driver.page_source
    shot(driver, tmp_path, "consumed")
    row = shop.row(dead_id)
    assert row.status is Status.CONSUMED
    assert row.requeue_count == 1


def test_payloads_keys_and_errors_render_as_text(
    driver: Any, sqlite_shop: ShopApp, processes: Processes, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By  # noqa: PLC0415

    shop = sqlite_shop
    bad = shop.publish({"note": XSS, "html": IMG}, key=XSS)
    shop.outbox.store(shop.svc).mark_dead(bad, f"RuntimeError: {XSS}\n{IMG}")
    base = processes.web("shopapp:outbox")
    pages = [
        f"/messages/{shop.svc}/{bad}",
        "/messages?" + urlencode({"q": XSS}),
        "/dead",
    ]
    for path in pages:
        driver.get(base + path)
        wait_until(driver, "page loaded", lambda d: d.find_element(By.TAG_NAME, "main"))
        assert no_alert(driver), path
        assert driver.execute_script("return window.__xss === undefined"), path
        assert driver.find_elements(By.CSS_SELECTOR, "main script, main img") == [], path
        assert XSS in driver.find_element(By.TAG_NAME, "main").text, path
    driver.get(base + pages[0])
    assert driver.find_element(By.ID, "key").text == XSS
    envelope = driver.find_element(By.ID, "envelope").text
    assert XSS in envelope
    assert IMG.replace('"', '\\"') in envelope  # JSON-escaped quotes, as stored
    assert driver.find_element(By.ID, "last-error").text == f"RuntimeError: {XSS}\n{IMG}"
    shot(driver, tmp_path, "escaped")


def test_overview_refreshes_itself(
    driver: Any, sqlite_shop: ShopApp, processes: Processes, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By  # noqa: PLC0415

    shop = sqlite_shop
    base = processes.web("shopapp:outbox")
    driver.get(base + "/")
    driver.execute_script("document.body.dataset.loaded = 'once'")

    def pending(d: Any) -> str:
        row = d.find_element(By.XPATH, f"//table[@id='services']//tr[td/a[text()='{shop.svc}']]")
        return str(row.find_elements(By.TAG_NAME, "td")[2].text)

    assert pending(driver) == "0"
    for i in range(3):
        shop.publish({"n": i}, key=f"new-{i}")
    # No reload: htmx swaps the table in (the cache keeps counts up to 5 s).
    wait_until(driver, "pending count refreshed", lambda d: pending(d) == "3")
    assert driver.execute_script("return document.body.dataset.loaded") == "once"


def test_token_login_and_read_only(
    driver: Any, sqlite_shop: ShopApp, processes: Processes, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By  # noqa: PLC0415

    shop = sqlite_shop
    dead = shop.publish({"n": 1}, key="stuck-1")
    shop.outbox.store(shop.svc).mark_dead(dead, "ValueError: stuck")
    base = processes.web("shopapp:outbox", "--read-only", OUTBOXER_WEB_TOKEN="open-sesame")
    driver.delete_all_cookies()
    driver.get(base + "/dead")
    wait_until(driver, "login page", lambda d: "/login" in d.current_url)
    driver.find_element(By.NAME, "token").send_keys("open-sesame")
    driver.find_element(By.NAME, "token").submit()
    wait_until(driver, "dead letters after login", lambda d: d.current_url.endswith("/dead"))
    assert driver.find_element(By.ID, "read-only").text == "read-only"
    assert "stuck-1" in driver.find_element(By.ID, "dead").text
    assert driver.find_elements(By.TAG_NAME, "button") == [
        b for b in driver.find_elements(By.TAG_NAME, "button") if b.text == "Filter"
    ]
    assert driver.find_elements(By.CSS_SELECTOR, "form[method=post]") == []
    driver.get(f"{base}/messages/{shop.svc}/{dead}")
    assert driver.find_elements(By.ID, "requeue") == []
    shot(driver, tmp_path, "read-only")

    # The server refuses the change itself, not only the page: a signed-in POST with
    # a valid CSRF token is 403.
    jar = CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    auth = {"Authorization": "Bearer open-sesame", "Origin": base}
    opener.open(urllib.request.Request(base + "/dead", headers=auth), timeout=10).close()
    csrf = next(c.value for c in jar if c.name == "outboxer_csrf")
    form = urlencode({"csrf": csrf, "one": f"{shop.svc}:{dead}"}).encode()
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener.open(
            urllib.request.Request(base + "/dead/requeue", data=form, headers=auth), timeout=10
        )
    assert refused.value.code == 403
    assert "read-only" in refused.value.read().decode()
    refused.value.close()
    assert shop.row(dead).status is Status.DEAD


def test_a_rebound_name_gets_nothing_and_a_named_one_works(
    driver: Any, sqlite_shop: ShopApp, processes: Processes, tmp_path: Path
) -> None:
    """Chromium resolves another site's name to the console (as after DNS rebinding):
    the console without a token refuses it; given that name with --allowed-host, it
    serves it, and a requeue from its page passes the Origin and CSRF checks."""
    from selenium.webdriver.common.by import By  # noqa: PLC0415

    shop = sqlite_shop
    dead = shop.publish({"n": 1}, key="rebound-key-1")
    shop.outbox.store(shop.svc).mark_dead(dead, "ValueError: stuck")
    base = processes.web("shopapp:outbox")
    port = base.rsplit(":", 1)[1]
    driver.delete_all_cookies()
    driver.get(f"http://{REBOUND}:{port}/dead")
    body = driver.find_element(By.TAG_NAME, "body").text
    assert "does not answer to that host name" in body
    assert "rebound-key-1" not in body
    driver.get(f"http://{REBOUND}:{port}/messages/{shop.svc}/{dead}")
    assert "rebound-key-1" not in driver.find_element(By.TAG_NAME, "body").text
    assert driver.get_cookies() == []  # not even a CSRF cookie for that name
    shot(driver, tmp_path, "rebound-refused")
    processes.stop_all()

    named = processes.web("shopapp:outbox", "--allowed-host", REBOUND)
    port = named.rsplit(":", 1)[1]
    driver.get(f"http://{REBOUND}:{port}/messages/{shop.svc}/{dead}")
    wait_until(driver, "message page", lambda d: "rebound-key-1" in d.page_source)
    driver.find_element(By.ID, "requeue").click()
    wait_until(driver, "requeued", lambda d: "requeued=1" in d.current_url)
    assert shop.row(dead).status is Status.PENDING


def test_overview_of_the_demo(driver: Any, processes: Processes, tmp_path: Path) -> None:
    """The demo's data in the console: the screenshot in the README."""
    from selenium.webdriver.common.by import By  # noqa: PLC0415

    db = tmp_path / "demo.db"
    summary = run_demo(600, "local", db, RichConsole(file=io.StringIO(), width=100))
    assert summary.ok, summary.problems()
    (tmp_path / "demoapp.py").write_text(DEMO_APP.format(url=f"sqlite:///{db}"))
    base = processes.web("demoapp:outbox")
    driver.set_window_size(1280, 900)
    driver.get(base + "/")
    table = driver.find_element(By.ID, "services")
    for kind in KINDS:
        assert kind.service in table.text
    wait_until(
        driver,
        "chart drawn",
        lambda d: d.find_element(By.ID, "activity").get_attribute("data-ready"),
    )
    assert driver.find_element(By.ID, "activity").get_attribute("data-points") == "60"
    path = shot(driver, tmp_path, "web-overview")
    if os.environ.get("OUTBOXER_WRITE_SCREENSHOT") == "1":
        shutil.copyfile(path, DOCS_SCREENSHOT)
