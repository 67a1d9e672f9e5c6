"""The ``outboxer`` command line, in-process (CliRunner) and as a real process."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import MetaData, create_engine, insert, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from outboxer import Outbox, OutboxSettings, Status
from outboxer.cli import app
from outboxer.database.migrations import LATEST, table_at
from outboxer.database.schema import db_now
from outboxer.settings import CONFIG_ENV
from tests.helpers import ServerDatabase

EVENT = "order.placed"
SERVICE = "orders"
TABLE = "orders_outbox_messages"
WIDE = {"COLUMNS": "160"}

APP_SOURCE = """\
from sqlalchemy import text

from outboxer import Outbox, OutboxSettings

outbox = Outbox(
    {url!r},
    settings=OutboxSettings.from_values(retry_unit=0.05, poll_interval=0.1, topic_prefix="t"),
)
outbox.register_event({event!r}, {service!r})


@outbox.handler({event!r})
def ship(event, tx):
    tx.execute(text("INSERT INTO shipped (order_id) VALUES (:id)"), {{"id": event.payload["id"]}})
"""


@dataclass
class AppModule:
    name: str
    url: str
    db: Path | None
    dir: Path

    @property
    def spec(self) -> str:
        return f"{self.name}:outbox"


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run in tmp_path; undo what loading an app does to sys.path and sys.modules."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv("OUTBOXER_APP", raising=False)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        module = sys.modules.pop(name)
        outbox = getattr(module, "outbox", None)
        if isinstance(outbox, Outbox):
            outbox.close()


def write_app(directory: Path, url: str, db: Path | None = None) -> AppModule:
    name = f"cliapp_{uuid.uuid4().hex[:10]}"
    (directory / f"{name}.py").write_text(APP_SOURCE.format(url=url, event=EVENT, service=SERVICE))
    return AppModule(name, url, db, directory)


@pytest.fixture
def sqlite_app(isolated: Path) -> AppModule:
    db = isolated / "app.db"
    return write_app(isolated, f"sqlite:///{db}", db)


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env={**WIDE, **(env or {})})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def publish(url: str, count: int, **options: Any) -> None:
    outbox = Outbox(url, settings=OutboxSettings.from_values())
    outbox.register_event(EVENT, SERVICE)
    with Session(outbox.db.sync_engine) as session, session.begin():
        session.execute(text("CREATE TABLE IF NOT EXISTS shipped (order_id INTEGER NOT NULL)"))
        for i in range(count):
            outbox.publish(session, EVENT, {"id": i}, key=f"order-{i}", **options)
    outbox.close()


def table_row(output: str, service: str) -> list[str]:
    """The cells of ``service``'s first line in a rich table."""
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0] == service:
            return cells
    raise AssertionError(f"no row for {service!r} in:\n{output}")


def cli_command() -> list[str]:
    script = Path(sys.executable).with_name("outboxer")
    return [str(script)] if script.exists() else [sys.executable, "-m", "outboxer.cli"]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOXER_")}
    return {**env, "PYTHONUNBUFFERED": "1", **WIDE}


# --------------------------------------------------------------------------- migrate


def test_migrate_creates_the_table_then_finds_it(sqlite_app: AppModule) -> None:
    code, out, err = invoke("--app", sqlite_app.spec, "migrate")
    assert code == 0, err
    assert table_row(out, SERVICE) == [SERVICE, TABLE, str(LATEST), "created"]
    assert sqlite_app.db is not None
    with sqlite3.connect(sqlite_app.db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    assert TABLE in tables

    code, out, err = invoke("--app", sqlite_app.spec, "migrate")
    assert code == 0, err
    assert table_row(out, SERVICE) == [SERVICE, TABLE, str(LATEST), "up to date"]


def test_migrate_names_rows_that_repeat_an_event_id(sqlite_app: AppModule) -> None:
    engine = create_engine(sqlite_app.url)
    md = MetaData()
    old = table_at(TABLE, 3, md)
    envelope = '{"event_id":"evt-1","event_type":"order.placed","payload":{}}'
    with engine.begin() as conn:
        md.create_all(conn)
        for _ in range(2):
            conn.execute(
                insert(old).values(
                    event_type=EVENT,
                    service_name=SERVICE,
                    topic="t",
                    message_key="k",
                    payload=envelope,
                    status="consumed",
                    retry_count=0,
                    max_retry=20,
                    created_at=db_now(),
                    updated_at=db_now(),
                )
            )
    engine.dispose()
    code, out, err = invoke("--app", sqlite_app.spec, "migrate")
    assert code == 0, err
    assert table_row(out, SERVICE) == [SERVICE, TABLE, str(LATEST), "upgraded from 1"]
    assert "note:" in out
    assert "1 row(s) repeat the event id of an earlier row ('evt-1': rows 1, 2)" in out


def test_app_from_the_environment(sqlite_app: AppModule) -> None:
    code, out, err = invoke("migrate", env={"OUTBOXER_APP": sqlite_app.spec})
    assert code == 0, err
    assert table_row(out, SERVICE)[3] == "created"


# --------------------------------------------------------------------------- status


def status_row(output: str, service: str) -> list[str]:
    """The cells of ``service``'s first line in the status table (space-separated)."""
    for line in output.splitlines():
        cells = line.split()
        if cells and cells[0] == service:
            return cells
    raise AssertionError(f"no row for {service!r} in:\n{output}")


def test_status_shows_counts_and_json_parses(sqlite_app: AppModule) -> None:
    code, out, _ = invoke("--app", sqlite_app.spec, "status")
    assert code == 3  # the table does not exist yet
    assert "outboxer migrate" in out

    assert invoke("--app", sqlite_app.spec, "migrate")[0] == 0
    publish(sqlite_app.url, 3)
    publish(sqlite_app.url, 1, delay=3600)  # scheduled: pending, not due, not overdue

    code, out, err = invoke("--app", sqlite_app.spec, "status")
    assert code == 0, err
    cells = status_row(out, SERVICE)
    # service, pending, scheduled, published, consumed, dead, due now, oldest due,
    # pub/s, con/s
    assert cells[:7] == [SERVICE, "4", "1", "0", "0", "0", "3"]
    assert cells[7].endswith("s")
    assert cells[8:] == ["0", "0"]
    assert TABLE[:10] in out
    # The scheduled row is not a backlog: oldest-due reads the due rows only.
    code, _, err = invoke("--app", sqlite_app.spec, "status", "--fail-on", "oldest-due>1h")
    assert code == 0, err
    code, _, _ = invoke("--app", sqlite_app.spec, "status", "--fail-on", "scheduled>0")
    assert code == 4

    code, out, err = invoke("--app", sqlite_app.spec, "status", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["database"] == sqlite_app.url
    [svc] = doc["services"]
    assert svc["service"] == SERVICE
    assert svc["table"] == TABLE
    assert svc["migrated"] is True
    assert svc["counts"] == {
        "pending": 4,
        "published": 0,
        "consumed": 0,
        "dead": 0,
        "cancelled": 0,
    }
    assert svc["total"] == 4
    assert svc["due"] == 3
    assert svc["scheduled"] == 1
    assert svc["dead"] == 0
    assert svc["oldest_due_seconds"] >= 0


def test_status_of_an_unknown_service(sqlite_app: AppModule) -> None:
    code, _, err = invoke("--app", sqlite_app.spec, "status", "--service", "nope")
    assert code == 1
    assert "unknown service 'nope'" in err
    assert SERVICE in err


def test_config_file_is_read_while_the_app_is_imported(isolated: Path) -> None:
    db = isolated / "from-config.db"
    config = isolated / "custom.toml"
    config.write_text(f'url = "sqlite:///{db}"\n')
    name = f"cliapp_{uuid.uuid4().hex[:10]}"
    (isolated / f"{name}.py").write_text(
        "from outboxer import Outbox\n"
        "outbox = Outbox()\n"
        f"outbox.register_event({EVENT!r}, {SERVICE!r})\n"
    )
    code, out, err = invoke("--app", f"{name}:outbox", "--config", str(config), "migrate")
    assert code == 0, err
    assert f"sqlite:///{db}" in out
    assert db.exists()
    assert CONFIG_ENV not in os.environ

    code, _, err = invoke("--app", f"{name}:outbox", "--config", "missing.toml", "status")
    assert code == 1
    assert "missing.toml" in err


# --------------------------------------------------------------------------- errors


def test_bad_app_strings_exit_1_with_a_clear_message(sqlite_app: AppModule) -> None:
    broken = f"cliapp_broken_{uuid.uuid4().hex[:8]}"
    (sqlite_app.dir / f"{broken}.py").write_text("raise RuntimeError('boom at import')\n")
    cases = {
        "no-colon-here": "must look like 'module:attribute'",
        ":outbox": "must look like 'module:attribute'",
        "no_such_module_xyz:outbox": "no module named 'no_such_module_xyz'",
        f"{sqlite_app.name}:nope": "has no attribute 'nope'",
        f"{sqlite_app.name}:ship": "not an outboxer.Outbox",
        f"{broken}:outbox": "raised RuntimeError: boom at import",
    }
    for spec, message in cases.items():
        code, out, err = invoke("--app", spec, "status")
        assert code == 1, (spec, out, err)
        assert message in err, (spec, err)
        assert repr(spec) in err, (spec, err)
        assert "Traceback" not in out + err
        assert len(err.strip().splitlines()) == 1, err


def test_commands_that_need_an_app_say_so(isolated: Path) -> None:
    code, _, err = invoke("status")
    assert code == 2
    assert "--app module:attribute" in err


def test_relay_only_and_consume_only_are_exclusive(sqlite_app: AppModule) -> None:
    code, _, err = invoke("--app", sqlite_app.spec, "run", "--relay-only", "--consume-only")
    assert code == 2
    assert "mutually exclusive" in err


def test_outbox_errors_are_one_red_line(sqlite_app: AppModule) -> None:
    # The local transport cannot relay without consuming: the engine refuses.
    assert invoke("--app", sqlite_app.spec, "migrate")[0] == 0
    code, out, err = invoke("--app", sqlite_app.spec, "run", "--relay-only")
    assert code == 1
    assert "local transport" in err
    assert "Traceback" not in out + err


# --------------------------------------------------------------------------- passwords


def test_password_is_never_printed(isolated: Path, pg_database: ServerDatabase) -> None:
    secret = "s3cret-Pa55word"
    url = make_url(pg_database.url).set(password=secret).render_as_string(hide_password=False)
    module = write_app(isolated, url)
    try:
        outputs = []
        for args in (("migrate",), ("status",), ("status", "--json")):
            code, out, err = invoke("--app", module.spec, *args)
            assert code == 0, err
            outputs.append(out + err)
        assert all(secret not in o for o in outputs)
        assert "***" in outputs[1]
        assert json.loads(outputs[2])["database"] == make_url(url).render_as_string()
    finally:
        outbox = Outbox(url, settings=OutboxSettings.from_values(topic_prefix="t"))
        outbox.register_event(EVENT, SERVICE)
        with outbox.db.sync_engine.begin() as conn:
            outbox.metadata.drop_all(conn)
        outbox.close()


def test_password_is_not_in_connection_errors(isolated: Path) -> None:
    secret = "s3cret-Pa55word"
    # Port 1: nothing listens, so the connection is refused without touching a server.
    module = write_app(isolated, f"postgresql+psycopg://app:{secret}@127.0.0.1:1/nope")
    for args in (("status",), ("migrate",)):
        code, out, err = invoke("--app", module.spec, *args)
        assert code == 1
        assert err.startswith("error: ")
        assert "app:***@127.0.0.1:1" in err
        assert secret not in out + err


# --------------------------------------------------------------------------- processes


def _consumed(db: Path) -> int:
    with sqlite3.connect(db, timeout=10) as conn:
        (n,) = conn.execute(f"SELECT count(*) FROM {TABLE} WHERE status = 'consumed'").fetchone()
    conn.close()
    return int(n)


def test_run_consumes_then_stops_cleanly_on_sigterm(sqlite_app: AppModule) -> None:
    assert sqlite_app.db is not None
    assert invoke("--app", sqlite_app.spec, "migrate")[0] == 0
    publish(sqlite_app.url, 20)
    proc = subprocess.Popen(
        [*cli_command(), "--app", sqlite_app.spec, "run", "--log-format", "plain"],
        cwd=sqlite_app.dir,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while _consumed(sqlite_app.db) < 20:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "events not consumed within 60s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "outboxer running" in err
    assert "outboxer stopped" in err
    assert "Traceback" not in err
    with sqlite3.connect(sqlite_app.db) as conn:
        shipped = conn.execute("SELECT count(*), count(DISTINCT order_id) FROM shipped").fetchone()
    conn.close()
    assert shipped == (20, 20)

    code, out, _ = invoke("--app", sqlite_app.spec, "status", "--json")
    assert code == 0
    assert json.loads(out)["services"][0]["counts"]["consumed"] == 20


def test_demo_command_prints_the_summary(tmp_path: Path) -> None:
    result = subprocess.run(
        [*cli_command(), "demo", "--events", "200"],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "exactly-once check passed" in out
    assert "events/s" in out
    # Retries: notification #25 fails twice, the poison twice before its third, fatal try.
    assert table_row(out, "total")[1:] == ["200", "199", "4", "1", "199"]
    assert "SQLite database:" in out
    assert "removed now" in out
    assert "Traceback" not in result.stdout + result.stderr


def test_demo_refuses_an_existing_database(isolated: Path) -> None:
    existing = isolated / "mine.db"
    existing.write_bytes(b"precious")
    code, _, err = invoke("demo", "--events", "50", "--db", str(existing))
    assert code == 1
    assert err.startswith("error: ")
    assert "already exists" in err
    assert existing.read_bytes() == b"precious"


# --------------------------------------------------------------------------- cancel


def test_cancel_a_waiting_event_then_not_again(sqlite_app: AppModule) -> None:
    assert invoke("--app", sqlite_app.spec, "migrate")[0] == 0
    outbox = Outbox(sqlite_app.url, settings=OutboxSettings.from_values())
    outbox.register_event(EVENT, SERVICE)
    with Session(outbox.db.sync_engine) as session, session.begin():
        oid = outbox.publish(session, EVENT, {"id": 1}, event_id="evt-cli", delay=600)

    code, out, err = invoke("--app", sqlite_app.spec, "cancel", "evt-cli")
    assert code == 0, err
    assert "cancelled event evt-cli" in out
    row = outbox.store(SERVICE).get_by_id(oid)
    assert row is not None
    assert row.status is Status.CANCELLED
    # Already cancelled: not waiting any more, exit 1 with the reason.
    code, _, err = invoke("--app", sqlite_app.spec, "cancel", "evt-cli")
    assert code == 1
    assert "not cancelled" in err
    code, out, _ = invoke("--app", sqlite_app.spec, "cancel", "nope", "--json")
    assert code == 1
    assert json.loads(out) == {"event_id": "nope", "cancelled": False}
    outbox.close()
