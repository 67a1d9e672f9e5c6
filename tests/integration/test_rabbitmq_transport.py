"""What the RabbitMQ transport promises beyond the contract suite, on the real broker:
unroutable messages are not sent, a too-large message is the message's fault, topology
that may not be declared is waited for with a clear error, a lane is read in order
again after a nack."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest

from outboxer.errors import TransportError
from outboxer.routing import ServiceRoute
from outboxer.transports.base import IncomingMessage, OutgoingMessage
from outboxer.transports.rabbitmq.admin import lane_of
from outboxer.transports.rabbitmq.transport import RabbitMQTransport
from outboxer.transports.registry import make_transport
from tests.helpers import isolated_settings
from tests.rabbitmq_broker import RabbitVhost

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(120)]


def _transport(vhost: RabbitVhost, **rabbitmq: Any) -> RabbitMQTransport:
    transport = make_transport(vhost.url, isolated_settings(rabbitmq=rabbitmq))
    assert isinstance(transport, RabbitMQTransport)
    return transport


def _route() -> ServiceRoute:
    name = f"svc_{uuid.uuid4().hex[:10]}"
    return ServiceRoute(name, f"{name}_outbox", f"rmq.{name}", f"rmq.{name}.g")


def _messages(
    count: int, *, key: str = "k", size: int = 0, start: int = 1
) -> list[OutgoingMessage]:
    out = []
    for oid in range(start, start + count):
        value = json.dumps({"outbox_id": oid, "pad": "x" * size}).encode()
        out.append(OutgoingMessage(oid, 0, key, value, f"e-{oid}", "rmq.sent", "v1"))
    return out


def _ids(messages: list[IncomingMessage]) -> list[int]:
    return [json.loads(m.value or b"{}")["outbox_id"] for m in messages]


async def _collect(sub: Any, count: int, *, max_messages: int = 100) -> list[IncomingMessage]:
    got: list[IncomingMessage] = []
    deadline = time.monotonic() + 30
    while len(got) < count:
        assert time.monotonic() < deadline, f"received {len(got)} of {count}"
        got.extend(await sub.receive(min(max_messages, count - len(got)), 0.5))
    return got


async def test_a_message_no_queue_takes_is_not_sent(rabbitmq_vhost: RabbitVhost) -> None:
    # The exchange exists, but no group has subscribed: no queue is bound.
    transport = _transport(rabbitmq_vhost)
    route = _route()
    try:
        await transport.start([route])
        deliveries = await transport.send(route, _messages(3))
        assert [d.outbox_id for d in deliveries] == [1, 2, 3]
        assert all(d.transient and not d.permanent and not d.ok for d in deliveries)
        assert all("no queue bound" in (d.error or "") for d in deliveries)
        # Once the group subscribed, the same transport sends them.
        sub = await transport.subscribe(route)
        sent = await transport.send(route, _messages(3))
        assert all(d.ok for d in sent)
        # No offsets on RabbitMQ: where a message went is its exchange and lane.
        assert {d.coordinates for d in sent} == {f"{route.topic}/{lane_of('k', 8)}"}
        got = await _collect(sub, 3)
        assert sorted(_ids(got)) == [1, 2, 3]
        assert {m.coordinates for m in got} == {f"{route.topic}/{lane_of('k', 8)}"}
        await sub.ack(got)
    finally:
        await transport.close()


async def test_a_message_above_the_limit_ends_dead_and_the_batch_goes_on(
    rabbitmq_vhost: RabbitVhost,
) -> None:
    transport = _transport(rabbitmq_vhost, max_message_size=500)
    route = _route()
    try:
        await transport.start([route])
        sub = await transport.subscribe(route)
        batch = [*_messages(1), *_messages(1, size=1000, start=2), *_messages(1, start=3)]
        deliveries = await transport.send(route, batch)
        assert [d.ok for d in deliveries] == [True, False, True]
        assert deliveries[1].permanent
        assert "max_message_size" in (deliveries[1].error or "")
        got = await _collect(sub, 2)
        assert sorted(_ids(got)) == [1, 3]
        await sub.ack(got)
    finally:
        await transport.close()


async def test_topology_that_may_not_be_declared_is_waited_for(
    rabbitmq_vhost: RabbitVhost,
) -> None:
    transport = _transport(rabbitmq_vhost, declare_topology=False, topology_wait_timeout=1.0)
    route = _route()
    try:
        started = time.monotonic()
        with pytest.raises(TransportError, match=f"exchange {route.topic}"):
            await transport.start([route])
        assert time.monotonic() - started >= 1.0
    finally:
        await transport.close()
    # Declared by someone else (here: a transport allowed to), it is found.
    declaring = _transport(rabbitmq_vhost)
    waiting = _transport(rabbitmq_vhost, declare_topology=False, topology_wait_timeout=5.0)
    try:
        await declaring.start([route])
        await (await declaring.subscribe(route)).close()
        await waiting.start([route])
        sub = await waiting.subscribe(route)
        assert all(d.ok for d in await waiting.send(route, _messages(2)))
        await sub.ack(await _collect(sub, 2))
    finally:
        await waiting.close()
        await declaring.close()


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
async def test_a_lane_is_read_in_order_again_after_a_nack(
    rabbitmq_vhost: RabbitVhost, queue_type: str
) -> None:
    transport = _transport(rabbitmq_vhost, lanes=2, prefetch=200, queue_type=queue_type)
    route = _route()
    try:
        await transport.start([route])
        sub = await transport.subscribe(route)
        assert all(d.ok for d in await transport.send(route, _messages(150, key="same")))
        first = await _collect(sub, 5, max_messages=5)
        assert _ids(first) == [1, 2, 3, 4, 5]
        await sub.ack(first[:2])
        # Give back 3..5 while 6..150 are already delivered to this consumer's buffer
        # (more than 32: the broker returns them in order, not in a map's order).
        await sub.nack(first[2:])
        again = await _collect(sub, 148)
        assert _ids(again) == list(range(3, 151))
        await sub.ack(again)
        assert await sub.receive(10, 1.0) == []
    finally:
        await transport.close()
