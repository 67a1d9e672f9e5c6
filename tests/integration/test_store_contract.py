"""The seed's state machine, transition by transition, on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from outboxer import (
    MessageNotFoundError,
    Outbox,
    OutboxMessage,
    ServiceMismatchError,
    Status,
    TransactionRequiredError,
)
from outboxer.database.ops.handling import HANDLING_ALONE, HANDLING_IN_BATCH
from outboxer.database.ops.tools import RowFilter
from outboxer.store import Store
from tests.helpers import backdate, drop_tables, make_outbox


def _store(ob: Outbox, service: str) -> Store:
    return ob.store(service)


def _create(ob: Outbox, service: str, key: str = "k", max_retry: int = 0) -> int:
    return _store(ob, service).create_message(
        f"{service}.created", key, {"n": 1}, max_retry=max_retry
    )


def _get(ob: Outbox, service: str, outbox_id: int) -> OutboxMessage:
    msg = _store(ob, service).get_by_id(outbox_id)
    assert msg is not None
    return msg


def test_create_defaults(outbox: Outbox, service: str) -> None:
    oid = _store(outbox, service).create_message(f"{service}.created", "  key-1 \n", {"a": [1]})
    msg = _get(outbox, service, oid)
    assert msg.status is Status.PENDING
    assert msg.retry_count == 0
    assert msg.max_retry == 20
    assert msg.message_key == "key-1"
    assert msg.service_name == service
    assert msg.topic == f"outboxer.{service}"
    assert msg.event_type == f"{service}.created"
    assert msg.payload == '{"a":[1]}'
    assert msg.next_retry_at is not None
    assert msg.published_at is None
    assert msg.consumed_at is None
    assert msg.last_error is None
    assert msg.created_at.tzinfo is not None


@pytest.mark.parametrize(("given", "stored"), [(0, 20), (-3, 20), (1, 1), (7, 7)])
def test_create_max_retry(outbox: Outbox, service: str, given: int, stored: int) -> None:
    assert _get(outbox, service, _create(outbox, service, max_retry=given)).max_retry == stored


def test_get_missing_returns_none(outbox: Outbox, service: str) -> None:
    assert _store(outbox, service).get_by_id(987654321) is None


def test_due_order_limit_and_filter(outbox: Outbox, service: str) -> None:
    st = _store(outbox, service)
    ids = [_create(outbox, service, key=str(i)) for i in range(5)]
    time.sleep(0.01)
    due = st.list_due_messages()
    assert [m.id for m in due] == ids
    assert [m.id for m in st.list_due_messages(limit=2)] == ids[:2]
    assert [m.id for m in st.list_due_messages(limit=0)] == ids  # <= 0 means 100
    assert [m.id for m in st.list_due_messages(service_name=service)] == ids
    assert st.list_due_messages(service_name="someone_else") == []
    # next_retry_at in the future or NULL, or a status other than pending: not due.
    st.mark_failed_for_retry(ids[0], "later")
    st.mark_published(ids[1])
    st.mark_dead(ids[2], "x")
    assert [m.id for m in st.list_due_messages()] == ids[3:]


def test_due_ordered_by_next_retry_at_then_id(outbox: Outbox, service: str) -> None:
    st = _store(outbox, service)
    first, second = _create(outbox, service), _create(outbox, service)
    # Make the later id due earlier.
    backdate(outbox, service, second, "next_retry_at", 5, relative_to=first)
    assert [m.id for m in st.list_due_messages()] == [second, first]


def test_mark_published(outbox: Outbox, service: str) -> None:
    st = _store(outbox, service)
    oid = _create(outbox, service)
    st.mark_failed_for_retry(oid, "first failure")
    st.mark_published(oid)
    msg = _get(outbox, service, oid)
    assert msg.status is Status.PUBLISHED
    assert msg.published_at is not None
    assert msg.last_error is None
    assert msg.next_retry_at is None
    assert msg.retry_count == 1


@pytest.mark.parametrize("final", ["consumed", "dead"])
def test_mark_published_never_overwrites_final(outbox: Outbox, service: str, final: str) -> None:
    st = _store(outbox, service)
    oid = _create(outbox, service)
    if final == "consumed":
        st.mark_consumed(oid)
    else:
        st.mark_dead(oid, "poison")
    st.mark_published(oid)
    msg = _get(outbox, service, oid)
    assert msg.status.value == final
    assert msg.published_at is None


def test_mark_published_with_expected_retry_count(outbox: Outbox, service: str) -> None:
    st = _store(outbox, service)
    oid = _create(outbox, service)
    st.mark_failed_for_retry(oid, "consumer failed meanwhile")
    assert st.mark_published_many([oid], expect_retry_count=0) == 0
    assert _get(outbox, service, oid).status is Status.PENDING
    assert st.mark_published_many([oid], expect_retry_count=1) == 1


async def test_relay_mark_skips_a_row_changed_since_its_claim(
    aoutbox: Outbox, service: str
) -> None:
    """The relay's mark names the claim's ``updated_at`` stamp: a row changed in any way
    since the claim (a consumer held it back meanwhile) is not marked published."""
    st = _store(aoutbox, service)
    oid = _create(aoutbox, service)
    [claimed] = await st.claim_to_send_async(10, 30.0)
    assert claimed.id == oid
    assert claimed.claimed_at is not None
    t = aoutbox.table_for(service)
    with aoutbox.db.sync_engine.begin() as conn:  # changed a second after the claim
        conn.execute(
            t.update()
            .where(t.c.id == oid)
            .values(updated_at=claimed.claimed_at + timedelta(seconds=1))
        )
    marked = await st.mark_published_many_async(
        [oid], expect_retry_count=claimed.retry_count, expect_updated_at=claimed.claimed_at
    )
    assert marked == 0
    assert _get(aoutbox, service, oid).status is Status.PENDING
    # With the row's current stamp the same mark goes through.
    current = _get(aoutbox, service, oid).updated_at
    marked = await st.mark_published_many_async(
        [oid], expect_retry_count=claimed.retry_count, expect_updated_at=current
    )
    assert marked == 1
    assert _get(aoutbox, service, oid).status is Status.PUBLISHED


async def test_a_marking_claim_marks_unmarked_rows_and_says_which(
    aoutbox: Outbox, service: str
) -> None:
    """``claim_to_send_async(mark=True)``: where the database can (PostgreSQL), the
    claim marks unmarked rows as being handled (alone for a claim of one row, in a
    batch for several) and leaves a mark found on a row alone (a crash's evidence);
    elsewhere it is a plain claim. ``release_async(unmark=True)`` clears the marks."""
    st = _store(aoutbox, service)
    t = aoutbox.table_for(service)
    marks = aoutbox.db.sync_engine.dialect.name == "postgresql"

    def handling() -> dict[int, int]:
        with aoutbox.db.sync_engine.connect() as conn:
            return {r.id: r.handling for r in conn.execute(select(t.c.id, t.c.handling))}

    one = _create(aoutbox, service)
    [claimed] = await st.claim_to_send_async(10, 30.0, mark=True)
    assert (claimed.id, claimed.marked) == (one, marks)
    assert handling()[one] == (HANDLING_ALONE if marks else 0)
    assert await st.release_async([one], 0.0, unmark=True) == 1
    assert handling()[one] == 0

    two, three = _create(aoutbox, service), _create(aoutbox, service)
    with aoutbox.db.sync_engine.begin() as conn:  # left by a worker that died
        conn.execute(t.update().where(t.c.id == three).values(handling=HANDLING_ALONE))
    got = await st.claim_to_send_async(10, 30.0, mark=True)
    assert [(c.id, c.marked) for c in got] == [(one, marks), (two, marks), (three, False)]
    expected = HANDLING_IN_BATCH if marks else 0
    assert handling() == {one: expected, two: expected, three: HANDLING_ALONE}
    # A plain claim marks nothing.
    assert await st.release_async([one, two, three], 0.0, unmark=True) == 3
    got = await st.claim_to_send_async(10, 30.0)
    assert [c.marked for c in got] == [False, False, False]
    assert set(handling().values()) == {0}


def test_mark_consumed(outbox: Outbox, service: str) -> None:
    st = _store(outbox, service)
    oid = _create(outbox, service)
    st.mark_failed_for_retry(oid, "err")
    st.mark_consumed(oid)
    msg = _get(outbox, service, oid)
    assert msg.status is Status.CONSUMED
    assert msg.consumed_at is not None
    assert msg.last_error is None
    assert msg.next_retry_at is None


def test_mark_dead_truncates(outbox: Outbox, service: str) -> None:
    st = _store(outbox, service)
    oid = _create(outbox, service)
    st.mark_dead(oid, "é" * 2500)
    msg = _get(outbox, service, oid)
    assert msg.status is Status.DEAD
    assert msg.next_retry_at is None
    assert msg.last_error == "é" * 2000


def test_error_text_with_nul_and_surrogates_is_stored(outbox: Outbox, service: str) -> None:
    st = _store(outbox, service)
    oid = _create(outbox, service)
    st.mark_failed_for_retry(oid, "bad\x00byte \udcff end")
    assert _get(outbox, service, oid).last_error == "bad\\0byte \\udcff end"


def test_failed_for_retry_backoff_and_dead(outbox: Outbox, service: str) -> None:
    st = _store(outbox, service)
    oid = _create(outbox, service, max_retry=3)
    unit = outbox.retry_policy.unit
    for attempt in (1, 2):
        before = _get(outbox, service, oid)
        assert st.mark_failed_for_retry(oid, f"failure {attempt}" + "x" * 3000) is Status.PENDING
        msg = _get(outbox, service, oid)
        assert msg.status is Status.PENDING
        assert msg.retry_count == attempt
        assert msg.last_error is not None
        assert len(msg.last_error) == 2000
        assert msg.last_error.startswith(f"failure {attempt}")
        assert msg.next_retry_at is not None
        delay = (msg.next_retry_at - msg.updated_at).total_seconds()
        assert delay == pytest.approx(attempt * attempt * unit, abs=0.002)
        assert msg.updated_at >= before.updated_at
    assert st.mark_failed_for_retry(oid, "third") is Status.DEAD
    msg = _get(outbox, service, oid)
    assert msg.status is Status.DEAD
    assert msg.retry_count == 3
    assert msg.next_retry_at is None
    assert msg.last_error == "third"


@pytest.mark.parametrize("final", ["consumed", "dead"])
def test_failed_for_retry_leaves_final_rows(outbox: Outbox, service: str, final: str) -> None:
    st = _store(outbox, service)
    oid = _create(outbox, service)
    if final == "consumed":
        st.mark_consumed(oid)
    else:
        st.mark_dead(oid, "poison")
    before = _get(outbox, service, oid)
    assert st.mark_failed_for_retry(oid, "late failure") is None
    assert _get(outbox, service, oid) == before


def test_failed_for_retry_missing_row(outbox: Outbox, service: str) -> None:
    with pytest.raises(MessageNotFoundError) as info:
        _store(outbox, service).mark_failed_for_retry(123456789, "x")
    assert info.value.context["outbox_id"] == 123456789


def test_failed_for_retry_from_published(outbox: Outbox, service: str) -> None:
    st = _store(outbox, service)
    oid = _create(outbox, service)
    st.mark_published(oid)
    st.mark_failed_for_retry(oid, "handler failed")
    msg = _get(outbox, service, oid)
    assert msg.status is Status.PENDING
    assert msg.retry_count == 1


def _effects_table(ob: Outbox, service: str) -> Table:
    md = MetaData()
    table = Table(
        f"{service}_effects",
        md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("note", String(50)),
    )
    with ob.db.sync_engine.begin() as conn:
        md.create_all(conn)
    return table


def _count(ob: Outbox, table: Table) -> int:
    with ob.db.sync_engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def test_consume_and_mark_commits_together(outbox: Outbox, service: str) -> None:
    st = _store(outbox, service)
    effects = _effects_table(outbox, service)
    oid = _create(outbox, service)
    calls = []

    def handler(tx: Session) -> None:
        calls.append(1)
        tx.execute(insert(effects).values(note="done"))

    assert st.consume_and_mark_consumed(oid, handler) is True
    assert _count(outbox, effects) == 1
    msg = _get(outbox, service, oid)
    assert msg.status is Status.CONSUMED
    assert msg.consumed_at is not None
    # Second delivery: nothing to do, the callback does not run.
    assert st.consume_and_mark_consumed(oid, handler) is False
    assert calls == [1]
    assert _count(outbox, effects) == 1
    effects.drop(outbox.db.sync_engine)


def test_consume_and_mark_rolls_back_together(outbox: Outbox, service: str) -> None:
    st = _store(outbox, service)
    effects = _effects_table(outbox, service)
    oid = _create(outbox, service)
    before = _get(outbox, service, oid)

    def failing(tx: Session) -> None:
        tx.execute(insert(effects).values(note="half"))
        raise RuntimeError("handler exploded")

    with pytest.raises(RuntimeError, match="handler exploded"):
        st.consume_and_mark_consumed(oid, failing)
    assert _count(outbox, effects) == 0
    assert _get(outbox, service, oid) == before
    effects.drop(outbox.db.sync_engine)


def test_consume_skips_missing_and_final(outbox: Outbox, service: str) -> None:
    st = _store(outbox, service)
    ran: list[int] = []
    assert st.consume_and_mark_consumed(99999999, lambda tx: ran.append(1)) is False
    dead = _create(outbox, service)
    st.mark_dead(dead, "poison")
    assert st.consume_and_mark_consumed(dead, lambda tx: ran.append(1)) is False
    assert st.consume_in_tx(dead, lambda tx: ran.append(1)) is False
    assert ran == []
    assert _get(outbox, service, dead).status is Status.DEAD


def test_consume_in_tx_does_not_mark(outbox: Outbox, service: str) -> None:
    st = _store(outbox, service)
    effects = _effects_table(outbox, service)
    oid = _create(outbox, service)
    assert st.consume_in_tx(oid, lambda tx: tx.execute(insert(effects).values(note="a")))
    assert _count(outbox, effects) == 1
    assert _get(outbox, service, oid).status is Status.PENDING
    st.mark_consumed(oid)
    assert st.consume_in_tx(oid, lambda tx: tx.execute(insert(effects).values(note="b"))) is False
    assert _count(outbox, effects) == 1
    effects.drop(outbox.db.sync_engine)


def test_store_bound_to_caller_transaction(outbox: Outbox, service: str) -> None:
    effects = _effects_table(outbox, service)
    oid = _create(outbox, service)
    with Session(outbox.db.sync_engine) as session:
        with session.begin():
            st = _store(outbox, service).with_tx(session)
            # A failing callback rolls back to its savepoint; the transaction goes on.
            with pytest.raises(ValueError, match="nope"):
                st.consume_and_mark_consumed(oid, _raise_value_error)
            session.execute(insert(effects).values(note="caller"))
            assert st.consume_and_mark_consumed(
                oid, lambda tx: tx.execute(insert(effects).values(note="effect"))
            )
            session.rollback()
        assert _get(outbox, service, oid).status is Status.PENDING
        assert _count(outbox, effects) == 0
        with session.begin():
            st = _store(outbox, service).with_tx(session)
            st.mark_dead(oid, "decided in caller tx")
        assert _get(outbox, service, oid).status is Status.DEAD
    effects.drop(outbox.db.sync_engine)


def _raise_value_error(tx: Session) -> None:
    raise ValueError("nope")


def test_store_refuses_other_service_events(outbox: Outbox, service: str) -> None:
    other = service + "_b"
    outbox.register_event(f"{other}.created", other)
    with pytest.raises(ServiceMismatchError) as info:
        _store(outbox, service).create_message(f"{other}.created", "k", {"a": 1})
    assert other in str(info.value)
    assert _store(outbox, service).list_due_messages() == []


def test_with_tx_rejects_wrong_kind(outbox: Outbox, service: str) -> None:
    with pytest.raises(TransactionRequiredError):
        _store(outbox, service).with_tx("not a transaction")  # type: ignore[arg-type]


def test_with_route_switches_table(outbox: Outbox, service: str) -> None:
    other = service + "_r"
    outbox.register_event(f"{other}.created", other)
    outbox.migrate()
    st = _store(outbox, service).with_route(other)
    oid = st.create_message(f"{other}.created", "k", {"b": 2})
    assert st.get_by_id(oid) is not None
    assert st.table.name == f"{other}_outbox_messages"
    assert _store(outbox, service).list_due_messages() == []


def test_requeue_dead(outbox: Outbox, service: str) -> None:
    st = _store(outbox, service)
    oid = _create(outbox, service, max_retry=1)
    assert st.mark_failed_for_retry(oid, "boom") is Status.DEAD
    assert st.requeue([oid]) == 1
    msg = _get(outbox, service, oid)
    assert msg.status is Status.PENDING
    assert msg.retry_count == 0
    assert [m.id for m in st.list_due_messages()] == [oid]


# ------------------------------------------------------------------ claim and lease


def test_claim_moves_due_time_and_is_not_an_attempt(outbox: Outbox, service: str) -> None:
    st = _store(outbox, service)
    ids = [_create(outbox, service) for _ in range(5)]
    claimed = st.claim_due(limit=3, lease=timedelta(seconds=30))
    assert [m.id for m in claimed] == ids[:3]
    for m in claimed:
        assert m.status is Status.PENDING
        assert m.retry_count == 0
        assert m.next_retry_at is not None
        assert (m.next_retry_at - m.updated_at).total_seconds() == pytest.approx(30, abs=0.01)
        assert _get(outbox, service, m.id).next_retry_at == m.next_retry_at
    assert [m.id for m in st.list_due_messages()] == ids[3:]
    assert [m.id for m in st.claim_due(limit=100, lease=30.0)] == ids[3:]
    assert st.claim_due() == []


def test_expired_lease_makes_rows_due_again(outbox: Outbox, service: str) -> None:
    st = _store(outbox, service)
    oid = _create(outbox, service)
    assert [m.id for m in st.claim_due(lease=60.0)] == [oid]
    assert st.claim_due(lease=60.0) == []
    backdate(outbox, service, oid, "next_retry_at", 61)  # the lease ran out
    again = st.claim_due(lease=60.0)
    assert [m.id for m in again] == [oid]
    assert again[0].retry_count == 0


def test_claim_rejects_bad_lease(outbox: Outbox, service: str) -> None:
    with pytest.raises(ValueError, match="lease"):
        _store(outbox, service).claim_due(lease=0)


LOCK_WAIT_S = 2
"""How long the claim below may wait for a row lock before its database gives up."""


def test_claim_skips_rows_another_transaction_holds(server_url: str, service: str) -> None:
    """Two claimers never wait for each other: the rows another relay's open claim holds
    are skipped (``SKIP LOCKED``), the others are claimed at once. The claiming session
    gives up on a lock wait after a couple of seconds, so a claim that waits fails
    fast with the database's lock timeout instead of hanging."""
    ob = make_outbox(server_url)
    ob.register_event(f"{service}.created", service)
    ob.migrate()
    ids = [_create(ob, service, key=str(i)) for i in range(4)]
    engine = ob.db.sync_engine
    bound_wait = {
        "postgresql": f"SET lock_timeout = '{LOCK_WAIT_S}s'",
        "mysql": f"SET SESSION innodb_lock_wait_timeout = {LOCK_WAIT_S}",
    }[ob.db.family]
    try:
        with engine.connect() as holder, engine.connect() as claimer:
            # Another relay's claim in flight: the two oldest due rows locked.
            first = _store(ob, service).with_tx(holder).claim_due(limit=2, lease=30.0)
            assert [m.id for m in first] == ids[:2]
            claimer.exec_driver_sql(bound_wait)
            claimed = _store(ob, service).with_tx(claimer).claim_due(limit=10, lease=30.0)
            assert [m.id for m in claimed] == ids[2:]
            claimer.commit()
            holder.rollback()
    finally:
        drop_tables(ob)
        ob.close()


# ------------------------------------------------------------------ async face


async def test_async_face_mirrors_sync(aoutbox: Outbox, service: str) -> None:
    st = aoutbox.store(service)
    oid = await st.create_message_async(f"{service}.created", "k", {"a": 1}, max_retry=2)
    msg = await st.get_by_id_async(oid)
    assert msg is not None
    assert msg.status is Status.PENDING
    assert [m.id for m in await st.list_due_messages_async()] == [oid]
    assert [m.id for m in await st.claim_due_async(lease=0.2)] == [oid]
    assert await st.mark_failed_for_retry_async(oid, "x") is Status.PENDING
    assert await st.mark_failed_for_retry_async(oid, "y") is Status.DEAD
    assert await st.requeue_async([oid]) == 1
    await st.mark_published_async(oid)
    assert (await st.get_by_id_async(oid)).status is Status.PUBLISHED  # type: ignore[union-attr]

    async def effect(tx: object) -> None:
        await asyncio.sleep(0)

    assert await st.consume_and_mark_consumed_async(oid, effect) is True
    assert await st.consume_and_mark_consumed_async(oid, effect) is False
    assert (await st.get_by_id_async(oid)).status is Status.CONSUMED  # type: ignore[union-attr]
    other = await st.create_message_async(f"{service}.created", "k", {"a": 2})
    assert await st.consume_in_tx_async(other, lambda tx: tx.execute(text("SELECT 1")))
    await st.mark_dead_async(other, "dead")
    await st.mark_consumed_async(other)
    assert (await st.get_by_id_async(other)).status is Status.CONSUMED  # type: ignore[union-attr]


async def test_async_count_and_purge_mirror_sync(aoutbox: Outbox, service: str) -> None:
    st = aoutbox.store(service)
    ids = [await st.create_message_async(f"{service}.created", "k", {"n": n}) for n in range(3)]
    await st.mark_dead_many_async(ids[:2], "gone")
    dead = RowFilter(status=Status.DEAD)
    assert await st.count_async(dead) == st.count(dead) == 2
    assert await st.count_async(RowFilter(status=Status.PENDING)) == 1
    assert await st.purge_batch_async(dead, 1) == 1  # at most the limit
    assert await st.count_async(dead) == 1
    assert await st.purge_batch_async(dead, 10) == 1
    assert await st.purge_batch_async(dead, 10) == 0
    assert [m.id for m in await st.find_async(RowFilter())] == [ids[2]]  # the pending row stays


async def test_async_consume_rolls_back(aoutbox: Outbox, service: str) -> None:
    st = aoutbox.store(service)
    oid = await st.create_message_async(f"{service}.created", "k", {"a": 1})

    async def boom(tx: object) -> None:
        raise KeyError("async handler failed")

    with pytest.raises(KeyError):
        await st.consume_and_mark_consumed_async(oid, boom)
    assert (await st.get_by_id_async(oid)).status is Status.PENDING  # type: ignore[union-attr]


async def test_sync_method_on_async_tx_is_refused(aoutbox: Outbox, service: str) -> None:
    async with AsyncSession(aoutbox.db.async_engine) as session:
        st = aoutbox.store(service).with_tx(session)
        with pytest.raises(TransactionRequiredError):
            st.get_by_id(1)


def test_sqlite_reads_do_not_wait_for_a_writer(tmp_path: object) -> None:
    """On SQLite, status/get/list run while another connection holds the write lock."""
    ob = make_outbox(f"sqlite:///{tmp_path}/locks.db")
    ob.register_event("a.b", "svc")
    ob.migrate()
    st = ob.store("svc")
    oid = st.create_message("a.b", "k", {"x": 1})
    with ob.db.sync_engine.begin() as writer:  # BEGIN IMMEDIATE: holds the write lock
        writer.execute(text("SELECT 1"))
        started = time.monotonic()
        assert st.get_by_id(oid) is not None
        assert st.status().counts["pending"] == 1
        assert [m.id for m in st.list_due_messages()] == [oid]
        # Far below the 30 s busy timeout a read waiting for the writer would take.
        assert time.monotonic() - started < 15
    ob.close()


def test_relay_dead_mark_leaves_final_rows(outbox: Outbox, service: str) -> None:
    st = _store(outbox, service)
    consumed, pending = _create(outbox, service), _create(outbox, service)
    st.mark_consumed(consumed)
    assert st.mark_dead_many([consumed, pending], "broker refused", unless_final=True) == 1
    assert _get(outbox, service, consumed).status is Status.CONSUMED
    assert _get(outbox, service, pending).status is Status.DEAD


def test_claim_unconsumed_takes_stale_published_rows(outbox: Outbox, service: str) -> None:
    st = _store(outbox, service)
    old, fresh, consumed = (_create(outbox, service) for _ in range(3))
    for oid in (old, fresh, consumed):
        st.mark_published(oid)
    st.mark_consumed(consumed)
    backdate(outbox, service, old, "updated_at", 120)
    again = st.claim_unconsumed(limit=10, older_than=60)
    assert [m.id for m in again] == [old]
    assert again[0].status is Status.PUBLISHED
    # The claim itself counts as activity: not taken again for another 60 s.
    assert st.claim_unconsumed(limit=10, older_than=60) == []
    assert st.mark_published_many([old], expect_retry_count=0) == 1


async def test_mark_failed_many_reports_each_new_status(aoutbox: Outbox, service: str) -> None:
    st = _store(aoutbox, service)
    retried, dying, consumed = (
        _create(aoutbox, service),
        _create(aoutbox, service, max_retry=1),
        _create(aoutbox, service),
    )
    st.mark_consumed(consumed)
    failures = [(retried, "a"), (dying, "b"), (consumed, "c"), (10**9, "missing")]
    expected = {retried: Status.PENDING, dying: Status.DEAD, consumed: None}
    assert await st.mark_failed_many_async(failures[:3] + failures[3:]) == expected
    fresh = [_create(aoutbox, service), _create(aoutbox, service, max_retry=1)]
    assert st.mark_failed_many([(fresh[0], "x"), (fresh[1], "y")]) == {
        fresh[0]: Status.PENDING,
        fresh[1]: Status.DEAD,
    }


# --------------------------------------------------------------------------- cancel


def _publish(ob: Outbox, service: str, event_id: str, **options: object) -> int:
    with Session(ob.db.sync_engine) as s, s.begin():
        return ob.publish(s, f"{service}.created", {"n": 1}, event_id=event_id, **options)


def test_cancel_takes_back_only_waiting_events(outbox: Outbox, service: str) -> None:
    st = _store(outbox, service)
    # claimed: a relay holds its lease; claimed-later: its time came and a relay took it
    claimed = _publish(outbox, service, "claimed")
    claimed_later = _publish(outbox, service, "claimed-later", delay=600)
    backdate(outbox, service, claimed_later, "next_retry_at", 600)
    backdate(outbox, service, claimed_later, "deliver_at", 600)
    assert {m.id for m in st.claim_due(limit=100, lease=60)} == {claimed, claimed_later}
    due = _publish(outbox, service, "due")
    later = _publish(outbox, service, "later", delay=600)
    retried = _publish(outbox, service, "retried")
    sent = _publish(outbox, service, "sent")
    done = _publish(outbox, service, "done")
    dead = _publish(outbox, service, "dead")
    st.mark_failed_for_retry(retried, "refused")
    backdate(outbox, service, retried, "next_retry_at", 3600)  # due again, but attempted
    st.mark_published(sent)
    st.mark_consumed(done)
    st.mark_dead(dead, "poison")

    outcome = {
        name: st.cancel(name)
        for name in (
            "due",
            "later",
            "claimed",
            "claimed-later",
            "retried",
            "sent",
            "done",
            "dead",
            "nothing",
        )
    }
    assert outcome == {
        "due": True,
        "later": True,
        "claimed": False,
        "claimed-later": False,
        "retried": False,
        "sent": False,
        "done": False,
        "dead": False,
        "nothing": False,
    }
    for oid in (due, later):
        msg = _get(outbox, service, oid)
        assert msg.status is Status.CANCELLED
        assert msg.next_retry_at is None
    assert st.cancel("due") is False  # cancelled is final
    # Nothing the loops do brings a cancelled row back or sends it.
    assert due not in {m.id for m in st.claim_due(limit=100)}
    st.mark_published(due)
    assert st.mark_failed_for_retry(due, "late") is None
    assert st.consume_and_mark_consumed(due, lambda tx: None) is False
    assert st.mark_dead_many([due], "late", unless_final=True) == 0
    assert _get(outbox, service, due).status is Status.CANCELLED


async def test_cancel_async_face_and_caller_transaction(aoutbox: Outbox, service: str) -> None:
    st = _store(aoutbox, service)
    oid = _publish(aoutbox, service, "a")
    async with AsyncSession(aoutbox.db.async_engine) as s, s.begin():
        assert await st.with_tx(s).cancel_async("a") is True
        await s.rollback()
    assert _get(aoutbox, service, oid).status is Status.PENDING
    assert await st.cancel_async("a") is True
    assert await st.cancel_async("a") is False
    assert _get(aoutbox, service, oid).status is Status.CANCELLED
