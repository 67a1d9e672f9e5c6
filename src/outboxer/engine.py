"""The engine: handlers, relay and consumer tasks, start and a clean stop.

Used through :class:`outboxer.Outbox` (``handler``, ``register_handler``,
``run_async``, ``run``, ``stop``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import weakref
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection, event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

from outboxer.consumer import Dispatcher, Handler, check_handler, consume_loop
from outboxer.errors import ConfigurationError, HandlerError, OutboxError
from outboxer.metrics import Stats
from outboxer.relay import Relay, RelayConfig, Waker
from outboxer.routing import ServiceRoute
from outboxer.runner import callable_name
from outboxer.transports.base import Transport
from outboxer.transports.local import LocalTransport

if TYPE_CHECKING:
    from outboxer.outbox import Outbox

logger = logging.getLogger(__name__)

H = TypeVar("H", bound=Handler)


def make_transport(spec: str | Transport, outbox: Outbox) -> Transport:
    """``"local"``, ``"kafka://host:port[,host:port]"`` or a transport instance."""
    if not isinstance(spec, str):
        return spec
    if spec == "local":
        return LocalTransport()
    if spec.startswith("kafka://"):
        # Optional dependency: imported only when asked for.
        from outboxer.transports.kafka import KafkaTransport  # noqa: PLC0415

        servers = spec.removeprefix("kafka://").strip("/")
        if not servers:
            raise ConfigurationError(f"transport {spec!r} names no bootstrap servers")
        return KafkaTransport(servers, settings=outbox.settings.kafka, lease=outbox.settings.lease)
    raise ConfigurationError(
        f"unknown transport {spec!r}: use 'local', 'kafka://host:port' or a Transport instance"
    )


class _CommitWake:
    """Wakes this process's relays when a transaction that published commits."""

    def __init__(self, waker: Waker) -> None:
        self.waker = waker
        self._armed: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def arm(self, tx: Session | Connection | AsyncSession | AsyncConnection, service: str) -> None:
        target: Session | Connection
        if isinstance(tx, AsyncSession):
            target = tx.sync_session
        elif isinstance(tx, AsyncConnection):
            target = tx.sync_connection  # type: ignore[assignment]
        else:
            target = tx
        with self._lock:
            pending = self._armed.get(target)
            if pending is None:
                pending = set()
                self._armed[target] = pending
                name = "after_commit" if isinstance(target, Session) else "commit"
                event.listen(target, name, self._fire)
                rollback = "after_soft_rollback" if isinstance(target, Session) else "rollback"
                event.listen(target, rollback, self._discard)
            pending.add(service)

    def _take(self, target: Any) -> set[str]:
        with self._lock:
            pending = self._armed.get(target)
            if not pending:
                return set()
            taken = set(pending)
            pending.clear()
            return taken

    def _fire(self, target: Any) -> None:
        services = self._take(target)
        if services:
            self.waker.notify(services)

    def _discard(self, target: Any, *args: Any) -> None:
        self._take(target)


class Runtime:
    """Handlers and the running loops of one Outbox."""

    def __init__(self, outbox: Outbox, transport: str | Transport) -> None:
        self.outbox = outbox
        # Built now so a bad transport is refused at construction; it connects on run.
        self.transport: Transport = make_transport(transport, outbox)
        self.handlers: dict[str, Handler] = {}
        self.stats = Stats()
        self.waker = Waker()
        self.commit_wake = _CommitWake(self.waker)
        self._relay_stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.running = False

    def wake_after_commit(self, tx: Any, service: str) -> None:
        """After a publish on ``tx``: wake ``service``'s relay when ``tx`` commits
        (nothing to do while no loops run in this process)."""
        if self.waker.active:
            self.commit_wake.arm(tx, service)

    # ---------------------------------------------------------------- handlers

    def register_handler(self, event_type: str, fn: Handler, *, service: str | None = None) -> None:
        event_type = event_type.strip()
        check_handler(event_type, fn)
        if service is not None:
            self.outbox.register_event(event_type, service)
        existing = self.handlers.get(event_type)
        if existing is not None and existing is not fn:
            raise HandlerError(
                f"event type {event_type!r} already has a handler ({callable_name(existing)})",
                event_type=event_type,
            )
        self.handlers[event_type] = fn

    def handler(self, event_type: str, *, service: str | None = None) -> Callable[[H], H]:
        def decorate(fn: H) -> H:
            self.register_handler(event_type, fn, service=service)
            return fn

        return decorate

    def handlers_by_service(self) -> dict[str, dict[str, Handler]]:
        """This app's handlers grouped by the service owning their event type."""
        grouped: dict[str, dict[str, Handler]] = {}
        for event_type, fn in self.handlers.items():
            service = self.outbox.routes.service_of(event_type)
            if service is None:
                raise HandlerError(
                    f"handler registered for {event_type!r}, which belongs to no service; "
                    "call register_event(event_type, service) or pass service=",
                    event_type=event_type,
                )
            grouped.setdefault(service, {})[event_type] = fn
        return grouped

    # ---------------------------------------------------------------- planning

    def _plan(
        self,
        services: Sequence[str] | None,
        relay: bool,
        consume: bool,
        local: bool,
        with_handlers: Collection[str],
    ) -> tuple[list[ServiceRoute], list[ServiceRoute]]:
        chosen = self.outbox.routes.select(services)
        consume_routes = [r for r in chosen if r.service_name in with_handlers] if consume else []
        if local:
            if not (relay and consume):
                raise ConfigurationError(
                    "the local transport delivers in-process: run relay and consumers together "
                    "(or use a broker transport for relay-only/consume-only processes)"
                )
            relay_routes = consume_routes
            for r in chosen:
                if r not in consume_routes:
                    logger.info(
                        "service %s has no handlers in this process; its events wait for a "
                        "process that has them",
                        r.service_name,
                        extra={"service": r.service_name},
                    )
        else:
            relay_routes = chosen if relay else []
        if not relay_routes and not consume_routes:
            raise ConfigurationError(
                "nothing to run: no registered services"
                + ("" if self.handlers else " and no handlers")
            )
        return relay_routes, consume_routes

    async def _check_tables(self, routes: Sequence[ServiceRoute]) -> None:
        existing = await asyncio.to_thread(self.outbox.db.table_names)
        missing = sorted({r.table_name for r in routes} - existing)
        if missing:
            raise ConfigurationError(
                f"outbox tables missing: {', '.join(missing)}; run `outboxer migrate` "
                "or Outbox.migrate() first"
            )

    # ---------------------------------------------------------------- running

    def stop(self) -> None:
        """Ask the running loops to finish their batch and stop (thread-safe)."""
        loop, ev = self._loop, self._relay_stop
        if loop is None or ev is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(ev.set)

    async def run(
        self,
        *,
        relay: bool = True,
        consume: bool = True,
        services: Sequence[str] | None = None,
        handle_signals: bool = False,
        ready: Callable[[], None] | None = None,
    ) -> None:
        if self.running:
            raise ConfigurationError("this Outbox is already running")
        settings = self.outbox.settings
        transport = self.transport
        by_service = self.handlers_by_service()
        relay_routes, consume_routes = self._plan(
            services, relay, consume, transport.delivers_in_process, by_service
        )
        await self._check_tables([*relay_routes, *consume_routes])
        self.running = True
        self._loop = asyncio.get_running_loop()
        relay_stop = self._relay_stop = asyncio.Event()
        consume_stop = asyncio.Event()
        relay_tasks: list[asyncio.Task[None]] = []
        consume_tasks: list[asyncio.Task[None]] = []
        installed: list[signal.Signals] = []
        ended: list[str] = []
        try:
            if handle_signals and threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGTERM, signal.SIGINT):
                    self._loop.add_signal_handler(sig, relay_stop.set)
                    installed.append(sig)
            await transport.start(
                list({r.service_name: r for r in [*relay_routes, *consume_routes]}.values())
            )
            config = RelayConfig(
                batch_size=settings.batch_size,
                poll_interval=settings.poll_interval,
                lease=settings.lease,
                # In-process delivery never leaves rows published.
                redeliver_after=0.0 if transport.delivers_in_process else settings.redeliver_after,
            )
            for route in consume_routes:
                sub = await transport.subscribe(route)
                dispatcher = Dispatcher(
                    self.outbox, route, by_service[route.service_name], self.stats
                )
                consume_tasks.append(
                    asyncio.create_task(
                        consume_loop(sub, dispatcher, consume_stop, batch_size=settings.batch_size),
                        name=f"outboxer-consume-{route.service_name}",
                    )
                )
            self.waker.bind(self._loop, [r.service_name for r in relay_routes])
            for route in relay_routes:
                # Redelivery only where this app's handlers consume: a topic read by
                # other systems would otherwise get every event again and again.
                own = (
                    config
                    if route.service_name in by_service
                    else replace(config, redeliver_after=0.0)
                )
                r = Relay(
                    self.outbox.store(route.service_name), transport, self.stats, self.waker, own
                )
                relay_tasks.append(
                    asyncio.create_task(
                        r.run(relay_stop), name=f"outboxer-relay-{route.service_name}"
                    )
                )
            logger.info(
                "outboxer running",
                extra={
                    "transport": transport.name,
                    "relay": [r.service_name for r in relay_routes],
                    "consume": [r.service_name for r in consume_routes],
                },
            )
            if ready is not None:
                ready()
            await _wait_any(relay_stop, [*relay_tasks, *consume_tasks])
            if not relay_stop.is_set():
                ended = [t.get_name() for t in [*relay_tasks, *consume_tasks] if t.done()]
        finally:
            # Reached on stop(), on cancellation and on a failed start alike.
            relay_stop.set()
            await self._shutdown(relay_tasks, consume_tasks, consume_stop, transport)
            for sig in installed:
                self._loop.remove_signal_handler(sig)
            self.waker.unbind()
            self.running = False
            self._loop = None
        _raise_task_errors([*relay_tasks, *consume_tasks])
        if ended:
            # A loop ended without an error and without stop(): never return as if
            # stopped on purpose while nothing is being delivered.
            raise OutboxError(f"outboxer stopped: {', '.join(ended)} ended unexpectedly")

    async def _shutdown(
        self,
        relay_tasks: list[asyncio.Task[None]],
        consume_tasks: list[asyncio.Task[None]],
        consume_stop: asyncio.Event,
        transport: Transport,
    ) -> None:
        timeout = self.outbox.settings.shutdown_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Relays first: an in-flight batch may still need the consumers (local transport).
        await _finish(relay_tasks, deadline - loop.time())
        consume_stop.set()
        await _finish(consume_tasks, deadline - loop.time())
        try:  # closes the subscriptions too
            await transport.close()
        except Exception:
            logger.exception("closing the transport failed")
        await self.outbox.db.dispose_async_only()
        logger.info("outboxer stopped", extra={"stats": dict(self.stats.totals())})


async def _wait_any(stop: asyncio.Event, tasks: list[asyncio.Task[None]]) -> None:
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not stopper.done():
            stopper.cancel()


async def _finish(tasks: list[asyncio.Task[None]], timeout: float) -> None:
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=max(timeout, 0.0))
    for task in pending:
        logger.warning("task %s did not stop in time; cancelling", task.get_name())
        task.cancel()
    if pending:
        await asyncio.wait(pending)


def _raise_task_errors(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
