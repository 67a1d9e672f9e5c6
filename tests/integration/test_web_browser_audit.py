"""The edit of a dead letter and the audit page in a headless Chromium against
``outboxer web`` and ``outboxer run`` as real processes (see test_web_browser.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from outboxer import Status
from tests.integration.test_web_browser import (  # noqa: F401 - the fixtures
    WAIT,
    Processes,
    ShopApp,
    browser_db,
    driver,
    processes,
    shop,
    shot,
    wait_until,
)

pytestmark = pytest.mark.browser


def test_fix_a_dead_letters_payload_and_find_it_in_the_audit(
    driver: Any,  # noqa: F811 - the fixtures imported above
    shop: ShopApp,  # noqa: F811
    processes: Processes,  # noqa: F811
    tmp_path: Path,
) -> None:
    from selenium.webdriver.common.by import By  # noqa: PLC0415

    # The handler refuses payloads marked "fail" while the failure is on: this one
    # can only be handled once its payload is fixed.
    (tmp_path / "failing").write_text("card declined: bad amount")
    dead_id = shop.publish({"n": 7, "fail": True}, key="order-7", max_retry=1)
    processes.start("--app", "shopapp:outbox", "--config", "outboxer.toml", "run", log="run.log")
    deadline = time.monotonic() + WAIT
    while shop.row(dead_id).status is not Status.DEAD:
        assert time.monotonic() < deadline, (tmp_path / "run.log").read_text()
        time.sleep(0.2)

    base = processes.web("shopapp:outbox")
    driver.get(f"{base}/messages/{shop.svc}/{dead_id}")
    driver.find_element(By.CSS_SELECTOR, "#edit summary").click()
    area = wait_until(driver, "edit form", lambda d: d.find_element(By.ID, "edit-payload"))
    assert json.loads(area.get_attribute("value")) == {"n": 7, "fail": True}
    area.clear()
    area.send_keys('{"n": 7, "fail": false}')
    driver.find_element(By.ID, "edit-submit").click()
    wait_until(driver, "edited notice", lambda d: d.find_elements(By.ID, "edit-result"))
    shot(driver, tmp_path, "edited")

    def consumed(d: Any) -> bool:
        d.refresh()
        return bool(d.find_element(By.ID, "status").text == "consumed")

    wait_until(driver, "the edited message consumed", consumed)
    trail = driver.find_element(By.ID, "trail").text
    assert "console:127.0.0.1" in trail
    assert "edit" in trail

    driver.find_element(By.LINK_TEXT, "Audit").click()
    rows = wait_until(
        driver, "audit rows", lambda d: d.find_elements(By.CSS_SELECTOR, "#audit tbody tr")
    )
    assert len(rows) == 1
    assert "edit" in rows[0].text
    assert str(dead_id) in rows[0].text
    shot(driver, tmp_path, "audit")
    rows[0].find_element(By.LINK_TEXT, str(dead_id)).click()
    status = wait_until(driver, "message page", lambda d: d.find_element(By.ID, "status"))
    assert status.text == "consumed"
    assert shop.row(dead_id).envelope().payload == {"n": 7, "fail": False}


LEDGER_APP = """\
from outboxer import Outbox

outbox = Outbox({url!r}, topic_prefix="t", retry_unit=60)
outbox.register_service("{svc}", ordered=True)
outbox.register_event("{svc}.entry", "{svc}")
"""


def test_park_and_release_a_key_then_trace_its_event(
    driver: Any,  # noqa: F811
    processes: Processes,  # noqa: F811
    tmp_path: Path,
) -> None:
    from selenium.webdriver.common.by import By  # noqa: PLC0415
    from sqlalchemy.orm import Session  # noqa: PLC0415

    from outboxer import Outbox  # noqa: PLC0415
    from tests.helpers import isolated_settings, unique_service  # noqa: PLC0415

    svc = unique_service()
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    (tmp_path / "ledgerapp.py").write_text(LEDGER_APP.format(url=url, svc=svc))
    ob = Outbox(url, settings=isolated_settings(topic_prefix="t", retry_unit=60))
    ob.register_service(svc, ordered=True)
    ob.register_event(f"{svc}.entry", svc)
    ob.migrate()
    try:
        with Session(ob.db.sync_engine) as session, session.begin():
            head = ob.publish(session, f"{svc}.entry", {"n": 1}, key="acct-7", event_id="e-7")
            ob.publish(session, f"{svc}.entry", {"n": 2}, key="acct-7")
        ob.store(svc).mark_failed_for_retry(head, "RuntimeError: ledger closed")
        base = processes.web("ledgerapp:outbox")
        driver.get(base + "/")
        driver.find_element(By.LINK_TEXT, "Blocked keys").click()
        rows = wait_until(
            driver, "blocked keys", lambda d: d.find_elements(By.CSS_SELECTOR, "#keys tbody tr")
        )
        assert len(rows) == 1
        assert "failing" in rows[0].text
        assert "ledger closed" in rows[0].text
        rows[0].find_element(By.CSS_SELECTOR, "button.park").click()
        wait_until(driver, "parked", lambda d: "Done: park" in d.page_source)
        row = driver.find_element(By.CSS_SELECTOR, "#keys tbody tr")
        assert "parked" in row.text
        shot(driver, tmp_path, "parked")
        row.find_element(By.CSS_SELECTOR, "button.release").click()
        wait_until(driver, "released", lambda d: "Done: release" in d.page_source)
        assert "failing" in driver.find_element(By.CSS_SELECTOR, "#keys tbody tr").text

        driver.find_element(By.LINK_TEXT, "Trace").click()
        box = wait_until(driver, "trace box", lambda d: d.find_element(By.ID, "trace-id"))
        box.send_keys("e-7")
        box.submit()
        steps = wait_until(
            driver, "trace steps", lambda d: d.find_elements(By.CSS_SELECTOR, "#trace td.step")
        )
        assert [s.text for s in steps] == ["created", "park", "release", "attempts", "waiting"]
        shot(driver, tmp_path, "trace")
        assert [e.action for e in ob.admin.audit().entries] == ["release", "park"]
    finally:
        ob.close()
