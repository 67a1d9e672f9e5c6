"""The Django example project driven through ``manage.py``, as its users would:
``sqlmigrate`` shows the outbox DDL, ``migrate`` creates the tables through
``MigrateOutbox()``, ``outboxer migrate`` finds nothing left to do, orders are placed
through the view, and ``outboxer run`` (SIGKILLed mid-run, then started again)
applies each order's invoice exactly once. On SQLite, PostgreSQL and MariaDB, each
on a database of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from outboxer.testing import scratch_database
from tests.helpers import MYSQL_ADMIN_URL, PG_ADMIN_URL, unavailable

pytest.importorskip("django")

pytestmark = pytest.mark.django

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "django_shop"
ORDERS = 100


@pytest.fixture(params=("sqlite", "postgresql", "mariadb"))
def shop_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shop.db'}"
        return
    admin = PG_ADMIN_URL if request.param == "postgresql" else MYSQL_ADMIN_URL
    with ExitStack() as stack:
        try:
            url = stack.enter_context(scratch_database(admin, prefix="outboxer_dj"))
        except Exception as exc:
            unavailable(f"{request.param}: {exc}")
        yield url


def shop_env(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOXER_", "SHOP_"))}
    env.update(
        {
            "SHOP_DATABASE_URL": url,
            "DJANGO_SETTINGS_MODULE": "shop_project.settings",
            "OUTBOXER_LEASE": "2",
            "OUTBOXER_BATCH_SIZE": "10",
            "OUTBOXER_REDELIVER_AFTER": "2",
            "OUTBOXER_POLL_INTERVAL": "0.1",
            "OUTBOXER_RETRY_UNIT": "0.05",
            "OUTBOXER_SHUTDOWN_TIMEOUT": "10",
            "PYTHONWARNINGS": "ignore",
            **extra,
        }
    )
    return env


def manage(url: str, *args: str, **extra: str) -> str:
    done = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=EXAMPLE,
        env=shop_env(url, **extra),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"manage.py {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


PLACE_ORDERS = """
from django.test import Client
client = Client()
for n in range({count}):
    response = client.post("/orders", data={{"total": n}}, content_type="application/json")
    assert response.status_code == 201, response.content
"""


def count(url: str, sql: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(sql)).scalar_one())
    finally:
        engine.dispose()


def start_worker(url: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "manage.py", "outboxer", "run"],
            cwd=EXAMPLE,
            env=shop_env(url, SHOP_HANDLER_SECONDS="0.02"),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def wait_for(what: str, check: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_shop_applies_each_invoice_once_across_a_killed_worker(
    shop_url: str, tmp_path: Path
) -> None:
    ddl = manage(shop_url, "sqlmigrate", "shop", "0001")
    assert "billing_outbox_messages" in ddl
    assert "outboxer_schema" in ddl
    manage(shop_url, "migrate", "--verbosity", "0")
    assert count(shop_url, "SELECT COUNT(*) FROM billing_outbox_messages") == 0
    assert "up to date" in manage(shop_url, "outboxer", "migrate").lower()

    manage(shop_url, "shell", "-c", PLACE_ORDERS.format(count=ORDERS))
    log = tmp_path / "worker.log"
    worker = start_worker(shop_url, log)
    try:
        invoices = "SELECT COUNT(*) FROM shop_invoice"
        wait_for("the first invoices", lambda: count(shop_url, invoices) >= 20)
        stop(worker, signal.SIGKILL)
        applied_at_kill = count(shop_url, invoices)
        assert applied_at_kill < ORDERS, "the worker finished before it was killed"
        worker = start_worker(shop_url, log)
        consumed = "SELECT COUNT(*) FROM billing_outbox_messages WHERE status = 'consumed'"
        wait_for("every event consumed", lambda: count(shop_url, consumed) == ORDERS, 90)
    finally:
        stop(worker)
    assert worker.returncode == 0, log.read_text()[-3000:]
    # The audit: one invoice per order, none for anything else.
    assert count(shop_url, "SELECT COUNT(*) FROM shop_order") == ORDERS
    assert count(shop_url, "SELECT COUNT(*) FROM shop_invoice") == ORDERS
    assert (
        count(
            shop_url,
            "SELECT COUNT(*) FROM (SELECT order_id FROM shop_invoice GROUP BY order_id"
            " HAVING COUNT(*) <> 1) twice",
        )
        == 0
    )
    assert (
        count(
            shop_url,
            "SELECT COUNT(*) FROM shop_order o WHERE NOT EXISTS"
            " (SELECT 1 FROM shop_invoice i WHERE i.order_id = o.id)",
        )
        == 0
    )
    status = manage(shop_url, "outboxer", "status")
    assert "billing" in status
