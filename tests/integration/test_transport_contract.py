"""The transport contract: one suite that every registered transport passes.

Each transport declares what it promises beyond the protocol in its ``features``
(:class:`outboxer.transports.base.Features`); a test of a promise a transport does not
make is skipped for it, or checks what the transport does instead (the in-process
transport has no broker that keeps messages: what a consumer does not acknowledge
comes back through the database, after the claim's lease). A new transport adds one
:class:`Case` to ``CASES``: how to reach it, and how to break it for the fault tests;
``test_every_registered_transport_has_a_case`` fails until it does.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from outboxer import Outbox, Status, Store
from outboxer.errors import TransportError
from outboxer.routing import ServiceRoute
from outboxer.settings import OutboxSettings
from outboxer.testing import EmbeddedKafka, free_port
from outboxer.transports.base import (
    Delivery,
    Features,
    IncomingMessage,
    OutgoingMessage,
    Subscription,
    Transport,
)
from outboxer.transports.registry import make_transport, schemes
from tests.helpers import delete_redis_keys, isolated_settings, redis_prefix
from tests.rabbitmq_broker import RabbitVhost

pytestmark = pytest.mark.timeout(300)

REDIS_PREFIX = redis_prefix()
"""The Redis case's keys (streams, leases), deleted after each test."""

WAIT = 60.0
"""Bound (seconds) of every wait for messages (a Kafka group join takes seconds)."""


@dataclass(frozen=True)
class Case:
    """How the suite reaches one transport and how it breaks it."""

    scheme: str
    url: Callable[[pytest.FixtureRequest], str]
    down_url: Callable[[pytest.FixtureRequest], str] | None = None
    """A transport of this kind whose broker is unreachable (outage tests)."""
    break_client: Callable[[Transport], None] | None = None
    """Put the transport's client in the state a fatal error leaves it in."""
    break_subscription: Callable[[Subscription], Awaitable[None]] | None = None
    """Take a subscription's client away from under it (its next call fails)."""
    settings: Callable[[], dict[str, Any]] = dict


def _kafka_url(request: pytest.FixtureRequest) -> str:
    broker: EmbeddedKafka = request.getfixturevalue("kafka_broker")
    return broker.transport_url


def _kafka_down(request: pytest.FixtureRequest) -> str:
    return f"kafka://127.0.0.1:{free_port()}"  # nothing listens there


def _kafka_fatal(transport: Transport) -> None:
    # A producer after a fatal error delivers nothing more: here its callbacks stop
    # being served, and it is flagged as the error callback flags it (librdkafka
    # offers no way to raise a fatal error on demand from Python;
    # tests/unit/test_kafka_producer.py feeds one through a fake client).
    handle = transport._producer  # type: ignore[attr-defined]
    assert handle is not None
    handle._stop.set()
    handle._thread.join(10)
    handle.break_("fatal error planted by the contract suite")


async def _kafka_consumer_gone(sub: Subscription) -> None:
    # The librdkafka consumer closed under the subscription: every call on it raises.
    consumer = sub._consumer  # type: ignore[attr-defined]
    await sub._call(consumer.close)  # type: ignore[attr-defined]


def _nats_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("nats_url")  # type: ignore[no-any-return]


def _nats_down(request: pytest.FixtureRequest) -> str:
    return f"nats://127.0.0.1:{free_port()}"  # nothing listens there


def _nats_fatal(transport: Transport) -> None:
    # The connection flagged as its closed callback flags it after a fatal error
    # (an authorization violation closes it for good).
    transport.break_client("fatal error planted by the contract suite")  # type: ignore[attr-defined]


async def _nats_connection_gone(sub: Subscription) -> None:
    # The subscription's connection closed under it: every fetch on it fails.
    await sub._conn.client.close()  # type: ignore[attr-defined]


def _redis_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue("redis_server")
    # Every key of the test starts with REDIS_PREFIX (the case's settings): gone after it.
    request.addfinalizer(lambda: delete_redis_keys(url, REDIS_PREFIX))
    return url


def _redis_down(request: pytest.FixtureRequest) -> str:
    return f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there


def _redis_fatal(transport: Transport) -> None:
    # The client's connections closed and pointing at a port where nothing listens:
    # its next command fails on the connection, as after a server that went away.
    client = transport._client  # type: ignore[attr-defined]
    assert client is not None
    pool = client.connection_pool
    dead = free_port()
    pool.connection_kwargs["port"] = dead
    for conn in [*pool._available_connections, *pool._in_use_connections]:
        conn._close()
        conn.port = dead


async def _redis_client_gone(sub: Subscription) -> None:
    client = sub._client  # type: ignore[attr-defined]
    assert client is not None
    client.connection_pool.connection_kwargs["port"] = free_port()
    await client.connection_pool.disconnect()


def _amqp_url(request: pytest.FixtureRequest) -> str:
    vhost: RabbitVhost = request.getfixturevalue("rabbitmq_vhost")
    return vhost.url


def _amqp_down(request: pytest.FixtureRequest) -> str:
    return f"amqp://guest:guest@127.0.0.1:{free_port()}/"  # nothing listens there


def _amqp_fatal(transport: Transport) -> None:
    # The publishing connection is gone (the broker closed it, or a fatal protocol
    # error did): the next send must build a new one.
    handle = transport._producer  # type: ignore[attr-defined]
    assert handle is not None
    asyncio.get_running_loop().create_task(handle.connection.close())
    handle.break_("connection closed by the contract suite")


async def _amqp_consumer_gone(sub: Subscription) -> None:
    # The subscription's connection closed under it (as the broker closes it).
    await sub._connection.close()  # type: ignore[attr-defined]


def _memory_down(request: pytest.FixtureRequest) -> str:
    return "memory-down"


CASES = [
    Case("local", lambda request: "local"),
    Case("memory", lambda request: "memory", down_url=_memory_down),
    Case(
        "kafka",
        _kafka_url,
        down_url=_kafka_down,
        break_client=_kafka_fatal,
        break_subscription=_kafka_consumer_gone,
        # Short delivery timeout (80% of the lease) for the outage test.
        settings=lambda: {"lease": 3.0, "kafka": {"session_timeout_ms": 6000}},
    ),
    Case(
        "nats",
        _nats_url,
        down_url=_nats_down,
        break_client=_nats_fatal,
        break_subscription=_nats_connection_gone,
        # Short PubAck timeout (80% of the lease) for the outage test.
        settings=lambda: {"lease": 3.0, "nats": {"ack_wait": 5.0, "connect_timeout": 1.0}},
    ),
    Case(
        "redis",
        _redis_url,
        down_url=_redis_down,
        break_client=_redis_fatal,
        break_subscription=_redis_client_gone,
        settings=lambda: {"redis": {"key_prefix": REDIS_PREFIX, "socket_timeout": 2.0}},
    ),
    Case(
        "amqp",
        _amqp_url,
        down_url=_amqp_down,
        break_client=_amqp_fatal,
        break_subscription=_amqp_consumer_gone,
        settings=lambda: {"lease": 5.0, "rabbitmq": {"lanes": 4}},
    ),
]


def _param(case: Case) -> Any:
    by_scheme = {"kafka": pytest.mark.kafka, "nats": pytest.mark.nats, "redis": pytest.mark.redis}
    by_scheme["amqp"] = pytest.mark.rabbitmq
    mark = by_scheme.get(case.scheme)
    return pytest.param(case, id=case.scheme, marks=[mark] if mark else [])


@pytest.fixture(params=[_param(c) for c in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    return request.param  # type: ignore[no-any-return]


@dataclass
class Bench:
    """One transport under test, with a fresh route of its own."""

    case: Case
    transport: Transport
    route: ServiceRoute
    request: pytest.FixtureRequest

    @property
    def features(self) -> Features:
        return self.transport.features

    def another(self) -> Transport:
        """A second transport of the same kind (another process's, say)."""
        return _build(self.case, self.request)


def _build(case: Case, request: pytest.FixtureRequest, url: str | None = None) -> Transport:
    url = url or case.url(request)
    if url == "memory-down":
        transport = make_transport("memory", isolated_settings())
        transport.down = True  # type: ignore[attr-defined]
        return transport
    return make_transport(url, isolated_settings(**case.settings()))


def _route() -> ServiceRoute:
    name = f"svc_{uuid.uuid4().hex[:10]}"
    return ServiceRoute(name, f"{name}_outbox", f"contract.{name}", f"contract.{name}.g")


@pytest.fixture
async def bench(case: Case, request: pytest.FixtureRequest) -> Any:
    transport = _build(case, request)
    route = _route()
    await transport.start([route])
    yield Bench(case, transport, route, request)
    await transport.close()


def _messages(keys: Sequence[str], per_key: int, start: int = 1) -> list[OutgoingMessage]:
    out = []
    oid = start
    for n in range(per_key):
        for key in keys:
            value = json.dumps({"outbox_id": oid, "key": key, "n": n}).encode()
            out.append(OutgoingMessage(oid, 0, key, value, f"e-{oid}", "contract.sent", "v1"))
            oid += 1
    return out


def _ids(messages: Sequence[IncomingMessage]) -> list[int]:
    return [json.loads(m.value or b"{}")["outbox_id"] for m in messages]


async def _collect(
    sub: Subscription, count: int, *, timeout: float = WAIT
) -> list[IncomingMessage]:
    """Receive until ``count`` messages arrived (fails after ``timeout`` seconds)."""
    got: list[IncomingMessage] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        assert time.monotonic() < deadline, f"received {len(got)} of {count} in {timeout}s"
        got.extend(await sub.receive(count - len(got), 0.5))
    return got


async def _send(bench: Bench, messages: Sequence[OutgoingMessage]) -> asyncio.Task[list[Delivery]]:
    """Start sending; a broker's send completes alone, an in-process one only when
    the consumer side has finished (so it runs as a task either way)."""
    task = asyncio.create_task(bench.transport.send(bench.route, messages))
    if not bench.features.in_process:
        deliveries = await task
        assert [d.outbox_id for d in deliveries] == [m.outbox_id for m in messages]
        assert all(d.ok and not d.settled for d in deliveries), deliveries
    return task


# ---------------------------------------------------------------------- the registry


def test_every_registered_transport_has_a_case() -> None:
    assert sorted(c.scheme for c in CASES) == schemes()


def test_the_declared_features(case: Case, request: pytest.FixtureRequest) -> None:
    transport = _build(case, request)
    assert isinstance(transport, Transport)
    assert transport.features.in_process == transport.delivers_in_process
    # Promises that need each other.
    assert not transport.features.requeue_delay or transport.features.requeue


# ---------------------------------------------------------------------- send, receive, ack


async def test_send_receive_and_acknowledge(bench: Bench) -> None:
    sub = await bench.transport.subscribe(bench.route)
    assert isinstance(sub, Subscription)
    messages = _messages(["a", "b"], 5)
    sending = await _send(bench, messages)
    got = await _collect(sub, len(messages))
    assert sorted(_ids(got)) == [m.outbox_id for m in messages]
    sent = {m.outbox_id: m for m in messages}
    for m in got:
        original = sent[_ids([m])[0]]
        assert m.route == bench.route
        assert m.value == original.value
        assert m.key == original.key.encode()
        assert m.headers["event_id"] == original.event_id.encode()
        assert m.headers["event_type"] == b"contract.sent"
    await sub.ack(got)
    deliveries = await sending
    assert all(d.ok for d in deliveries)
    if bench.features.in_process:
        # The consumer recorded the outcome: the relay must not mark these rows.
        assert all(d.settled for d in deliveries)
        await sub.close()
        return
    # Lineage: a broker says where it put each message, and a reader where it read
    # it, in the same words (docs/architecture.md, "Add a transport").
    where_sent = {d.outbox_id: d.coordinates for d in deliveries}
    assert all(where_sent.values()), where_sent
    assert {_ids([m])[0]: m.coordinates for m in got} == where_sent
    await sub.close()
    # What was acknowledged stays so: the group's next reader starts after it.
    later = _messages(["a"], 1, start=100)
    await _send(bench, later)
    sub = await bench.transport.subscribe(bench.route)
    assert _ids(await _collect(sub, 1)) == [100]
    assert await sub.receive(10, 1.0) == []
    await sub.close()


async def test_propagation_headers_travel(bench: Bench) -> None:
    sub = await bench.transport.subscribe(bench.route)
    [message] = _messages(["k"], 1)
    traced = OutgoingMessage(
        message.outbox_id,
        0,
        message.key,
        message.value,
        message.event_id,
        message.event_type,
        message.event_version,
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    )
    sending = await _send(bench, [traced])
    [got] = await _collect(sub, 1)
    assert got.headers["traceparent"].startswith(b"00-0af76519")
    await sub.ack([got])
    await sending
    await sub.close()


# ---------------------------------------------------------------------- order


async def test_order_per_key(bench: Bench) -> None:
    if not bench.features.ordered_per_key:
        pytest.skip(f"{bench.case.scheme} does not keep order per key")
    sub = await bench.transport.subscribe(bench.route)
    keys = ["k1", "k2", "k3", "k4"]
    batches = [_messages(keys, 10, start=1 + 40 * i) for i in range(3)]
    got: list[IncomingMessage] = []
    for batch in batches:
        sending = await _send(bench, batch)
        received = await _collect(sub, len(batch))
        await sub.ack(received)
        await sending
        got.extend(received)
    per_key: dict[bytes | None, list[int]] = {}
    for m in got:
        per_key.setdefault(m.key, []).append(_ids([m])[0])
    assert set(per_key) == {k.encode() for k in keys}
    for ids in per_key.values():
        assert ids == sorted(ids)
        assert len(ids) == 30
    await sub.close()


# ---------------------------------------------------------------------- redelivery


async def test_what_a_dead_consumer_did_not_acknowledge_comes_again(bench: Bench) -> None:
    first = await bench.transport.subscribe(bench.route)
    messages = _messages(["a", "b", "c"], 4)
    sending = await _send(bench, messages)
    got = await _collect(first, len(messages))
    await first.close()  # without acknowledging: its process died before its commit
    if not bench.features.redelivers_unacked:
        # In process: the relay learns that the handoff failed; the rows stay claimed
        # and are claimed again when the lease runs out.
        deliveries = await sending
        assert all(not d.ok and d.settled for d in deliveries), deliveries
        return
    assert len(got) == len(messages)
    second = await bench.transport.subscribe(bench.route)
    again = await _collect(second, len(messages))
    assert sorted(_ids(again)) == sorted(_ids(got))
    await second.ack(again)
    await second.close()


async def test_nack_gives_messages_back(bench: Bench) -> None:
    sub = await bench.transport.subscribe(bench.route)
    messages = _messages(["a", "b"], 3)
    sending = await _send(bench, messages)
    got = await _collect(sub, len(messages))
    await sub.nack(got)
    if not bench.features.requeue:
        deliveries = await sending
        assert all(not d.ok for d in deliveries), deliveries
        await sub.close()
        return
    again = await _collect(sub, len(messages))
    assert sorted(_ids(again)) == sorted(_ids(got))
    await sub.ack(again)
    await sub.close()


async def test_nack_with_a_delay_holds_messages_back(bench: Bench) -> None:
    if not bench.features.requeue_delay:
        pytest.skip(f"{bench.case.scheme} cannot hold messages back")
    sub = await bench.transport.subscribe(bench.route)
    messages = _messages(["a"], 3)
    await _send(bench, messages)
    got = await _collect(sub, len(messages))
    delay = 3.0
    given_back = time.monotonic()
    await sub.nack(got, delay=delay)
    again = await _collect(sub, len(messages))
    waited = time.monotonic() - given_back
    assert waited >= delay * 0.9, f"given back after {waited:.2f}s, not {delay}s"
    assert sorted(_ids(again)) == sorted(_ids(got))
    await sub.ack(again)
    await sub.close()


# ---------------------------------------------------------------------- faults


async def test_an_unreachable_broker_is_an_outage_not_an_attempt(
    case: Case, request: pytest.FixtureRequest
) -> None:
    if case.down_url is None:
        pytest.skip(f"{case.scheme} has no broker to lose")
    transport = _build(case, request, case.down_url(request))
    route = _route()
    messages = _messages(["a", "b"], 2)
    try:
        try:
            deliveries = await transport.send(route, messages)
        except TransportError:
            return  # the transport failed as a whole: the relay counts no attempt
        assert [d.outbox_id for d in deliveries] == [m.outbox_id for m in messages]
        # Per message, then: every failure is the broker's, none the message's.
        assert all(not d.ok and d.transient and not d.permanent for d in deliveries), deliveries
    finally:
        await transport.close()


async def test_a_client_with_a_fatal_error_is_rebuilt(bench: Bench) -> None:
    if not bench.features.rebuilds_clients or bench.case.break_client is None:
        pytest.skip(f"{bench.case.scheme} has no client to rebuild")
    sub = await bench.transport.subscribe(bench.route)
    await _send(bench, _messages(["a"], 1))
    bench.case.break_client(bench.transport)
    # The next send builds a new client and gets through, without a restart.
    await _send(bench, _messages(["a"], 1, start=2))
    got = await _collect(sub, 2)
    assert sorted(_ids(got)) == [1, 2]
    await sub.ack(got)
    await sub.close()


async def test_a_subscription_whose_client_failed_is_rebuilt(bench: Bench) -> None:
    if not bench.features.rebuilds_clients or bench.case.break_subscription is None:
        pytest.skip(f"{bench.case.scheme} has no client to rebuild")
    sub = await bench.transport.subscribe(bench.route)
    await _send(bench, _messages(["a"], 1))
    first = await _collect(sub, 1)
    await sub.ack(first)
    await bench.case.break_subscription(sub)
    await _send(bench, _messages(["a"], 1, start=2))
    # The next receive meets the failure, builds a new client, and goes on reading.
    assert _ids(await _collect(sub, 1)) == [2]
    await sub.close()


# ---------------------------------------------------------------------- with the outbox


class Probe:
    """Wraps a transport; checks at every acknowledgement that each acknowledged
    message's row is already committed as consumed (read on a connection of its own)."""

    def __init__(self, inner: Transport, consumed: Callable[[list[int]], set[int]]) -> None:
        self.inner = inner
        self.name = inner.name
        self.features = inner.features
        self.consumed = consumed
        self.acked: list[int] = []
        self.early: list[int] = []

    @property
    def delivers_in_process(self) -> bool:
        return self.inner.delivers_in_process

    def check_route(self, route: ServiceRoute) -> None:
        self.inner.check_route(route)

    async def start(self, routes: Sequence[ServiceRoute]) -> None:
        await self.inner.start(routes)

    async def send(
        self, route: ServiceRoute, messages: Sequence[OutgoingMessage]
    ) -> list[Delivery]:
        return await self.inner.send(route, messages)

    async def subscribe(self, route: ServiceRoute) -> Subscription:
        return ProbeSubscription(await self.inner.subscribe(route), self)

    async def close(self) -> None:
        await self.inner.close()


class ProbeSubscription:
    def __init__(self, inner: Subscription, probe: Probe) -> None:
        self.inner = inner
        self.route = inner.route
        self.probe = probe

    async def receive(self, max_messages: int, timeout: float) -> list[IncomingMessage]:
        return await self.inner.receive(max_messages, timeout)

    async def ack(self, messages: Sequence[IncomingMessage]) -> None:
        ids = _ids(messages)
        done = await asyncio.to_thread(self.probe.consumed, ids)
        self.probe.early.extend(i for i in ids if i not in done)
        self.probe.acked.extend(ids)
        await self.inner.ack(messages)

    async def nack(self, messages: Sequence[IncomingMessage], *, delay: float = 0.0) -> None:
        await self.inner.nack(messages, delay=delay)

    async def close(self) -> None:
        await self.inner.close()


async def test_nothing_is_acknowledged_before_the_database_commit(
    case: Case, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    service = f"svc_{uuid.uuid4().hex[:10]}"
    settings = OutboxSettings.from_values(
        **{**case.settings(), "lease": 30.0}, topic_prefix=f"c{uuid.uuid4().hex[:6]}"
    )
    stores: list[Store] = []

    def consumed(ids: list[int]) -> set[int]:
        found = (stores[0].get_by_id(i) for i in ids)
        return {m.id for m in found if m is not None and m.status is Status.CONSUMED}

    probe = Probe(make_transport(case.url(request), settings), consumed)
    outbox = Outbox(
        f"sqlite:///{tmp_path / 'contract.db'}",
        settings=settings,
        transport=probe,  # type: ignore[arg-type]
    )
    handled: list[int] = []

    @outbox.handler(f"{service}.happened", service=service)
    def handle(event: Any, tx: Any) -> None:
        handled.append(event.payload["n"])

    outbox.migrate()
    stores.append(outbox.store(service))
    with outbox.db.sync_engine.begin() as conn:
        for n in range(20):
            outbox.publish(conn, f"{service}.happened", {"n": n}, key=f"k{n % 3}")

    async def settled() -> None:
        deadline = time.monotonic() + WAIT
        while len(probe.acked) < 20:
            assert time.monotonic() < deadline, f"acknowledged {len(probe.acked)} of 20"
            await asyncio.sleep(0.1)

    run = asyncio.create_task(outbox.run_async())
    try:
        await settled()
    finally:
        outbox.stop()
        await run
        outbox.close()
    assert sorted(handled) == list(range(20))
    assert sorted(probe.acked) == sorted(set(probe.acked))
    assert probe.early == []
