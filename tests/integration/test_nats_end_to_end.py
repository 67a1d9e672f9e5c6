"""End to end over NATS JetStream: the README's app with only its transport URL
changed, and the inbox (a consumer with its own database) fed through JetStream,
with copies of some events on the stream."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from outboxer import Status
from outboxer.transports.nats.admin import stream_name
from tests.integration.engine_helpers import run_until
from tests.integration.test_inbox import Pair
from tests.integration.test_readme_app import _argv, _blocks, _commands, _invoices
from tests.nats_support import run_aside

pytestmark = [pytest.mark.nats, pytest.mark.timeout(240)]

EVENTS = 300


def test_the_readme_app_runs_on_nats(tmp_path: Path, nats_url: str) -> None:
    app = next(b for b in _blocks("python") if b.startswith("# app.py"))
    assert "outbox = Outbox(DB)" in app
    app = app.replace("outbox = Outbox(DB)", f"outbox = Outbox(DB, transport={nats_url!r})", 1)
    (tmp_path / "app.py").write_text(app)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOXER_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), env.get("PYTHONPATH")) if p)
    # A stream of its own (deleted after the test by the nats_url fixture).
    env["OUTBOXER_TOPIC_PREFIX"] = f"nt{uuid.uuid4().hex[:6]}"
    for command in _commands():
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


class _Server:
    def __init__(self, url: str) -> None:
        self.transport_url = url


async def _copies(url: str, subject: str, values: list[bytes]) -> None:
    import nats  # noqa: PLC0415

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for value in values:
            # No Nats-Msg-Id: the stream stores each copy (a replay by hand).
            await js.publish(subject, value, headers={"Outboxer-Key": "dup"})
    finally:
        await nc.close()


async def _all_acknowledged(url: str, stream: str) -> bool:
    """Every durable consumer of ``stream`` has read and acknowledged everything."""
    import nats  # noqa: PLC0415

    nc = await nats.connect(url)
    try:
        infos = await nc.jetstream().consumers_info(stream)
        return bool(infos) and all(i.num_pending == 0 and i.num_ack_pending == 0 for i in infos)
    finally:
        await nc.close()


async def test_the_inbox_applies_each_event_once_over_nats(
    pg_database: Any, mysql_database: Any, nats_url: str
) -> None:
    pair = Pair(pg_database.url, mysql_database.url, _Server(nats_url))  # type: ignore[arg-type]
    pair.flaky = {7: 1, 11: 2}
    try:
        pair.publish(EVENTS)
        stored = pair.producer.store("orders")
        copies = []
        for oid in (1, 2, 3, 50, 51):
            row = stored.get_by_id(oid)
            assert row is not None
            copies.append(row.envelope().to_json())
        topic = pair.producer.routes.route_for_service("orders").topic

        def done() -> bool:
            return pair.inbox()[Status.CONSUMED.value] >= EVENTS

        await run_until([pair.producer, pair.consumer], done, timeout=120)
        # Copies of consumed events on the stream, as a replay would put them.
        run_aside(lambda: _copies(nats_url, f"{topic}.0", copies))

        def copies_read() -> bool:
            return run_aside(lambda: _all_acknowledged(nats_url, stream_name(topic)))

        await run_until([pair.consumer], copies_read, timeout=60)
        assert pair.effects() == (EVENTS, EVENTS)
        counts = pair.inbox()
        assert counts[Status.CONSUMED.value] == EVENTS
        assert counts[Status.PENDING.value] == 0
        assert counts[Status.DEAD.value] == 0
        assert pair.producer.store("orders").status().counts[Status.PUBLISHED.value] == EVENTS
    finally:
        pair.drop()
