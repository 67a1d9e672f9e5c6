"""End to end: publish -> relay -> transport -> consumer -> handler, on real servers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from sqlalchemy import select

from outboxer import ConfigurationError, HandlerError, Outbox, OutboxMessage, Status
from outboxer.testing import EmbeddedKafka
from tests.helpers import isolated_settings
from tests.integration.engine_helpers import (
    App,
    all_final,
    build_app,
    drop_app,
    effects,
    publish_many,
    run_until,
    status_counts,
)

pytestmark = pytest.mark.timeout(600)


def _committed_and_end(broker: EmbeddedKafka, topic: str, group: str) -> tuple[int, int, int]:
    """(sum of the group's committed offsets, sum of end offsets, messages in the topic).

    End offsets are found by reading the topic from the start (this broker's
    ListOffsets answer is not reliable), as last offset + 1 per partition.
    """
    reader = Consumer(
        {
            "bootstrap.servers": broker.bootstrap_servers,
            "group.id": f"probe-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    probe = Consumer({"bootstrap.servers": broker.bootstrap_servers, "group.id": group})
    try:
        meta = reader.list_topics(topic, timeout=10)
        parts = [TopicPartition(topic, p, 0) for p in meta.topics[topic].partitions]
        reader.assign(parts)
        end: dict[int, int] = {}
        count, idle = 0, 0
        while idle < 4:
            batch = reader.consume(1000, 0.5)
            idle = 0 if batch else idle + 1
            for m in batch:
                assert m.error() is None, m.error()
                end[m.partition()] = m.offset() + 1
                count += 1
        committed = probe.committed([TopicPartition(topic, p) for p in end], timeout=10)
        return sum(max(tp.offset, 0) for tp in committed), sum(end.values()), count
    finally:
        reader.close()
        probe.close()


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["pg_database", "mysql_database"])
async def test_ten_thousand_events_through_kafka(
    request: pytest.FixtureRequest, kafka_broker: EmbeddedKafka, fixture: str
) -> None:
    url = request.getfixturevalue(fixture).url
    app = build_app(url, kafka_broker.transport_url, n_services=3)
    try:
        publish_many(app, 10_000)
        await run_until([app.outbox], lambda: all_final(app), timeout=300)
        counts = status_counts(app)
        assert counts["consumed"] == 10_000
        assert counts["dead"] == 0
        assert effects(app) == (10_000, 10_000)
        sent = 0
        for svc in app.services:
            route = app.outbox.routes.route_for_service(svc)
            committed, end, count = _committed_and_end(kafka_broker, route.topic, route.group_id)
            assert committed == end, f"{svc}: committed {committed} of {end}"
            sent += count
        assert sent >= 10_000
    finally:
        drop_app(app)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "mariadb", "postgresql"])
async def test_ten_thousand_events_local(
    request: pytest.FixtureRequest, tmp_path: object, backend: str
) -> None:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path}/local.db"
    else:
        fixture = "pg_database" if backend == "postgresql" else "mysql_database"
        url = request.getfixturevalue(fixture).url
    app = build_app(url, "local", n_services=3)
    try:
        publish_many(app, 10_000)
        await run_until([app.outbox], lambda: all_final(app), timeout=300)
        assert status_counts(app)["consumed"] == 10_000
        assert effects(app) == (10_000, 10_000)
        stats = app.outbox.stats
        assert stats.get("consumed") == 10_000
        assert stats.get("published") == 0  # in-process: rows go straight to consumed
    finally:
        drop_app(app)


TRANSPORTS = ["local", "kafka"]


def _transport(request: pytest.FixtureRequest, name: str) -> str:
    if name == "local":
        return "local"
    broker: EmbeddedKafka = request.getfixturevalue("kafka_broker")
    return broker.transport_url


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("isolate", [True, False], ids=["isolated", "fast-path"])
async def test_retry_then_success_and_dead_after_max_retry(
    request: pytest.FixtureRequest, db_url: str, transport: str, isolate: bool
) -> None:
    app = build_app(db_url, _transport(request, transport), max_retry=4, isolate_handlers=isolate)
    app.fail = {0: 2, 1: -1}
    try:
        publish_many(app, 3)
        await run_until([app.outbox], lambda: all_final(app), timeout=120)
        st = app.outbox.store(app.services[0])
        rows = {m.envelope().payload["n"]: m for m in _all_rows(app)}
        assert rows[0].status is Status.CONSUMED
        assert rows[0].retry_count == 2
        assert rows[1].status is Status.DEAD
        assert rows[1].retry_count == 4
        assert rows[1].last_error is not None
        assert rows[1].last_error.startswith("RuntimeError: planned failure for n=1")
        assert rows[2].status is Status.CONSUMED
        assert rows[2].retry_count == 0
        if isolate:  # one handler call per attempt
            assert app.attempts[0] == 3
            assert app.attempts[1] == 4
        else:  # the fast path runs a batch's handlers again after another one failed
            assert app.attempts[0] >= 3
            assert app.attempts[1] >= 4
        # Failed attempts' writes were rolled back with their savepoint.
        assert effects(app) == (2, 2)
        assert st.status().dead == 1
    finally:
        drop_app(app)


def _all_rows(app: App) -> list[OutboxMessage]:
    ob = app.outbox
    out = []
    for svc in app.services:
        table = ob.table_for(svc)
        with ob.db.sync_engine.connect() as conn:
            out.extend(OutboxMessage.from_mapping(r._mapping) for r in conn.execute(select(table)))
    return out


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_event_without_handler_ends_dead_with_reason(
    request: pytest.FixtureRequest, db_url: str, transport: str
) -> None:
    app = build_app(db_url, _transport(request, transport))
    orphan = f"{app.services[0]}.orphaned"
    app.outbox.register_event(orphan, app.services[0])
    try:
        with app.outbox.db.sync_engine.begin() as conn:
            oid = app.outbox.publish(conn, orphan, {"n": 1})
        publish_many(app, 2)
        await run_until([app.outbox], lambda: all_final(app), timeout=120)
        msg = app.outbox.store(app.services[0]).get_by_id(oid)
        assert msg is not None
        assert msg.status is Status.DEAD
        assert msg.last_error is not None
        assert orphan in msg.last_error
        assert "no handler" in msg.last_error
        assert status_counts(app)["consumed"] == 2
    finally:
        drop_app(app)


@pytest.mark.kafka
async def test_garbage_on_the_topic_is_skipped_and_counted(
    pg_database: object, kafka_broker: EmbeddedKafka
) -> None:
    app = build_app(pg_database.url, kafka_broker.transport_url)  # type: ignore[attr-defined]
    route = app.outbox.routes.route_for_service(app.services[0])
    try:
        publish_many(app, 5)

        async def produce_garbage() -> None:
            await asyncio.sleep(0.5)
            producer = Producer({"bootstrap.servers": kafka_broker.bootstrap_servers})
            producer.produce(route.topic, value=b"\xff\x00 not json at all")
            producer.produce(route.topic, value=b"[1, 2, 3]")
            producer.produce(
                route.topic,
                value=json.dumps({"event_type": "x", "payload": {}}).encode(),
            )
            producer.produce(route.topic, value=None, key=b"tombstone")
            producer.flush(10)

        garbage = asyncio.create_task(produce_garbage())
        stats = app.outbox.stats

        def done() -> bool:
            return (
                all_final(app) and stats.get("undecodable") >= 3 and stats.get("no_outbox_id") >= 1
            )

        publish_later = asyncio.create_task(asyncio.to_thread(_later, app))
        await run_until([app.outbox], done, timeout=120)
        await garbage
        await publish_later
        assert stats.get("undecodable") == 3
        assert stats.get("no_outbox_id") == 1
        assert status_counts(app)["consumed"] == 10  # events after the garbage too
        assert effects(app) == (10, 10)
    finally:
        drop_app(app)


def _later(app: App) -> None:
    time.sleep(1.5)
    publish_many(app, 5, start=100)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_two_relays_two_consumers_no_double_effects(
    request: pytest.FixtureRequest, server_url: str, transport: str
) -> None:
    spec = _transport(request, transport)
    one = build_app(server_url, spec, n_services=2, batch_size=50)
    two = build_app(
        server_url, spec, n_services=2, batch_size=50, prefix=one.prefix, effects=one.effects
    )
    try:
        publish_many(one, 3000)
        await run_until([one.outbox, two.outbox], lambda: all_final(one), timeout=240)
        assert status_counts(one)["consumed"] == 3000
        assert effects(one) == (3000, 3000)
        # Both processes did work.
        assert one.outbox.stats.get("consumed") > 0
        assert two.outbox.stats.get("consumed") > 0
    finally:
        two.outbox.close()
        drop_app(one)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_stop_during_busy_run_then_restart_finishes(
    request: pytest.FixtureRequest, server_url: str, transport: str
) -> None:
    spec = _transport(request, transport)
    app = build_app(server_url, spec, n_services=2, batch_size=50)
    try:
        publish_many(app, 4000)

        def some_done() -> bool:
            return status_counts(app)["consumed"] > 0

        # The first run works on one service only and is stopped while busy, so the
        # second run always starts with work left (the other service's 2,000 events).
        await run_until(
            [app.outbox], some_done, timeout=120, run_kwargs={"services": [app.services[0]]}
        )
        first = status_counts(app)["consumed"]
        assert 0 < first <= 2000
        again = build_app(server_url, spec, n_services=2, prefix=app.prefix, effects=app.effects)
        try:
            await run_until([again.outbox], lambda: all_final(app), timeout=240)
        finally:
            again.outbox.close()
        assert status_counts(app)["consumed"] == 4000
        assert effects(app) == (4000, 4000)
    finally:
        drop_app(app)


async def test_sync_handlers_run_off_the_event_loop(db_url: str) -> None:
    app = build_app(db_url, "local", sync_handlers=True, n_services=2)
    try:
        publish_many(app, 500)
        await run_until([app.outbox], lambda: all_final(app), timeout=120)
        assert effects(app) == (500, 500)
        assert app.sync_handler_calls
        on_loop = [call for call in app.sync_handler_calls if call[1]]
        assert on_loop == [], "sync handlers ran on the event loop's thread"
        assert threading.main_thread().name not in {name for name, _ in app.sync_handler_calls}
    finally:
        drop_app(app)


async def test_publish_wakes_the_relay(db_url: str) -> None:
    # A poll interval far longer than the test: only the commit hook can wake the relay.
    app = build_app(db_url, "local", poll_interval=30.0)
    try:
        task = asyncio.create_task(app.outbox.run_async())
        await asyncio.sleep(1.0)
        publish_many(app, 3)
        loop = asyncio.get_running_loop()
        start = loop.time()
        while status_counts(app)["consumed"] < 3:
            assert loop.time() - start < 10, "relay was not woken by the commit"
            await asyncio.sleep(0.05)
        app.outbox.stop()
        await task
    finally:
        drop_app(app)


async def test_a_publish_in_another_process_wakes_the_relay(pg_database: Any) -> None:
    """PostgreSQL: publish NOTIFYs, the worker LISTENs. The publisher here is another
    Outbox that runs no loops (as a web process would), and the worker's poll interval
    is far longer than the test: only the notification can wake it."""
    app = build_app(pg_database.url, "local", poll_interval=30.0)
    publisher = Outbox(pg_database.url, settings=isolated_settings(topic_prefix=app.prefix))
    for svc in app.services:
        publisher.register_event(app.event(svc), svc)
    try:
        task = asyncio.create_task(app.outbox.run_async())
        await asyncio.sleep(1.0)  # let the first (empty) poll happen and LISTEN start
        with publisher.db.sync_engine.begin() as conn:
            publisher.publish(conn, app.event(app.services[0]), {"n": 1})
        loop = asyncio.get_running_loop()
        start = loop.time()
        while status_counts(app)["consumed"] < 1:
            assert loop.time() - start < 15, "the relay was not woken by the notification"
            await asyncio.sleep(0.05)
        app.outbox.stop()
        await task
    finally:
        publisher.close()
        drop_app(app)


def test_handler_registration_errors(tmp_path: object) -> None:
    app = build_app(f"sqlite:///{tmp_path}/h.db", handlers=True)
    ob = app.outbox
    with pytest.raises(HandlerError, match="already has a handler"):
        ob.register_handler(app.event(app.services[0]), lambda e, tx: None)
    with pytest.raises(HandlerError, match="must accept"):
        ob.register_handler("other.event", lambda e: None)  # type: ignore[arg-type,misc]

    @ob.handler("orphan.event")
    def orphan(event: object, tx: object) -> None: ...

    with pytest.raises(HandlerError, match=r"orphan\.event"):
        ob.run()
    drop_app(app)


def test_bad_transport_and_local_relay_only(tmp_path: object) -> None:
    with pytest.raises(ConfigurationError, match="unknown transport"):
        Outbox(f"sqlite:///{tmp_path}/t.db", transport="carrier-pigeon://x")
    with pytest.raises(ConfigurationError, match="no bootstrap"):
        Outbox(f"sqlite:///{tmp_path}/t.db", transport="kafka://")
    app = build_app(f"sqlite:///{tmp_path}/t.db")
    with pytest.raises(ConfigurationError, match="in-process"):
        app.outbox.run(relay=True, consume=False)
    drop_app(app)


def test_run_refuses_missing_tables(tmp_path: object) -> None:
    ob = Outbox(f"sqlite:///{tmp_path}/m.db", settings=isolated_settings())
    ob.register_handler("a.b", lambda e, tx: None, service="svc_" + uuid.uuid4().hex[:6])
    with pytest.raises(ConfigurationError, match="migrate"):
        ob.run()
    ob.close()


@pytest.mark.kafka
async def test_relay_only_and_consume_only_processes(
    pg_database: object, kafka_broker: EmbeddedKafka
) -> None:
    url = pg_database.url  # type: ignore[attr-defined]
    relayer = build_app(url, kafka_broker.transport_url, n_services=2, handlers=False)
    consumer = build_app(
        url,
        kafka_broker.transport_url,
        n_services=2,
        prefix=relayer.prefix,
        effects=relayer.effects,
    )
    try:
        publish_many(relayer, 300)
        relay_task = asyncio.create_task(relayer.outbox.run_async(consume=False))
        await run_until(
            [consumer.outbox], lambda: all_final(relayer), timeout=120, run_kwargs={"relay": False}
        )
        relayer.outbox.stop()
        await relay_task
        assert status_counts(relayer)["consumed"] == 300
        assert effects(relayer) == (300, 300)
        assert relayer.outbox.stats.get("published") > 0
        assert relayer.outbox.stats.get("consumed") == 0
        assert consumer.outbox.stats.get("claimed") == 0
        assert consumer.outbox.stats.get("consumed") == 300
    finally:
        consumer.outbox.close()
        drop_app(relayer)


@pytest.mark.kafka
async def test_messages_lost_by_the_broker_are_sent_again(pg_database: object) -> None:
    url = pg_database.url  # type: ignore[attr-defined]
    with EmbeddedKafka() as first_broker:
        app = build_app(url, first_broker.transport_url, redeliver_after=1.0)
        publish_many(app, 50)
        await run_until(
            [app.outbox],
            lambda: status_counts(app)["published"] == 50,
            timeout=60,
            run_kwargs={"consume": False},
        )
    # The broker is gone with everything it acknowledged (it keeps nothing on disk).
    try:
        with EmbeddedKafka() as second_broker:
            again = build_app(
                url,
                second_broker.transport_url,
                redeliver_after=1.0,
                prefix=app.prefix,
                effects=app.effects,
            )
            try:
                await run_until([again.outbox], lambda: all_final(app), timeout=120)
            finally:
                again.outbox.close()
        assert status_counts(app)["consumed"] == 50
        assert effects(app) == (50, 50)
        # Every row was sent again at least once; while the new consumer group was still
        # joining (longer than redeliver_after here), some were sent more than once,
        # and the consumer skipped the repeats.
        assert again.outbox.stats.get("redelivered") >= 50
        assert again.outbox.stats.get("consumed") == 50
    finally:
        drop_app(app)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_one_outbox_runs_again_after_a_stop(
    request: pytest.FixtureRequest, tmp_path: object, transport: str
) -> None:
    """run() twice on the same Outbox, each in its own event loop (asyncio.run)."""
    app = build_app(f"sqlite:///{tmp_path}/again.db", _transport(request, transport))
    try:
        for round_ in range(2):
            publish_many(app, 20, start=round_ * 100)

            async def until_done() -> None:
                await run_until([app.outbox], lambda: all_final(app), timeout=60)

            asyncio.run(until_done())
        assert status_counts(app)["consumed"] == 40
        assert effects(app) == (40, 40)
    finally:
        drop_app(app)


BLOCKING_APP = """
import asyncio, pathlib, sys, time
from outboxer import Outbox, OutboxSettings

db, marker = sys.argv[1], pathlib.Path(sys.argv[2])
outbox = Outbox(f"sqlite:///{db}", settings=OutboxSettings.from_values(shutdown_timeout=1.0))
outbox.register_event("slow.e", "slow")

@outbox.handler("slow.e")
def handle(event, tx):
    try:
        asyncio.get_running_loop()
        where = "on the event loop"
    except RuntimeError:
        where = "off the event loop"
    marker.write_text(where)
    time.sleep(60)  # a handler stuck on something without a timeout

outbox.migrate()
with outbox.db.sync_engine.begin() as conn:
    outbox.publish(conn, "slow.e", {"n": 1})
outbox.run()
"""


def test_stop_is_bounded_even_with_a_blocked_sync_handler(tmp_path: Path) -> None:
    script = tmp_path / "blocking.py"
    script.write_text(BLOCKING_APP)
    marker = tmp_path / "started"
    db = tmp_path / "slow.db"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(db), str(marker)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while not (marker.exists() and marker.read_text()):
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "handler never started"
            time.sleep(0.05)
        # A handler blocking the loop would also block the stop this test times.
        assert marker.read_text() == "off the event loop"
        sent = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=20)[0].decode()
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    assert took < 10, f"stop took {took:.1f}s with shutdown_timeout=1"
    with sqlite3.connect(db) as conn:
        # The interrupted batch never committed: the row will be delivered again.
        assert conn.execute("SELECT status FROM slow_outbox_messages").fetchall() == [("pending",)]
