"""``outboxer keys`` as real processes on SQLite, PostgreSQL and MariaDB: blocked
(table and --json), retry, skip, park and release, each audited with the OS user."""

from __future__ import annotations

import getpass
import json
import subprocess
from pathlib import Path

from sqlalchemy.orm import Session

from outboxer import Outbox, Status
from tests.helpers import drop_tables, isolated_settings
from tests.integration.test_cli import child_env, cli_command

APP = """\
from outboxer import Outbox

outbox = Outbox({url!r}, topic_prefix="t", retry_unit=60)
outbox.register_service("{svc}", ordered=True)
outbox.register_event("{svc}.entry", "{svc}")
"""


def test_keys_blocked_park_release_skip(db_url: str, service: str, tmp_path: Path) -> None:
    (tmp_path / "keysapp.py").write_text(APP.format(url=db_url, svc=service))
    ob = Outbox(db_url, settings=isolated_settings(topic_prefix="t", retry_unit=60))
    ob.register_service(service, ordered=True)
    ob.register_event(f"{service}.entry", service)
    ob.migrate()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cli_command(), "--app", "keysapp:outbox", "keys", *args],
            cwd=tmp_path,
            env={**child_env(), "COLUMNS": "120"},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    try:
        with Session(ob.db.sync_engine) as session, session.begin():
            a, _, _ = (
                ob.publish(session, f"{service}.entry", {"n": n}, key=k)
                for k, n in (("acct-1", 0), ("acct-1", 1), ("acct-2", 2))
            )
        ob.store(service).mark_failed_for_retry(a, "RuntimeError: ledger closed")

        parked = cli("park", service, "acct-2", "--reason", "bad import", "--json")
        assert parked.returncode == 0, parked.stderr
        assert json.loads(parked.stdout)["parked"] is True
        listed = cli("blocked", "-s", service, "--json")
        assert listed.returncode == 0, listed.stderr
        found = {b["key"]: b for b in json.loads(listed.stdout)["blocked"]}
        assert (found["acct-1"]["by"], found["acct-1"]["waiting"]) == ("failing", 1)
        assert found["acct-1"]["head"]["id"] == a
        assert found["acct-1"]["head"]["last_error"] == "RuntimeError: ledger closed"
        assert (found["acct-2"]["by"], found["acct-2"]["parked_by"]) == (
            "parked",
            getpass.getuser(),
        )
        table = cli("blocked")
        assert table.returncode == 0, table.stderr
        assert "ledger closed" in table.stdout
        assert "bad import" in table.stdout

        skipped = cli("skip", service, "acct-1", "--reason", "amount is wrong")
        assert skipped.returncode == 0, skipped.stderr
        assert f"skipped {a}" in skipped.stdout
        row = ob.store(service).get_by_id(a)
        assert row is not None
        assert row.status is Status.DEAD
        released = cli("release", service, "acct-2", "--json")
        assert json.loads(released.stdout)["released"] == 0  # it was due already
        assert ob.admin.blocked_keys() == []
        entries = ob.admin.audit(services=[service]).entries
        assert [e.action for e in entries] == ["release", "skip", "park"]
        assert {e.actor for e in entries} == {getpass.getuser()}
    finally:
        drop_tables(ob)
        ob.close()
