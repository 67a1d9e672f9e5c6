"""Operations on the outbox tables: dead letters, retention, status.

:class:`Admin` (``outbox.admin``) is the one implementation behind ``outboxer dead
...``, ``outboxer purge``, ``outboxer status``, the retention sweep of ``outboxer run``
and any console built later: each method works across the application's services,
in small transactions of its own, and has an ``_async`` twin.

- Dead letters: :meth:`Admin.dead_letters` (filter by service, event type and age;
  paged with a ``service:id`` cursor), :meth:`Admin.message` (one row, any status),
  :meth:`Admin.requeue` (back to ``pending`` with a fresh retry budget; the row
  notes ``requeue_count`` and ``requeued_at``), and :meth:`Admin.purge` with
  ``dead_older_than``.
- Browsing (the web console): :meth:`Admin.search` (messages of any status by
  outbox id, event id, key, event type and status, newest first, paged with a
  ``service:id`` cursor, never counted) and :meth:`Admin.activity` (published,
  consumed and failed per minute over the last hour).
- Cancel: :meth:`Admin.cancel` takes back an event that is still waiting (by its
  event id), as ``Outbox.cancel`` does on a caller's transaction.
- Retention: :meth:`Admin.purge` deletes consumed and cancelled rows, published rows
  of services consumed elsewhere, and dead rows older than given ages, ``batch_size`` rows per
  transaction with a pause between batches, so it holds no long lock and sends
  replicas no large spike.

- Audit: every change an operator makes here (requeue, purge with an ``actor``,
  edit, cancel) writes a row in ``outboxer_audit`` in the transaction of the change;
  :meth:`Admin.audit` reads it back, :meth:`Admin.purge_audit` deletes from it (the
  retention purge never does). :meth:`Admin.edit` replaces a dead letter's payload
  (checked as ``publish`` checks one) and requeues it.

Ages are measured from a row's last change (``updated_at``, the database's clock):
for a consumed row its consumption, for a dead row its death.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from outboxer.contracts import Contracts
from outboxer.database.ops.tools import Audit, AuditFilter, RowFilter
from outboxer.envelope import DEFAULT_VERSION, encode_json
from outboxer.errors import (
    AmbiguousMessageError,
    ConfigurationError,
    MessageNotFoundError,
    PayloadNotSerializableError,
)
from outboxer.models import (
    Activity,
    AuditEntry,
    BlockedKey,
    OutboxMessage,
    ServiceStatus,
    Status,
    TraceStep,
)
from outboxer.routing import ServiceRoute
from outboxer.rows import check_event_id, clean_key
from outboxer.settings import DEFAULT_PURGE_BATCH
from outboxer.store import Storage, Store

DEFAULT_PAGE = 50

Progress = Callable[[str, Status, int], None]
"""``progress(service, status, deleted_so_far)`` after each purge batch."""


@dataclass(frozen=True, slots=True)
class DeadLetterPage:
    """One page of dead letters (oldest id first within each service)."""

    messages: list[OutboxMessage]
    next_after: str | None
    """Cursor of the next page (``service:id``); ``None`` on the last page."""


@dataclass(frozen=True, slots=True)
class MessagePage:
    """One page of messages, newest first (id descending, then service)."""

    messages: list[OutboxMessage]
    next_before: str | None
    """Cursor of the next (older) page (``service:id``); ``None`` on the last page."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Search:
    """What :meth:`Admin.search` looks for (every field optional; all must match)."""

    outbox_id: int | None = None
    event_id: str | None = None
    key: str | None = None
    event_type: str | None = None
    status: Status | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PurgeRule:
    """Delete rows of ``status`` last changed more than ``older_than`` seconds ago."""

    status: Status
    older_than: float


@dataclass
class PurgeResult:
    """What a purge deleted (or, for a dry run, would delete)."""

    deleted: dict[tuple[str, Status], int] = field(default_factory=dict)
    """(service, status) -> rows."""
    skipped: list[str] = field(default_factory=list)
    """Why some service's published rows were kept (they are consumed here)."""
    stopped: bool = False
    """Asked to stop before the end."""

    @property
    def total(self) -> int:
        return sum(self.deleted.values())


@dataclass(frozen=True, slots=True)
class AuditPage:
    """One page of the audit trail, newest first."""

    entries: list[AuditEntry]
    next_before: int | None
    """Cursor of the next (older) page (an audit id); ``None`` on the last page."""


AUDIT_ACTIONS = ("requeue", "purge", "edit", "cancel", "retry", "skip", "park", "release")


def os_user() -> str:
    """The operator of a command: the OS user name (``uid:N`` when it has none)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}" if hasattr(os, "getuid") else "unknown"


def parse_cursor(after: str | None) -> tuple[str, int] | None:
    """``service:id`` -> (service, id)."""
    if after is None:
        return None
    service, sep, raw = after.rpartition(":")
    if not sep or not service or not raw.isdigit():
        raise ConfigurationError(f"invalid page cursor {after!r}: expected service:id")
    return service, int(raw)


class Admin:
    """Operations across one application's outbox tables (see the module docstring).

    ``consumed_here`` names the services this application has handlers for: their
    ``published`` rows still wait for a consumer, so retention never deletes them.
    """

    def __init__(
        self,
        storage: Storage,
        consumed_here: Callable[[], Collection[str]] = frozenset,
        contracts: Contracts | None = None,
    ) -> None:
        self.storage = storage
        self._consumed_here = consumed_here
        self._contracts = contracts if contracts is not None else Contracts()

    def routes(self, services: Sequence[str] | None = None) -> list[ServiceRoute]:
        """The routes of ``services`` (all registered ones when None or empty)."""
        routes = self.storage.routes.select(services)
        if not routes:
            raise ConfigurationError("no services are registered (register_event/register_service)")
        return routes

    def _store(self, route: ServiceRoute) -> Store:
        return self.storage.store(route)

    # ------------------------------------------------------------------ status

    def status(
        self, services: Sequence[str] | None = None, *, rates: bool = False
    ) -> list[tuple[ServiceRoute, ServiceStatus | None]]:
        """Each service's :class:`ServiceStatus` (``None``: its table does not exist)."""
        existing = self.storage.database.table_names()
        return [
            (r, self._store(r).status(rates=rates) if r.table_name in existing else None)
            for r in self.routes(services)
        ]

    async def status_async(
        self, services: Sequence[str] | None = None, *, rates: bool = False
    ) -> list[tuple[ServiceRoute, ServiceStatus | None]]:
        existing = await asyncio.to_thread(self.storage.database.table_names)
        found: list[tuple[ServiceRoute, ServiceStatus | None]] = []
        for r in self.routes(services):
            st = (
                await self._store(r).status_async(rates=rates) if r.table_name in existing else None
            )
            found.append((r, st))
        return found

    # ------------------------------------------------------------------ browsing

    def _search_plan(
        self, services: Sequence[str] | None, search: Search, before: str | None
    ) -> list[tuple[ServiceRoute, RowFilter]]:
        existing = self.storage.database.table_names()
        cursor = parse_cursor(before)
        plan: list[tuple[ServiceRoute, RowFilter]] = []
        for route in self.routes(services):
            if route.table_name not in existing:
                continue
            before_id = None
            if cursor is not None:
                # Order: id descending, then service ascending.
                before_id = cursor[1] + 1 if route.service_name > cursor[0] else cursor[1]
            where = RowFilter(
                ids=None if search.outbox_id is None else [search.outbox_id],
                event_id=search.event_id,
                key=search.key,
                event_type=search.event_type,
                status=search.status,
                before_id=before_id,
            )
            plan.append((route, where))
        return plan

    def search(
        self,
        search: Search = Search(),
        *,
        services: Sequence[str] | None = None,
        limit: int = DEFAULT_PAGE,
        before: str | None = None,
    ) -> MessagePage:
        """Messages of any status matching ``search`` in ``services`` (all when None),
        newest first, ``limit`` per page; ``before`` is the previous page's
        ``next_before``. Each page reads at most ``limit + 1`` rows per service by
        key order and counts nothing. Services whose table is missing are left out."""
        found: list[OutboxMessage] = []
        for route, where in self._search_plan(services, search, before):
            found += self._store(route).find(where, limit + 1, newest_first=True)
        return _newest_page(found, limit)

    async def search_async(
        self,
        search: Search = Search(),
        *,
        services: Sequence[str] | None = None,
        limit: int = DEFAULT_PAGE,
        before: str | None = None,
    ) -> MessagePage:
        plan = await asyncio.to_thread(self._search_plan, services, search, before)
        found: list[OutboxMessage] = []
        for route, where in plan:
            found += await self._store(route).find_async(where, limit + 1, newest_first=True)
        return _newest_page(found, limit)

    def activity(
        self, services: Sequence[str] | None = None, *, minutes: int = 60
    ) -> Activity | None:
        """Rows published, consumed and failed in each of the last ``minutes`` minutes,
        summed over ``services`` (``None``: no table exists)."""
        existing = self.storage.database.table_names()
        total: Activity | None = None
        for route in self.routes(services):
            if route.table_name in existing:
                one = self._store(route).activity(minutes=minutes)
                total = one if total is None else total + one
        return total

    async def activity_async(
        self, services: Sequence[str] | None = None, *, minutes: int = 60
    ) -> Activity | None:
        existing = await asyncio.to_thread(self.storage.database.table_names)
        total: Activity | None = None
        for route in self.routes(services):
            if route.table_name in existing:
                one = await self._store(route).activity_async(minutes=minutes)
                total = one if total is None else total + one
        return total

    # ------------------------------------------------------------------ dead letters

    def _dead_pages(
        self,
        services: Sequence[str] | None,
        after: str | None,
    ) -> list[tuple[ServiceRoute, int | None]]:
        routes = sorted(self.routes(services), key=lambda r: r.service_name)
        cursor = parse_cursor(after)
        plan: list[tuple[ServiceRoute, int | None]] = []
        for route in routes:
            if cursor is None:
                plan.append((route, None))
            elif route.service_name == cursor[0]:
                plan.append((route, cursor[1]))
            elif route.service_name > cursor[0]:
                plan.append((route, None))
        return plan

    def dead_letters(
        self,
        *,
        services: Sequence[str] | None = None,
        event_type: str | None = None,
        older_than: float | None = None,
        newer_than: float | None = None,
        limit: int = DEFAULT_PAGE,
        after: str | None = None,
    ) -> DeadLetterPage:
        """Dead letters, ``limit`` per page, in (service, id) order; ``older_than`` /
        ``newer_than`` are seconds since they died; ``after`` is the cursor of the
        previous page's ``next_after``."""
        found: list[OutboxMessage] = []
        for route, after_id in self._dead_pages(services, after):
            want = limit - len(found)
            where = RowFilter(
                status=Status.DEAD,
                event_type=event_type,
                older_than=older_than,
                newer_than=newer_than,
                after_id=after_id,
            )
            found += self._store(route).find(where, want + 1)
            if len(found) > limit:
                break
        return _page(found, limit)

    async def dead_letters_async(
        self,
        *,
        services: Sequence[str] | None = None,
        event_type: str | None = None,
        older_than: float | None = None,
        newer_than: float | None = None,
        limit: int = DEFAULT_PAGE,
        after: str | None = None,
    ) -> DeadLetterPage:
        found: list[OutboxMessage] = []
        for route, after_id in self._dead_pages(services, after):
            want = limit - len(found)
            where = RowFilter(
                status=Status.DEAD,
                event_type=event_type,
                older_than=older_than,
                newer_than=newer_than,
                after_id=after_id,
            )
            found += await self._store(route).find_async(where, want + 1)
            if len(found) > limit:
                break
        return _page(found, limit)

    def message(self, outbox_id: int, *, service: str | None = None) -> OutboxMessage:
        """The row ``outbox_id`` (any status) of ``service``, or of the only service
        whose table has that id. Raises :class:`MessageNotFoundError`, or
        :class:`AmbiguousMessageError` when several services have it."""
        routes = self.routes([service] if service else None)
        found = [m for m in (self._store(r).get_by_id(outbox_id) for r in routes) if m]
        return _one(found, outbox_id, service)

    async def message_async(self, outbox_id: int, *, service: str | None = None) -> OutboxMessage:
        routes = self.routes([service] if service else None)
        found = []
        for r in routes:
            m = await self._store(r).get_by_id_async(outbox_id)
            if m is not None:
                found.append(m)
        return _one(found, outbox_id, service)

    def cancel(
        self, event_id: str, *, service: str | None = None, actor: str | None = None
    ) -> bool:
        """Take back the event ``event_id`` of ``service`` (or of the only service
        where an event with that id is pending) if it is still waiting; True when it
        is now ``cancelled``. Raises :class:`AmbiguousMessageError` when the id is
        pending in several services."""
        event_id = check_event_id(event_id)
        route = self._cancel_route(event_id, service)
        audit = Audit(actor or os_user(), "cancel", {"event_id": event_id})
        return route is not None and self._store(route).cancel_audited(event_id, audit)

    async def cancel_async(
        self, event_id: str, *, service: str | None = None, actor: str | None = None
    ) -> bool:
        return await asyncio.to_thread(self.cancel, event_id, service=service, actor=actor)

    def _cancel_route(self, event_id: str, service: str | None) -> ServiceRoute | None:
        existing = self.storage.database.table_names()
        routes = [
            r for r in self.routes([service] if service else None) if r.table_name in existing
        ]
        if service is not None:
            if routes and routes[0].inbox:
                raise ConfigurationError(
                    f"service {service!r} is consumed here through an inbox: its events "
                    f"are cancelled where they are published"
                )
            return routes[0] if routes else None
        # Only the services where the id still waits can take a cancel.
        where = RowFilter(event_id=event_id, status=Status.PENDING)
        holders = [
            r
            for r in routes
            if not r.inbox and any(m.event_id == event_id for m in self._store(r).find(where, 2))
        ]
        if len(holders) > 1:
            names = ", ".join(r.service_name for r in holders)
            raise AmbiguousMessageError(
                f"event id {event_id!r} exists in services {names}: name the service",
                event_id=event_id,
            )
        return holders[0] if holders else None

    def requeue(
        self,
        ids: Sequence[int] | None = None,
        *,
        services: Sequence[str] | None = None,
        event_type: str | None = None,
        since: float | None = None,
        dry_run: bool = False,
        actor: str | None = None,
    ) -> dict[str, int]:
        """Give dead letters a new start: ``pending``, due now, ``retry_count`` 0, and a
        note (``requeue_count`` + 1, ``requeued_at``). Either ``ids`` (each must be
        dead in exactly one of the chosen services) or ``services`` (all of their dead
        letters, narrowed by ``event_type`` and ``since``: died within that many
        seconds). Returns the rows requeued (``dry_run``: that would be) per service.
        Each service's requeue writes an audit row naming ``actor`` (default: the OS
        user) and the rows, in its transaction."""
        plan = self._requeue_plan(ids, services, event_type, since, self._find_dead)
        done: dict[str, int] = {}
        for route, chosen in plan:
            store = self._store(route)
            if dry_run:
                where = RowFilter(
                    status=Status.DEAD, ids=chosen, event_type=event_type, newer_than=since
                )
                done[route.service_name] = store.count(where)
            else:
                detail: dict[str, Any] = {"event_type": event_type, "since": since}
                audit = Audit(actor or os_user(), "requeue", detail)
                done[route.service_name] = store.requeue_audited(
                    chosen, audit, event_type=event_type, since=since
                )
        return done

    async def requeue_async(
        self,
        ids: Sequence[int] | None = None,
        *,
        services: Sequence[str] | None = None,
        event_type: str | None = None,
        since: float | None = None,
        dry_run: bool = False,
        actor: str | None = None,
    ) -> dict[str, int]:
        return await asyncio.to_thread(
            self.requeue,
            ids,
            services=services,
            event_type=event_type,
            since=since,
            dry_run=dry_run,
            actor=actor,
        )

    def _find_dead(self, route: ServiceRoute, ids: Sequence[int]) -> set[int]:
        rows = self._store(route).find(RowFilter(status=Status.DEAD, ids=ids), len(ids))
        return {m.id for m in rows}

    def _requeue_plan(
        self,
        ids: Sequence[int] | None,
        services: Sequence[str] | None,
        event_type: str | None,
        since: float | None,
        find_dead: Callable[[ServiceRoute, Sequence[int]], set[int]],
    ) -> list[tuple[ServiceRoute, list[int] | None]]:
        if ids is None:
            if not services:
                raise ConfigurationError(
                    "name the dead letters to requeue: their ids, or the service(s) "
                    "whose dead letters (of an event type, since a time) go back"
                )
            return [(r, None) for r in self.routes(services)]
        ids = sorted(set(ids))
        if not ids:
            return []
        owners: dict[int, list[ServiceRoute]] = {i: [] for i in ids}
        for route in self.routes(services):
            for oid in find_dead(route, ids):
                owners[oid].append(route)
        missing = [i for i, r in owners.items() if not r]
        if missing:
            raise MessageNotFoundError(
                f"no dead letter with id {', '.join(map(str, missing))}"
                + (f" in {', '.join(services)}" if services else "")
            )
        ambiguous = {i: r for i, r in owners.items() if len(r) > 1}
        if ambiguous:
            oid, routes = next(iter(ambiguous.items()))
            names = ", ".join(r.service_name for r in routes)
            raise AmbiguousMessageError(
                f"dead letter {oid} exists in services {names}: name the service", outbox_id=oid
            )
        by_route: dict[str, tuple[ServiceRoute, list[int]]] = {}
        for oid, (route,) in owners.items():
            by_route.setdefault(route.service_name, (route, []))[1].append(oid)
        return list(by_route.values())

    # ------------------------------------------------------------------ retention

    def purge_rules(
        self,
        *,
        consumed_older_than: float | None = None,
        published_older_than: float | None = None,
        dead_older_than: float | None = None,
    ) -> list[PurgeRule]:
        rules = [
            PurgeRule(status=status, older_than=age)
            for status, age in (
                (Status.CONSUMED, consumed_older_than),
                # Cancelled rows are done as consumed ones are: they go with them.
                (Status.CANCELLED, consumed_older_than),
                (Status.PUBLISHED, published_older_than),
                (Status.DEAD, dead_older_than),
            )
            if age is not None
        ]
        if not rules:
            raise ConfigurationError(
                "nothing to purge: give an age for consumed, published or dead rows"
            )
        return rules

    def purge(
        self,
        *,
        consumed_older_than: float | None = None,
        published_older_than: float | None = None,
        dead_older_than: float | None = None,
        services: Sequence[str] | None = None,
        event_type: str | None = None,
        batch_size: int = DEFAULT_PURGE_BATCH,
        pause: float = 0.0,
        dry_run: bool = False,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None,
        actor: str | None = None,
    ) -> PurgeResult:
        """Delete consumed (and cancelled, at the same age), published and dead rows
        older than the given ages (seconds since their last change), ``batch_size``
        rows per transaction, ``pause`` seconds between batches. Published rows are
        deleted only for services this application has no handlers for (consumed
        elsewhere: ``published`` is final there). ``dry_run`` counts instead;
        ``should_stop`` is asked between batches. ``actor``: an operator's purge, each
        batch audited with the rows it deleted (the retention sweep gives none). The
        audit table is never purged here (:meth:`purge_audit`)."""
        if batch_size < 1:
            raise ConfigurationError(f"batch size must be at least 1, got {batch_size}")
        rules = self.purge_rules(
            consumed_older_than=consumed_older_than,
            published_older_than=published_older_than,
            dead_older_than=dead_older_than,
        )
        consumed_here = set(self._consumed_here())
        result = PurgeResult()
        for route in self.routes(services):
            store = self._store(route)
            for rule in rules:
                if rule.status is Status.PUBLISHED and route.service_name in consumed_here:
                    result.skipped.append(
                        f"{route.service_name}: published rows kept (handlers here consume them)"
                    )
                    continue
                where = RowFilter(
                    status=rule.status, event_type=event_type, older_than=rule.older_than
                )
                key = (route.service_name, rule.status)
                if dry_run:
                    result.deleted[key] = store.count(where)
                    continue
                result.deleted[key] = 0
                while True:
                    if should_stop is not None and should_stop():
                        result.stopped = True
                        return result
                    audit = None
                    if actor is not None:
                        detail = {
                            "status": rule.status.value,
                            "older_than": rule.older_than,
                            "event_type": event_type,
                        }
                        audit = Audit(actor, "purge", detail)
                    n = store.purge_batch(where, batch_size, audit)
                    result.deleted[key] += n
                    if progress is not None and n:
                        progress(route.service_name, rule.status, result.deleted[key])
                    if n < batch_size:
                        break
                    if pause > 0:
                        time.sleep(pause)
        return result

    async def purge_async(self, **options: Any) -> PurgeResult:
        """:meth:`purge` (same keyword arguments) on a worker thread: its batches are
        separate transactions with pauses between them."""
        return await asyncio.to_thread(lambda: self.purge(**options))

    # ------------------------------------------------------------------ edit

    def edit(
        self,
        outbox_id: int,
        payload: Any,
        *,
        service: str | None = None,
        actor: str | None = None,
    ) -> OutboxMessage:
        """Replace dead letter ``outbox_id``'s payload with ``payload`` (a JSON value)
        and requeue it, with an audit row holding the envelope before and after.

        The payload is checked as ``publish`` checks one, before any SQL: JSON (strict
        when the settings are), the size limit, and the schema registered for the
        event type and the envelope's version. Raises :class:`MessageNotFoundError`
        when the row is not dead (or is gone)."""
        m = self.message(outbox_id, service=service)
        if m.status is not Status.DEAD:
            raise MessageNotFoundError(
                f"outbox message {outbox_id} of {m.service_name} is {m.status.value}, "
                f"not dead: only dead letters are edited",
                outbox_id=outbox_id,
            )
        text = self.edited_envelope(m, payload)
        route = self.storage.routes.route_for_service(m.service_name)
        audit = Audit(actor or os_user(), "edit", {"event_type": m.event_type})
        edited = self._store(route).edit(m.id, text, audit)
        if edited is None:
            raise MessageNotFoundError(
                f"outbox message {outbox_id} of {m.service_name} is no longer dead",
                outbox_id=outbox_id,
            )
        return edited

    async def edit_async(
        self,
        outbox_id: int,
        payload: Any,
        *,
        service: str | None = None,
        actor: str | None = None,
    ) -> OutboxMessage:
        return await asyncio.to_thread(self.edit, outbox_id, payload, service=service, actor=actor)

    def edited_envelope(self, m: OutboxMessage, payload: Any) -> str:
        """The stored envelope of ``m`` with ``payload`` in place of its payload,
        checked (JSON, size, schema) and encoded; raises a typed error otherwise."""
        if payload is None:
            raise PayloadNotSerializableError("payload is None", event_type=m.event_type)
        try:
            stored = json.loads(m.payload)
        except ValueError:
            stored = None
        if not isinstance(stored, dict):
            # The stored text is what could not be read: rebuilt from the columns.
            stored = {
                "event_id": m.event_id,
                "event_type": m.event_type,
                "event_version": DEFAULT_VERSION,
                "aggregate_id": m.message_key,
            }
        version = stored.get("event_version")
        self._contracts.check(m.event_type, version if isinstance(version, str) else None, payload)
        rules = self.storage.rows
        return encode_json(
            {**stored, "payload": payload},
            strict=rules.strict_json,
            json_default=rules.json_default,
            max_bytes=rules.max_payload_bytes,
            event_type=m.event_type,
        )

    # ------------------------------------------------------------------ blocked keys

    def _ordered(self, service: str) -> ServiceRoute:
        route = self.storage.routes.route_for_service(service)
        if not route.ordered:
            raise ConfigurationError(
                f"service {service!r} is not ordered: no key of it is ever held back"
            )
        return route

    def blocked_keys(
        self, services: Sequence[str] | None = None, *, limit: int = DEFAULT_PAGE
    ) -> list[BlockedKey]:
        """Keys of the ordered ``services`` (all ordered ones when None) held back:
        by a failing or dead head, or parked; oldest first, at most ``limit`` per
        service. Services whose table is missing are left out."""
        existing = self.storage.database.table_names()
        found: list[BlockedKey] = []
        for route in self.routes(services):
            if services and not route.ordered:
                self._ordered(route.service_name)
            if route.ordered and route.table_name in existing:
                found += self._store(route).blocked_keys(limit)
        return found

    async def blocked_keys_async(
        self, services: Sequence[str] | None = None, *, limit: int = DEFAULT_PAGE
    ) -> list[BlockedKey]:
        return await asyncio.to_thread(lambda: self.blocked_keys(services, limit=limit))

    def retry_head(self, service: str, key: str, *, actor: str | None = None) -> int:
        """Retry the head of ``key`` now (a failing one keeps its attempts, a dead one
        is requeued); audited. Returns its outbox id."""
        route = self._ordered(service)
        key = clean_key(key)
        audit = Audit(actor or os_user(), "retry", {"key": key})
        oid = self._store(route).retry_head(key, audit)
        if oid is None:
            raise MessageNotFoundError(
                f"key {key!r} of {service} has no failing or dead event at its head"
            )
        return oid

    def skip_head(self, service: str, key: str, reason: str, *, actor: str | None = None) -> int:
        """Mark the head of ``key`` dead with ``reason`` so the events behind it go
        on (with ``ordered_after_dead = "block"`` a dead head still holds the key);
        audited. Returns its outbox id. Only a head that holds the key is skipped (it
        failed, or the key is parked): when the failing head went through meanwhile,
        nothing is skipped and :class:`MessageNotFoundError` is raised."""
        reason = reason.strip()
        if not reason:
            raise ConfigurationError("give a reason to skip an event")
        route = self._ordered(service)
        key = clean_key(key)
        audit = Audit(actor or os_user(), "skip", {"key": key, "reason": reason})
        oid = self._store(route).skip_head(key, f"skipped by an operator: {reason}", audit)
        if oid is None:
            raise MessageNotFoundError(
                f"key {key!r} of {service} has no failing event at its head to skip "
                f"(and is not parked)"
            )
        return oid

    def park(
        self, service: str, key: str, *, reason: str | None = None, actor: str | None = None
    ) -> bool:
        """Hold every event of ``key`` (handled by no consumer from the next batch on; a
        batch that locked its rows before the park committed finishes them) until
        :meth:`release`; audited. False when it was parked already."""
        route = self._ordered(service)
        key = clean_key(key)
        audit = Audit(actor or os_user(), "park", {"key": key, "reason": reason})
        return self._store(route).park(key, reason, audit)

    def release(self, service: str, key: str, *, actor: str | None = None) -> int:
        """Release parked ``key``: its waiting events are due at once; audited.
        Returns how many were made due; raises when the key was not parked."""
        route = self._ordered(service)
        key = clean_key(key)
        audit = Audit(actor or os_user(), "release", {"key": key})
        released = self._store(route).release(key, audit)
        if released is None:
            raise MessageNotFoundError(f"key {key!r} of {service} is not parked")
        return released

    # ------------------------------------------------------------------ lineage

    def trace(self, event_id: str) -> list[TraceStep]:
        """The life of event ``event_id`` (or of the outbox id an event without one
        went out with) in this application's tables, in order: created (or received
        from where, by which group), attempts and the last error, sent where (the
        broker's coordinates), consumed or dead, and each audited action on it."""
        event_id = check_event_id(event_id)
        existing = self.storage.database.table_names()
        steps: list[TraceStep] = []
        for route in self.routes():
            if route.table_name not in existing:
                continue
            rows = self._store(route).find(RowFilter(event_id=event_id), 10)
            for m in rows:
                steps += _row_steps(m, route.inbox)
                trail = self.audit(services=[route.service_name], outbox_id=m.id, limit=100)
                entries = list(trail.entries)
                if route.ordered:
                    # Its key parked or released while it waited.
                    for action in ("park", "release"):
                        page = self.audit(services=[route.service_name], action=action, limit=100)
                        entries += [
                            e
                            for e in page.entries
                            if e.detail.get("key") == m.message_key and e.at >= m.created_at
                        ]
                steps += [
                    TraceStep(
                        e.at,
                        m.service_name,
                        m.id,
                        e.action,
                        f"by {e.actor}" + _audit_detail(e),
                        route.inbox,
                    )
                    for e in entries
                ]
        return sorted(steps, key=_step_order)

    async def trace_async(self, event_id: str) -> list[TraceStep]:
        return await asyncio.to_thread(self.trace, event_id)

    # ------------------------------------------------------------------ audit

    def audit(
        self,
        *,
        services: Sequence[str] | None = None,
        action: str | None = None,
        outbox_id: int | None = None,
        limit: int = DEFAULT_PAGE,
        before: int | None = None,
    ) -> AuditPage:
        """The audit trail, newest first, ``limit`` per page; ``before`` is the
        previous page's ``next_before``. ``services`` (any of them), ``action`` and
        ``outbox_id`` narrow it."""
        if action is not None and action not in AUDIT_ACTIONS:
            raise ConfigurationError(
                f"unknown audit action {action!r} (actions: {', '.join(AUDIT_ACTIONS)})"
            )
        names = [r.service_name for r in self.routes(services)] if services else [None]
        found: list[AuditEntry] = []
        for name in names:
            where = AuditFilter(service=name, action=action, outbox_id=outbox_id, before_id=before)
            found += self.storage.audit_entries(where, limit + 1)
        found.sort(key=lambda e: -e.id)
        if len(found) <= limit:
            return AuditPage(found, None)
        return AuditPage(found[:limit], found[limit - 1].id)

    async def audit_async(self, **options: Any) -> AuditPage:
        return await asyncio.to_thread(lambda: self.audit(**options))

    def purge_audit(self, *, older_than: float) -> int:
        """Delete audit rows written more than ``older_than`` seconds ago (only when
        asked: the retention purge keeps them)."""
        if not older_than > 0:
            raise ConfigurationError(f"older_than must be positive, got {older_than!r}")
        return self.storage.purge_audit(AuditFilter(older_than=older_than))


_STEP_RANK = {"created": 0, "received": 0, "attempts": 2, "sent": 3, "consumed": 4}


def _step_order(s: TraceStep) -> tuple[Any, ...]:
    # Steps without a time of their own (attempts, waiting) go after their row's last.
    at = s.at.timestamp() if s.at is not None else float("inf")
    return (at, _STEP_RANK.get(s.step, 5), s.outbox_id)


def _first(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


def _audit_detail(e: AuditEntry) -> str:
    shown = {k: v for k, v in e.detail.items() if v is not None and k != "event_type"}
    return "".join(f", {k}: {v}" for k, v in sorted(shown.items()))


def _row_steps(m: OutboxMessage, inbox: bool) -> list[TraceStep]:
    def step(at: datetime | None, name: str, detail: str) -> TraceStep:
        return TraceStep(at, m.service_name, m.id, name, detail, inbox)

    found: list[TraceStep] = []
    if inbox:
        where = m.coordinates or "the transport (no coordinates)"
        group = f" by group {m.consumer_group}" if m.consumer_group else ""
        found.append(step(m.created_at, "received", f"from {where}{group}; {m.event_type}"))
    else:
        found.append(
            step(m.created_at, "created", f"{m.event_type}, key {m.message_key!r} (committed)")
        )
    if m.retry_count:
        found.append(
            step(
                None,  # the attempts' times are not kept (only their count)
                "attempts",
                f"{m.retry_count} failed attempt(s) of {m.max_retry}; "
                + (
                    f"last error: {_first(m.last_error)}"
                    if m.last_error
                    else "its error is not kept once it succeeded"
                ),
            )
        )
    if m.published_at is not None:
        where = m.coordinates or "the transport (no coordinates)"
        found.append(step(m.published_at, "sent", f"to {where}"))
    if m.consumed_at is not None:
        who = f" by group {m.consumer_group}" if inbox and m.consumer_group else ""
        found.append(step(m.consumed_at, "consumed", f"handled{who}"))
    if m.status is Status.DEAD:
        found.append(step(m.updated_at, "dead", _first(m.last_error) or "-"))
    elif m.status is Status.CANCELLED:
        found.append(step(m.updated_at, "cancelled", "taken back before it was sent"))
    elif m.status is Status.PENDING:
        found.append(step(None, "waiting", f"pending, next attempt at {m.next_retry_at}"))
    elif m.status is Status.PUBLISHED and inbox:
        found.append(step(None, "waiting", "received, not handled yet"))
    return found


def _page(found: list[OutboxMessage], limit: int) -> DeadLetterPage:
    if len(found) <= limit:
        return DeadLetterPage(found, None)
    page = found[:limit]
    last = page[-1]
    return DeadLetterPage(page, f"{last.service_name}:{last.id}")


def _newest_page(found: list[OutboxMessage], limit: int) -> MessagePage:
    found.sort(key=lambda m: (-m.id, m.service_name))
    if len(found) <= limit:
        return MessagePage(found, None)
    page = found[:limit]
    last = page[-1]
    return MessagePage(page, f"{last.service_name}:{last.id}")


def _one(found: list[OutboxMessage], outbox_id: int, service: str | None) -> OutboxMessage:
    if not found:
        where = f" in service {service!r}" if service else ""
        raise MessageNotFoundError(f"no outbox message with id {outbox_id}{where}")
    if len(found) > 1:
        names = ", ".join(m.service_name for m in found)
        raise AmbiguousMessageError(
            f"outbox id {outbox_id} exists in services {names}: name the service",
            outbox_id=outbox_id,
        )
    return found[0]
