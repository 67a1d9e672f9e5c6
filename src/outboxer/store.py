"""The outbox state machine on one service's table, with a sync and an async face.

:class:`Store` is a thin face over the ops in :mod:`outboxer.database.ops`: each
method runs one op either in its own transaction or on the caller's (``with_tx``).
:class:`RowBuilder` checks and encodes a new event before any SQL runs, and
:class:`Storage` bundles what every store of one application shares (the database,
the tables, the routes and those row rules), so nothing below the facade needs the
facade.
"""

from __future__ import annotations

import contextlib
import math
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from contextlib import AbstractAsyncContextManager, AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Connection, Table
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

from outboxer.backoff import RetryPolicy, check_max_retry
from outboxer.database.dialects import Dialect, dialect_for
from outboxer.database.engines import AUTOCOMMIT, READ_ONLY, Database
from outboxer.database.instructions import Callback, Op
from outboxer.database.ops import (
    HANDLING_ALONE,
    HANDLING_IN_BATCH,
    Attempt,
    Claimed,
    OpContext,
    RowFilter,
    Started,
    op_activity,
    op_cancel,
    op_claim,
    op_claim_to_send,
    op_claim_unconsumed,
    op_consume,
    op_count,
    op_find,
    op_get,
    op_inbox_start,
    op_inbox_store,
    op_insert,
    op_list_due,
    op_mark_clean,
    op_mark_consumed,
    op_mark_dead,
    op_mark_failed,
    op_mark_published,
    op_purge_batch,
    op_release,
    op_requeue,
    op_start,
    op_status,
)
from outboxer.database.runner import AsyncRunner, SyncRunner
from outboxer.database.schema import MAX_EVENT_ID_CHARS, MAX_KEY_CHARS, Tables
from outboxer.envelope import DEFAULT_VERSION, JsonDefault, build_stored_envelope, encode_json
from outboxer.errors import (
    ConfigurationError,
    InvalidEventError,
    MessageNotFoundError,
    PayloadNotSerializableError,
    ServiceMismatchError,
    StoreError,
    TransactionRequiredError,
)
from outboxer.models import Activity, OutboxMessage, ServiceStatus, Status
from outboxer.routing import RouteRegistry, ServiceRoute, validate_event_type
from outboxer.settings import DEFAULT_BATCH_SIZE, DEFAULT_LEASE, DEFAULT_SCHEDULE_HORIZON

T = TypeVar("T")

SyncTx = Session | Connection
AsyncTx = AsyncSession | AsyncConnection


def clean_key(key: object, event_type: str | None = None) -> str:
    """A message key trimmed and checked: a string of at most 255 characters with no
    control characters (C0, DEL, C1)."""
    if not isinstance(key, str):
        raise InvalidEventError(
            f"message key must be a string, got {type(key).__name__}", event_type=event_type
        )
    key = key.strip()
    if len(key) > MAX_KEY_CHARS:
        raise InvalidEventError(
            f"message key is longer than {MAX_KEY_CHARS} characters ({len(key)})",
            event_type=event_type,
        )
    if any(unicodedata.category(c) == "Cc" for c in key):
        raise InvalidEventError(
            f"message key {key[:40]!r} contains control characters", event_type=event_type
        )
    try:
        key.encode()
    except UnicodeEncodeError as exc:
        raise InvalidEventError(
            f"message key is not valid Unicode: {exc}", event_type=event_type
        ) from exc
    return key


def check_event_id(event_id: object) -> str:
    """An event id as given to ``cancel``: a non-empty string (trimmed, as publish
    stores it)."""
    if not isinstance(event_id, str) or not event_id.strip():
        raise InvalidEventError(f"event id must be a non-empty string, got {event_id!r}")
    if len(event_id.strip()) > MAX_EVENT_ID_CHARS:
        raise InvalidEventError(f"event id is longer than {MAX_EVENT_ID_CHARS} characters")
    return event_id.strip()


def lease_seconds(lease: timedelta | float) -> float:
    seconds = lease.total_seconds() if isinstance(lease, timedelta) else float(lease)
    if not seconds > 0:
        raise ConfigurationError(f"lease must be positive, got {lease!r}")
    return seconds


def check_sync(tx: object) -> None:
    """Refuse anything but a synchronous Session or Connection."""
    if isinstance(tx, AsyncSession | AsyncConnection):
        raise TransactionRequiredError(
            "this method needs a synchronous Session/Connection; "
            "use the *_async method with an AsyncSession/AsyncConnection"
        )
    if not isinstance(tx, Session | Connection):
        raise TransactionRequiredError(
            f"expected a SQLAlchemy Session or Connection, got {type(tx).__name__}"
        )


def check_async(tx: object) -> None:
    """Refuse anything but an AsyncSession or AsyncConnection."""
    if isinstance(tx, Session | Connection):
        raise TransactionRequiredError(
            "this method needs an AsyncSession/AsyncConnection; "
            "use the method without _async for a synchronous Session/Connection"
        )
    if not isinstance(tx, AsyncSession | AsyncConnection):
        raise TransactionRequiredError(
            f"expected a SQLAlchemy AsyncSession or AsyncConnection, got {type(tx).__name__}"
        )


def dialect_name(tx: SyncTx | AsyncTx) -> str:
    bind = tx.get_bind() if isinstance(tx, Session | AsyncSession) else tx
    return str(bind.dialect.name)


@dataclass(frozen=True, slots=True, kw_only=True)
class RowBuilder:
    """The rules of a new row: every check and the encoding, before any SQL."""

    policy: RetryPolicy
    strict_json: bool = True
    json_default: JsonDefault | None = None
    max_payload_bytes: int | None = None
    schedule_horizon: float = DEFAULT_SCHEDULE_HORIZON
    """Seconds ahead ``delay``/``deliver_at`` may schedule an event."""

    def schedule(
        self,
        delay: float | timedelta | None,
        deliver_at: datetime | None,
        event_type: str | None = None,
    ) -> dict[str, Any]:
        """The due time of a new row as insert parameters: ``{}`` (due now),
        ``{"_delay": seconds}`` (the database clock) or ``{"_at": utc_datetime}``."""
        if delay is not None and deliver_at is not None:
            raise InvalidEventError("give delay or deliver_at, not both", event_type=event_type)
        horizon = self.schedule_horizon
        if delay is not None:
            if isinstance(delay, timedelta):
                seconds = delay.total_seconds()
            elif isinstance(delay, int | float) and not isinstance(delay, bool):
                seconds = float(delay)
            else:
                raise InvalidEventError(
                    f"delay must be seconds or a timedelta, got {type(delay).__name__}",
                    event_type=event_type,
                )
            if not math.isfinite(seconds) or seconds < 0:
                raise InvalidEventError(
                    f"delay must be zero or more seconds, got {delay!r}", event_type=event_type
                )
            if seconds > horizon:
                raise InvalidEventError(
                    f"delay of {seconds:g} s is beyond the schedule horizon ({horizon:g} s)",
                    event_type=event_type,
                )
            return {"_delay": seconds} if seconds > 0 else {}
        if deliver_at is not None:
            if not isinstance(deliver_at, datetime):
                raise InvalidEventError(
                    f"deliver_at must be a datetime, got {type(deliver_at).__name__}",
                    event_type=event_type,
                )
            if deliver_at.tzinfo is None or deliver_at.utcoffset() is None:
                raise InvalidEventError(
                    f"deliver_at must be an aware datetime (with a time zone), got "
                    f"{deliver_at.isoformat()}",
                    event_type=event_type,
                )
            at = deliver_at.astimezone(UTC)
            ahead = (at - datetime.now(UTC)).total_seconds()
            if ahead > horizon:
                raise InvalidEventError(
                    f"deliver_at {at.isoformat()} is beyond the schedule horizon "
                    f"({horizon:g} s from now)",
                    event_type=event_type,
                )
            return {"_at": at} if ahead > 0 else {}  # a time already past: due now
        return {}

    def row(
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

    def received(
        self,
        route: ServiceRoute,
        *,
        event_id: str,
        event_type: str,
        key: str,
        payload: Any,
        version: str,
        aggregate_id: str,
    ) -> dict[str, Any]:
        """The inbox row of an event received from another producer: stored as it
        came (no strictness or size rule: it was already accepted once), with its
        key made to fit the column."""
        if not event_id or len(event_id) > MAX_EVENT_ID_CHARS:
            raise InvalidEventError(
                f"event id must have 1 to {MAX_EVENT_ID_CHARS} characters", event_type=event_type
            )
        event_type = validate_event_type(event_type)
        document = build_stored_envelope(
            event_type=event_type,
            payload=payload,
            event_id=event_id,
            version=version or DEFAULT_VERSION,
            aggregate_id=aggregate_id or key,
        )
        text = encode_json(document, strict=False, json_default=self.json_default)
        fitted = "".join("?" if unicodedata.category(c) == "Cc" else c for c in key.strip())
        return {
            "event_type": event_type,
            "service_name": route.service_name,
            "topic": route.topic,
            "message_key": fitted[:MAX_KEY_CHARS],
            "payload": text,
            "max_retry": self.policy.max_retry,
            "event_id": event_id,
        }

    def event(
        self,
        route: ServiceRoute,
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
    ) -> dict[str, Any]:
        """The row of an event as ``publish`` writes it (``event_type`` already
        validated and routed to ``route``); the explicit event id in ``event_id``,
        the due time of a scheduled event in ``_delay``/``_at`` (see
        :meth:`schedule`)."""
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
        if max_retry is None:
            max_retry = self.policy.max_retry
        else:
            try:
                check_max_retry(max_retry)
            except ConfigurationError as exc:
                raise InvalidEventError(exc.message, event_type=event_type) from None
        event_id = event_id.strip() if event_id is not None and event_id.strip() else None
        resolved_key = clean_key(key or "", event_type) or event_id or event_type
        if event_id is not None:
            clean_key(event_id, event_type)
        due = self.schedule(delay, deliver_at, event_type)
        envelope = build_stored_envelope(
            event_type=event_type,
            payload=payload,
            event_id=event_id,
            version=(version or "").strip() or DEFAULT_VERSION,
            aggregate_id=(aggregate_id or "").strip() or resolved_key,
        )
        values = self.row(route, event_type, resolved_key, envelope, max_retry)
        values["event_id"] = event_id
        values.update(due)
        return values


@dataclass(frozen=True, slots=True)
class Storage:
    """What every store of one application shares."""

    database: Database
    tables: Tables
    routes: RouteRegistry
    rows: RowBuilder
    notify: bool = True
    """Inserts notify relays waiting on the database (PostgreSQL NOTIFY)."""
    dead_blocks: bool = False
    """Ordered services: a dead event holds back the later events of its key."""
    scheduled_blocks: bool = False
    """Ordered services: a scheduled event not yet due holds back the later events
    of its key."""

    def op_context(self, route: ServiceRoute, tx: Any = None) -> OpContext:
        """The context the ops need for ``route``, on outboxer's engines or on the
        caller's transaction ``tx``."""
        dialect = self.database.dialect if tx is None else dialect_for(dialect_name(tx))
        table = self.tables.table(route)
        channel = dialect.notify_channel(table.name) if self.notify and not route.inbox else None
        return OpContext(
            table,
            route,
            dialect,
            self.rows.policy,
            channel,
            self.dead_blocks,
            self.scheduled_blocks,
        )

    def store(self, route: ServiceRoute, tx: SyncTx | AsyncTx | None = None) -> Store:
        return Store(self, route, tx)


class Store:
    """The outbox state machine bound to one service route.

    Get one from :meth:`Outbox.store`. Each method opens and commits its own
    transaction, unless the store is bound to the caller's with :meth:`with_tx`
    (then nothing is committed; consume methods run inside a SAVEPOINT so a failing
    callback leaves the caller's transaction usable).
    """

    def __init__(
        self, storage: Storage, route: ServiceRoute, tx: SyncTx | AsyncTx | None = None
    ) -> None:
        self._storage = storage
        self.route = route
        self._tx = tx
        self._ctx = storage.op_context(route, tx)

    def with_route(self, route: ServiceRoute | str) -> Store:
        """The same store (and transaction) for another service route."""
        if isinstance(route, str):
            route = self._storage.routes.route_for_service(route)
        else:
            self._storage.routes.register_service(
                route.service_name, table=route.table_name, topic=route.topic, group=route.group_id
            )
        return Store(self._storage, route, self._tx)

    def with_tx(self, tx: SyncTx | AsyncTx) -> Store:
        """The same store writing on the caller's transaction (never committing it)."""
        if not isinstance(tx, Session | Connection | AsyncSession | AsyncConnection):
            raise TransactionRequiredError(
                f"expected a SQLAlchemy Session, Connection, AsyncSession or AsyncConnection, "
                f"got {type(tx).__name__}"
            )
        return Store(self._storage, self.route, tx)

    @property
    def table(self) -> Table:
        return self._ctx.table

    # -- running

    @property
    def dialect(self) -> Dialect:
        """The database this store writes to."""
        return self._ctx.dialect

    @property
    def _single_claim(self) -> bool:
        return self._storage.database.dialect.single_statement_claim

    def _options(self, read_only: bool, single: bool) -> dict[str, Any]:
        if read_only:
            return READ_ONLY
        if single and self._storage.database.dialect.autocommit_single_statements:
            # One statement is its own transaction: no BEGIN and COMMIT round trips.
            return AUTOCOMMIT
        return {}

    def _run(
        self,
        op: Op[T],
        *,
        savepoint: bool = False,
        read_only: bool = False,
        single: bool = False,
    ) -> T:
        tx = self._tx
        if tx is None:
            engine = self._storage.database.sync_engine
            runner: SyncRunner | None = None
            options = self._options(read_only, single)
            try:
                with engine.connect() as conn:
                    if options:
                        conn.execution_options(**options)
                    with conn.begin():
                        runner = SyncRunner(conn)
                        return runner.run(op)
            except SQLAlchemyError as exc:
                if runner is not None and exc is runner.callback_error:
                    raise
                raise StoreError(f"database error: {exc}", **self._ctx.ctx()) from exc
        check_sync(tx)
        assert isinstance(tx, Session | Connection)
        cm: AbstractContextManager[Any] = tx.begin_nested() if savepoint else nullcontext()
        with cm:
            return SyncRunner(tx).run(op)

    async def _run_async(
        self,
        op: Op[T],
        *,
        savepoint: bool = False,
        read_only: bool = False,
        single: bool = False,
    ) -> T:
        tx = self._tx
        if tx is None:
            database = self._storage.database
            engine = database.async_engine
            runner: AsyncRunner | None = None
            options = self._options(read_only, single)
            writer = contextlib.nullcontext() if read_only else database.writer()
            try:
                async with writer, engine.connect() as conn:
                    if options:
                        await conn.execution_options(**options)
                    async with conn.begin():
                        runner = AsyncRunner(conn)
                        return await runner.run(op)
            except SQLAlchemyError as exc:
                if runner is not None and exc is runner.callback_error:
                    raise
                raise StoreError(f"database error: {exc}", **self._ctx.ctx()) from exc
        check_async(tx)
        assert isinstance(tx, AsyncSession | AsyncConnection)
        cm: AbstractAsyncContextManager[Any] = tx.begin_nested() if savepoint else nullcontext()
        async with cm:
            return await AsyncRunner(tx).run(op)

    # -- building

    def _prepare_create(
        self, event_type: str, message_key: str, payload: Any, max_retry: int
    ) -> dict[str, Any]:
        event_type = validate_event_type(event_type)
        route = self._storage.routes.resolve_event(event_type)
        if route.service_name != self.route.service_name:
            raise ServiceMismatchError(
                f"event type {event_type!r} belongs to service {route.service_name!r}, "
                f"this store is bound to {self.route.service_name!r}",
                event_type=event_type,
                service=route.service_name,
                store_service=self.route.service_name,
            )
        message_key = clean_key(message_key, event_type)
        if isinstance(max_retry, bool) or not isinstance(max_retry, int):
            raise InvalidEventError(f"max_retry must be an int, got {max_retry!r}")
        if max_retry <= 0:
            max_retry = self._storage.rows.policy.max_retry
        try:
            check_max_retry(max_retry)
        except ConfigurationError as exc:
            raise InvalidEventError(exc.message, event_type=event_type) from None
        return self._storage.rows.row(route, event_type, message_key, payload, max_retry)

    # -- the state machine, sync face

    def create_message(
        self, event_type: str, message_key: str, payload: Any, max_retry: int = 0
    ) -> int:
        """Insert a pending row; ``max_retry <= 0`` means the outbox default (20)."""
        values = self._prepare_create(event_type, message_key, payload, max_retry)
        return int(self._run(op_insert(self._ctx, values), single=True))

    def get_by_id(self, outbox_id: int) -> OutboxMessage | None:
        return self._run(op_get(self._ctx, outbox_id), read_only=True)

    def list_due_messages(
        self, limit: int = DEFAULT_BATCH_SIZE, service_name: str | None = None
    ) -> list[OutboxMessage]:
        return self._run(op_list_due(self._ctx, limit, _svc(service_name)), read_only=True)

    def claim_due(
        self,
        limit: int = DEFAULT_BATCH_SIZE,
        lease: timedelta | float = DEFAULT_LEASE,
        service_name: str | None = None,
    ) -> list[OutboxMessage]:
        """Claim due rows for this worker (see :func:`op_claim`)."""
        op = op_claim(self._ctx, limit, lease_seconds(lease), _svc(service_name))
        return self._run(op, single=self._single_claim)

    def claim_unconsumed(self, limit: int, older_than: float) -> list[OutboxMessage]:
        """Published rows not consumed within ``older_than`` seconds (to send again)."""
        return self._run(
            op_claim_unconsumed(self._ctx, limit, older_than), single=self._single_claim
        )

    def mark_published(self, outbox_id: int) -> None:
        self._run(op_mark_published(self._ctx, [outbox_id]), single=True)

    def mark_published_many(
        self, ids: Iterable[int], *, expect_retry_count: int | None = None
    ) -> int:
        return int(
            self._run(op_mark_published(self._ctx, list(ids), expect_retry_count), single=True)
        )

    def mark_consumed(self, outbox_id: int) -> None:
        self._run(op_mark_consumed(self._ctx, [outbox_id]), single=True)

    def mark_dead(self, outbox_id: int, reason: str) -> None:
        self._run(op_mark_dead(self._ctx, [outbox_id], reason), single=True)

    def mark_dead_many(self, ids: Iterable[int], reason: str, *, unless_final: bool = False) -> int:
        """Dead letters; ``unless_final`` leaves rows already consumed or dead alone."""
        op = op_mark_dead(self._ctx, list(ids), reason, unless_final=unless_final)
        return int(self._run(op, single=True))

    def mark_failed_for_retry(self, outbox_id: int, reason: str) -> Status | None:
        """One failed attempt; returns the new status, ``None`` if consumed/dead."""
        outcome = self._run(op_mark_failed(self._ctx, [(outbox_id, reason)]))
        return self._found(outcome, outbox_id)

    def mark_failed_many(self, failures: Sequence[tuple[int, str]]) -> dict[int, Status | None]:
        """One failed attempt each; the new status per id found (``None``: the row
        was consumed/dead and left alone)."""
        return _statuses(self._run(op_mark_failed(self._ctx, list(failures))))

    def consume_and_mark_consumed(
        self, outbox_id: int, fn: Callable[[Session], Any] | None
    ) -> bool:
        """Run ``fn(session)`` and mark the row consumed in one transaction."""
        return bool(self._run(op_consume(self._ctx, outbox_id, fn, True), savepoint=True))

    def consume_in_tx(self, outbox_id: int, fn: Callable[[Session], Any] | None) -> bool:
        """As :meth:`consume_and_mark_consumed` without the mark (caller marks later)."""
        return bool(self._run(op_consume(self._ctx, outbox_id, fn, False), savepoint=True))

    def status(self, *, rates: bool = False) -> ServiceStatus:
        """Counts by status, rows due now and the age of the oldest due row; with
        ``rates``, rows published and consumed in the last minute."""
        return self._run(op_status(self._ctx, rates), read_only=True)

    async def status_async(self, *, rates: bool = False) -> ServiceStatus:
        op = op_status(self._ctx, rates)
        return await self._run_async(op, read_only=True)

    def requeue(
        self,
        ids: Sequence[int] | None = None,
        *,
        status: Status = Status.DEAD,
        event_type: str | None = None,
        since: float | None = None,
    ) -> int:
        """Rows of ``status`` (dead letters by default) due again now with a fresh
        retry budget; ``ids``/``event_type``/``since`` (seconds) narrow them. Returns
        how many were requeued; each keeps a note (``requeue_count``, ``requeued_at``)."""
        op = op_requeue(self._ctx, ids, status, event_type=event_type, since=since)
        return int(self._run(op, single=True))

    def cancel(self, event_id: str) -> bool:
        """Take back the event ``event_id`` if it is still waiting (see
        :func:`~outboxer.database.ops.op_cancel`); True when it is now cancelled."""
        return bool(self._run(op_cancel(self._ctx, check_event_id(event_id)), single=True))

    def find(
        self, where: RowFilter, limit: int = DEFAULT_BATCH_SIZE, *, newest_first: bool = False
    ) -> list[OutboxMessage]:
        """Rows matching ``where`` in id order (``newest_first``: descending; read only)."""
        return self._run(op_find(self._ctx, where, limit, newest_first), read_only=True)

    def activity(self, *, minutes: int = 60) -> Activity:
        """Rows published, consumed and failed in each of the last ``minutes`` minutes
        (see :func:`~outboxer.database.ops.op_activity`)."""
        return self._run(op_activity(self._ctx, minutes), read_only=True)

    def count(self, where: RowFilter) -> int:
        return int(self._run(op_count(self._ctx, where), read_only=True))

    def purge_batch(self, where: RowFilter, limit: int) -> int:
        """Delete up to ``limit`` rows matching ``where`` in one short transaction."""
        return int(self._run(op_purge_batch(self._ctx, where, limit)))

    # -- async face

    async def create_message_async(
        self, event_type: str, message_key: str, payload: Any, max_retry: int = 0
    ) -> int:
        values = self._prepare_create(event_type, message_key, payload, max_retry)
        return int(await self._run_async(op_insert(self._ctx, values), single=True))

    async def get_by_id_async(self, outbox_id: int) -> OutboxMessage | None:
        return await self._run_async(op_get(self._ctx, outbox_id), read_only=True)

    async def list_due_messages_async(
        self, limit: int = DEFAULT_BATCH_SIZE, service_name: str | None = None
    ) -> list[OutboxMessage]:
        op = op_list_due(self._ctx, limit, _svc(service_name))
        return await self._run_async(op, read_only=True)

    async def claim_due_async(
        self,
        limit: int = DEFAULT_BATCH_SIZE,
        lease: timedelta | float = DEFAULT_LEASE,
        service_name: str | None = None,
    ) -> list[OutboxMessage]:
        op = op_claim(self._ctx, limit, lease_seconds(lease), _svc(service_name))
        return await self._run_async(op, single=self._single_claim)

    async def claim_to_send_async(self, limit: int, lease: float) -> list[Claimed]:
        """:meth:`claim_due_async` returning only what the relay sends."""
        return await self._run_async(
            op_claim_to_send(self._ctx, limit, lease_seconds(lease)), single=self._single_claim
        )

    async def claim_unconsumed_async(self, limit: int, older_than: float) -> list[OutboxMessage]:
        op = op_claim_unconsumed(self._ctx, limit, older_than)
        return await self._run_async(op, single=self._single_claim)

    async def mark_published_async(self, outbox_id: int) -> None:
        await self._run_async(op_mark_published(self._ctx, [outbox_id]), single=True)

    async def mark_published_many_async(
        self,
        ids: Iterable[int],
        *,
        expect_retry_count: int | None = None,
        expect_updated_at: datetime | None = None,
    ) -> int:
        op = op_mark_published(self._ctx, list(ids), expect_retry_count, expect_updated_at)
        return int(await self._run_async(op, single=True))

    async def release_async(self, ids: Iterable[int], delay: float = 0.0) -> int:
        """Claimed rows due again in ``delay`` seconds, no attempt counted."""
        return int(await self._run_async(op_release(self._ctx, list(ids), delay), single=True))

    async def store_received_async(self, row: dict[str, Any]) -> int:
        """Store a received event in this inbox (once) and return its row id."""
        return await self._run_async(op_inbox_store(self._ctx, row))

    async def start_handling_async(
        self,
        ids: Sequence[int],
        *,
        alone: bool = False,
        own: AbstractSet[int] = frozenset(),
        skip_busy: bool = True,
    ) -> Started:
        """Mark messages as being handled, before their handlers run (see
        :func:`~outboxer.database.ops.op_start`), in a transaction of its own.

        Where the database marks in one autocommit statement (PostgreSQL), that is
        tried first: when every row was pending or published and unmarked (the
        usual case), it is all; otherwise the full start runs, knowing the rows it
        marked."""
        ids = sorted(set(ids))
        if ids and self.dialect.one_statement_marks:
            mark = HANDLING_ALONE if alone or len(ids) == 1 else HANDLING_IN_BATCH
            marked = await self._run_async(op_mark_clean(self._ctx, ids, mark), single=True)
            if marked is not None and len(marked) == len(ids):
                return Started(ready=ids)
            own = {*own, *(marked or ())}
        op = op_start(self._ctx, ids, alone=alone, own=own, skip_busy=skip_busy)
        return await self._run_async(op)

    async def inbox_start_async(
        self,
        rows: Sequence[dict[str, Any]],
        *,
        lease: float,
        alone: bool = False,
        own: AbstractSet[int] = frozenset(),
    ) -> tuple[dict[str, int], Started]:
        """Store received events and mark them as being handled, in one transaction
        (see :func:`~outboxer.database.ops.op_inbox_start`)."""
        op = op_inbox_start(self._ctx, rows, lease=lease, alone=alone, own=own)
        return await self._run_async(op)

    async def mark_consumed_async(self, outbox_id: int) -> None:
        await self._run_async(op_mark_consumed(self._ctx, [outbox_id]), single=True)

    async def mark_dead_async(self, outbox_id: int, reason: str) -> None:
        await self._run_async(op_mark_dead(self._ctx, [outbox_id], reason), single=True)

    async def mark_dead_many_async(
        self, ids: Iterable[int], reason: str, *, unless_final: bool = False
    ) -> int:
        op = op_mark_dead(self._ctx, list(ids), reason, unless_final=unless_final)
        return int(await self._run_async(op, single=True))

    async def mark_failed_for_retry_async(self, outbox_id: int, reason: str) -> Status | None:
        outcome = await self._run_async(op_mark_failed(self._ctx, [(outbox_id, reason)]))
        return self._found(outcome, outbox_id)

    async def mark_failed_many_async(
        self, failures: Sequence[tuple[int, str]]
    ) -> dict[int, Status | None]:
        return _statuses(await self._run_async(op_mark_failed(self._ctx, list(failures))))

    async def consume_and_mark_consumed_async(self, outbox_id: int, fn: Callback | None) -> bool:
        """Async twin; ``fn`` may be ``async def fn(AsyncSession)`` or ``def fn(Session)``."""
        op = op_consume(self._ctx, outbox_id, fn, True)
        return bool(await self._run_async(op, savepoint=True))

    async def consume_in_tx_async(self, outbox_id: int, fn: Callback | None) -> bool:
        op = op_consume(self._ctx, outbox_id, fn, False)
        return bool(await self._run_async(op, savepoint=True))

    async def requeue_async(
        self,
        ids: Sequence[int] | None = None,
        *,
        status: Status = Status.DEAD,
        event_type: str | None = None,
        since: float | None = None,
    ) -> int:
        op = op_requeue(self._ctx, ids, status, event_type=event_type, since=since)
        return int(await self._run_async(op, single=True))

    async def cancel_async(self, event_id: str) -> bool:
        op = op_cancel(self._ctx, check_event_id(event_id))
        return bool(await self._run_async(op, single=True))

    async def find_async(
        self, where: RowFilter, limit: int = DEFAULT_BATCH_SIZE, *, newest_first: bool = False
    ) -> list[OutboxMessage]:
        op = op_find(self._ctx, where, limit, newest_first)
        return await self._run_async(op, read_only=True)

    async def activity_async(self, *, minutes: int = 60) -> Activity:
        return await self._run_async(op_activity(self._ctx, minutes), read_only=True)

    async def count_async(self, where: RowFilter) -> int:
        return int(await self._run_async(op_count(self._ctx, where), read_only=True))

    async def purge_batch_async(self, where: RowFilter, limit: int) -> int:
        return int(await self._run_async(op_purge_batch(self._ctx, where, limit)))

    def _found(self, outcome: dict[int, Attempt], outbox_id: int) -> Status | None:
        if outbox_id not in outcome:
            raise MessageNotFoundError(
                "outbox message not found", **self._ctx.ctx(outbox_id=outbox_id)
            )
        return outcome[outbox_id].status


def _statuses(outcome: dict[int, Attempt]) -> dict[int, Status | None]:
    return {oid: attempt.status for oid, attempt in outcome.items()}


def _svc(service_name: str | None) -> str | None:
    if service_name is None:
        return None
    return service_name.strip() or None
