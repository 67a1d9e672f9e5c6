"""Applications on RabbitMQ: the README's 20-line service with only its transport URL
changed, and a consumer with its own database (the inbox) fed through the broker,
duplicates on the queues included. Each applies every effect exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aio_pika
import pytest
from sqlalchemy import func, select

from outboxer import Status
from outboxer.transports.rabbitmq.admin import lane_of
from tests.integration.engine_helpers import run_until
from tests.integration.test_inbox import EVENTS, Pair
from tests.integration.test_readme_app import _argv, _blocks, _commands, _invoices
from tests.rabbitmq_broker import RabbitVhost, rabbitmqctl

pytestmark = pytest.mark.rabbitmq

README_TRANSPORT = 'outbox = Outbox(DB)  # transport="kafka://broker:9092" to go through Kafka'


def test_readme_service_runs_on_rabbitmq(tmp_path: Path, rabbitmq_vhost: RabbitVhost) -> None:
    app = next(b for b in _blocks("python") if b.startswith("# app.py"))
    assert README_TRANSPORT in app
    # The one change: the transport URL.
    app = app.replace(README_TRANSPORT, f"outbox = Outbox(DB, transport={rabbitmq_vhost.url!r})")
    (tmp_path / "app.py").write_text(app)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOXER_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), env.get("PYTHONPATH")) if p)
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


async def _duplicate(vhost: RabbitVhost, exchange: str, values: list[tuple[str, bytes]]) -> None:
    """Publish copies of stored events straight to the exchange (a replay)."""
    connection = await aio_pika.connect(vhost.url)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        target = await channel.get_exchange(exchange, ensure=True)
        for key, value in values:
            message = aio_pika.Message(value, headers={"outboxer_key": key})
            await target.publish(message, routing_key=str(lane_of(key, 8)))
    finally:
        await connection.close()


@pytest.mark.parametrize("direction", ["postgresql->mariadb"])
async def test_inbox_over_rabbitmq_applies_each_event_once(
    request: pytest.FixtureRequest, rabbitmq_vhost: RabbitVhost, direction: str
) -> None:
    fixture = {"postgresql": "pg_database", "mariadb": "mysql_database"}
    source, target = direction.split("->")
    broker: Any = SimpleNamespace(transport_url=rabbitmq_vhost.url)
    pair = Pair(
        request.getfixturevalue(fixture[source]).url,
        request.getfixturevalue(fixture[target]).url,
        broker,
    )
    pair.flaky = {7: 1, 11: 2}
    try:
        pair.publish(EVENTS)

        def done() -> bool:
            return pair.inbox()[Status.CONSUMED.value] >= EVENTS

        await run_until([pair.producer, pair.consumer], done, timeout=120)
        # Copies of some events on the queues, as a replay would: applied once still.
        stored = pair.producer.store("orders")
        copies = []
        for oid in (1, 2, 3, 50, 51):
            row = stored.get_by_id(oid)
            assert row is not None
            copies.append((row.message_key or "", row.envelope().to_json()))
        topic = pair.producer.routes.route_for_service("orders").topic
        await _duplicate(rabbitmq_vhost, topic, copies)

        async def copies_taken() -> None:
            # The consumer runs until the queues hold nothing more for it.
            await run_until(
                [pair.consumer], lambda: _queues_empty(rabbitmq_vhost, topic), timeout=60
            )

        await copies_taken()
        assert pair.effects() == (EVENTS, EVENTS)
        counts = pair.inbox()
        assert counts[Status.CONSUMED.value] == EVENTS
        assert counts[Status.PENDING.value] == 0
        assert counts[Status.DEAD.value] == 0
        inbox = pair.consumer.table_for("orders")
        with pair.consumer.db.sync_engine.connect() as conn:
            most = conn.execute(select(func.max(inbox.c.retry_count))).scalar_one()
        assert most == 2  # the flaky handler's failures were retried in the inbox
        assert pair.producer.store("orders").status().counts[Status.PUBLISHED.value] == EVENTS
    finally:
        pair.drop()


def _queues_empty(vhost: RabbitVhost, topic: str) -> bool:
    """Whether every queue of ``topic`` in the vhost has no ready nor unacked message."""

    out = rabbitmqctl("list_queues", "-p", vhost.name, "name", "messages", "--no-table-headers")
    counts = [
        int(line.split()[1])
        for line in out.splitlines()
        if line.split() and line.split()[0].startswith(f"{topic}.")
    ]
    return bool(counts) and sum(counts) == 0
