"""Ordered services: a key's events are handled in publish order, across failures.

Several relays and consumers (two outboxes sharing one in-memory broker, whose
consumer group hands any message to any consumer) and random handler failures: the
order in which each key's effects committed equals the order its events were
published, and every event took effect exactly once.
"""

from __future__ import annotations

import random
import uuid
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select
from sqlalchemy.orm import Session

from outboxer import Envelope, Outbox, Status
from outboxer.testing import InMemoryTransport
from tests.helpers import isolated_settings
from tests.integration.engine_helpers import run_until

KEYS = 6
EVENTS = 90


def _effects_table(prefix: str) -> Table:
    return Table(
        f"{prefix}_fx",
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("key", String(20), nullable=False),
        Column("seq", Integer, nullable=False),
    )


def _outbox(url: str, transport: InMemoryTransport, prefix: str, **settings: Any) -> Outbox:
    values: dict[str, Any] = {
        "retry_unit": 0.02,
        "poll_interval": 0.05,
        "topic_prefix": prefix,
        "batch_size": 7,
        "max_retry": 20,
        **settings,
    }
    ob = Outbox(url, transport=transport, settings=isolated_settings(**values))
    ob.register_service("ledger", ordered=True)
    ob.register_event("entry.added", "ledger")
    return ob


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_each_key_is_handled_in_publish_order(server_url: str, seed: int) -> None:
    rng = random.Random(seed)
    prefix = f"o{uuid.uuid4().hex[:8]}"
    transport = InMemoryTransport()
    outboxes = [_outbox(server_url, transport, prefix) for _ in range(2)]
    fx = _effects_table(prefix)
    # Each event fails its first 0-2 deliveries (decided up front, so the plan is
    # the same whichever consumer gets it).
    failures = {n: rng.choice([0, 0, 0, 1, 2]) for n in range(EVENTS)}
    attempts: dict[int, int] = {}

    def handle(event: Envelope, tx: Session) -> None:
        n = event.payload["n"]
        tx.execute(insert(fx).values(key=event.payload["key"], seq=n))
        seen = attempts.get(n, 0)
        attempts[n] = seen + 1
        if seen < failures[n]:
            raise RuntimeError(f"planned failure of {n}")

    for ob in outboxes:
        ob.register_handler("entry.added", handle)
    first = outboxes[0]
    with first.db.sync_engine.begin() as conn:
        fx.metadata.create_all(conn)
    first.migrate()
    try:
        with first.db.sync_engine.begin() as conn:
            for n in range(EVENTS):
                key = f"k{rng.randrange(KEYS)}"
                first.publish(conn, "entry.added", {"n": n, "key": key}, key=key)
        st = first.store("ledger")

        def done() -> bool:
            return st.status().counts[Status.CONSUMED.value] == EVENTS

        await run_until(outboxes, done)
        with first.db.sync_engine.connect() as conn:
            rows = conn.execute(select(fx.c.key, fx.c.seq).order_by(fx.c.id)).all()
            total = conn.execute(select(func.count()).select_from(fx)).scalar_one()
        assert total == EVENTS  # failed attempts' writes were rolled back: once each
        by_key: dict[str, list[int]] = {}
        for key, seq in rows:
            by_key.setdefault(key, []).append(seq)
        for key, seqs in by_key.items():
            assert seqs == sorted(seqs), f"key {key} handled out of order: {seqs}"
        assert sorted(seq for seqs in by_key.values() for seq in seqs) == list(range(EVENTS))
        assert sum(failures.values()) > 0  # the plan did make events fail
    finally:
        with first.db.sync_engine.begin() as conn:
            fx.drop(conn)
            first.metadata.drop_all(conn)
        for ob in outboxes:
            await ob.aclose()


@pytest.mark.parametrize("after_dead", ["skip", "block"])
async def test_a_dead_event_skips_or_blocks_its_key(db_url: str, after_dead: str) -> None:
    prefix = f"o{uuid.uuid4().hex[:8]}"
    transport = InMemoryTransport()
    ob = _outbox(db_url, transport, prefix, ordered_after_dead=after_dead, max_retry=2)
    fx = _effects_table(prefix)
    healed = {"poison": False}

    def handle(event: Envelope, tx: Session) -> None:
        if event.payload["n"] == 0 and not healed["poison"]:
            raise RuntimeError("poison")
        tx.execute(insert(fx).values(key="k", seq=event.payload["n"]))

    ob.register_handler("entry.added", handle)
    with ob.db.sync_engine.begin() as conn:
        fx.metadata.create_all(conn)
    ob.migrate()
    st = ob.store("ledger")
    try:
        with ob.db.sync_engine.begin() as conn:
            first, second = (ob.publish(conn, "entry.added", {"n": n}, key="k") for n in range(2))

        def settled() -> bool:
            one, two = st.get_by_id(first), st.get_by_id(second)
            assert one is not None
            assert two is not None
            if after_dead == "skip":
                return one.status is Status.DEAD and two.status is Status.CONSUMED
            return one.status is Status.DEAD

        await run_until([ob], settled, timeout=60)
        two = st.get_by_id(second)
        assert two is not None
        if after_dead == "block":
            # Held back behind the dead event: never handled, never an attempt.
            assert two.status in (Status.PENDING, Status.PUBLISHED)
            assert two.retry_count == 0
            healed["poison"] = True
            assert st.requeue([first]) == 1

            def both() -> bool:
                return st.status().counts[Status.CONSUMED.value] == 2

            await run_until([ob], both, timeout=60)
            with ob.db.sync_engine.connect() as conn:
                seqs = conn.execute(select(fx.c.seq).order_by(fx.c.id)).scalars().all()
            assert seqs == [0, 1]
    finally:
        with ob.db.sync_engine.begin() as conn:
            fx.drop(conn)
            ob.metadata.drop_all(conn)
        await ob.aclose()
