"""Publishing: one INSERT on the caller's transaction, after every check.

An event with an explicit ``event_id`` is written once per table (a second publish
of the id returns the first row's outbox id, or raises ``DuplicateEventError`` when
it is another event); ``delay``/``deliver_at`` set the row's first due time. Both go
through :func:`~outboxer.database.ops.writes.op_publish`; a plain event keeps the one
INSERT of :func:`~outboxer.database.ops.writes.op_insert`.

``publish`` never opens, commits or rolls back a transaction: the event becomes
visible with the caller's commit and disappears with its rollback. Every check
(registered event type, the payload's schema, key, ids, ``max_retry``, JSON and
size of the payload)
runs before any SQL, so a rejected event raises a typed error and leaves the
caller's transaction usable. After the INSERT the hooks hear of it
(``event_published``), which is how a running relay in this process is woken when
that transaction commits.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from outboxer.cloudevents import DATASCHEMA_HEADER, TIME_HEADER, is_cloudevents
from outboxer.contracts import Contracts
from outboxer.database.connections import connection_lost
from outboxer.database.ops.base import OpContext
from outboxer.database.ops.writes import op_insert, op_insert_many, op_publish
from outboxer.errors import CommitOutcomeUnknownError, RoutingError
from outboxer.hooks import Observer
from outboxer.models import Event
from outboxer.routing import ServiceRoute, validate_event_type
from outboxer.store import Storage


class Publisher:
    """Writes events on callers' transactions (``Outbox.publish`` / ``publish_async``)."""

    def __init__(
        self, storage: Storage, hooks: Observer, contracts: Contracts | None = None
    ) -> None:
        self.storage = storage
        self.hooks = hooks
        self.contracts = contracts if contracts is not None else Contracts()

    def _prepare(
        self, event_type: str, payload: Any, options: dict[str, Any]
    ) -> tuple[ServiceRoute, dict[str, Any]]:
        event_type = validate_event_type(event_type)
        route = self.storage.routes.resolve_event(event_type)
        if route.inbox:
            raise RoutingError(
                f"service {route.service_name!r} is consumed here through an inbox; its "
                f"events are published by its own application, not this one",
                event_type=event_type,
                service=route.service_name,
            )
        self.contracts.check(event_type, options.get("version"), payload)
        values = self.storage.rows.event(route, event_type, payload, **options)
        carrier: dict[str, str] = {}
        self.hooks.inject_context(route.service_name, event_type, carrier)
        if is_cloudevents(route):
            # Stored with the row, so every send of the event carries the same.
            carrier[TIME_HEADER] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
            schema = self.contracts.schema(event_type, options.get("version") or "v1")
            if schema is not None and isinstance(schema.get("$id"), str):
                carrier[DATASCHEMA_HEADER] = schema["$id"]
        # The trace context of the caller, continued by the consumer; always a key, so
        # rows of one publish_many statement all bind the same columns.
        values["headers"] = json.dumps(carrier, separators=(",", ":")) if carrier else None
        return route, values

    def publish(
        self, tx: Session | Connection, event_type: str, payload: Any, **options: Any
    ) -> int:
        connector = self.storage.connector
        connector.check_sync(tx)
        route, values = self._prepare(event_type, payload, options)
        ctx = self.storage.op_context(route, tx)
        if _plain(values):
            outbox_id, inserted = int(connector.run(op_insert(ctx, values), tx)), True
        else:
            outbox_id, inserted = connector.run(op_publish(ctx, values), tx)
        if inserted:
            self.hooks.event_published(route.service_name, values["event_type"], tx)
        return outbox_id

    def _prepare_many(
        self, events: Iterable[Event | tuple[str, Any]], tx: object
    ) -> tuple[int, list[_Write]]:
        """Every event checked and encoded (nothing written yet), as the writes to
        make in order: runs of plain events of one table (one INSERT each), and the
        others (event id, scheduled) one by one. A table's rows are written in the
        order they were given, so its outbox ids (the order of ordered services)
        follow that order."""
        writes: list[_Write] = []
        runs: dict[str, _Write] = {}
        count = 0
        for index, item in enumerate(events):
            event = item if isinstance(item, Event) else Event(*item)
            options = {
                "key": event.key,
                "aggregate_id": event.aggregate_id,
                "event_id": event.event_id,
                "version": event.version,
                "max_retry": event.max_retry,
                "delay": event.delay,
                "deliver_at": event.deliver_at,
            }
            route, values = self._prepare(event.event_type, event.payload, options)
            count = index + 1
            if not _plain(values):
                run = runs.pop(route.service_name, None)
                if run is not None:
                    writes.append(run)
                writes.append((self.storage.op_context(route, tx), [index], [values], True))
                continue
            run = runs.get(route.service_name)
            if run is None:
                run = runs[route.service_name] = (self.storage.op_context(route, tx), [], [], False)
            run[1].append(index)
            run[2].append(values)
        writes.extend(runs.values())
        return count, writes

    def publish_many(
        self, tx: Session | Connection, events: Iterable[Event | tuple[str, Any]]
    ) -> list[int]:
        connector = self.storage.connector
        connector.check_sync(tx)
        count, writes = self._prepare_many(events, tx)
        ids = [0] * count
        for ctx, indices, rows, one in writes:
            if one:
                ids[indices[0]], inserted = connector.run(op_publish(ctx, rows[0]), tx)
                if inserted:
                    self._report(ctx, rows, tx)
                continue
            written = connector.run(op_insert_many(ctx, rows), tx)
            for index, oid in zip(indices, written, strict=True):
                ids[index] = oid
            self._report(ctx, rows, tx)
        return ids

    async def publish_many_async(
        self, tx: AsyncSession | AsyncConnection, events: Iterable[Event | tuple[str, Any]]
    ) -> list[int]:
        connector = self.storage.connector
        connector.check_async(tx)
        count, writes = self._prepare_many(events, tx)
        ids = [0] * count
        for ctx, indices, rows, one in writes:
            if one:
                ids[indices[0]], inserted = await connector.run_async(op_publish(ctx, rows[0]), tx)
                if inserted:
                    self._report(ctx, rows, tx)
                continue
            written = await connector.run_async(op_insert_many(ctx, rows), tx)
            for index, oid in zip(indices, written, strict=True):
                ids[index] = oid
            self._report(ctx, rows, tx)
        return ids

    def _report(self, ctx: OpContext, rows: list[dict[str, Any]], tx: object) -> None:
        for values in rows:
            self.hooks.event_published(ctx.route.service_name, values["event_type"], tx)

    async def publish_async(
        self, tx: AsyncSession | AsyncConnection, event_type: str, payload: Any, **options: Any
    ) -> int:
        connector = self.storage.connector
        connector.check_async(tx)
        route, values = self._prepare(event_type, payload, options)
        ctx = self.storage.op_context(route, tx)
        if _plain(values):
            outbox_id, inserted = int(await connector.run_async(op_insert(ctx, values), tx)), True
        else:
            outbox_id, inserted = await connector.run_async(op_publish(ctx, values), tx)
        if inserted:
            self.hooks.event_published(route.service_name, values["event_type"], tx)
        return outbox_id


class OutboxTransaction:
    """A business transaction opened by :meth:`Outbox.transaction`: write on
    ``connection``, publish with :meth:`publish`; it commits when the block ends."""

    def __init__(self, publisher: Publisher, connection: Connection) -> None:
        self._publisher = publisher
        self.connection = connection
        self.outbox_ids: list[int] = []
        """The outbox ids of the events published in it, in order."""
        self.event_ids: list[str | None] = []
        """The ``event_id`` given to each publish (None: none given)."""

    def publish(self, event_type: str, payload: Any, **options: Any) -> int:
        """:meth:`Outbox.publish` on this transaction (same arguments after ``tx``)."""
        oid = self._publisher.publish(self.connection, event_type, payload, **options)
        self.outbox_ids.append(oid)
        self.event_ids.append(options.get("event_id"))
        return oid


class AsyncOutboxTransaction:
    """The async twin of :class:`OutboxTransaction` (:meth:`Outbox.transaction_async`)."""

    def __init__(self, publisher: Publisher, connection: AsyncConnection) -> None:
        self._publisher = publisher
        self.connection = connection
        self.outbox_ids: list[int] = []
        self.event_ids: list[str | None] = []

    async def publish(self, event_type: str, payload: Any, **options: Any) -> int:
        oid = await self._publisher.publish_async(self.connection, event_type, payload, **options)
        self.outbox_ids.append(oid)
        self.event_ids.append(options.get("event_id"))
        return oid


def _unknown(
    exc: BaseException, handle: OutboxTransaction | AsyncOutboxTransaction
) -> CommitOutcomeUnknownError:
    return CommitOutcomeUnknownError(
        "the connection was lost during COMMIT: the transaction may or may not have "
        "committed; look for its rows (outbox_ids), or publish again with the same "
        "event_id (an id already there writes nothing)",
        outbox_ids=handle.outbox_ids,
        event_ids=handle.event_ids,
        error=f"{type(exc).__name__}: {exc}",
    )


@contextlib.contextmanager
def transaction(publisher: Publisher, engine: Engine) -> Iterator[OutboxTransaction]:
    """Begin on a connection of ``engine``; commit when the block ends, roll back if it
    raises. A connection lost during COMMIT raises :class:`CommitOutcomeUnknownError`."""
    conn = engine.connect()
    try:
        trans = conn.begin()
        handle = OutboxTransaction(publisher, conn)
        try:
            yield handle
        except BaseException:
            with contextlib.suppress(Exception):  # a lost connection rolled it back
                trans.rollback()
            raise
        try:
            trans.commit()
        except Exception as exc:
            if connection_lost(exc):
                raise _unknown(exc, handle) from exc
            raise
    finally:
        with contextlib.suppress(Exception):
            conn.close()


@contextlib.asynccontextmanager
async def transaction_async(
    publisher: Publisher, engine: AsyncEngine
) -> AsyncIterator[AsyncOutboxTransaction]:
    """Async twin of :func:`transaction`."""
    conn = await engine.connect()
    try:
        trans = await conn.begin()
        handle = AsyncOutboxTransaction(publisher, conn)
        try:
            yield handle
        except BaseException:
            with contextlib.suppress(Exception):
                await trans.rollback()
            raise
        try:
            await trans.commit()
        except Exception as exc:
            if connection_lost(exc):
                raise _unknown(exc, handle) from exc
            raise
    finally:
        with contextlib.suppress(Exception):
            await conn.close()


_Write = tuple[OpContext, list[int], list[dict[str, Any]], bool]
"""A write of ``publish_many``: (context, indices in the call, rows, written one by
one with ``op_publish``: an event id or a due time)."""


def _plain(values: dict[str, Any]) -> bool:
    """Due now and without an event id: the one plain INSERT."""
    return values.get("event_id") is None and "_delay" not in values and "_at" not in values
