"""The same message handed to two consumers at the same moment takes effect once.

The consumer's batch statement and consume-and-mark lock the outbox row. A consumer
that finds the row marked as being handled and locked by a live worker skips it at
once (``busy``: no transaction waits for a slow handler); with ``skip_busy`` off (a
broker with ``redeliver_after = 0``) it waits for the first to commit, then finds
the row consumed. Without the lock both would run the handler (each test below
fails when the lock is removed).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from outboxer import Envelope, Status
from outboxer.consumer import Dispatcher
from outboxer.hooks import Stats
from outboxer.transports.base import IncomingMessage
from tests.helpers import drop_tables, make_outbox

pytestmark = pytest.mark.faults

SECOND_WAIT = 5.0
"""How long the first handler waits for the second to enter its handler too (only
possible without the row lock); with the lock it waits this long, then finishes."""


def _setup(url: str, service: str) -> tuple[Any, int]:
    ob = make_outbox(url)
    ob.register_event(f"{service}.e", service)
    ob.migrate()
    with ob.db.sync_engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {service}_fx (n INTEGER)"))
        oid = ob.publish(conn, f"{service}.e", {"n": 1})
    return ob, oid


def _effects(ob: Any, service: str) -> int:
    with ob.db.sync_engine.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {service}_fx")).scalar_one())


def _teardown(ob: Any, service: str) -> None:
    with ob.db.sync_engine.begin() as conn:
        conn.execute(text(f"DROP TABLE {service}_fx"))
    drop_tables(ob)
    ob.close()


class _Overlap:
    """A handler body that lets the first caller wait for a second one."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.first_inside = threading.Event()
        self.second_inside = threading.Event()
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, tx: Session) -> None:
        with self.lock:
            self.calls += 1
            first = self.calls == 1
        if first:
            self.first_inside.set()
            self.second_inside.wait(SECOND_WAIT)
        else:
            self.second_inside.set()
        tx.execute(text(f"INSERT INTO {self.service}_fx (n) VALUES (1)"))


@pytest.mark.parametrize("skip_busy", [True, False], ids=["skip-busy", "wait"])
async def test_two_dispatchers_one_effect(server_url: str, service: str, skip_busy: bool) -> None:
    ob, oid = _setup(server_url, service)
    body = _Overlap(service)

    def handler(event: Envelope, tx: Session) -> None:
        body(tx)

    try:
        st = ob.store(service)
        msg = st.get_by_id(oid)
        assert msg is not None
        batch = [IncomingMessage(route=st.route, value=msg.envelope().to_json(), position=0)]
        stats = Stats()
        handlers = {f"{service}.e": handler}
        first = Dispatcher(ob.storage, st.route, handlers, stats)
        second = Dispatcher(ob.storage, st.route, handlers, stats, skip_busy=skip_busy)
        one = asyncio.create_task(first.dispatch(batch))
        assert await asyncio.to_thread(body.first_inside.wait, 30)
        two = asyncio.create_task(second.dispatch(batch))
        if skip_busy:
            # Recognised as handled elsewhere: done while the first handler still runs.
            await asyncio.wait_for(asyncio.shield(two), SECOND_WAIT * 4)
            assert not one.done()
        await asyncio.gather(one, two)
        assert _effects(ob, service) == 1
        assert body.calls == 1
        assert stats.get("busy" if skip_busy else "skipped") == 1
        row = st.get_by_id(oid)
        assert row is not None
        assert row.status is Status.CONSUMED
        assert (row.retry_count, row.crashes, row.handling) == (0, 0, 0)
    finally:
        with ob.db.sync_engine.begin() as conn:
            conn.execute(text(f"DROP TABLE {service}_fx"))
        drop_tables(ob)
        await ob.aclose()


def test_two_consume_and_mark_calls_one_effect(server_url: str, service: str) -> None:
    ob, oid = _setup(server_url, service)
    body = _Overlap(service)
    results: list[bool] = []

    def consume() -> None:
        results.append(ob.store(service).consume_and_mark_consumed(oid, body))

    try:
        one = threading.Thread(target=consume)
        one.start()
        assert body.first_inside.wait(30)
        two = threading.Thread(target=consume)
        two.start()
        one.join(60)
        two.join(60)
        assert sorted(results) == [False, True]
        assert _effects(ob, service) == 1
        assert body.calls == 1
    finally:
        _teardown(ob, service)
