"""The outbox state machine on one service's table, with a sync and an async face.

:class:`Store` is a thin face over the ops in :mod:`outboxer.database.ops`: each
method runs one op through the connector, either in its own transaction or on the
caller's (``with_tx``). :class:`Storage` bundles what every store of one application
shares (the database, the connector, the tables, the routes and the row rules of
:mod:`outboxer.rows`), so nothing below the facade needs the facade.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Connection, Table
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

from outboxer.backoff import check_max_retry
from outboxer.database.connector import Connector
from outboxer.database.dialects import Dialect
from outboxer.database.engines import Database
from outboxer.database.instructions import Callback, Op
from outboxer.database.ops.base import OpContext
from outboxer.database.ops.handling import (
    HANDLING_ALONE,
    HANDLING_IN_BATCH,
    Started,
    op_mark_clean,
    op_start,
)
from outboxer.database.ops.inbox import op_inbox_start, op_inbox_store
from outboxer.database.ops.tools import (
    Audit,
    AuditFilter,
    RowFilter,
    op_activity,
    op_audit_list,
    op_audit_purge,
    op_blocked_keys,
    op_cancel_audited,
    op_count,
    op_edit,
    op_find,
    op_park,
    op_purge_batch,
    op_release_key,
    op_requeue,
    op_requeue_audited,
    op_retry_head,
    op_skip_head,
    op_status,
)
from outboxer.database.ops.transitions import (
    Attempt,
    Claimed,
    op_claim,
    op_claim_to_send,
    op_claim_unconsumed,
    op_consume,
    op_get,
    op_list_due,
    op_mark_consumed,
    op_mark_dead,
    op_mark_failed,
    op_mark_published,
    op_release,
)
from outboxer.database.ops.writes import op_cancel, op_insert
from outboxer.database.schema import Tables
from outboxer.errors import (
    ConfigurationError,
    InvalidEventError,
    MessageNotFoundError,
    ServiceMismatchError,
)
from outboxer.models import (
    Activity,
    AuditEntry,
    BlockedKey,
    OutboxMessage,
    ServiceStatus,
    Status,
)
from outboxer.routing import RouteRegistry, ServiceRoute, validate_event_type
from outboxer.rows import RowBuilder, check_event_id, clean_key
from outboxer.settings import DEFAULT_BATCH_SIZE, DEFAULT_LEASE

T = TypeVar("T")

SyncTx = Session | Connection
AsyncTx = AsyncSession | AsyncConnection


def lease_seconds(lease: timedelta | float) -> float:
    seconds = lease.total_seconds() if isinstance(lease, timedelta) else float(lease)
    if not seconds > 0:
        raise ConfigurationError(f"lease must be positive, got {lease!r}")
    return seconds


@dataclass(frozen=True, slots=True)
class Storage:
    """What every store of one application shares."""

    database: Database
    connector: Connector
    """How every op reaches the database (SQLAlchemy's connector, or a framework's)."""
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
    _contexts: dict[tuple[ServiceRoute, str], OpContext] = field(
        default_factory=dict, compare=False, repr=False
    )

    def op_context(self, route: ServiceRoute, tx: Any = None) -> OpContext:
        """The context the ops need for ``route``, on outboxer's engines or on the
        caller's transaction ``tx`` (one object per route and database, kept: a
        publish builds none)."""
        dialect = self.database.dialect if tx is None else self.connector.dialect_of(tx)
        key = (route, dialect.family)
        found = self._contexts.get(key)
        if found is not None:
            return found
        table = self.tables.table(route)
        channel = dialect.notify_channel(table.name) if self.notify and not route.inbox else None
        made = OpContext(
            table,
            route,
            dialect,
            self.rows.policy,
            channel,
            self.dead_blocks,
            self.scheduled_blocks,
            self.tables.audit,
            self.tables.parked,
        )
        self._contexts[key] = made
        return made

    def store(self, route: ServiceRoute, tx: SyncTx | AsyncTx | None = None) -> Store:
        return Store(self, route, tx)

    def audit_entries(self, where: AuditFilter, limit: int) -> list[AuditEntry]:
        """The audit trail (``outboxer_audit``) matching ``where``, newest first."""
        op = op_audit_list(self.tables.audit, where, limit)
        return self.connector.run(op, read_only=True)

    def purge_audit(self, where: AuditFilter) -> int:
        """Delete the audit rows matching ``where`` (one transaction)."""
        return int(self.connector.run(op_audit_purge(self.tables.audit, where)))


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
        self._storage.connector.check_tx(tx)
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
    def notifies(self) -> bool:
        """Whether inserts into this table notify waiting relays (PostgreSQL NOTIFY,
        unless ``notify`` is off): without it, relays in other processes find new
        rows by polling."""
        return self._ctx.channel is not None

    @property
    def _single_claim(self) -> bool:
        return self._storage.database.dialect.single_statement_claim

    def _run(
        self,
        op: Op[T],
        *,
        savepoint: bool = False,
        read_only: bool = False,
        single: bool = False,
    ) -> T:
        return self._storage.connector.run(
            op,
            self._tx,
            savepoint=savepoint,
            read_only=read_only,
            single=single,
            context=self._ctx.ctx,
        )

    async def _run_async(
        self,
        op: Op[T],
        *,
        savepoint: bool = False,
        read_only: bool = False,
        single: bool = False,
    ) -> T:
        return await self._storage.connector.run_async(
            op,
            self._tx,
            savepoint=savepoint,
            read_only=read_only,
            single=single,
            context=self._ctx.ctx,
        )

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
        :func:`~outboxer.database.ops.writes.op_cancel`); True when it is now cancelled."""
        return bool(self._run(op_cancel(self._ctx, check_event_id(event_id)), single=True))

    def find(
        self, where: RowFilter, limit: int = DEFAULT_BATCH_SIZE, *, newest_first: bool = False
    ) -> list[OutboxMessage]:
        """Rows matching ``where`` in id order (``newest_first``: descending; read only)."""
        return self._run(op_find(self._ctx, where, limit, newest_first), read_only=True)

    def activity(self, *, minutes: int = 60) -> Activity:
        """Rows published, consumed and failed in each of the last ``minutes`` minutes
        (see :func:`~outboxer.database.ops.tools.op_activity`)."""
        return self._run(op_activity(self._ctx, minutes), read_only=True)

    def count(self, where: RowFilter) -> int:
        return int(self._run(op_count(self._ctx, where), read_only=True))

    def purge_batch(self, where: RowFilter, limit: int, audit: Audit | None = None) -> int:
        """Delete up to ``limit`` rows matching ``where`` in one short transaction
        (``audit``: an operator's purge, recorded in the same transaction)."""
        return int(self._run(op_purge_batch(self._ctx, where, limit, audit)))

    # -- an operator's changes, each with its audit row in its transaction

    def requeue_audited(
        self,
        ids: Sequence[int] | None,
        audit: Audit,
        *,
        status: Status = Status.DEAD,
        event_type: str | None = None,
        since: float | None = None,
    ) -> int:
        """:meth:`requeue` by an operator: the audit row names the rows requeued."""
        op = op_requeue_audited(self._ctx, ids, status, audit, event_type=event_type, since=since)
        return int(self._run(op))

    def edit(self, outbox_id: int, payload: str, audit: Audit) -> OutboxMessage | None:
        """Replace dead letter ``outbox_id``'s stored envelope and requeue it, audited
        (None: the row is not dead)."""
        return self._run(op_edit(self._ctx, outbox_id, payload, audit))

    def blocked_keys(self, limit: int) -> list[BlockedKey]:
        """The keys of this (ordered) service held back (read only)."""
        return self._run(op_blocked_keys(self._ctx, limit), read_only=True)

    def retry_head(self, key: str, audit: Audit) -> int | None:
        """Make the failing or dead head of ``key`` due now, audited."""
        return self._run(op_retry_head(self._ctx, key, audit))

    def skip_head(self, key: str, reason: str, audit: Audit) -> int | None:
        """Mark the pending head of ``key`` dead with ``reason``, audited."""
        return self._run(op_skip_head(self._ctx, key, reason, audit))

    def park(self, key: str, reason: str | None, audit: Audit) -> bool:
        """Hold every event of ``key`` until released, audited."""
        return bool(self._run(op_park(self._ctx, key, reason, audit)))

    def release(self, key: str, audit: Audit) -> int | None:
        """Release parked ``key`` (its waiting events due now), audited."""
        return self._run(op_release_key(self._ctx, key, audit))

    def cancel_audited(self, event_id: str, audit: Audit) -> bool:
        """:meth:`cancel` by an operator, audited."""
        return bool(self._run(op_cancel_audited(self._ctx, check_event_id(event_id), audit)))

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

    async def claim_to_send_async(
        self, limit: int, lease: float, *, mark: bool = False
    ) -> list[Claimed]:
        """:meth:`claim_due_async` returning only what the relay sends. ``mark``: an
        in-process consumer is about to handle the rows at once; where the database
        can, the claim marks them as being handled too (:attr:`Claimed.marked`)."""
        # In a transaction of its own (no caller's), the claim commits relaxed.
        own = self._tx is None
        marks = (HANDLING_ALONE, HANDLING_IN_BATCH) if mark and own else None
        op = op_claim_to_send(self._ctx, limit, lease_seconds(lease), relaxed=own, marks=marks)
        return await self._run_async(op, single=self._single_claim)

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
        coordinates: Mapping[int, str] | None = None,
    ) -> int:
        op = op_mark_published(
            self._ctx, list(ids), expect_retry_count, expect_updated_at, coordinates
        )
        return int(await self._run_async(op, single=True))

    async def release_async(
        self, ids: Iterable[int], delay: float = 0.0, *, unmark: bool = False
    ) -> int:
        """Claimed rows due again in ``delay`` seconds, no attempt counted (``unmark``:
        their handling mark, set by the claim, cleared too)."""
        op = op_release(self._ctx, list(ids), delay, unmark=unmark)
        return int(await self._run_async(op, single=True))

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
        :func:`~outboxer.database.ops.handling.op_start`), in a transaction of its own.

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
        (see :func:`~outboxer.database.ops.inbox.op_inbox_start`)."""
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
