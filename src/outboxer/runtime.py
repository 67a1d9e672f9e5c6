"""The runtime: starts the relay and consumer loops, supervises them, stops them.

:meth:`Runtime.run` reads top to bottom: plan which services get a relay and which
a consumer, check their tables, start the transport and the loops, wait until a
stop is asked or a loop ends, then stop in order (relays, consumers, transport,
connection pools) within ``shutdown_timeout``. The facade (:class:`outboxer.Outbox`)
owns one runtime; the runtime receives narrow handles (storage, handlers,
transport, settings, hooks), never the facade.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from outboxer.admin import Admin
from outboxer.backoff import ErrorBackoff
from outboxer.consumer import Dispatcher, InboxDispatcher, consume_loop
from outboxer.errors import ConfigurationError, OutboxError
from outboxer.handlers import Handler, Handlers
from outboxer.hooks import Hooks
from outboxer.relay import Relay
from outboxer.retention import start_sweeper
from outboxer.routing import ServiceRoute
from outboxer.settings import OutboxSettings
from outboxer.signals import stop_on_signals
from outboxer.store import Storage
from outboxer.transports.adapters import Adapter, default_adapter
from outboxer.transports.base import Transport
from outboxer.transports.local import LocalTransport
from outboxer.wake import CommitWake, NotificationWake, Waker

logger = logging.getLogger(__name__)


@dataclass
class _Plan:
    relay: list[ServiceRoute]
    consume: list[ServiceRoute]
    handlers: dict[str, dict[str, Handler]]
    inbox: list[ServiceRoute] = field(default_factory=list)
    """Services consumed here into an inbox (from the broker, retried locally)."""


@dataclass
class _Running:
    relay_stop: asyncio.Event = field(default_factory=asyncio.Event)
    consume_stop: asyncio.Event = field(default_factory=asyncio.Event)
    relays: list[asyncio.Task[None]] = field(default_factory=list)
    consumers: list[asyncio.Task[None]] = field(default_factory=list)
    side: list[asyncio.Task[None]] = field(default_factory=list)
    """Side tasks (the retention sweep): stopped with the relays, never supervised."""
    listeners: list[asyncio.Task[None]] = field(default_factory=list)
    """Wake-up sources (the notification listener): cancelled when the stop begins."""

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        return [*self.relays, *self.consumers]


class Runtime:
    """The running loops of one application."""

    def __init__(
        self,
        storage: Storage,
        handlers: Handlers,
        transport: Transport,
        settings: OutboxSettings,
        hooks: Hooks,
        adapters: Mapping[str, Adapter] | None = None,
    ) -> None:
        self.storage = storage
        self.handlers = handlers
        self.transport = transport
        self.settings = settings
        self.hooks = hooks
        self.adapters = adapters if adapters is not None else {}
        """Inbox services whose messages are not outboxer envelopes -> their adapter."""
        self._inbox_transport: LocalTransport | None = None
        self.waker = Waker()
        self._commit_wake = CommitWake(self.waker, storage.connector)
        self._running: _Running | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def running(self) -> bool:
        return self._running is not None

    def stop(self) -> None:
        """Ask the running loops to finish their batch and stop (thread-safe)."""
        loop, running = self._loop, self._running
        if loop is None or running is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(running.relay_stop.set)

    # ---------------------------------------------------------------- the run

    async def run(
        self,
        *,
        relay: bool = True,
        consume: bool = True,
        services: Sequence[str] | None = None,
        handle_signals: bool = False,
        ready: Callable[[], None] | None = None,
    ) -> None:
        if self._running is not None:
            raise ConfigurationError("this Outbox is already running")
        plan = self._plan(services, relay, consume)
        await self._check_tables([*plan.relay, *plan.consume, *plan.inbox])
        running = self._running = _Running()
        self._loop = loop = asyncio.get_running_loop()
        ended: list[str] = []
        try:
            with stop_on_signals(loop, running.relay_stop.set, enabled=handle_signals):
                await self._start(plan, running)
                if ready is not None:
                    ready()
                ended = await self._supervise(running)
        finally:
            # Reached on stop(), on cancellation and on a failed start alike.
            running.relay_stop.set()
            await self._shutdown(running)
            self._running = None
            self._loop = None
        _raise_task_errors(running.tasks)
        if ended:
            # A loop ended without an error and without stop(): never return as if
            # stopped on purpose while nothing is being delivered.
            raise OutboxError(f"outboxer stopped: {', '.join(ended)} ended unexpectedly")

    def _plan(self, services: Sequence[str] | None, relay: bool, consume: bool) -> _Plan:
        by_service = self.handlers.by_service(self.storage.routes)
        selected = self.storage.routes.select(services)
        chosen = [r for r in selected if not r.inbox]
        inbox = [r for r in selected if r.inbox and r.service_name in by_service] if consume else []
        if inbox and self.transport.delivers_in_process:
            raise ConfigurationError(
                "an inbox consumes another database's events from a broker: use a broker "
                f"transport (services: {', '.join(r.service_name for r in inbox)})"
            )
        consume_routes = [r for r in chosen if r.service_name in by_service] if consume else []
        if self.transport.delivers_in_process:
            if not (relay and consume):
                raise ConfigurationError(
                    "the local transport delivers in-process: run relay and consumers together "
                    "(or use a broker transport for relay-only/consume-only processes)"
                )
            relay_routes = consume_routes
            _log_services_without_handlers(chosen, consume_routes)
        else:
            relay_routes = chosen if relay else []
        if not relay_routes and not consume_routes and not inbox:
            if not selected:
                raise ConfigurationError("nothing to run: no registered services")
            names = ", ".join(r.service_name for r in selected)
            raise ConfigurationError(
                f"nothing to run: no handlers are registered for {names}; register handlers "
                "(or run relays only, with a broker transport)"
            )
        return _Plan(relay_routes, consume_routes, by_service, inbox)

    async def _check_tables(self, routes: Sequence[ServiceRoute]) -> None:
        existing = await asyncio.to_thread(self.storage.database.table_names)
        missing = sorted({r.table_name for r in routes} - existing)
        if missing:
            raise ConfigurationError(
                f"outbox tables missing: {', '.join(missing)}; run `outboxer migrate` "
                "or Outbox.migrate() first"
            )

    async def _start(self, plan: _Plan, running: _Running) -> None:
        transport = self.transport
        await transport.start(
            list({r.service_name: r for r in [*plan.relay, *plan.consume, *plan.inbox]}.values())
        )
        for route in plan.consume:
            sub = await transport.subscribe(route)
            dispatcher = Dispatcher(
                self.storage,
                route,
                plan.handlers[route.service_name],
                self.hooks,
                isolate=self.settings.isolate_handlers,
                # A message skipped while another worker handles it comes back if that
                # worker dies: by the lease (in-process) or redeliver_after (a broker).
                skip_busy=transport.delivers_in_process or self.settings.redeliver_after > 0,
            )
            running.consumers.append(
                asyncio.create_task(
                    consume_loop(sub, dispatcher, running.consume_stop, self.settings),
                    name=f"outboxer-consume-{route.service_name}",
                )
            )
        await self._start_inboxes(plan, running)
        services = [r.service_name for r in [*plan.relay, *plan.inbox]]
        self.waker.bind(asyncio.get_running_loop(), services)
        self.hooks.add(self._commit_wake)
        listener = self._notification_wake(plan.relay)
        if listener is not None:
            running.listeners.append(asyncio.create_task(listener.run(), name="outboxer-listen"))
        for route in plan.relay:
            relay = Relay(
                self.storage.store(route),
                transport,
                self.settings,
                hooks=self.hooks,
                waker=self.waker,
                redeliver_after=self._redeliver_after(route, plan),
            )
            running.relays.append(
                asyncio.create_task(
                    relay.run(running.relay_stop), name=f"outboxer-relay-{route.service_name}"
                )
            )
        running.side += start_sweeper(
            Admin(self.storage, lambda: set(plan.handlers)),
            self.settings.retention,
            {r.service_name for r in [*plan.relay, *plan.consume, *plan.inbox]},
            self.hooks,
            running.relay_stop,
        )
        logger.info(
            "outboxer running",
            extra={
                "transport": transport.name,
                "relay": [r.service_name for r in plan.relay],
                "consume": [r.service_name for r in plan.consume],
                "inbox": [r.service_name for r in plan.inbox],
            },
        )

    async def _start_inboxes(self, plan: _Plan, running: _Running) -> None:
        """Per inbox: a consumer on the broker that stores and handles what arrives,
        and a relay with its consumer over an in-process handoff that runs the inbox's
        failed (and held back) messages again when they are due."""
        if not plan.inbox:
            return
        local = self._inbox_transport = LocalTransport()
        await local.start(plan.inbox)
        for route in plan.inbox:
            handlers = plan.handlers[route.service_name]
            received = InboxDispatcher(
                self.storage,
                route,
                handlers,
                self.hooks,
                adapter=self.adapters.get(route.service_name) or default_adapter(route),
                isolate=self.settings.isolate_handlers,
                lease=self.settings.lease,
            )
            again = Dispatcher(
                self.storage, route, handlers, self.hooks, isolate=self.settings.isolate_handlers
            )
            for name, sub, dispatcher in (
                ("consume", await self.transport.subscribe(route), received),
                ("retry", await local.subscribe(route), again),
            ):
                running.consumers.append(
                    asyncio.create_task(
                        consume_loop(sub, dispatcher, running.consume_stop, self.settings),
                        name=f"outboxer-inbox-{name}-{route.service_name}",
                    )
                )
            relay = Relay(
                self.storage.store(route), local, self.settings, hooks=self.hooks, waker=self.waker
            )
            running.relays.append(
                asyncio.create_task(
                    relay.run(running.relay_stop), name=f"outboxer-inbox-{route.service_name}"
                )
            )

    def _notification_wake(self, routes: Sequence[ServiceRoute]) -> NotificationWake | None:
        dialect = self.storage.database.dialect
        if not (self.settings.notify and routes):
            return None
        channels: dict[str, str] = {}
        for route in routes:
            channel = dialect.notify_channel(self.storage.tables.table(route).name)
            if channel is None:
                return None  # this database has no notifications: relays poll
            channels[channel] = route.service_name
        backoff = ErrorBackoff(self.settings.error_delay, self.settings.error_delay_max)
        return NotificationWake(self.storage.database, channels, self.waker, backoff)

    def _redeliver_after(self, route: ServiceRoute, plan: _Plan) -> float:
        # In-process delivery never leaves rows published; and redelivery only where
        # this app's handlers consume: a topic read by other systems would otherwise
        # get every event again and again.
        if self.transport.delivers_in_process or route.service_name not in plan.handlers:
            return 0.0
        return self.settings.redeliver_after

    async def _supervise(self, running: _Running) -> list[str]:
        """Wait for a stop or for a loop to end; the names of loops that ended."""
        stopper = asyncio.ensure_future(running.relay_stop.wait())
        try:
            await asyncio.wait([stopper, *running.tasks], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not stopper.done():
                stopper.cancel()
        if running.relay_stop.is_set():
            return []
        return [t.get_name() for t in running.tasks if t.done()]

    async def _shutdown(self, running: _Running) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_timeout
        for task in running.listeners:  # they only wake relays, which are stopping
            task.cancel()
        # Relays first: an in-flight batch may still need the consumers (local transport).
        await _finish([*running.relays, *running.side], deadline - loop.time())
        running.consume_stop.set()
        await _finish(running.consumers, deadline - loop.time())
        if running.listeners:
            await asyncio.wait(running.listeners)
        self.hooks.remove(self._commit_wake)
        self.waker.unbind()
        for transport in (self.transport, self._inbox_transport):
            if transport is None:
                continue
            try:  # closes the subscriptions too
                await transport.close()
            except Exception:
                logger.exception("closing the transport failed")
        self._inbox_transport = None
        await self.storage.database.dispose_async_only()
        logger.info("outboxer stopped")


def _log_services_without_handlers(
    chosen: Sequence[ServiceRoute], consumed: Collection[ServiceRoute]
) -> None:
    for route in chosen:
        if route not in consumed:
            logger.info(
                "service %s has no handlers in this process; its events wait for a "
                "process that has them",
                route.service_name,
                extra={"service": route.service_name},
            )


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
