"""The public facade: one :class:`Outbox` per application.

It builds the parts and wires them together (settings, routes, database, tables,
the store's row rules, publisher, handlers, transport, hooks, runtime), and offers
them through one object. Nothing below it knows it exists: the parts receive each
other, never the facade.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, MetaData, Table
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from outboxer.admin import Admin
from outboxer.backoff import RetryPolicy
from outboxer.contracts import ChannelSpec, Contracts, asyncapi_document
from outboxer.database import migrations
from outboxer.database.connector import Connector, SQLAlchemyConnector
from outboxer.database.engines import Database
from outboxer.database.migrations import TablePlan
from outboxer.database.schema import Tables
from outboxer.envelope import JsonDefault
from outboxer.errors import ConfigurationError
from outboxer.handlers import BatchHandler, Handler, Handlers
from outboxer.hooks import Hooks, LogReports, Observer, Stats
from outboxer.models import Event
from outboxer.publish import (
    AsyncOutboxTransaction,
    OutboxTransaction,
    Publisher,
    transaction,
    transaction_async,
)
from outboxer.routing import RouteRegistry, ServiceRoute
from outboxer.rows import RowBuilder
from outboxer.runtime import Runtime
from outboxer.settings import OutboxSettings, load_settings
from outboxer.store import Storage, Store
from outboxer.transports.adapters import Adapter
from outboxer.transports.base import Transport
from outboxer.transports.registry import make_transport

H = TypeVar("H", bound=Handler)


class Outbox:
    """An application's outbox: its routes, tables, publisher, stores and loops.

    ``url_or_engine`` is a database URL (see :mod:`outboxer.database.engines` for the
    forms) or a SQLAlchemy ``Engine``/``AsyncEngine``; when omitted, ``OUTBOXER_URL``
    or the configuration file decides. Keyword arguments override configuration.
    ``observers`` listen to what the loops and ``publish`` do (see
    :mod:`outboxer.hooks`); ``stats`` is always one of them. ``connector`` builds
    the connector every op runs through from the :class:`Database` (a framework's,
    see :mod:`outboxer.contrib.django`); SQLAlchemy's by default.
    """

    def __init__(
        self,
        url_or_engine: str | URL | Engine | AsyncEngine | None = None,
        *,
        transport: str | Transport | None = None,
        topic_prefix: str | None = None,
        max_retry: int | None = None,
        retry_unit: float | None = None,
        max_payload_bytes: int | None = None,
        strict_json: bool | None = None,
        json_default: JsonDefault | None = None,
        settings: OutboxSettings | None = None,
        config_file: str | Path | None = None,
        observers: Sequence[Observer] = (),
        connector: Callable[[Database], Connector] | None = None,
    ) -> None:
        if settings is None:
            settings = load_settings(config_file)
        updates = {
            "topic_prefix": topic_prefix,
            "max_retry": max_retry,
            "retry_unit": retry_unit,
            "max_payload_bytes": max_payload_bytes,
            "strict_json": strict_json,
        }
        updates = {k: v for k, v in updates.items() if v is not None}
        if updates:
            settings = settings.updated(**updates)
        self.settings = settings
        self.retry_policy = RetryPolicy(max_retry=settings.max_retry, unit=settings.retry_unit)
        self.routes = RouteRegistry(
            topic_prefix=settings.topic_prefix, overrides=settings.overrides()
        )
        self.db = Database(
            url_or_engine if url_or_engine is not None else settings.url,
            timeout=settings.database_timeout,
        )
        self.tables = Tables()
        self.stats = Stats()
        """Counters of what this process's relays, consumers and publishes did."""
        self.hooks = Hooks([self.stats, LogReports(), *observers])
        self.storage = Storage(
            self.db,
            SQLAlchemyConnector(self.db) if connector is None else connector(self.db),
            self.tables,
            self.routes,
            RowBuilder(
                policy=self.retry_policy,
                strict_json=settings.strict_json,
                json_default=json_default,
                max_payload_bytes=settings.max_payload_bytes,
                schedule_horizon=settings.schedule_horizon,
            ),
            notify=settings.notify,
            dead_blocks=settings.ordered_after_dead == "block",
            scheduled_blocks=settings.ordered_scheduled == "block",
        )
        self.contracts = Contracts()
        """The payload schemas of the event types, by version (``register_event``)."""
        self._publisher = Publisher(self.storage, self.hooks, self.contracts)
        self._handlers = Handlers()
        self.admin = Admin(self.storage, self.handled_services, self.contracts)
        """Dead letters, retention and status across the services (see
        :class:`outboxer.admin.Admin`)."""
        # Built now so a bad transport is refused at construction; it connects on run.
        self.transport: Transport = make_transport(
            transport if transport is not None else settings.transport, settings
        )
        # Optional for transports written before the protocol had it.
        self.routes.check = getattr(self.transport, "check_route", None)
        self._adapters: dict[str, Adapter] = {}
        self._runtime = Runtime(
            self.storage, self._handlers, self.transport, settings, self.hooks, self._adapters
        )

    @property
    def metadata(self) -> MetaData:
        """Holds one table per registered service; give it to Alembic's target_metadata."""
        return self.tables.metadata

    # ------------------------------------------------------------------ routing

    def register_service(
        self,
        name: str,
        *,
        table: str | None = None,
        topic: str | None = None,
        group: str | None = None,
        ordered: bool | None = None,
        format: str | None = None,
        source: str | None = None,
    ) -> ServiceRoute:
        """Declare a service's route (defaults derived from its name).

        ``ordered=True``: events with the same key are handled in publish order, even
        across failures (a failing event holds back the later events of its key).
        ``format="cloudevents"`` (or ``"cloudevents-structured"``): its messages are
        CloudEvents 1.0 with ``source`` (default ``/outboxer/<name>``); see
        :mod:`outboxer.cloudevents`.
        """
        return self._declared(
            name,
            self.routes.register_service(
                name,
                table=table,
                topic=topic,
                group=group,
                ordered=ordered,
                format=format,
                source=source,
            ),
        )

    def register_inbox(
        self,
        service: str,
        *,
        consumer: str,
        table: str | None = None,
        topic: str | None = None,
        group: str | None = None,
        adapter: Adapter | None = None,
        ordered: bool | None = None,
        format: str | None = None,
    ) -> ServiceRoute:
        """Consume ``service``'s events, published from another database, into an
        inbox table in this application's database.

        ``consumer`` names this application: its inbox table
        (``<consumer>_<service>_inbox``) and its consumer group
        (``<prefix>.<service>.<consumer>``, so several applications each get every
        event). Each event's effects apply once here: a message delivered again finds
        its event id in the inbox. ``adapter`` reads messages that are not outboxer
        envelopes (:mod:`outboxer.transports.adapters`, e.g. ``Debezium()``);
        ``format="cloudevents"`` reads CloudEvents (the ``CloudEvents()`` adapter).
        """
        route = self.routes.register_inbox(
            service,
            consumer=consumer,
            table=table,
            topic=topic,
            group=group,
            ordered=ordered,
            format=format,
        )
        if adapter is not None:
            self._adapters[service] = adapter
        return self._declared(service, route)

    def _declared(self, name: str, route: ServiceRoute) -> ServiceRoute:
        # A default route taken on first use (register_event before register_service)
        # is replaced: its table must not linger in the metadata.
        for table in list(self.tables.metadata.tables):
            if (
                table != route.table_name
                and not self.tables.own(table)
                and table not in {r.table_name for r in self.routes.routes()}
            ):
                self.tables.forget(table)
        self.tables.table(route)
        return route

    def register_event(
        self,
        event_type: str,
        service: str,
        *,
        schema: Mapping[str, Any] | None = None,
        version: str | None = None,
    ) -> ServiceRoute:
        """Make ``service`` the owner of ``event_type`` (its events go to its table).

        ``schema``: a JSON Schema for the payloads of ``version`` (default ``v1``);
        ``publish`` then refuses a payload that does not match with
        :class:`SchemaViolationError`, before any SQL. Call again with another
        ``version`` to add its schema. Needs ``pip install 'outboxer[schemas]'``.
        """
        prepared = (
            self.contracts.prepare(event_type, version, schema) if schema is not None else None
        )
        route = self.routes.register_event(event_type, service)
        self.tables.table(route)
        if prepared is not None:
            self.contracts.add(prepared)
        return route

    def asyncapi(self, *, title: str | None = None, version: str = "1.0.0") -> dict[str, Any]:
        """The AsyncAPI 3 document of this application: a channel per service, send
        operations for the services it publishes, receive operations for those it
        handles, a message per event type and schema version (``outboxer schemas
        export``)."""
        handled = self.handled_services()
        specs = [
            ChannelSpec(
                route,
                self.routes.events_of(route.service_name),
                sends=not route.inbox,
                receives=route.service_name in handled,
                wire_format=route.format,
            )
            for route in self.routes.routes()
        ]
        names = ", ".join(r.service_name for r in self.routes.routes())
        return asyncapi_document(
            specs, self.contracts, title=title or f"outboxer: {names}", version=version
        )

    def table_for(self, route: ServiceRoute | str) -> Table:
        """The outbox table of a service (or route)."""
        if isinstance(route, str):
            route = self.routes.route_for_service(route)
        return self.tables.table(route)

    # ------------------------------------------------------------------ handlers

    def handler(self, event_type: str, *, service: str | None = None) -> Callable[[H], H]:
        """Decorator: ``fn(event, tx)`` handles ``event_type`` (see :meth:`register_handler`)."""

        def decorate(fn: H) -> H:
            self.register_handler(event_type, fn, service=service)
            return fn

        return decorate

    def register_handler(self, event_type: str, fn: Handler, *, service: str | None = None) -> None:
        """Make ``fn`` the handler of ``event_type``.

        ``async def fn(event: Envelope, tx: AsyncSession)`` or ``def fn(event, tx:
        Session)``: it runs inside the transaction that marks the event consumed, so
        its database writes and the mark commit together. Raising makes the event
        fail for retry. ``service=`` also registers the event type to that service.
        """
        if service is not None:
            self.register_event(event_type.strip(), service)
        self._handlers.register(event_type, fn)

    def batch_handler(self, event_type: str, *, service: str | None = None) -> Callable[[H], H]:
        """Decorator: ``fn(events, tx)`` handles lists of ``event_type`` events (see
        :meth:`register_batch_handler`)."""

        def decorate(fn: H) -> H:
            self.register_batch_handler(event_type, fn, service=service)
            return fn

        return decorate

    def register_batch_handler(
        self, event_type: str, fn: Handler, *, service: str | None = None
    ) -> None:
        """Make ``fn`` the handler of ``event_type``, called with a list of events.

        ``def fn(events: list[Envelope], tx: Session)`` (or ``async def`` with an
        ``AsyncSession``): the consumer's fast path passes consecutive events of the
        type in one call, so a handler can write them with one statement (one round
        trip for many events). If the call raises, the batch is rolled back and each
        event runs again alone, in a list of one, so a failure is recorded against the
        event that fails. Its writes commit with the consumed marks, as for
        :meth:`register_handler`.
        """
        if service is not None:
            self.register_event(event_type.strip(), service)
        self._handlers.register(event_type, BatchHandler(fn))

    def handled_services(self) -> set[str]:
        """The services that have handlers registered in this process."""
        return set(self._handlers.by_service(self.routes))

    def add_observer(self, observer: Observer) -> None:
        """Listen to the loops and to ``publish`` (see :class:`outboxer.hooks.Observer`)."""
        self.hooks.add(observer)

    # ------------------------------------------------------------------ running

    async def run_async(
        self,
        *,
        relay: bool = True,
        consume: bool = True,
        services: Sequence[str] | None = None,
        handle_signals: bool = False,
        ready: Callable[[], None] | None = None,
    ) -> None:
        """Run relays and consumers until :meth:`stop` or cancellation.

        Stopping finishes the batch in flight, flushes the producer, commits consumer
        offsets and closes connections, within ``shutdown_timeout`` seconds.
        ``ready`` is called once relays and consumers are started (Kafka consumer
        groups may still be joining). Consumers run for services that have handlers
        in this process; relays for every chosen service (with the local transport:
        the consumed ones, since delivery is in-process).
        """
        await self._runtime.run(
            relay=relay,
            consume=consume,
            services=services,
            handle_signals=handle_signals,
            ready=ready,
        )

    def run(
        self,
        *,
        relay: bool = True,
        consume: bool = True,
        services: Sequence[str] | None = None,
    ) -> None:
        """Blocking :meth:`run_async` for scripts; SIGTERM and SIGINT stop it cleanly."""
        asyncio.run(
            self.run_async(relay=relay, consume=consume, services=services, handle_signals=True)
        )

    def stop(self) -> None:
        """Ask a running :meth:`run_async` to stop (safe from any thread)."""
        self._runtime.stop()

    # ------------------------------------------------------------------ schema

    def migrate(self) -> list[TablePlan]:
        """Bring every registered service's table to the latest schema version: create
        missing tables, apply the missing steps (idempotent; see
        :mod:`outboxer.database.migrations`). Returns what was done per table."""
        return migrations.migrate(self.db, self.tables)

    async def migrate_async(self) -> list[TablePlan]:
        """:meth:`migrate` on a worker thread (DDL runs on the sync driver)."""
        return await asyncio.to_thread(self.migrate)

    def migration_plan(self) -> list[TablePlan]:
        """What :meth:`migrate` would do, without changing anything."""
        return migrations.plan(self.db, self.tables)

    # ------------------------------------------------------------------ stores

    def store(self, service: str | ServiceRoute | None = None) -> Store:
        """The state machine bound to ``service`` (the only service when omitted)."""
        if service is None:
            routes = self.routes.routes()
            if len(routes) != 1:
                raise ConfigurationError(
                    "store() needs a service name when there is not exactly one service"
                )
            route = routes[0]
        elif isinstance(service, str):
            route = self.routes.route_for_service(service)
        else:
            route = self.register_service(
                service.service_name,
                table=service.table_name,
                topic=service.topic,
                group=service.group_id,
            )
        return self.storage.store(route)

    # ------------------------------------------------------------------ publish

    def publish(
        self,
        tx: Session | Connection,
        event_type: str,
        payload: Any,
        *,
        key: str | None = None,
        aggregate_id: str | None = None,
        event_id: str | None = None,
        version: str | None = None,
        max_retry: int | None = None,
        delay: float | timedelta | None = None,
        deliver_at: datetime | None = None,
    ) -> int:
        """Write one event on the caller's transaction and return its outbox id.

        Nothing is committed: the event becomes visible with the caller's commit and
        disappears with its rollback. Every check runs before any SQL, so a rejected
        event leaves the transaction usable.

        ``event_id`` makes the publish idempotent in the service's table: publishing
        an id that is already there writes nothing and returns that row's outbox id
        (same event type and payload) or raises :class:`DuplicateEventError` (another
        event). ``delay`` (seconds or a ``timedelta``) or ``deliver_at`` (an aware
        datetime) schedule the event: nothing sends it before that time.
        """
        return self._publisher.publish(
            tx,
            event_type,
            payload,
            key=key,
            aggregate_id=aggregate_id,
            event_id=event_id,
            version=version,
            max_retry=max_retry,
            delay=delay,
            deliver_at=deliver_at,
        )

    def publish_many(
        self, tx: Session | Connection, events: Iterable[Event | tuple[str, Any]]
    ) -> list[int]:
        """Write many events on the caller's transaction, one INSERT per service for
        all of them; returns their outbox ids in order. ``events`` are
        :class:`~outboxer.Event` objects or ``(event_type, payload)`` pairs. Every event
        is checked before any SQL: one bad event writes none."""
        return self._publisher.publish_many(tx, events)

    async def publish_many_async(
        self, tx: AsyncSession | AsyncConnection, events: Iterable[Event | tuple[str, Any]]
    ) -> list[int]:
        """Async twin of :meth:`publish_many`."""
        return await self._publisher.publish_many_async(tx, events)

    async def publish_async(
        self,
        tx: AsyncSession | AsyncConnection,
        event_type: str,
        payload: Any,
        *,
        key: str | None = None,
        aggregate_id: str | None = None,
        event_id: str | None = None,
        version: str | None = None,
        max_retry: int | None = None,
        delay: float | timedelta | None = None,
        deliver_at: datetime | None = None,
    ) -> int:
        """Async twin of :meth:`publish` for ``AsyncSession``/``AsyncConnection``."""
        return await self._publisher.publish_async(
            tx,
            event_type,
            payload,
            key=key,
            aggregate_id=aggregate_id,
            event_id=event_id,
            version=version,
            max_retry=max_retry,
            delay=delay,
            deliver_at=deliver_at,
        )

    def transaction(
        self, engine: Engine | None = None
    ) -> contextlib.AbstractContextManager[OutboxTransaction]:
        """A business transaction on a connection of ``engine`` (the outbox's own by
        default), committed when the block ends and rolled back if it raises::

            with outbox.transaction() as tx:
                tx.connection.execute(orders.insert().values(...))
                tx.publish("order.created", {...}, event_id=f"order-{n}")

        If the connection is lost while the database commits, whether it committed
        is unknown: :class:`~outboxer.errors.CommitOutcomeUnknownError` carries the
        ``outbox_ids`` and ``event_ids`` published in it. With event ids, running the
        transaction again is safe (an event id already there writes nothing).
        """
        return transaction(self._publisher, engine or self.db.sync_engine)

    def transaction_async(
        self, engine: AsyncEngine | None = None
    ) -> contextlib.AbstractAsyncContextManager[AsyncOutboxTransaction]:
        """Async twin of :meth:`transaction` (``await tx.publish(...)``)."""
        return transaction_async(self._publisher, engine or self.db.async_engine)

    # ------------------------------------------------------------------ cancel

    def cancel(
        self, tx: Session | Connection, event_id: str, *, service: str | None = None
    ) -> bool:
        """Take back the event ``event_id`` of ``service`` (the only service when
        omitted) on the caller's transaction, if it is still waiting: published
        with that event id, pending, not yet sent nor on its way. Returns True when
        it is now ``cancelled`` (final: never sent, never handled; it takes effect
        with the caller's commit), False when it is not there or cannot be taken
        back any more (sent, consumed, dead, or claimed by a relay)."""
        return self._cancel_store(tx, service).cancel(event_id)

    async def cancel_async(
        self, tx: AsyncSession | AsyncConnection, event_id: str, *, service: str | None = None
    ) -> bool:
        """Async twin of :meth:`cancel`."""
        return await self._cancel_store(tx, service).cancel_async(event_id)

    def _cancel_store(self, tx: Any, service: str | None) -> Store:
        if service is None:
            routes = [r for r in self.routes.routes() if not r.inbox]
            if len(routes) != 1:
                raise ConfigurationError(
                    "cancel() needs service= when there is not exactly one service"
                )
            return self.storage.store(routes[0]).with_tx(tx)
        route = self.routes.route_for_service(service)
        if route.inbox:
            raise ConfigurationError(
                f"service {service!r} is consumed here through an inbox: its events are "
                f"cancelled where they are published"
            )
        return self.storage.store(route).with_tx(tx)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Dispose of the connection pools outboxer created (sync engines)."""
        self.db.dispose()

    async def aclose(self) -> None:
        """Dispose of every connection pool outboxer created."""
        await self.db.dispose_async()

    def __repr__(self) -> str:
        services = [r.service_name for r in self.routes.routes()]
        return f"Outbox({self.db.safe_url!r}, services={services})"
