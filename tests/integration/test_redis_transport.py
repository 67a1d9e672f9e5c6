"""The Redis Streams transport on the real server: what the contract suite cannot
say for every broker (lane leases, a server that lost its data, replicas, trimming,
streams that must exist), the README's app with only its transport URL changed, and
the inbox of a consumer with its own database.

Every key a test creates starts with a prefix of its own and is deleted after it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from outboxer import Status
from outboxer.demo import run_demo
from outboxer.errors import TransportError
from outboxer.routing import ServiceRoute
from outboxer.transports.base import IncomingMessage, OutgoingMessage
from outboxer.transports.redis import RedisSettings
from outboxer.transports.redis.subscription import RedisSubscription
from outboxer.transports.redis.transport import RedisTransport
from tests.helpers import delete_redis_keys, redis_prefix
from tests.integration.engine_helpers import run_until
from tests.integration.test_demo import _check, _console
from tests.integration.test_inbox import EVENTS, Pair
from tests.integration.test_readme_app import _argv, _blocks, _commands, _invoices

pytestmark = [pytest.mark.redis, pytest.mark.timeout(180)]


@pytest.fixture
def prefix(redis_server: str) -> Iterator[str]:
    key_prefix = redis_prefix()
    yield key_prefix
    delete_redis_keys(redis_server, key_prefix)


@pytest.fixture
def raw(redis_server: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server)
    yield client
    client.close()


def _transport(url: str, prefix: str, **values: Any) -> RedisTransport:
    return RedisTransport(url, settings=RedisSettings(key_prefix=prefix, **values))


def _route() -> ServiceRoute:
    name = f"svc_{uuid.uuid4().hex[:8]}"
    return ServiceRoute(name, f"{name}_outbox", f"t.{name}", f"t.{name}.g")


def _messages(count: int, key: str = "k", start: int = 1) -> list[OutgoingMessage]:
    return [
        OutgoingMessage(i, 0, key, json.dumps({"id": i}).encode(), f"e-{i}", "t.sent", "v1")
        for i in range(start, start + count)
    ]


def _ids(messages: list[IncomingMessage]) -> list[int]:
    return [json.loads(m.value or b"{}")["id"] for m in messages]


async def _collect(
    sub: RedisSubscription, count: int, timeout: float = 30
) -> list[IncomingMessage]:
    got: list[IncomingMessage] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        assert time.monotonic() < deadline, f"received {len(got)} of {count}"
        got.extend(await sub.receive(count - len(got), 0.2))
    return got


# ---------------------------------------------------------------------- lanes


async def test_a_lane_has_one_reader_and_a_dead_readers_lane_moves_in_order(
    redis_server: str, prefix: str
) -> None:
    transport = _transport(redis_server, prefix, lanes=1, lane_lease=1.0)
    route = _route()
    await transport.start([route])
    first = await transport.subscribe(route)
    second = await transport.subscribe(route)
    await transport.send(route, _messages(6))
    got = await _collect(first, 6)
    assert _ids(got) == [1, 2, 3, 4, 5, 6]
    # The lane is the first reader's: the second gets nothing while its lease lasts.
    assert await second.receive(10, 0.3) == []
    await first.ack(got[:2])
    # The first reader dies (no close, no renewal): its lease expires, the second
    # takes the lane and gets the unacknowledged entries first, in order.
    first._closed = True
    await transport.send(route, _messages(2, start=7))
    again = await _collect(second, 6, timeout=15)
    assert _ids(again) == [3, 4, 5, 6, 7, 8]
    await second.ack(again)
    assert await second.receive(10, 0.3) == []
    await first._drop_client()
    await transport.close()


async def test_a_paused_reader_cannot_acknowledge_after_losing_its_lane(
    redis_server: str, prefix: str, raw: redis.Redis
) -> None:
    transport = _transport(redis_server, prefix, lanes=1, lane_lease=1.0)
    route = _route()
    await transport.start([route])
    paused = await transport.subscribe(route)
    await transport.send(route, _messages(3))
    got = await _collect(paused, 3)
    await asyncio.sleep(1.3)  # paused past its lease
    other = await transport.subscribe(route)
    taken = await _collect(other, 3)
    assert _ids(taken) == [1, 2, 3]
    await paused.ack(got)  # refused: the lease is the other's now
    stream = transport.topology.stream(route.topic, 0)
    assert raw.xpending(stream, route.group_id)["pending"] == 3
    assert paused.lost_leases == 1
    await other.ack(taken)
    assert raw.xpending(stream, route.group_id)["pending"] == 0
    await transport.close()


async def test_entries_left_idle_by_another_consumer_are_claimed(
    redis_server: str, prefix: str, raw: redis.Redis
) -> None:
    transport = _transport(redis_server, prefix, lanes=1, claim_idle=1.0)
    route = _route()
    await transport.start([route])
    sub = await transport.subscribe(route)
    assert await sub.receive(10, 0.1) == []  # holds the lane from now on
    await transport.send(route, _messages(2))
    stream = transport.topology.stream(route.topic, 0)
    # A former holder paused past its lease reads them after all, then stops.
    stale = raw.xreadgroup(route.group_id, "stale-reader", {stream: ">"}, count=10)
    assert len(stale[0][1]) == 2
    got = await _collect(sub, 2, timeout=10)  # once idle for claim_idle
    assert _ids(got) == [1, 2]
    consumers = {c["name"]: c["pending"] for c in raw.xinfo_consumers(stream, route.group_id)}
    assert consumers[b"stale-reader"] == 0
    await sub.ack(got)
    assert raw.xpending(stream, route.group_id)["pending"] == 0
    await transport.close()


async def test_lanes_spread_keys_and_keep_each_keys_order(redis_server: str, prefix: str) -> None:
    transport = _transport(redis_server, prefix, lanes=4)
    route = _route()
    await transport.start([route])
    sub = await transport.subscribe(route)
    keys = [f"key-{n}" for n in range(12)]
    sent = [m for n in range(5) for m in _messages(1, keys[n * 7 % 12], start=100 + n)]
    sent += [
        OutgoingMessage(i, 0, keys[i % 12], json.dumps({"id": i}).encode(), f"e{i}", "t", "v1")
        for i in range(1, 61)
    ]
    await transport.send(route, sent)
    got = await _collect(sub, len(sent))
    lanes = {m.position[0] for m in got}
    assert len(lanes) > 1
    by_key: dict[bytes | None, list[int]] = {}
    for m in got:
        by_key.setdefault(m.key, []).append(_ids([m])[0])
    expected: dict[bytes | None, list[int]] = {}
    for m in sent:
        expected.setdefault(m.key.encode(), []).append(json.loads(m.value)["id"])
    assert by_key == expected
    await sub.ack(got)
    await transport.close()


# ---------------------------------------------------------------------- the server


async def test_streams_and_groups_lost_by_the_server_are_created_again(
    redis_server: str, prefix: str, raw: redis.Redis
) -> None:
    transport = _transport(redis_server, prefix, lanes=2)
    route = _route()
    await transport.start([route])
    sub = await transport.subscribe(route)
    await transport.send(route, _messages(2))
    await sub.ack(await _collect(sub, 2))
    # What a restart without persistence does: the streams and their groups are gone.
    raw.delete(*transport.topology.streams(route.topic))
    await transport.send(route, _messages(3, start=10))
    got = await _collect(sub, 3)
    assert sorted(_ids(got)) == [10, 11, 12]
    await sub.ack(got)
    await transport.close()


async def test_streams_that_must_exist_are_waited_for_then_refused(
    redis_server: str, prefix: str
) -> None:
    transport = _transport(redis_server, prefix, create_streams=False, stream_wait_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(TransportError, match=r"redis\.stream_wait_timeout"):
        await transport.start([_route()])
    assert time.monotonic() - started >= 1.0
    await transport.close()


async def test_an_unreachable_server_at_start_is_a_clear_error(prefix: str) -> None:
    from outboxer.testing import free_port  # noqa: PLC0415

    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    transport = _transport(url, prefix, stream_wait_timeout=1.0, socket_timeout=1.0)
    with pytest.raises(TransportError, match="unreachable") as caught:
        await transport.start([_route()])
    assert "secret" not in str(caught.value) + repr(caught.value.context)
    await transport.close()


async def test_missing_replicas_make_a_batch_transient(redis_server: str, prefix: str) -> None:
    transport = _transport(redis_server, prefix, wait_replicas=1, wait_timeout=0.2)
    route = _route()
    await transport.start([route])
    deliveries = await transport.send(route, _messages(3))
    # The test server has no replica: nothing counts as sent, no attempt is spent.
    assert all(not d.ok and d.transient and not d.permanent for d in deliveries)
    assert "0 of 1 replica" in str(deliveries[0].error)
    await transport.close()


async def test_trimming_keeps_about_maxlen_entries(
    redis_server: str, prefix: str, raw: redis.Redis
) -> None:
    transport = _transport(redis_server, prefix, lanes=1, maxlen=100)
    route = _route()
    await transport.start([route])
    for start in range(1, 2001, 500):
        assert all(d.ok for d in await transport.send(route, _messages(500, start=start)))
    length = raw.xlen(transport.topology.stream(route.topic, 0))
    assert 100 <= length < 2000  # "~": trimmed by whole macro nodes, never below maxlen
    await transport.close()


# ---------------------------------------------------------------------- apps


def test_the_readme_app_runs_on_redis_with_only_its_url_changed(
    tmp_path: Path, redis_server: str, prefix: str
) -> None:
    app = next(b for b in _blocks("python") if b.startswith("# app.py"))
    assert "outbox = Outbox(DB)" in app
    app = app.replace("outbox = Outbox(DB)", f'outbox = Outbox(DB, transport="{redis_server}")')
    (tmp_path / "app.py").write_text(app)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOXER_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), env.get("PYTHONPATH")) if p)
    env["OUTBOXER_REDIS__KEY_PREFIX"] = prefix  # this test's own keys on the shared server
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
    client = redis.Redis.from_url(redis_server)
    try:
        assert client.keys(prefix + "*"), "the app did not go through Redis"
    finally:
        client.close()


class _Server:
    def __init__(self, url: str) -> None:
        self.transport_url = url


async def test_the_inbox_applies_each_event_once_over_redis(
    pg_database: Any, mysql_database: Any, redis_server: str
) -> None:
    pair = Pair(pg_database.url, mysql_database.url, _Server(redis_server))  # type: ignore[arg-type]
    pair.flaky = {7: 1, 11: 2}
    try:
        pair.publish(EVENTS)

        def done() -> bool:
            return pair.inbox()[Status.CONSUMED.value] >= EVENTS

        await run_until([pair.producer, pair.consumer], done, timeout=120)
        assert pair.effects() == (EVENTS, EVENTS)
        counts = pair.inbox()
        assert counts[Status.CONSUMED.value] == EVENTS
        assert counts[Status.DEAD.value] == 0
        assert pair.producer.store("orders").status().counts[Status.PUBLISHED.value] == EVENTS
    finally:
        pair.drop()
        delete_redis_keys(redis_server, pair.prefix)


def test_the_demo_runs_on_redis_and_leaves_no_keys(
    tmp_path: Path, redis_server: str, raw: redis.Redis
) -> None:
    before = set(raw.scan_iter(match="demo.*"))
    console, out = _console()
    db = tmp_path / "demo.db"
    summary = run_demo(
        200, transport="redis", db_path=db, console=console, timeout=120, transport_url=redis_server
    )
    _check(summary, 200, db)
    assert summary.transport == "redis"
    assert "redis transport" in out.getvalue()
    assert set(raw.scan_iter(match="demo.*")) == before
