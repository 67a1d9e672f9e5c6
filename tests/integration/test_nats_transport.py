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
