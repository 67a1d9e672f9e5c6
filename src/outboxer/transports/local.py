"""The in-process transport: the database is the queue.

``send`` hands a claimed batch straight to this process's consumer for the route and
returns once the consumer has processed it and committed the outcome in the
database, so the relay does not mark anything (``Delivery.settled``). If the process
dies in between, the claim's lease runs out and the rows are claimed again; several
processes on one PostgreSQL/MariaDB database share the work through the claim.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from outboxer.errors import TransportError
from outboxer.routing import ServiceRoute
from outboxer.transports.base import Delivery, Features, IncomingMessage, OutgoingMessage


class _NotTaken(TransportError):
    """The consumer stopped before it took the batch: nothing of it ran."""


@dataclass(slots=True)
class _Batch:
    messages: list[IncomingMessage]
    done: asyncio.Future[None]


class LocalSubscription:
    """The consumer side of one route's in-process handoff."""

    def __init__(self, route: ServiceRoute, queue: asyncio.Queue[_Batch]) -> None:
        self.route = route
        self._queue = queue
        self._pending: list[_Batch] = []
        self.closed = False

    @property
    def busy(self) -> bool:
        """A batch taken and not yet acknowledged (being processed)."""
        return bool(self._pending)

    async def receive(self, max_messages: int, timeout: float) -> list[IncomingMessage]:
        if self.closed:
            return []
        try:
            batch = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return []
        self._pending.append(batch)
        return list(batch.messages)

    async def ack(self, messages: Sequence[IncomingMessage]) -> None:
        acked = {id(m) for m in messages}
        still: list[_Batch] = []
        for batch in self._pending:
            if all(id(m) in acked for m in batch.messages):
                if not batch.done.done():
                    batch.done.set_result(None)
            else:
                still.append(batch)
        self._pending = still

    async def nack(self, messages: Sequence[IncomingMessage], *, delay: float = 0.0) -> None:
        # The rows are still claimed by the relay that handed them over: a failed
        # handoff leaves them so, and they are claimed again when the lease runs out.
        given = {id(m) for m in messages}
        still: list[_Batch] = []
        for batch in self._pending:
            if any(id(m) in given for m in batch.messages):
                if not batch.done.done():
                    batch.done.set_exception(TransportError("the consumer gave the batch back"))
            else:
                still.append(batch)
        self._pending = still

    async def close(self) -> None:
        self.closed = True
        for batch in self._pending:
            if not batch.done.done():
                batch.done.set_exception(TransportError("local consumer stopped"))
        self._pending = []
        while not self._queue.empty():
            batch = self._queue.get_nowait()
            if not batch.done.done():
                batch.done.set_exception(_NotTaken("local consumer stopped"))


class LocalTransport:
    """In-process delivery (the embedded default); needs relay and consumers together."""

    name = "local"
    features = Features(in_process=True, redelivers_unacked=False)

    def __init__(self, *, handoff_timeout: float = 300.0) -> None:
        self._queues: dict[str, asyncio.Queue[_Batch]] = {}
        self._subscriptions: dict[str, LocalSubscription] = {}
        self.handoff_timeout = handoff_timeout

    @property
    def delivers_in_process(self) -> bool:
        return True

    def check_route(self, route: ServiceRoute) -> None:
        pass  # any name the neutral rule allows

    async def start(self, routes: Sequence[ServiceRoute]) -> None:
        # Fresh queues per run: an asyncio queue belongs to the loop that first used it.
        self._queues = {r.service_name: asyncio.Queue(maxsize=1) for r in routes}
        self._subscriptions = {}

    async def subscribe(self, route: ServiceRoute) -> LocalSubscription:
        queue = self._queues.setdefault(route.service_name, asyncio.Queue(maxsize=1))
        sub = LocalSubscription(route, queue)
        self._subscriptions[route.service_name] = sub
        return sub

    async def send(
        self, route: ServiceRoute, messages: Sequence[OutgoingMessage]
    ) -> list[Delivery]:
        sub = self._subscriptions.get(route.service_name)
        if sub is None or sub.closed:
            error = f"no consumer for service {route.service_name!r} is running in this process"
            return [Delivery(m.outbox_id, error=error) for m in messages]
        incoming = [
            IncomingMessage(
                route=route,
                value=m.value,
                key=m.key.encode(),
                headers=dict(m.headers()),
                position=m.outbox_id,
                envelope=m.envelope,
                marked=m.marked,
            )
            for m in messages
        ]
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # The sender may be gone (cancelled) when the consumer side fails the batch.
        done.add_done_callback(_retrieve)
        taken = False
        try:
            await asyncio.wait_for(
                self._queues[route.service_name].put(_Batch(incoming, done)),
                self.handoff_timeout,
            )
            taken = True  # or queued: a consumer that stops first fails it _NotTaken
            await asyncio.wait_for(asyncio.shield(done), self.handoff_timeout)
        except (TimeoutError, TransportError) as exc:
            # The rows stay claimed; their lease expires and they are sent again.
            error = f"in-process handoff did not complete: {exc or 'timeout'}"
            untouched = not taken or isinstance(exc, _NotTaken)
            return [
                Delivery(m.outbox_id, error=error, settled=True, transient=untouched)
                for m in messages
            ]
        return [Delivery(m.outbox_id, settled=True) for m in messages]

    def idle(self, route: ServiceRoute) -> bool:
        """Whether ``route``'s consumer is running and has nothing to do: a batch
        handed over now is taken at once."""
        sub = self._subscriptions.get(route.service_name)
        queue = self._queues.get(route.service_name)
        return (
            sub is not None
            and not sub.closed
            and not sub.busy
            and queue is not None
            and queue.empty()
        )

    async def close(self) -> None:
        for sub in self._subscriptions.values():
            await sub.close()


def _retrieve(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()
