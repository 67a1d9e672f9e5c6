"""NATS-specific behaviour beyond the contract suite, on the real server."""

from __future__ import annotations

import time
import uuid

import pytest

from outboxer.routing import ServiceRoute
from outboxer.settings import OutboxSettings
from outboxer.transports.base import OutgoingMessage
from outboxer.transports.nats import create
from outboxer.transports.nats.subscription import NatsSubscription

pytestmark = [pytest.mark.nats, pytest.mark.timeout(120)]


def _messages(start: int, count: int) -> list[OutgoingMessage]:
    return [
        OutgoingMessage(i, 0, f"k{i % 3}", b"%d" % i, f"e-{i}", "t", "v1")
        for i in range(start, start + count)
    ]


async def test_a_server_that_lost_its_stream_gets_it_and_the_consumers_again(
    nats_url: str,
) -> None:
    """A server replaced by an empty one: the relay declares the stream again when a
    publish finds none, the subscription its consumers once its fetches found nothing
    for a while, and what is published afterwards is received."""
    transport = create(nats_url, OutboxSettings.from_values(lease=3.0))
    name = f"nt{uuid.uuid4().hex[:6]}"
    route = ServiceRoute(f"s_{name}", f"s_{name}_outbox", f"{name}.orders", f"{name}.orders.g")
    await transport.start([route])
    sub = await transport.subscribe(route)
    assert isinstance(sub, NatsSubscription)
    try:
        assert all(d.ok for d in await transport.send(route, _messages(1, 4)))
        first = await sub.receive(10, 2.0)
        assert len(first) == 4
        await sub.ack(first)

        # The stream vanishes as with a new, empty server (a connection of its own).
        await transport.delete_destinations([route.topic])
        transport._ready.add(route.topic)  # the relay does not know yet
        lost = await transport.send(route, _messages(5, 2))
        assert all(d.transient and not d.permanent for d in lost), lost
        # The next send declares the stream again and gets through.
        again = await transport.send(route, _messages(5, 2))
        assert all(d.ok for d in again), again

        got: list[int] = []
        deadline = time.monotonic() + 30
        while len(got) < 2:
            assert time.monotonic() < deadline, f"received {got} after the loss"
            batch = await sub.receive(10, 1.0)
            got.extend(int(m.value or b"0") for m in batch)
            await sub.ack(batch)
        assert sorted(got) == [5, 6]
        assert sub.rebuilds == 1
    finally:
        await sub.close()
        await transport.close()


def _route() -> ServiceRoute:
    name = f"nt{uuid.uuid4().hex[:6]}"
    return ServiceRoute(f"s_{name}", f"s_{name}_outbox", f"{name}.orders", f"{name}.orders.g")


async def test_a_batch_held_longer_than_ack_wait_is_not_delivered_twice(nats_url: str) -> None:
    """While a subscription holds a batch, its in-progress acks keep JetStream from
    handing the messages to another reader after ``ack_wait``; once it is gone
    without acknowledging, they come again."""
    settings = OutboxSettings.from_values(nats={"ack_wait": 1.5, "lanes": 1})
    transport = create(nats_url, settings)
    route = _route()
    await transport.start([route])
    holder = await transport.subscribe(route)
    other = await transport.subscribe(route)
    try:
        assert all(d.ok for d in await transport.send(route, _messages(1, 3)))
        held = await holder.receive(10, 2.0)
        assert len(held) == 3
        # Three times ack_wait: without in-progress acks the other reader gets them.
        deadline = time.monotonic() + 4.5
        while time.monotonic() < deadline:
            assert await other.receive(10, 0.5) == []
        await holder.ack(held)
        assert await other.receive(10, 2.0) == []
    finally:
        await holder.close()
        await other.close()
        await transport.close()


async def test_a_message_over_the_servers_max_payload_is_permanent(nats_url: str) -> None:
    transport = create(nats_url, OutboxSettings.from_values())
    route = _route()
    await transport.start([route])
    try:
        big = OutgoingMessage(1, 0, "k", b"x" * (2 * 1024 * 1024), "e-1", "t", "v1")
        small = _messages(2, 1)[0]
        too_big, fine = await transport.send(route, [big, small])
        assert too_big.permanent
        assert not too_big.transient
        assert too_big.error is not None
        assert "MaxPayload" in too_big.error
        assert fine.ok
    finally:
        await transport.close()


async def test_with_max_ack_pending_1_a_lane_is_read_in_order_across_readers(
    nats_url: str,
) -> None:
    """``nats.max_ack_pending = 1``: one message of a lane out at a time, so two
    readers of one group take a key's messages in publish order, also after one of
    them gave a message back."""
    settings = OutboxSettings.from_values(nats={"lanes": 1, "max_ack_pending": 1})
    transport = create(nats_url, settings)
    route = _route()
    await transport.start([route])
    readers = [await transport.subscribe(route), await transport.subscribe(route)]
    try:
        assert all(d.ok for d in await transport.send(route, _messages(1, 6)))
        order: list[int] = []
        gave_back = False
        deadline = time.monotonic() + 30
        while len(order) < 6:
            assert time.monotonic() < deadline, f"read {order}"
            rounds = [await r.receive(10, 0.3) for r in readers]
            got = [(r, m) for r, batch in zip(readers, rounds, strict=True) for m in batch]
            assert len(got) <= 1, [int(m.value or b"0") for _, m in got]
            if not got:
                continue
            reader, message = got[0]
            if int(message.value or b"0") == 3 and not gave_back:
                gave_back = True
                await reader.nack([message])
                continue
            order.append(int(message.value or b"0"))
            await reader.ack([message])
        assert order == [1, 2, 3, 4, 5, 6]
        assert gave_back
    finally:
        for r in readers:
            await r.close()
        await transport.close()
