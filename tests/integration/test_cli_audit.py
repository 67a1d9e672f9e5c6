"""``outboxer dead edit`` and ``outboxer audit list`` as real processes on SQLite,
PostgreSQL and MariaDB: --set, --payload-file and $EDITOR, the checks, and the
audit rows naming the OS user."""

from __future__ import annotations

import getpass
import json
import shlex
import sys

from tests.integration.test_cli_ops import OpsApp, ops_app  # noqa: F401 - the fixture


def test_dead_edit_and_audit_list(ops_app: OpsApp) -> None:  # noqa: F811 - the fixture
    app, svc = ops_app, ops_app.svc
    app.outbox.migrate()
    a, b = app.publish(f"{svc}.poison", 2)
    store = app.outbox.store(svc)
    for oid in (a, b):
        store.mark_dead(oid, "RuntimeError: poison pill")

    # --set: a dotted path, the value read as JSON
    done = app.cli("dead", "edit", str(a), "--set", "i=41", "--set", "fix.note=by hand", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert (doc["status"], doc["requeue_count"]) == ("pending", 1)
    assert doc["envelope"]["payload"] == {"i": 41, "fix": {"note": "by hand"}}

    # --payload-file: invalid JSON is a usage error; the row stays dead.
    (app.dir / "bad.json").write_text("{not json")
    bad = app.cli("dead", "edit", str(b), "--payload-file", "bad.json", "--json")
    assert bad.returncode == 2
    assert "not valid" in json.loads(bad.stdout)["error"]
    row = store.get_by_id(b)
    assert row is not None
    assert row.status.value == "dead"

    # $EDITOR: a program that rewrites the file it is given.
    editor = app.dir / "editor.py"
    editor.write_text(
        "import json, sys\n"
        "path = sys.argv[1]\n"
        "doc = json.load(open(path))\n"
        "doc['i'] = 99\n"
        "json.dump(doc, open(path, 'w'))\n"
    )
    cmd = f"{shlex.quote(sys.executable)} {shlex.quote(str(editor))}"
    edited = app.cli("dead", "edit", str(b), EDITOR=cmd, VISUAL=cmd)
    assert edited.returncode == 0, edited.stdout + edited.stderr
    assert f"edited dead letter {b} of {svc}" in edited.stdout
    row = store.get_by_id(b)
    assert row is not None
    assert row.envelope().payload == {"i": 99}

    listed = app.cli("audit", "list", "-s", svc, "--json")
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)["entries"]
    assert [(e["action"], e["outbox_ids"]) for e in entries] == [("edit", [b]), ("edit", [a])]
    assert {e["actor"] for e in entries} == {getpass.getuser()}
    assert json.loads(entries[0]["payload_before"])["payload"] == {"i": 1}
    assert json.loads(entries[0]["payload_after"])["payload"] == {"i": 99}
    table = app.cli("audit", "list", "--action", "edit")
    assert table.returncode == 0, table.stderr
    assert "edit" in table.stdout
    assert svc in table.stdout
