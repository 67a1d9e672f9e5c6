"""Schema versions, the data step of version 4, and single-instance locks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    Table,
    bindparam,
    func,
    insert,
    select,
    update,
)

from outboxer.database.dialects import Dialect
from outboxer.database.instructions import Execute, Op
from outboxer.database.schema import (
    MAX_EVENT_ID_CHARS,
    db_now,
)


def op_copy_event_ids(t: Table, chunk: int = 1000) -> Op[list[tuple[str, list[int]]]]:
    """Migration to version 4: copy the explicit event ids stored in the rows'
    envelopes into the ``event_id`` column, in id order, ``chunk`` rows per read.
    The earliest row of an id gets it; later rows with the same id keep the column
    empty. Returns those repeats: ``(event id, [holder, later ids...])``."""
    held: dict[str, int] = {}
    result = yield Execute(
        select(t.c.event_id, t.c.id).where(t.c.event_id.is_not(None)),
        what="event ids",
        context={"table": t.name},
    )
    for event_id, oid in result.all():
        held[event_id] = oid
    repeats: dict[str, list[int]] = {}
    after = 0
    while True:
        # Only envelopes with an explicit id: an event without one stores null.
        result = yield Execute(
            select(t.c.id, t.c.payload)
            .where(
                t.c.id > after,
                t.c.event_id.is_(None),
                t.c.payload.contains('"event_id":"', autoescape=True),
            )
            .order_by(t.c.id)
            .limit(chunk),
            what="copy event ids",
            context={"table": t.name},
        )
        rows = result.all()
        if not rows:
            break
        after = rows[-1].id
        copies: list[dict[str, Any]] = []
        for oid, payload in rows:
            try:
                document = json.loads(payload)
            except ValueError:
                continue
            event_id = document.get("event_id") if isinstance(document, dict) else None
            if not isinstance(event_id, str) or not 0 < len(event_id) <= MAX_EVENT_ID_CHARS:
                continue
            first = held.get(event_id)
            if first is None:
                held[event_id] = oid
                copies.append({"_id": oid, "_event_id": event_id})
            else:
                repeats.setdefault(event_id, [first]).append(oid)
        if copies:
            yield Execute(
                update(t).where(t.c.id == bindparam("_id")).values(event_id=bindparam("_event_id")),
                copies,
                what="copy event ids",
                context={"table": t.name},
            )
    return sorted(repeats.items(), key=lambda item: item[1][0])


# ----------------------------------------------------------- schema versions


def op_schema_versions(versions: Table) -> Op[dict[str, int]]:
    """The highest recorded schema version of each outbox table."""
    result = yield Execute(
        select(versions.c.table_name, func.max(versions.c.version)).group_by(versions.c.table_name),
        what="read schema versions",
    )
    return {str(name): int(version) for name, version in result.all()}


def op_record_versions(versions: Table, table_name: str, steps: Sequence[Any]) -> Op[None]:
    """Record ``steps`` (each with ``version`` and ``description``) as applied now."""
    if not steps:
        return
    yield Execute(
        insert(versions).values(applied_at=db_now()),
        [
            {"table_name": table_name, "version": s.version, "description": s.description}
            for s in steps
        ],
        what="record schema version",
        context={"table": table_name},
    )


# ----------------------------------------------------------- single-instance locks


def op_try_lock(dialect: Dialect, name: str) -> Op[bool]:
    """Try to take the database-wide lock ``name`` for this connection's session
    (PostgreSQL advisory lock, MySQL ``GET_LOCK``) without waiting; True when taken.
    Databases without such locks (SQLite, one writer at a time) always grant it."""
    stmt = dialect.lock_statement(name)
    if stmt is None:
        return True
    result = yield Execute(stmt, what="take lock", context={"lock": name})
    return bool(result.scalar())


def op_unlock(dialect: Dialect, name: str) -> Op[None]:
    stmt = dialect.unlock_statement(name)
    if stmt is not None:
        yield Execute(stmt, what="release lock", context={"lock": name})
