"""The README's 20-line service runs as documented: migrate, publish, `outboxer run`."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", README.read_text(), flags=re.S)


def _commands() -> list[str]:
    block = next(b for b in _blocks("sh") if "app:outbox run" in b)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def _argv(command: str) -> list[str]:
    bin_dir = Path(sys.executable).parent
    if command.startswith("python -c "):
        return [sys.executable, "-c", command.removeprefix("python -c ").strip('"')]
    assert command.startswith("outboxer ")
    return [str(bin_dir / "outboxer"), *command.split()[1:]]


def _invoices(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM invoices").fetchone()[0])


def test_readme_service_runs(tmp_path: Path) -> None:
    app = next(b for b in _blocks("python") if b.startswith("# app.py"))
    (tmp_path / "app.py").write_text(app)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOXER_")}
    # The app's folder first, then whatever this test run imports outboxer from.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), env.get("PYTHONPATH")) if p)
    commands = _commands()
    assert [c.split()[3] for c in commands if c.startswith("outboxer")] == [
        "migrate",
        "run",
        "status",
        "dead",
    ]
    for command in commands:
        argv = _argv(command)
        if argv[-1] != "run":
            done = subprocess.run(
                argv,
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            continue
        proc = subprocess.Popen(
            argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 60
            while _invoices(tmp_path / "shop.db") < 1:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, "the invoice never appeared"
                time.sleep(0.1)
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            output = proc.communicate(timeout=30)[0].decode()
        assert proc.returncode == 0, output
    assert _invoices(tmp_path / "shop.db") == 1
    with sqlite3.connect(tmp_path / "shop.db") as conn:
        status = conn.execute("SELECT status FROM billing_outbox_messages").fetchall()
    assert status == [("consumed",)]
