"""The in-process transport hands the relay's envelopes to the consumer as they are."""

from __future__ import annotations

import asyncio

from outboxer import Envelope
from outboxer.routing import ServiceRoute
from outboxer.transports.base import OutgoingMessage
from outboxer.transports.local import LocalTransport


def test_the_consumer_receives_the_envelope_the_relay_built() -> None:
    route = ServiceRoute("svc", "svc_outbox", "t.svc", "t.svc.g")
    envelope = Envelope(
        outbox_id=7,
        event_id="e-7",
        event_type="thing.done",
        event_version="v1",
        aggregate_id="k",
        payload={"n": 1},
    )
    built = OutgoingMessage.from_envelope(envelope, key="k", retry_count=0)
    handed = OutgoingMessage(
        7, 0, "k", built.value, "e-7", "thing.done", "v1", {}, envelope=envelope
    )

    async def main() -> list[object]:
        transport = LocalTransport(handoff_timeout=5)
        await transport.start([route])
        sub = await transport.subscribe(route)
        sending = asyncio.create_task(transport.send(route, [handed, built]))
        batch = await sub.receive(10, 5)
        await sub.ack(batch)
        deliveries = await sending
        assert all(d.error is None and d.settled for d in deliveries)
        await transport.close()
        return [m.envelope for m in batch]

    got = asyncio.run(main())
    assert got[0] is envelope  # handed over, not parsed again
    assert got[1] is None  # a message without one: the consumer parses its bytes


def test_idle_and_a_batch_the_consumer_never_took() -> None:
    """``idle`` is true only while the consumer waits with nothing queued; a batch
    still queued when the consumer stops comes back ``transient`` (nothing of it
    ran: the relay may clear its claim's marks), one being processed does not."""
    route = ServiceRoute("svc", "svc_outbox", "t.svc", "t.svc.g")
    first = [OutgoingMessage(1, 0, "k", b"{}", "e-1", "thing.done", "v1", {}, marked=True)]
    second = [OutgoingMessage(2, 0, "k", b"{}", "e-2", "thing.done", "v1", {}, marked=True)]

    async def main() -> None:
        transport = LocalTransport(handoff_timeout=5)
        await transport.start([route])
        assert not transport.idle(route)  # no consumer yet
        sub = await transport.subscribe(route)
        assert transport.idle(route)
        taken = asyncio.create_task(transport.send(route, first))
        batch = await sub.receive(10, 5)
        assert [m.marked for m in batch] == [True]
        assert not transport.idle(route)  # processing it
        queued = asyncio.create_task(transport.send(route, second))
        await asyncio.sleep(0.01)
        await transport.close()  # the consumer stops
        processing, never = await taken, await queued
        assert [(d.settled, d.error is not None, d.transient) for d in processing] == [
            (True, True, False)
        ]
        assert [(d.settled, d.error is not None, d.transient) for d in never] == [
            (True, True, True)
        ]

    asyncio.run(main())
