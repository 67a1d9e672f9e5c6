"""Blocked keys of ordered services on SQLite, PostgreSQL and MariaDB: the listing
(failing head, dead head when dead blocks, parked keys), the operator's actions
(retry the head, skip it, park, release), each audited, and park honoured by the
consumer: a parked key's events are not handled until it is released."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.orm import Session

from outboxer import Envelope, Outbox, Status
from outboxer.errors import ConfigurationError, MessageNotFoundError
from outboxer.testing import InMemoryTransport
from tests.helpers import drop_tables, isolated_settings
from tests.integration.engine_helpers import run_until


def _outbox(url: str, service: str, **settings: Any) -> Outbox:
    values: dict[str, Any] = {
        "retry_unit": 0.02,
        "poll_interval": 0.05,
        "topic_prefix": service,
        "max_retry": 5,
        **settings,
    }
    ob = Outbox(url, transport=InMemoryTransport(), settings=isolated_settings(**values))
    ob.register_service(service, ordered=True)
    ob.register_event(f"{service}.entry", service)
    ob.register_event(f"{service}_plain.entry", f"{service}_plain")
    return ob


@pytest.fixture
def ob(db_url: str, service: str) -> Iterator[Outbox]:
    outbox = _outbox(db_url, service, retry_unit=60)  # a failed event waits a minute
    outbox.migrate()
    yield outbox
    drop_tables(outbox)
    outbox.close()


def _blocked_gauge(ob: Outbox, service: str) -> dict[str, float]:
    """The ``outboxer_blocked_keys`` samples of ``service``, as a scrape reads them."""
    from outboxer.metrics import PrometheusMetrics  # noqa: PLC0415 - the prometheus extra

    metrics = PrometheusMetrics(ob.admin, min_interval=0)
    return {
        s.labels["by"]: s.value
        for family in metrics.registry.collect()
        if family.name == "outboxer_blocked_keys"
        for s in family.samples
        if s.labels["service"] == service
    }


def _publish(ob: Outbox, service: str, items: list[tuple[str, int]]) -> list[int]:
    with Session(ob.db.sync_engine) as session, session.begin():
        return [ob.publish(session, f"{service}.entry", {"n": n}, key=k) for k, n in items]


def test_failing_head_listed_retried_then_skipped(ob: Outbox, service: str) -> None:
    a, b, c = _publish(ob, service, [("k", 0), ("k", 1), ("k", 2)])
    [other] = _publish(ob, service, [("other", 0)])
    store = ob.store(service)
    assert ob.admin.blocked_keys() == []
    assert store.mark_failed_for_retry(a, "RuntimeError: ledger closed") is Status.PENDING

    [blocked] = ob.admin.blocked_keys([service])
    assert (blocked.message_key, blocked.by, blocked.waiting) == ("k", "failing", 2)
    assert blocked.head is not None
    assert blocked.head.id == a
    assert blocked.head.last_error == "RuntimeError: ledger closed"
    assert blocked.since == blocked.head.created_at

    # Retry now: due at once, its attempts kept.
    before = store.get_by_id(a)
    assert before is not None
    assert ob.admin.retry_head(service, "k", actor="alice") == a
    after = store.get_by_id(a)
    assert after is not None
    assert after.retry_count == 1
    assert after.next_retry_at is not None
    assert before.next_retry_at is not None
    assert after.next_retry_at < before.next_retry_at
    # Skip: dead with the reason; with the default ordered_after_dead = "skip" the
    # key is no longer held.
    with pytest.raises(ConfigurationError, match="reason"):
        ob.admin.skip_head(service, "k", "  ", actor="bob")
    assert ob.admin.skip_head(service, "k", "amount is wrong", actor="bob") == a
    skipped = store.get_by_id(a)
    assert skipped is not None
    assert skipped.status is Status.DEAD
    assert skipped.last_error == "skipped by an operator: amount is wrong"
    assert ob.admin.blocked_keys([service]) == []
    with pytest.raises(MessageNotFoundError):
        ob.admin.retry_head(service, "other", actor="alice")  # nothing failing there
    entries = ob.admin.audit(services=[service]).entries
    assert [(e.action, e.actor, e.outbox_ids) for e in entries] == [
        ("skip", "bob", [a]),
        ("retry", "alice", [a]),
    ]
    assert entries[0].detail == {"key": "k", "reason": "amount is wrong"}
    # The events behind the head, and the other key's, are untouched.
    rest = [store.get_by_id(i) for i in (b, c, other)]
    assert [(r.status, r.retry_count) for r in rest if r is not None] == [(Status.PENDING, 0)] * 3
    with pytest.raises(ConfigurationError, match="not ordered"):
        ob.admin.park(f"{service}_plain", "k", actor="alice")
    with pytest.raises(ConfigurationError, match="not ordered"):
        ob.admin.blocked_keys([f"{service}_plain"])


def test_a_dead_head_blocks_when_dead_blocks(db_url: str, service: str) -> None:
    ob = _outbox(db_url, service, ordered_after_dead="block")
    ob.migrate()
    try:
        a, _ = _publish(ob, service, [("k", 0), ("k", 1)])
        ob.store(service).mark_dead(a, "ValueError: bad")
        [blocked] = ob.admin.blocked_keys()
        assert (blocked.by, blocked.waiting, blocked.head.id) == ("dead", 1, a)  # type: ignore[union-attr]
        assert ob.admin.retry_head(service, "k", actor="alice") == a
        row = ob.store(service).get_by_id(a)
        assert row is not None
        assert (row.status, row.retry_count, row.requeue_count) == (Status.PENDING, 0, 1)
    finally:
        drop_tables(ob)
        ob.close()


async def test_a_parked_key_is_not_handled_until_released(db_url: str, service: str) -> None:
    ob = _outbox(db_url, service)
    handled: list[tuple[str, int]] = []

    def handle(event: Envelope, tx: Session) -> None:
        handled.append((event.aggregate_id, event.payload["n"]))

    ob.register_handler(f"{service}.entry", handle)
    ob.migrate()
    store = ob.store(service)
    try:
        assert ob.admin.park(service, "held", reason="bad import", actor="alice") is True
        assert ob.admin.park(service, "held", actor="alice") is False
        held = _publish(ob, service, [("held", 0), ("free", 1), ("held", 2), ("free", 3)])[::2]

        def free_done_and_held_deferred() -> bool:
            if store.status().counts[Status.CONSUMED.value] < 2:
                return False
            rows = [store.get_by_id(i) for i in held]
            # Deferred by the consumer for the park's wait, without an attempt.
            return all(
                r is not None
                and r.next_retry_at is not None
                and r.next_retry_at - r.updated_at > timedelta(seconds=5)
                for r in rows
            )

        await run_until([ob], free_done_and_held_deferred, timeout=60)
        assert handled == [("free", 1), ("free", 3)]
        for oid in held:
            row = store.get_by_id(oid)
            assert row is not None
            assert (row.status, row.retry_count) == (Status.PENDING, 0)
        [blocked] = ob.admin.blocked_keys([service])
        assert (blocked.message_key, blocked.by, blocked.waiting) == ("held", "parked", 2)
        assert _blocked_gauge(ob, service) == {"failing": 0, "dead": 0, "parked": 1}
        assert (blocked.parked_by, blocked.reason) == ("alice", "bad import")
        assert blocked.head is not None
        assert blocked.head.id == held[0]

        assert ob.admin.release(service, "held", actor="bob") == 2
        with pytest.raises(MessageNotFoundError, match="not parked"):
            ob.admin.release(service, "held", actor="bob")

        def all_done() -> bool:
            return store.status().counts[Status.CONSUMED.value] == 4

        await run_until([ob], all_done, timeout=60)
        assert handled[2:] == [("held", 0), ("held", 2)]
        assert ob.admin.blocked_keys([service]) == []
        assert _blocked_gauge(ob, service) == {"failing": 0, "dead": 0, "parked": 0}
        actions = [(e.action, e.actor) for e in ob.admin.audit(services=[service]).entries]
        assert actions == [("release", "bob"), ("park", "alice")]
    finally:
        drop_tables(ob)
        await ob.aclose()


def test_retry_takes_the_failing_head_not_an_earlier_dead_event(ob: Outbox, service: str) -> None:
    # With ordered_after_dead = "skip" a dead event holds nothing: the head of the key
    # is its earliest open event, and "retry now" must retry that one, never requeue
    # an event that went dead before it (here one an operator skipped).
    a, b, _ = _publish(ob, service, [("k", 0), ("k", 1), ("k", 2)])
    store = ob.store(service)
    assert store.mark_failed_for_retry(a, "RuntimeError: first") is Status.PENDING
    assert ob.admin.skip_head(service, "k", "amount is wrong", actor="bob") == a
    assert store.mark_failed_for_retry(b, "RuntimeError: second") is Status.PENDING
    [blocked] = ob.admin.blocked_keys([service])
    assert blocked.head is not None
    assert blocked.head.id == b

    assert ob.admin.retry_head(service, "k", actor="alice") == b
    skipped = store.get_by_id(a)
    assert skipped is not None
    assert skipped.status is Status.DEAD
    retried = store.get_by_id(b)
    assert retried is not None
    assert (retried.status, retried.retry_count) == (Status.PENDING, 1)


def test_skip_leaves_a_key_whose_failing_head_went_through(ob: Outbox, service: str) -> None:
    # The operator saw the head failing; it succeeded on its retry before the skip
    # came. The next event of the key holds nothing: it must not be killed in its
    # place.
    a, b = _publish(ob, service, [("k", 0), ("k", 1)])
    store = ob.store(service)
    assert store.mark_failed_for_retry(a, "RuntimeError: ledger closed") is Status.PENDING
    [blocked] = ob.admin.blocked_keys([service])
    assert blocked.head is not None
    assert blocked.head.id == a
    store.mark_consumed(a)  # the retry went through

    with pytest.raises(MessageNotFoundError):
        ob.admin.skip_head(service, "k", "amount is wrong", actor="bob")
    row = store.get_by_id(b)
    assert row is not None
    assert (row.status, row.retry_count) == (Status.PENDING, 0)
    assert ob.admin.audit(services=[service]).entries == []


def test_skip_takes_the_head_of_a_parked_key(ob: Outbox, service: str) -> None:
    # A parked key holds even a head that never failed: skipping it is the operator's
    # way to drop that event and release the rest later.
    a, b = _publish(ob, service, [("k", 0), ("k", 1)])
    assert ob.admin.park(service, "k", actor="alice") is True
    assert ob.admin.skip_head(service, "k", "duplicate import", actor="bob") == a
    store = ob.store(service)
    skipped = store.get_by_id(a)
    assert skipped is not None
    assert skipped.status is Status.DEAD
    row = store.get_by_id(b)
    assert row is not None
    assert row.status is Status.PENDING


def test_keys_are_trimmed_as_park_trims_them(ob: Outbox, service: str) -> None:
    # Keys are stored trimmed (publish and park trim them): every action on a key
    # trims it the same way, so the key an operator parked is the key they release.
    a, _ = _publish(ob, service, [("k", 0), ("k", 1)])
    store = ob.store(service)
    assert store.mark_failed_for_retry(a, "RuntimeError: ledger closed") is Status.PENDING
    assert ob.admin.retry_head(service, " k ", actor="alice") == a
    assert ob.admin.park(service, " k ", actor="alice") is True
    assert ob.admin.release(service, "k ", actor="alice") >= 0
    assert ob.admin.skip_head(service, "\tk", "amount is wrong", actor="bob") == a
