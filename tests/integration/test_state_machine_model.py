"""Random operation sequences against a model of the seed's state machine."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select

from outboxer import Outbox, OutboxMessage, Status
from tests.helpers import drop_tables, make_outbox, unique_service

FINAL = (Status.CONSUMED, Status.DEAD)
reasons = st.text(min_size=0, max_size=2100)
keys = st.text(max_size=8, alphabet=st.characters(codec="utf-8", exclude_categories=("Cc",)))


def stored_reason(reason: str) -> str:
    """What last_error must hold: NUL spelled out, lone surrogates escaped, 2000 chars."""
    reason = reason.replace("\x00", "\\0")
    return reason.encode("utf-8", "backslashreplace").decode()[:2000]


@dataclass
class Row:
    status: Status = Status.PENDING
    retry_count: int = 0
    max_retry: int = 20
    last_error: str | None = None
    due: bool = True
    next_retry_set: bool = True
    published: bool = False
    consumed: bool = False


def make_machine(url: str) -> type[RuleBasedStateMachine]:
    class OutboxModel(RuleBasedStateMachine):
        ids = Bundle("ids")

        @initialize()
        def setup(self) -> None:
            self.service = unique_service()
            # A long backoff unit and lease keep retried/claimed rows out of "due"
            # for the whole run, so due-ness is deterministic.
            self.ob: Outbox = make_outbox(url, retry_unit=1000.0)
            self.ob.register_event(f"{self.service}.e", self.service)
            self.ob.migrate()
            self.store = self.ob.store(self.service)
            self.model: dict[int, Row] = {}

        def teardown(self) -> None:
            if hasattr(self, "ob"):
                drop_tables(self.ob)
                self.ob.close()

        @rule(target=ids, max_retry=st.integers(-2, 4), key=keys)
        def create(self, max_retry: int, key: str) -> int:
            oid = self.store.create_message(f"{self.service}.e", key, {"k": key}, max_retry)
            self.model[oid] = Row(max_retry=max_retry if max_retry > 0 else 20)
            return oid

        @rule(oid=ids)
        def mark_published(self, oid: int) -> None:
            self.store.mark_published(oid)
            row = self.model[oid]
            if row.status not in FINAL:
                row.status, row.last_error = Status.PUBLISHED, None
                row.due = row.next_retry_set = False
                row.published = True

        @rule(oid=ids)
        def mark_consumed(self, oid: int) -> None:
            self.store.mark_consumed(oid)
            row = self.model[oid]
            row.status, row.last_error, row.consumed = Status.CONSUMED, None, True
            row.due = row.next_retry_set = False

        @rule(oid=ids, reason=reasons)
        def mark_dead(self, oid: int, reason: str) -> None:
            self.store.mark_dead(oid, reason)
            row = self.model[oid]
            row.status, row.last_error = Status.DEAD, stored_reason(reason)
            row.due = row.next_retry_set = False

        @rule(oid=ids, reason=reasons)
        def mark_failed(self, oid: int, reason: str) -> None:
            got = self.store.mark_failed_for_retry(oid, reason)
            row = self.model[oid]
            if row.status in FINAL:
                assert got is None
                return
            row.retry_count += 1
            row.last_error = stored_reason(reason)
            row.due = False
            if row.retry_count >= row.max_retry:
                row.status, row.next_retry_set = Status.DEAD, False
            else:
                row.status, row.next_retry_set = Status.PENDING, True
            assert got is row.status

        @rule(oid=ids, ok=st.booleans(), mark=st.booleans())
        def consume(self, oid: int, ok: bool, mark: bool) -> None:
            ran: list[int] = []

            def callback(tx: object) -> None:
                ran.append(oid)
                if not ok:
                    raise RuntimeError("callback failed")

            row = self.model[oid]
            fn = self.store.consume_and_mark_consumed if mark else self.store.consume_in_tx
            if row.status in FINAL:
                assert fn(oid, callback) is False
                assert ran == []
                return
            if not ok:
                with pytest.raises(RuntimeError):
                    fn(oid, callback)
                return
            assert fn(oid, callback) is True
            if mark:
                row.status, row.last_error, row.consumed = Status.CONSUMED, None, True
                row.due = row.next_retry_set = False

        @rule(limit=st.integers(1, 4))
        def claim(self, limit: int) -> None:
            # Claim order is (next_retry_at, id); the model knows which rows are due, the
            # database when each became due (a requeued row is due later than newer ones).
            due_at = {}
            for i, r in self.model.items():
                if r.due:
                    msg = self.store.get_by_id(i)
                    assert msg is not None
                    due_at[i] = msg.next_retry_at
            got = [m.id for m in self.store.claim_due(limit=limit, lease=1000)]
            expected = sorted(due_at, key=lambda i: (due_at[i], i))[:limit]
            assert sorted(got) == sorted(expected)
            for i in got:
                self.model[i].due = False

        @rule(oid=ids)
        def requeue(self, oid: int) -> None:
            n = self.store.requeue([oid])
            row = self.model[oid]
            if row.status is Status.DEAD:
                assert n == 1
                row.status, row.retry_count, row.due, row.next_retry_set = (
                    Status.PENDING,
                    0,
                    True,
                    True,
                )
            else:
                assert n == 0

        @invariant()
        def database_matches_model(self) -> None:
            if not hasattr(self, "store"):
                return
            due = {m.id for m in self.store.list_due_messages(limit=1000)}
            assert due == {i for i, r in self.model.items() if r.due}
            table = self.store.table
            with self.ob.db.sync_engine.connect() as conn:
                stored = {
                    r.id: OutboxMessage.from_mapping(r._mapping)
                    for r in conn.execute(select(table))
                }
            assert set(stored) == set(self.model)
            for oid, row in self.model.items():
                msg = stored[oid]
                assert (msg.status, msg.retry_count, msg.max_retry, msg.last_error) == (
                    row.status,
                    row.retry_count,
                    row.max_retry,
                    row.last_error,
                )
                assert (msg.next_retry_at is not None) == row.next_retry_set
                assert (msg.published_at is not None) == row.published
                assert (msg.consumed_at is not None) == row.consumed

    return OutboxModel


def test_random_operation_sequences(db_url: str) -> None:
    sqlite = db_url.startswith("sqlite")
    run_state_machine_as_test(
        make_machine(db_url),
        settings=settings(
            max_examples=60 if sqlite else 25,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
            database=None,
        ),
    )
