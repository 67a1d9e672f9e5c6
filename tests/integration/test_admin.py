"""outbox.admin: dead letters, requeue notes, purge in batches, the sweep's lock."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session

from outboxer import (
    AmbiguousMessageError,
    InvalidEventError,
    MessageNotFoundError,
    Outbox,
    Status,
)
from outboxer.admin import Search
from outboxer.database.locks import single_instance
from outboxer.database.ops.tools import RowFilter
from outboxer.retention import SWEEP_LOCK, Sweeper
from outboxer.settings import RetentionSettings
from tests.helpers import backdate, drop_tables, make_outbox


@pytest.fixture
def two(db_url: str, service: str) -> Iterator[Outbox]:
    ob = make_outbox(db_url)
    ob.register_event(f"{service}.a", service)
    ob.register_event(f"{service}.b", service)
    ob.register_event(f"{service}_2.c", f"{service}_2")
    ob.migrate()
    yield ob
    drop_tables(ob)
    ob.close()


def _dead(ob: Outbox, service: str, event: str, n: int) -> list[int]:
    store = ob.store(service)
    ids = [store.create_message(event, f"k{i}", {"i": i}) for i in range(n)]
    for oid in ids:
        store.mark_dead(oid, f"boom {oid}\nframe")
    return ids


def test_dead_letters_filter_and_page_across_services(two: Outbox, service: str) -> None:
    a = _dead(two, service, f"{service}.a", 3)
    b = _dead(two, service, f"{service}.b", 1)
    c = _dead(two, f"{service}_2", f"{service}_2.c", 2)
    seen: list[tuple[str, int]] = []
    after = None
    while True:
        page = two.admin.dead_letters(limit=2, after=after)
        seen += [(m.service_name, m.id) for m in page.messages]
        if page.next_after is None:
            break
        after = page.next_after
    expected = [(service, i) for i in sorted(a + b)] + [(f"{service}_2", i) for i in c]
    assert seen == expected
    only_b = two.admin.dead_letters(services=[service], event_type=f"{service}.b")
    assert [m.id for m in only_b.messages] == b
    backdate(two, service, a[0], "updated_at", 3600)
    old = two.admin.dead_letters(services=[service], older_than=1800)
    assert [m.id for m in old.messages] == [a[0]]
    recent = two.admin.dead_letters(services=[service], newer_than=1800)
    assert [m.id for m in recent.messages] == sorted(a[1:] + b)


async def test_requeue_keeps_a_note_and_narrows(two: Outbox, service: str) -> None:
    a = _dead(two, service, f"{service}.a", 2)
    b = _dead(two, service, f"{service}.b", 2)
    backdate(two, service, a[0], "updated_at", 3600)
    assert two.admin.requeue(services=[service], since=1800, dry_run=True) == {service: 3}
    assert two.admin.requeue(services=[service], event_type=f"{service}.b") == {service: 2}
    assert await two.admin.requeue_async([a[1]]) == {service: 1}
    row = two.store(service).get_by_id(a[1])
    assert row is not None
    assert (row.status, row.retry_count, row.requeue_count) == (Status.PENDING, 0, 1)
    assert row.requeued_at is not None
    assert row.next_retry_at is not None
    assert row.last_error == f"boom {a[1]}\nframe"
    # Requeued twice: the count goes on.
    two.store(service).mark_dead(a[1], "again")
    two.admin.requeue([a[1]])
    again = two.store(service).get_by_id(a[1])
    assert again is not None
    assert again.requeue_count == 2
    # Only dead rows are requeued; an id that is not dead is refused.
    with pytest.raises(MessageNotFoundError, match=str(b[0])):
        two.admin.requeue([b[0]])
    with pytest.raises(ValueError, match="name the dead letters"):
        two.admin.requeue()
    assert two.store(service).get_by_id(a[0]).status is Status.DEAD  # type: ignore[union-attr]


async def test_each_async_twin_answers_as_its_sync_face(two: Outbox, service: str) -> None:
    """The read-only tools' async twins find the same rows, pages and errors."""
    a = _dead(two, service, f"{service}.a", 3)
    c = _dead(two, f"{service}_2", f"{service}_2.c", 2)
    live = two.store(service).create_message(f"{service}.b", "live", {"x": 1})
    backdate(two, service, a[0], "updated_at", 3600)
    admin = two.admin
    try:

        def ids(page: object) -> list[tuple[str, int]]:
            return [(m.service_name, m.id) for m in page.messages]  # type: ignore[attr-defined]

        for kwargs in ({"limit": 2}, {"services": [service], "older_than": 1800.0}, {}):
            sync_page = admin.dead_letters(**kwargs)  # type: ignore[arg-type]
            async_page = await admin.dead_letters_async(**kwargs)  # type: ignore[arg-type]
            assert ids(async_page) == ids(sync_page)
            assert async_page.next_after == sync_page.next_after
        assert ids(await admin.dead_letters_async(limit=2)) == [
            (service, a[0]),
            (service, a[1]),
        ]
        for search in (Search(), Search(status=Status.PENDING), Search(key="live")):
            sync_found = admin.search(search, limit=2)
            async_found = await admin.search_async(search, limit=2)
            assert ids(async_found) == ids(sync_found)
            assert async_found.next_before == sync_found.next_before
        assert ids(await admin.search_async(Search(key="live"))) == [(service, live)]
        assert (await admin.message_async(c[1], service=f"{service}_2")).id == c[1]
        assert (await admin.message_async(live)).event_type == f"{service}.b"
        with pytest.raises(MessageNotFoundError):
            await admin.message_async(10**9)
        async_status = (await admin.status_async([service]))[0][1]
        sync_status = admin.status([service])[0][1]
        assert async_status is not None
        assert sync_status is not None
        assert (async_status.counts, async_status.due, async_status.dead) == (
            sync_status.counts,
            sync_status.due,
            sync_status.dead,
        )
        assert {k: n for k, n in async_status.counts.items() if n} == {"dead": 3, "pending": 1}
        sync_activity = admin.activity([service], minutes=5)
        async_activity = await admin.activity_async([service], minutes=5)
        assert async_activity == sync_activity
        assert async_activity is not None
    finally:
        await two.aclose()  # the async pool belongs to this test's event loop


def test_ids_in_several_tables_are_ambiguous(two: Outbox, service: str) -> None:
    [x] = _dead(two, service, f"{service}.a", 1)
    [y] = _dead(two, f"{service}_2", f"{service}_2.c", 1)
    assert x == y  # both tables start at 1
    with pytest.raises(AmbiguousMessageError, match="name the service"):
        two.admin.message(x)
    with pytest.raises(AmbiguousMessageError):
        two.admin.requeue([x])
    assert two.admin.message(x, service=f"{service}_2").event_type == f"{service}_2.c"
    assert two.admin.requeue([x], services=[service]) == {service: 1}


async def test_purge_in_batches_only_what_is_old_enough(two: Outbox, service: str) -> None:
    store = two.store(service)
    consumed = [store.create_message(f"{service}.a", "k", {"i": i}) for i in range(7)]
    for oid in consumed:
        store.mark_consumed(oid)
    fresh = store.create_message(f"{service}.a", "k", {})
    store.mark_consumed(fresh)
    pending = store.create_message(f"{service}.a", "k", {})
    published = store.create_message(f"{service}.a", "k", {})
    store.mark_published(published)
    [dead] = _dead(two, service, f"{service}.a", 1)
    # A cancelled event is done as a consumed one is: it goes with them.
    with Session(two.db.sync_engine) as session, session.begin():
        cancelled = two.publish(session, f"{service}.a", {}, event_id="gone")
    assert two.admin.cancel("gone", service=service)
    for oid in [*consumed, pending, published, dead, cancelled]:
        backdate(two, service, oid, "updated_at", 7200, relative_to=fresh)
    calls: list[tuple[str, Status, int]] = []
    result = two.admin.purge(
        consumed_older_than=3600,
        services=[service],
        batch_size=3,
        progress=lambda *a: calls.append(a),
    )
    assert result.deleted == {(service, Status.CONSUMED): 7, (service, Status.CANCELLED): 1}
    assert calls == [
        (service, Status.CONSUMED, 3),
        (service, Status.CONSUMED, 6),
        (service, Status.CONSUMED, 7),
        (service, Status.CANCELLED, 1),
    ]
    remaining = {m.id for m in store.find(_everything(), 100)}
    assert remaining == {fresh, pending, published, dead}
    # Published rows of a service with handlers here are kept; dead ones go on request.
    two.register_handler(f"{service}.a", lambda e, tx: None)
    result = await two.admin.purge_async(
        published_older_than=3600, dead_older_than=3600, services=[service]
    )
    assert result.deleted == {(service, Status.DEAD): 1}
    assert result.skipped
    assert {m.id for m in store.find(_everything(), 100)} == {fresh, pending, published}


def _everything() -> RowFilter:
    return RowFilter()


def test_only_one_sweeper_at_a_time(server_url: str, service: str) -> None:
    ob = make_outbox(server_url)
    ob.register_event(f"{service}.a", service)
    ob.migrate()
    sweeper = Sweeper(ob.admin, RetentionSettings(consumed_after=1.0), [service], ob.hooks)
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with single_instance(ob.db, SWEEP_LOCK) as taken:
            assert taken
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(30)
        assert sweeper.sweep_once() is None  # the other process is sweeping
    finally:
        release.set()
        holder.join(30)
    assert sweeper.sweep_once() is not None
    drop_tables(ob)
    ob.close()


async def test_cancel_finds_the_service_of_an_event_id(two: Outbox, service: str) -> None:
    with Session(two.db.sync_engine) as session, session.begin():
        one = two.publish(session, f"{service}.a", {}, event_id="only-here", delay=60)
        two.publish(session, f"{service}.a", {}, event_id="in-both")
        two.publish(session, f"{service}_2.c", {}, event_id="in-both")
    assert two.admin.cancel("only-here") is True
    assert two.store(service).get_by_id(one).status is Status.CANCELLED  # type: ignore[union-attr]
    assert two.admin.cancel("nowhere") is False
    with pytest.raises(AmbiguousMessageError, match="name the service"):
        two.admin.cancel("in-both")
    try:
        assert await two.admin.cancel_async("in-both", service=f"{service}_2") is True
        assert await two.admin.cancel_async("in-both", service=f"{service}_2") is False
    finally:
        await two.aclose()  # the async pool belongs to this test's event loop
    assert two.admin.cancel("in-both") is True  # the other one is now the only one waiting
    with pytest.raises(InvalidEventError):
        two.admin.cancel(" ")
    assert two.store(service).status().counts["cancelled"] == 2
