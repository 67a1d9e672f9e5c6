"""The operations commands as real processes on SQLite, PostgreSQL and MariaDB:
status (exit codes, --json, --fail-on, --watch), dead list/show/requeue/purge,
purge, migrate --sql, run with metrics and with the retention sweep."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import MetaData, func, select
from sqlalchemy.orm import Session

from outboxer import Outbox, Status
from outboxer.database.migrations import table_at
from outboxer.testing import free_port
from tests.helpers import drop_tables, isolated_settings
from tests.integration.test_cli import child_env, cli_command

APP = """\
from outboxer import Outbox

outbox = Outbox({url!r}, topic_prefix="t", retry_unit=0.02)
outbox.register_event("{svc}.ok", "{svc}")
outbox.register_event("{svc}.poison", "{svc}")
outbox.register_event("{svc}_ext.sent", "{svc}_ext")  # consumed elsewhere


@outbox.handler("{svc}.ok")
def ok(event, tx):
    pass


@outbox.handler("{svc}.poison")
def poison(event, tx):
    raise RuntimeError("poison pill")
"""

CONFIG = "poll_interval = 0.1\nerror_delay = 0.2\n"


@dataclass
class OpsApp:
    dir: Path
    url: str
    svc: str
    outbox: Outbox

    def cli(self, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cli_command(), "--app", "opsapp:outbox", "--config", "outboxer.toml", *args],
            cwd=self.dir,
            env={**child_env(), "COLUMNS": "80", **env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def popen(self, *args: str, **env: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*cli_command(), "--app", "opsapp:outbox", "--config", "outboxer.toml", *args],
            cwd=self.dir,
            env={**child_env(), "COLUMNS": "80", **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def counts(self, service: str | None = None) -> dict[str, int]:
        return self.outbox.store(service or self.svc).status().counts

    def publish(self, event: str, n: int, **kw: Any) -> list[int]:
        with Session(self.outbox.db.sync_engine) as session, session.begin():
            return [self.outbox.publish(session, event, {"i": i}, **kw) for i in range(n)]


@pytest.fixture
def ops_app(db_url: str, service: str, tmp_path: Path) -> Iterator[OpsApp]:
    (tmp_path / "opsapp.py").write_text(APP.format(url=db_url, svc=service))
    (tmp_path / "outboxer.toml").write_text(CONFIG)
    ob = Outbox(db_url, settings=isolated_settings(topic_prefix="t"))
    for event, svc in (("ok", service), ("poison", service)):
        ob.register_event(f"{service}.{event}", svc)
    ob.register_event(f"{service}_ext.sent", f"{service}_ext")
    yield OpsApp(tmp_path, db_url, service, ob)
    drop_tables(ob)
    ob.close()


def _wait(
    what: str, done: Any, proc: subprocess.Popen[str] | None = None, limit: float = 90
) -> None:
    deadline = time.monotonic() + limit
    while not done():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended: {proc.communicate()}")
        assert time.monotonic() < deadline, f"{what} not reached within {limit}s"
        time.sleep(0.2)


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    return out, err


def test_dead_letter_lifecycle_and_retention(ops_app: OpsApp) -> None:
    app, svc = ops_app, ops_app.svc
    migrated = app.cli("migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert "created" in migrated.stdout

    ok_ids = app.publish(f"{svc}.ok", 5)
    poison_ids = app.publish(f"{svc}.poison", 2, max_retry=2)
    [ext_id] = app.publish(f"{svc}_ext.sent", 1)

    status = app.cli("status", "--json", "--fail-on", "dead>0")
    assert status.returncode == 0, status.stdout + status.stderr
    doc = json.loads(status.stdout)
    assert doc["ok"] is True
    assert [s["counts"]["pending"] for s in doc["services"]] == [7, 1]

    proc = app.popen("run", "--log-format", "json")
    _wait("all consumed or dead", lambda: app.counts()["pending"] == 0, proc)
    _, err = _stop(proc)
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    dead_lines = [r for r in lines if r["level"] == "ERROR" and r.get("outbox_id") in poison_ids]
    assert len(dead_lines) == 2
    assert all(
        "is dead after 2 attempt(s): RuntimeError: poison pill" in r["message"] for r in dead_lines
    )
    assert "Traceback" not in err

    # status: the dead letters fail the probe
    status = app.cli("status", "--fail-on", "dead>0,oldest-due>1h")
    assert status.returncode == 4, status.stdout + status.stderr
    assert f"failing: {svc}: dead>0 (dead is 2)" in status.stdout
    assert max(len(line) for line in status.stdout.splitlines()) <= 80
    status = app.cli("status", "--json", "--fail-on", "dead>0")
    doc = json.loads(status.stdout)
    assert (status.returncode, doc["ok"], doc["exit_code"]) == (4, False, 4)
    assert doc["failing"] == [f"{svc}: dead>0 (dead is 2)"]
    [mine] = [s for s in doc["services"] if s["service"] == svc]
    assert mine["counts"] == {
        "pending": 0,
        "published": 0,
        "consumed": 5,
        "dead": 2,
        "cancelled": 0,
    }
    assert mine["consumed_per_second"] > 0

    # dead list, paged
    listed = app.cli("dead", "list", "--json", "--limit", "1")
    assert listed.returncode == 0, listed.stderr
    page = json.loads(listed.stdout)
    assert [m["id"] for m in page["messages"]] == [poison_ids[0]]
    assert page["next_after"] == f"{svc}:{poison_ids[0]}"
    rest = json.loads(app.cli("dead", "list", "--json", "--after", page["next_after"]).stdout)
    assert [m["id"] for m in rest["messages"]] == [poison_ids[1]]
    assert rest["next_after"] is None
    table = app.cli("dead", "list", "--service", svc)
    assert table.returncode == 0
    assert "RuntimeError: poison pill" in table.stdout
    assert max(len(line) for line in table.stdout.splitlines()) <= 80
    none = json.loads(app.cli("dead", "list", "--json", "--newer-than", "0s").stdout)
    assert none["messages"] == []

    # dead show
    shown = app.cli("dead", "show", str(poison_ids[0]), "--service", svc, "--json")
    assert shown.returncode == 0, shown.stderr
    one = json.loads(shown.stdout)
    assert (one["status"], one["attempts"], one["envelope"]["payload"]) == ("dead", 2, {"i": 0})
    assert "RuntimeError: poison pill" in one["last_error"]
    assert "File " in one["last_error"]  # the full error, frames included
    text = app.cli("dead", "show", str(poison_ids[0]), "--service", svc)
    assert "poison pill" in text.stdout
    missing = app.cli("dead", "show", "999999", "--json")
    assert missing.returncode == 1
    assert "no outbox message with id 999999" in json.loads(missing.stdout)["error"]

    # requeue one by id: back to pending with a note
    assert app.cli("dead", "requeue").returncode == 2
    requeued = app.cli("dead", "requeue", str(poison_ids[0]))
    assert requeued.returncode == 0, requeued.stderr
    assert "requeued 1 dead letter(s)" in requeued.stdout
    row = app.outbox.store(svc).get_by_id(poison_ids[0])
    assert row is not None
    assert (row.status, row.retry_count, row.requeue_count) == (Status.PENDING, 0, 1)
    assert row.requeued_at is not None
    assert row.last_error is not None  # kept until it succeeds
    dry = json.loads(app.cli("dead", "requeue", "-s", svc, "--dry-run", "--json").stdout)
    assert dry == {"requeued": 1, "by_service": {svc: 1}, "dry_run": True}

    # dead purge: the other one
    purged = app.cli("dead", "purge", "--older-than", "0s", "--service", svc, "--json")
    assert purged.returncode == 0, purged.stderr
    assert json.loads(purged.stdout)["total"] == 1
    assert app.outbox.store(svc).get_by_id(poison_ids[1]) is None

    # retention: consumed rows, and published rows only where consumed elsewhere
    app.outbox.store(f"{svc}_ext").mark_published(ext_id)
    app.outbox.store(svc).mark_published(poison_ids[0])
    dry = app.cli("purge", "--consumed-older-than", "0s", "--dry-run", "--json")
    assert json.loads(dry.stdout)["total"] == 5
    assert app.counts()["consumed"] == 5
    done = app.cli(
        "purge", "--consumed-older-than", "0s", "--published-older-than", "0s", "--batch-size", "2"
    )
    assert done.returncode == 0, done.stderr
    assert "deleted 6 row(s)" in done.stdout
    assert "published rows kept" in done.stdout
    assert app.counts() == {"pending": 0, "published": 1, "consumed": 0, "dead": 0, "cancelled": 0}
    assert app.counts(f"{svc}_ext")["published"] == 0
    assert all(app.outbox.store(svc).get_by_id(i) is None for i in ok_ids)
    assert app.cli("purge").returncode == 2


def test_status_exit_codes_and_json_errors(ops_app: OpsApp) -> None:
    app = ops_app
    missing = app.cli("status", "--json")
    doc = json.loads(missing.stdout)
    assert (missing.returncode, doc["ok"]) == (3, False)
    assert len(doc["missing_tables"]) == 2
    text = app.cli("status")
    assert text.returncode == 3
    assert "outboxer migrate" in text.stdout
    bad = app.cli("status", "--json", "--fail-on", "dead>>0")
    assert bad.returncode == 2
    assert "invalid condition" in json.loads(bad.stdout)["error"]


def test_status_of_an_unreachable_database(tmp_path: Path) -> None:
    (tmp_path / "down.py").write_text(
        "from outboxer import Outbox\n"
        "outbox = Outbox('postgresql+psycopg://app:secret-pw@127.0.0.1:1/x')\n"
        "outbox.register_service('svc')\n"
    )
    result = subprocess.run(
        [*cli_command(), "--app", "down:outbox", "status", "--json"],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    doc = json.loads(result.stdout)
    assert doc["ok"] is False
    assert "cannot read the database" in doc["error"]
    assert "secret-pw" not in result.stdout + result.stderr


def test_status_watch_fits_80_columns(ops_app: OpsApp) -> None:
    app = ops_app
    assert app.cli("migrate").returncode == 0
    app.publish(f"{app.svc}.ok", 3)
    watched = app.cli("status", "--watch", "--interval", "0.1s", "--count", "3")
    assert watched.returncode == 0, watched.stderr
    assert app.svc[:10] in watched.stdout
    assert "pub/s" in watched.stdout
    assert max(len(line) for line in watched.stdout.splitlines()) <= 80


def test_migrate_sql_prints_and_changes_nothing(ops_app: OpsApp) -> None:
    app = ops_app
    # The service's table exists at version 1 (before versions were recorded).
    md = MetaData()
    table = app.outbox.table_for(app.svc).name
    table_at(table, 1, md)
    with app.outbox.db.sync_engine.begin() as conn:
        md.create_all(conn)
    printed = app.cli("migrate", "--sql")
    assert printed.returncode == 0, printed.stderr
    assert f"ALTER TABLE {table} ADD COLUMN headers" in printed.stdout
    assert "CREATE TABLE" in printed.stdout  # the ext service's table
    assert not app.outbox.migration_plan()[0].up_to_date  # nothing applied
    applied = app.cli("migrate")
    assert applied.returncode == 0
    assert "upgraded from 1" in applied.stdout
    assert all(p.up_to_date for p in app.outbox.migration_plan())


def test_run_serves_metrics_and_sweeps(ops_app: OpsApp) -> None:
    app = ops_app
    (app.dir / "outboxer.toml").write_text(
        CONFIG + '[retention]\nconsumed_after = "1ms"\nsweep_interval = "1s"\n'
    )
    assert app.cli("migrate").returncode == 0
    app.publish(f"{app.svc}.ok", 4)
    port = free_port()
    proc = app.popen("run", "--metrics-port", str(port), "--metrics-addr", "127.0.0.1")
    t = app.outbox.table_for(app.svc)

    def rows() -> int:
        with app.outbox.db.sync_engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(t)).scalar_one())

    try:
        _wait("rows consumed and swept", lambda: rows() == 0, proc)
        families: dict[str, Any] = {}

        def scraped() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    text = r.read().decode()
            except OSError:
                return False
            families.update({f.name: f for f in text_string_to_metric_families(text)})
            return True

        _wait("metrics endpoint", scraped, proc)
    finally:
        _, err = _stop(proc)
    samples = {
        (s.name, s.labels.get("service"), s.labels.get("status")): s.value
        for f in families.values()
        for s in f.samples
    }
    assert samples[("outboxer_messages_consumed_total", app.svc, None)] == 4
    assert samples[("outboxer_rows_purged_total", app.svc, "consumed")] == 4
    assert samples[("outboxer_messages", app.svc, "consumed")] == 0
    assert samples[("outboxer_database_up", None, None)] == 1
    assert "serving Prometheus metrics" in err
    assert "retention sweep deleted 4 row(s)" in err


def test_config_typos_and_version(tmp_path: Path) -> None:
    (tmp_path / "outboxer.toml").write_text("max_retyr = 3\n")
    (tmp_path / "typo.py").write_text(
        "from outboxer import Outbox\noutbox = Outbox('sqlite:///t.db')\n"
    )
    result = subprocess.run(
        [*cli_command(), "--app", "typo:outbox", "status"],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "unknown setting 'max_retyr' (did you mean 'max_retry'?)" in result.stderr
    version = subprocess.run(
        [*cli_command(), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert version.returncode == 0
    assert version.stdout.startswith("outboxer ")
