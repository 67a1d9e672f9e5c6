"""Single-instance locks: work that only one process may do at a time.

The retention sweep and migrations take a database-wide lock on a connection of
their own and hold it while they work: a PostgreSQL advisory lock or a MySQL
``GET_LOCK``, both tied to the session, so a holder that crashes releases it with
its connection. SQLite has no such lock and needs none: its single writer
serialises every transaction, so two sweeps can only take turns batch by batch, and
two migrations table by table.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.exc import SQLAlchemyError

from outboxer.database.engines import Database
from outboxer.database.ops.maintenance import op_try_lock, op_unlock
from outboxer.database.runner import SyncRunner
from outboxer.errors import StoreError

LOCK_POLL = 0.2
"""Seconds between two tries while waiting for a lock."""


def lock_name(database: Database, name: str) -> str:
    """``name`` qualified by the database (MySQL's named locks are server-wide)."""
    return f"{name}:{database.url.database or ''}"


@contextmanager
def single_instance(database: Database, name: str, *, wait: float | bool = False) -> Iterator[bool]:
    """Hold the database-wide lock ``name`` while the block runs; yields whether it
    was taken. ``wait``: seconds to keep trying (``True``: until taken; ``False``: one
    try). The lock lives on a connection of its own, released (or dropped with its
    session) when the block ends."""
    qualified = lock_name(database, name)
    dialect = database.dialect
    if dialect.lock_statement(qualified) is None:
        yield True
        return
    deadline = None if wait is True else time.monotonic() + float(wait)
    try:
        conn = database.sync_engine.connect()
    except SQLAlchemyError as exc:
        orig = getattr(exc, "orig", None) or exc
        raise StoreError(
            f"cannot connect to the database: {orig}", url=database.safe_url, lock=name
        ) from exc
    try:
        while True:
            taken = bool(SyncRunner(conn).run(op_try_lock(dialect, qualified)))
            conn.commit()
            if taken or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(LOCK_POLL)
        try:
            yield taken
        finally:
            if taken:
                try:
                    SyncRunner(conn).run(op_unlock(dialect, qualified))
                    conn.commit()
                except StoreError:
                    # The session is broken; dropping it releases its locks.
                    conn.invalidate()
    finally:
        conn.close()
