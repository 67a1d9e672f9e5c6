"""The public facade: routes, schema, publishing and stores."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, MetaData, Table
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from outboxer.backoff import RetryPolicy
from outboxer.config import OutboxSettings, load_settings
from outboxer.consumer import Handler
from outboxer.db import Database, family_of
from outboxer.engine import Runtime
from outboxer.envelope import DEFAULT_VERSION, JsonDefault, build_stored_envelope, encode_json
from outboxer.errors import (
    ConfigurationError,
    InvalidEventError,
    PayloadNotSerializableError,
    StoreError,
)
from outboxer.metrics import Stats
from outboxer.routing import RouteRegistry, ServiceRoute, validate_event_type
from outboxer.runner import AsyncRunner, SyncRunner
from outboxer.schema import outbox_table
from outboxer.store import (
    OpContext,
    Store,
    _check_async,
    _check_sync,
    _dialect_name,
    clean_key,
    op_insert,
)
from outboxer.transports.base import Transport

logger = logging.getLogger(__name__)

H = TypeVar("H", bound=Handler)


class Outbox:
    """An application's outbox: its routes, tables, publisher and stores.

    ``url_or_engine`` is a database URL (see :mod:`outboxer.db` for the forms) or a
    SQLAlchemy ``Engine``/``AsyncEngine``; when omitted, ``OUTBOXER_URL`` or the
    configuration file decides. Keyword arguments override configuration.
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
            settings = OutboxSettings.from_values(**{**settings.model_dump(), **updates})
        self.settings = settings
        self.retry_policy = RetryPolicy(max_retry=settings.max_retry, unit=settings.retry_unit)
        self.max_payload_bytes = settings.max_payload_bytes
        self.strict_json = settings.strict_json
        self.json_default = json_default
        self.routes = RouteRegistry(
            topic_prefix=settings.topic_prefix, overrides=settings.overrides()
        )
        self.db = Database(url_or_engine if url_or_engine is not None else settings.url)
        self.metadata = MetaData()
        """Holds one table per registered service; give it to Alembic's target_metadata."""
        self._engine = Runtime(self, transport if transport is not None else settings.transport)

    # ------------------------------------------------------------------ routing

    def register_service(
        self,
        name: str,
        *,
        table: str | None = None,
        topic: str | None = None,
        group: str | None = None,
    ) -> ServiceRoute:
        """Declare a service's route (defaults derived from its name)."""
        route = self.routes.register_service(name, table=table, topic=topic, group=group)
        outbox_table(route.table_name, self.metadata)
        return route

    def register_event(self, event_type: str, service: str) -> ServiceRoute:
        """Make ``service`` the owner of ``event_type`` (its events go to its table)."""
        route = self.routes.register_event(event_type, service)
        outbox_table(route.table_name, self.metadata)
        return route

    # ------------------------------------------------------------------ handlers

    def handler(self, event_type: str, *, service: str | None = None) -> Callable[[H], H]:
        """Decorator: ``fn(event, tx)`` handles ``event_type`` (see :meth:`register_handler`)."""
        return self._engine.handler(event_type, service=service)

    def register_handler(self, event_type: str, fn: Handler, *, service: str | None = None) -> None:
        """Make ``fn`` the handler of ``event_type``.

        ``async def fn(event: Envelope, tx: AsyncSession)`` or ``def fn(event, tx:
        Session)``: it runs inside the transaction that marks the event consumed, so
        its database writes and the mark commit together. Raising makes the event
        fail for retry. ``service=`` also registers the event type to that service.
        """
        self._engine.register_handler(event_type, fn, service=service)

    @property
    def transport(self) -> Transport:
        return self._engine.transport

    @property
    def stats(self) -> Stats:
        """Counters of what this process's relays and consumers did."""
        return self._engine.stats

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
        groups may still be joining). Consumers
        run for services that have handlers in this process; relays for every chosen
        service (with the local transport: the consumed ones, since delivery is
        in-process).
        """
        await self._engine.run(
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
        self._engine.stop()

    def op_context(self, route: ServiceRoute, tx: Any = None) -> OpContext:
        """The context the state-machine ops need for ``route``, on outboxer's engines
        or on the caller's transaction ``tx``."""
        return OpContext(
            table=self.table_for(route),
            route=route,
            family=self.db.family if tx is None else family_of(_dialect_name(tx)),
            policy=self.retry_policy,
        )

    def row_values(
        self, route: ServiceRoute, event_type: str, key: str, document: Any, max_retry: int
    ) -> dict[str, Any]:
        """The columns of a new row: ``document`` encoded (checked against the JSON and
        size rules) and the route's service and topic."""
        if document is None:
            raise PayloadNotSerializableError("payload is None", event_type=event_type)
        text = encode_json(
            document,
            strict=self.strict_json,
            json_default=self.json_default,
            max_bytes=self.max_payload_bytes,
            event_type=event_type,
        )
        return {
            "event_type": event_type,
            "service_name": route.service_name,
            "topic": route.topic,
            "message_key": key,
            "payload": text,
            "max_retry": max_retry,
        }

    def table_for(self, route: ServiceRoute | str) -> Table:
        if isinstance(route, str):
            route = self.routes.route_for_service(route)
        return outbox_table(route.table_name, self.metadata)

    # ------------------------------------------------------------------ schema

    def migrate(self) -> None:
        """Create every registered service's table and indexes that do not exist yet."""
        try:
            with self.db.sync_engine.begin() as conn:
                self.metadata.create_all(conn, checkfirst=True)
        except SQLAlchemyError as exc:
            raise StoreError(f"migration failed: {exc}", url=self.db.safe_url) from exc

    async def migrate_async(self) -> None:
        try:
            async with self.db.async_engine.begin() as conn:
                await conn.run_sync(self.metadata.create_all, checkfirst=True)
        except SQLAlchemyError as exc:
            raise StoreError(f"migration failed: {exc}", url=self.db.safe_url) from exc

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
        self.table_for(route)
        return Store(self, route)

    # ------------------------------------------------------------------ publish

    def _prepare_publish(
        self,
        event_type: str,
        payload: Any,
        key: str | None,
        aggregate_id: str | None,
        event_id: str | None,
        version: str | None,
        max_retry: int | None,
    ) -> tuple[ServiceRoute, dict[str, Any]]:
        event_type = validate_event_type(event_type)
        route = self.routes.resolve_event(event_type)
        for name, value in (
            ("key", key),
            ("aggregate_id", aggregate_id),
            ("event_id", event_id),
            ("version", version),
        ):
            if value is not None and not isinstance(value, str):
                raise InvalidEventError(
                    f"{name} must be a string, got {type(value).__name__}", event_type=event_type
                )
        if max_retry is not None and (
            isinstance(max_retry, bool) or not isinstance(max_retry, int) or max_retry < 1
        ):
            raise InvalidEventError(
                f"max_retry must be an int of at least 1, got {max_retry!r}",
                event_type=event_type,
            )
        event_id = event_id.strip() if event_id is not None and event_id.strip() else None
        resolved_key = clean_key(key or "", event_type) or event_id or event_type
        if event_id is not None:
            clean_key(event_id, event_type)
        envelope = build_stored_envelope(
            event_type=event_type,
            payload=payload,
            event_id=event_id,
            version=(version or "").strip() or DEFAULT_VERSION,
            aggregate_id=(aggregate_id or "").strip() or resolved_key,
        )
        if max_retry is None:
            max_retry = self.retry_policy.max_retry
        return route, self.row_values(route, event_type, resolved_key, envelope, max_retry)

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
    ) -> int:
        """Write one event on the caller's transaction and return its outbox id.

        Nothing is committed: the event becomes visible with the caller's commit and
        disappears with its rollback. Every check runs before any SQL, so a rejected
        event leaves the transaction usable.
        """
        _check_sync(tx)
        route, values = self._prepare_publish(
            event_type, payload, key, aggregate_id, event_id, version, max_retry
        )
        outbox_id = int(SyncRunner(tx).run(op_insert(self.op_context(route, tx), values)))
        self._engine.wake_after_commit(tx, route.service_name)
        return outbox_id

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
    ) -> int:
        """Async twin of :meth:`publish` for ``AsyncSession``/``AsyncConnection``."""
        _check_async(tx)
        route, values = self._prepare_publish(
            event_type, payload, key, aggregate_id, event_id, version, max_retry
        )
        runner = AsyncRunner(tx)
        outbox_id = int(await runner.run(op_insert(self.op_context(route, tx), values)))
        self._engine.wake_after_commit(tx, route.service_name)
        return outbox_id

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
