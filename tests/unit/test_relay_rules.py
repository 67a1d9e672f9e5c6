"""Relay and engine rules, with a scripted transport and a SQLite file (no server)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from outboxer import Outbox, OutboxError, OutboxSettings, Status
from outboxer.hooks import Observer, Stats
from outboxer.relay import Relay
from outboxer.routing import ServiceRoute
from outboxer.testing import InMemoryTransport
from outboxer.transports.base import Delivery, IncomingMessage, OutgoingMessage
from outboxer.wake import Waker
from tests.helpers import backdate


class ScriptedTransport:
    """A broker double: answers every send with ``error`` (None: acknowledged)."""

    name = "scripted"

    def __init__(
        self, error: str | None = None, *, permanent: bool = False, transient: bool = False
    ) -> None:
        self.error = error
        self.permanent = permanent
        self.transient = transient
        self.ok_ids: set[int] = set()
        """Ids acknowledged whatever ``error`` says."""
        self.sent: list[int] = []
        self.receive_raises: BaseException | None = None

    @property
    def delivers_in_process(self) -> bool:
        return False

    async def start(self, routes: Sequence[ServiceRoute]) -> None:
        return None

    async def send(
        self, route: ServiceRoute, messages: Sequence[OutgoingMessage]
    ) -> list[Delivery]:
        self.sent.extend(m.outbox_id for m in messages)
        return [
            Delivery(m.outbox_id)
            if m.outbox_id in self.ok_ids
            else Delivery(m.outbox_id, self.error, self.permanent, transient=self.transient)
            for m in messages
        ]

    async def subscribe(self, route: ServiceRoute) -> Any:
        return _Sub(route, self)

    async def close(self) -> None:
        return None


class _Sub:
    def __init__(self, route: ServiceRoute, transport: ScriptedTransport) -> None:
        self.route = route
        self.transport = transport

    async def receive(self, max_messages: int, timeout: float) -> list[IncomingMessage]:
        if self.transport.receive_raises is not None:
            raise self.transport.receive_raises
        await asyncio.sleep(timeout)
        return []

    async def ack(self, messages: Sequence[IncomingMessage]) -> None:
        return None

    async def close(self) -> None:
        return None


def _outbox(tmp_path: Path, transport: ScriptedTransport, **settings: Any) -> Outbox:
    ob = Outbox(
        f"sqlite:///{tmp_path}/relay.db",
        transport=transport,
        settings=OutboxSettings.from_values(poll_interval=0.05, **settings),
    )
    ob.register_event("a.e", "svc")
    ob.migrate()
    return ob


@pytest.mark.parametrize("permanent", [False, True])
async def test_failed_resend_keeps_the_row_published(tmp_path: Path, permanent: bool) -> None:
    transport = ScriptedTransport()
    ob = _outbox(tmp_path, transport)
    st = ob.store("svc")
    oid = st.create_message("a.e", "k", {"event_type": "a.e", "payload": {}}, max_retry=1)
    st.mark_published(oid)
    backdate(ob, "svc", oid, "updated_at", 120)
    transport.error, transport.permanent = "broker down", permanent
    relay = Relay(st, transport, ob.settings, hooks=Stats(), waker=Waker(), redeliver_after=60.0)
    assert await relay.run_once() == 1
    assert transport.sent == [oid]
    row = st.get_by_id(oid)
    assert row is not None
    # Not an attempt (max_retry=1 would have made it dead), not a dead letter.
    assert row.status is Status.PUBLISHED
    assert row.retry_count == 0
    assert isinstance(relay.hooks, Stats)
    assert relay.hooks.get("redeliver_failed") == 1
    await ob.aclose()


async def test_redelivery_check_is_not_starved_by_a_backlog(tmp_path: Path) -> None:
    transport = ScriptedTransport()
    ob = _outbox(tmp_path, transport)
    st = ob.store("svc")
    stale = st.create_message("a.e", "k", {"event_type": "a.e", "payload": {}})
    st.mark_published(stale)
    backdate(ob, "svc", stale, "updated_at", 120)
    for _ in range(10):
        st.create_message("a.e", "k", {"event_type": "a.e", "payload": {}})
    settings = OutboxSettings.from_values(batch_size=4)
    relay = Relay(st, transport, settings, hooks=Stats(), waker=Waker(), redeliver_after=60.0)
    await relay.run_once()  # a full batch of pending rows is waiting, yet:
    assert stale in transport.sent
    assert len(transport.sent) == 4
    await ob.aclose()


WAIT = 30.0
"""Bound (seconds) of a wait for a condition: generous, so a loaded machine still meets
it; a test that works never waits that long."""


async def _run_until(ob: Outbox, condition: Callable[[], bool], **kwargs: Any) -> None:
    """Run ``ob`` until ``condition()`` holds (at most :data:`WAIT` seconds), then stop."""
    task = asyncio.create_task(ob.run_async(**kwargs))
    deadline = asyncio.get_running_loop().time() + WAIT
    try:
        while not condition():
            assert not task.done(), "the outbox stopped on its own"
            assert asyncio.get_running_loop().time() < deadline, f"not done after {WAIT}s"
            await asyncio.sleep(0.02)
    finally:
        ob.stop()
        await task


class Rounds(Observer):
    """Counts each relay round (a claim, even of nothing) per service."""

    def __init__(self) -> None:
        self.count: Counter[str] = Counter()

    def batch_claimed(self, service: str, due: int, redelivered: int) -> None:
        self.count[service] += 1


async def test_redelivery_only_for_services_this_app_consumes(tmp_path: Path) -> None:
    transport = ScriptedTransport()
    ob = _outbox(tmp_path, transport, redeliver_after=0.5)
    ob.register_event("b.e", "other")  # read by some other system: no handlers here
    ob.migrate()
    ob.register_handler("a.e", lambda event, tx: None)
    for service, event_type in (("svc", "a.e"), ("other", "b.e")):
        st = ob.store(service)
        oid = st.create_message(event_type, "k", {"event_type": event_type, "payload": {}})
        st.mark_published(oid)
        backdate(ob, service, oid, "updated_at", 60)
    rounds = Rounds()
    ob.add_observer(rounds)

    def both_checked() -> bool:
        # A relay's first round checks for redelivery (when it does any): two rounds of
        # the other service's relay leave no doubt that it had its chance.
        return ob.stats.get("redelivered", "svc") >= 1 and rounds.count["other"] >= 2

    await _run_until(ob, both_checked, consume=False)
    assert ob.stats.get("redelivered", "other") == 0
    await ob.aclose()


async def test_a_loop_that_ends_by_itself_is_an_error(tmp_path: Path) -> None:
    transport = ScriptedTransport()
    transport.receive_raises = asyncio.CancelledError()
    ob = _outbox(tmp_path, transport)
    ob.register_handler("a.e", lambda event, tx: None)
    with pytest.raises(OutboxError, match="ended unexpectedly"):
        await asyncio.wait_for(ob.run_async(), 30)
    await ob.aclose()


class ProbedTransport(InMemoryTransport):
    """The in-memory broker, counting the sends tried while it is down."""

    def __init__(self) -> None:
        super().__init__()
        self.probes = 0

    async def send(
        self, route: ServiceRoute, messages: Sequence[OutgoingMessage]
    ) -> list[Delivery]:
        if self.down:
            self.probes += 1
        return await super().send(route, messages)


async def test_an_outage_spends_no_attempts(tmp_path: Path) -> None:
    transport = ProbedTransport()
    ob = Outbox(
        f"sqlite:///{tmp_path}/outage.db",
        transport=transport,
        settings=OutboxSettings.from_values(
            poll_interval=0.05, error_delay=0.05, error_delay_max=0.2, max_retry=2
        ),
    )
    ob.register_event("a.e", "svc")
    ob.migrate()
    seen: list[int] = []
    ob.register_handler("a.e", lambda event, tx: seen.append(event.outbox_id))
    st = ob.store("svc")
    ids = [st.create_message("a.e", "k", {"event_type": "a.e", "payload": {}}) for _ in range(5)]
    transport.down = True
    task = asyncio.create_task(ob.run_async())

    def untouched() -> bool:
        rows = [st.get_by_id(i) for i in ids]
        return all(r is not None and r.status is Status.PENDING and not r.retry_count for r in rows)

    deadline = asyncio.get_running_loop().time() + WAIT
    # Twice max_retry probes, or until one of them was counted as an attempt.
    while transport.probes < 2 * 2 and untouched():
        assert asyncio.get_running_loop().time() < deadline, f"{transport.probes} probes"
        await asyncio.sleep(0.02)
    assert untouched(), "a probe during the outage was counted as an attempt"
    assert ob.stats.get("outages") == 1  # reported once, however many probes
    transport.down = False
    deadline = asyncio.get_running_loop().time() + WAIT
    while ob.stats.get("consumed") < 5:
        assert asyncio.get_running_loop().time() < deadline, "not consumed after the outage"
        await asyncio.sleep(0.05)
    ob.stop()
    await task
    assert sorted(seen) == ids
    assert all(st.get_by_id(i).retry_count == 0 for i in ids)  # type: ignore[union-attr]
    await ob.aclose()


async def test_a_batch_failing_only_transiently_is_an_outage(tmp_path: Path) -> None:
    transport = ScriptedTransport("_MSG_TIMED_OUT: Local: Message timed out", transient=True)
    ob = _outbox(tmp_path, transport)
    st = ob.store("svc")
    oid = st.create_message("a.e", "k", {"event_type": "a.e", "payload": {}}, max_retry=1)
    stats = Stats()
    relay = Relay(st, transport, ob.settings, hooks=stats, waker=Waker())
    assert await relay.run_once() == 1
    row = st.get_by_id(oid)
    assert row is not None
    assert (row.status, row.retry_count) == (Status.PENDING, 0)
    assert relay.outage_since is not None
    assert stats.get("outages") == 1
    transport.error = None
    backdate(ob, "svc", oid, "next_retry_at", 60)
    assert await relay.run_once() == 1
    assert relay.outage_since is None
    assert st.get_by_id(oid).status is Status.PUBLISHED  # type: ignore[union-attr]
    await ob.aclose()


async def test_a_transient_error_beside_successes_counts_no_attempt(tmp_path: Path) -> None:
    # Seen after a broker was replaced mid-batch: the requests the old broker had
    # acknowledged succeeded, the one that reached the new broker failed with
    # UNKNOWN_PRODUCER_ID. Counting it spent an attempt on a row for the broker's fault.
    transport = ScriptedTransport("UNKNOWN_PRODUCER_ID: Unknown Producer Id", transient=True)
    ob = _outbox(tmp_path, transport, error_delay=60.0)
    st = ob.store("svc")
    good = st.create_message("a.e", "k", {"event_type": "a.e", "payload": {}})
    bad = st.create_message("a.e", "k", {"event_type": "a.e", "payload": {}}, max_retry=1)
    transport.ok_ids = {good}
    stats = Stats()
    relay = Relay(st, transport, ob.settings, hooks=stats, waker=Waker())
    await relay.run_once()
    assert relay.outage_since is None
    assert st.get_by_id(good).status is Status.PUBLISHED  # type: ignore[union-attr]
    row = st.get_by_id(bad)
    assert row is not None
    assert (row.status, row.retry_count, row.last_error) == (Status.PENDING, 0, None)
    assert stats.get("send_failed") == 1
    assert await relay.run_once() == 0  # due again only after error_delay
    transport.ok_ids.add(bad)
    backdate(ob, "svc", bad, "next_retry_at", 120)
    assert await relay.run_once() == 1
    assert st.get_by_id(bad).status is Status.PUBLISHED  # type: ignore[union-attr]
    await ob.aclose()


@pytest.mark.parametrize(
    ("code", "transient", "permanent"),
    [
        # Purged by librdkafka when its producer fails fatally or is closed for a rebuild:
        # the producer's end, so no attempt is counted (the fault suite saw a purge after
        # UNKNOWN_PRODUCER_ID spend an attempt).
        ("_PURGE_QUEUE", True, False),
        ("_PURGE_INFLIGHT", True, False),
        ("UNKNOWN_PRODUCER_ID", True, False),
        ("_MSG_TIMED_OUT", True, False),
        ("MSG_SIZE_TOO_LARGE", False, True),
        ("INVALID_REQUIRED_ACKS", False, False),
    ],
)
def test_kafka_delivery_errors_are_classified(code: str, transient: bool, permanent: bool) -> None:
    kafka = pytest.importorskip("confluent_kafka")
    from outboxer.transports.kafka.errors import delivery_of  # noqa: PLC0415

    d = delivery_of(7, kafka.KafkaError(getattr(kafka.KafkaError, code)))
    assert (d.outbox_id, d.transient, d.permanent) == (7, transient, permanent)
    assert d.error is not None
    assert d.error.startswith(code)
