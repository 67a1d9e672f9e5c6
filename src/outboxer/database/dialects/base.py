"""What differs per database, behind one small interface.

Each supported database family has one module in this package with one
:class:`Dialect` subclass: how outboxer opens its engines, the SQL of the database
clock, the column types that differ, the claim statement (``SKIP LOCKED`` or a
single writer) and how tests create and drop a throw-away database. Adding a
database means adding one module here and one entry in the test matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    Engine,
    Insert,
    Row,
    Select,
    Table,
    bindparam,
    create_engine,
    select,
    text,
    update,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool
from sqlalchemy.sql import ColumnElement, Executable
from sqlalchemy.types import TypeEngine

from outboxer.database.instructions import Execute, Op

READ_ONLY_OPTION = "outboxer_read_only"
"""Execution option of a transaction that only reads (a single-writer database then
does not take its write lock)."""
CONNECT_TIMEOUT = 10
"""Seconds a new connection may take (TCP, TLS, authentication) before it fails."""
KEEPALIVE_IDLE = 10
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3
"""TCP keepalive on database connections: the first probe after 10 s of silence,
then every 5 s; 3 unanswered probes close the connection (about 25 s)."""
TCP_USER_TIMEOUT_MS = 30_000
"""Sent data unacknowledged for this long closes the connection (Linux)."""


def transport_socket_fd(transport: Any) -> int | None:
    """The socket descriptor of an asyncio transport (async drivers)."""
    if transport is None:
        return None
    sock = transport.get_extra_info("socket")
    return None if sock is None else int(sock.fileno())


class Dialect:
    """One database family (``sqlite``, ``postgresql`` or ``mysql``, MariaDB included)."""

    family: ClassVar[str]
    backends: ClassVar[tuple[str, ...]]
    """SQLAlchemy backend names of this family (``mariadb`` is ``mysql``'s)."""
    django_engine: ClassVar[str | None] = None
    """Django's database engine for this family (``outboxer.contrib.django``)."""
    sync_driver: ClassVar[str]
    async_driver: ClassVar[str]
    async_drivers: ClassVar[frozenset[str]] = frozenset()
    """Async drivers kept when a URL names them (``asyncpg``, ``asyncmy``)."""
    skip_locked: ClassVar[bool] = True
    single_statement_claim: ClassVar[bool] = True
    """The claim is one statement (it may then run without an explicit transaction)."""
    autocommit_single_statements: ClassVar[bool] = True
    """Run one-statement operations in autocommit mode: no BEGIN/COMMIT round trips."""
    snapshot_reads: ClassVar[bool] = False
    """A plain read inside a transaction sees the snapshot its first read took, not
    rows committed since (MySQL/MariaDB's default, repeatable read): reading what
    another transaction just committed takes a locking read."""

    single_writer: ClassVar[bool] = False
    """The database takes one writing transaction at a time (SQLite): this process's
    loops queue for it (``Database.writer``) and the relay pipelines nothing."""
    pre_ping: ClassVar[bool] = True
    """outboxer's sync engine checks a pooled connection before lending it (a server
    may have closed it while it idled; a file database cannot)."""
    borrows_engines: ClassVar[bool] = True
    """An engine the application built can be used as it is (False: outboxer needs its
    own connection settings and takes only the engine's URL)."""

    one_statement_marks: ClassVar[bool] = False
    """:meth:`mark_clean` gives a statement."""

    def mark_clean(
        self, table: Table, cond: ColumnElement[bool], values: dict[str, Any]
    ) -> Executable | None:
        """One statement, run in autocommit, that sets ``values`` on the rows matching
        ``cond`` in id order and returns their ids, committing without waiting for the
        disk (the consumer's handling marks in one round trip); None where the
        database cannot (then the marks take a short transaction)."""
        return None

    def relaxed_condition(self) -> ColumnElement[bool] | None:
        """A condition, always true, that makes the one statement carrying it in its
        WHERE commit without waiting for the disk when it runs as its own (autocommit)
        transaction; None where the database has no such switch. Only for statements
        outboxer runs in transactions of its own: inside a caller's transaction it
        would relax the caller's commit too."""
        return None

    def claim_marking(
        self,
        table: Table,
        cond: ColumnElement[bool],
        order: Sequence[ColumnElement[Any]],
        limit: int,
        values: dict[str, Any],
        columns: Sequence[ColumnElement[Any]],
        marks: tuple[int, int],
    ) -> Executable | None:
        """One statement, run as its own transaction, that claims like :meth:`claim`
        and also marks the claimed rows that carry no handling mark as being handled
        (``marks``: the value for a claim of one row, then for several), returning
        ``columns`` and, labelled ``was_handling``, each row's mark before it; None
        where the database cannot (then the consumer marks them itself)."""
        return None

    relaxed_commit: ClassVar[str | None] = None
    """A statement that lets the current transaction commit without waiting for the
    disk (the consumer's handling marks: a mark lost with the server is one crash not
    counted, nothing else); None where the database has no such switch."""

    # ------------------------------------------------------------------ engines

    def check_url(self, url: URL) -> None:
        """Refuse a URL outboxer cannot work with (raise ConfigurationError)."""

    def driver_url(self, url: URL, driver: str) -> URL:
        """``url`` with the driver ``driver`` (the backend name as this family spells it)."""
        return url.set(drivername=f"{self.family}+{driver}")

    def engine_options(self, url: URL) -> dict[str, Any]:
        """Keyword arguments for ``create_engine`` / ``create_async_engine``."""
        return {}

    def tune(self, engine: Engine) -> None:
        """Event listeners on a sync engine outboxer created (SQLite's pragmas)."""

    def connection_failed(self, error: BaseException) -> bool:
        """Whether the driver's ``error`` says the connection could not be made or was
        lost (what SQLAlchemy's disconnect check misses, e.g. a connect that timed
        out), as opposed to an error of the statement."""
        return False

    def socket_of(self, driver_connection: Any) -> int | None:
        """The file descriptor of the driver connection's socket, which the watchdog
        shuts down when a call on it does not answer (None: no socket, e.g. SQLite)."""
        return None

    # ------------------------------------------------------------------ transactions

    def in_transaction(self, driver_connection: Any) -> bool | None:
        """Whether the driver's connection is inside a transaction, read from the
        driver's own state (no round trip); None when the driver does not say."""
        return None

    def implicitly_commits(self, statement: str) -> bool:
        """Whether a statement makes the database commit the open transaction (beyond
        COMMIT/ROLLBACK/BEGIN, which every database treats so)."""
        return False

    def in_lock_order(self, table: Table, cond: ColumnElement[bool]) -> ColumnElement[bool]:
        """``cond`` for an UPDATE of several rows, so that the rows are locked in id
        order (the order consumers lock their batches in: no deadlock between an
        update of the relay and a consumer's batch). By default ``cond`` itself."""
        return cond

    def ids_in(self, column: ColumnElement[int], ids: Sequence[int]) -> ColumnElement[bool]:
        """``column`` is one of ``ids`` (the batch statements: marks, locks)."""
        return column.in_(list(ids))

    def ids_param(self, column: ColumnElement[int], name: str) -> ColumnElement[bool]:
        """``column`` is one of the ids given at execution as the parameter ``name``
        (a list): :meth:`ids_in` for a statement built once and run many times."""
        return column.in_(bindparam(name, expanding=True))

    def value_by_id(
        self, column: ColumnElement[int], ids: str, values: str, otherwise: ColumnElement[Any]
    ) -> ColumnElement[Any] | None:
        """The text at the position of ``column`` in the list parameter ``ids`` within
        the list parameter ``values`` (a NULL there: ``otherwise``), in a statement
        whose text does not depend on how many ids there are; None when the database
        has no arrays (the caller writes a ``CASE`` for the batch at hand)."""
        return None

    def lock_rows(
        self, stmt: Select[Any], *, skip_locked: bool = False, read: bool = False
    ) -> Select[Any]:
        """``stmt`` taking row locks (``FOR UPDATE``; ``read``: ``FOR SHARE``);
        ``skip_locked``: rows another transaction holds are left out, not waited for."""
        return stmt.with_for_update(read=read, skip_locked=skip_locked)

    def insert_ignoring_duplicates(self, table: Table, unique: str) -> Insert:
        """An INSERT into ``table`` that skips rows whose ``unique`` column value is
        already there (the inbox: a message received twice is stored once)."""
        raise NotImplementedError

    def inserted_id(self, result: Any) -> int | None:
        """The id of the row an :meth:`insert_ignoring_duplicates` of one row wrote,
        or None when it skipped a duplicate."""
        if result.rowcount != 1:
            return None
        return int(result.inserted_primary_key[0])

    # ------------------------------------------------------------------ wake-ups

    def notify(self, channel: str) -> Executable:
        """A statement that notifies ``channel`` when its transaction commits (only
        called where :meth:`notify_channel` gave a channel)."""
        raise NotImplementedError

    def with_notice(
        self, insert: Insert, id_column: ColumnElement[int], channel: str
    ) -> Executable:
        """``insert`` (one row) and a notice on ``channel`` in one statement returning
        the new row's id (nothing when the insert skipped its row)."""
        raise NotImplementedError

    def notify_channel(self, table: str) -> str | None:
        """The channel a commit that wrote to ``table`` notifies (None: this database
        has no notifications; relays then poll)."""
        return None

    async def listen(
        self,
        url: URL,
        channels: Sequence[str],
        on_notify: Callable[[str], None],
        on_connected: Callable[[], None],
    ) -> None:
        """Hold a connection listening on ``channels``; call ``on_notify(channel)`` for
        each notification and ``on_connected()`` after each (re)connection. Returns
        only by raising (connection lost); the caller reconnects."""
        raise NotImplementedError

    # ------------------------------------------------------------------ SQL

    def now_sql(self) -> str:
        """The database's current UTC time."""
        raise NotImplementedError

    def now_plus_sql(self, seconds: str) -> str:
        """The database's current UTC time plus ``seconds`` (compiled SQL)."""
        raise NotImplementedError

    def minute_sql(self, timestamp: str) -> str:
        """The UTC minute of a timestamp column as text, ``YYYY-MM-DD HH:MM`` (compiled
        SQL; groups rows per minute for the web console's chart)."""
        raise NotImplementedError

    def timestamp_type(self) -> TypeEngine[Any]:
        """The column type of a UTC timestamp with sub-second precision."""
        raise NotImplementedError

    def from_db_timestamp(self, value: Any) -> datetime:
        """A timestamp as the driver returns it, as an aware UTC datetime."""
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def id_type(self) -> TypeEngine[int] | None:
        """The type of the id column where it differs from BIGINT (None: BIGINT)."""
        return None

    def add_column_sql(self, table: str, column_spec: str) -> str:
        """The DDL adding a column (``table`` quoted, ``column_spec`` compiled)."""
        return f"ALTER TABLE {table} ADD COLUMN {column_spec}"

    def to_db_timestamp(self, value: Any) -> Any:
        """A UTC-aware datetime as the driver stores it."""
        return value

    def text_type(self, long: bool) -> TypeEngine[Any] | None:
        """A type for large text (the payload), or None for the generic TEXT."""
        return None

    def claim(
        self,
        table: Table,
        cond: ColumnElement[bool],
        order: Sequence[ColumnElement[Any]],
        limit: int,
        values: dict[str, Any],
        context: dict[str, Any],
        columns: Sequence[ColumnElement[Any]] | None = None,
        *,
        params: dict[str, Any] | None = None,
        built: dict[str, Any] | None = None,
        relaxed: bool = False,
    ) -> Op[list[tuple[Row[Any], dict[str, Any]]]]:
        """Take up to ``limit`` rows matching ``cond`` (in ``order``) that no other
        claimer holds, set ``values`` on them, and return each row (its ``columns``,
        all by default) with the values it now has (the second item: overrides for
        that read).

        ``relaxed``: the claim runs in a transaction of its own, which may commit
        without waiting for the disk (:meth:`relaxed_condition`).
        ``params`` are the values of bind parameters in ``cond`` and ``values``.
        ``built`` keeps the statements built for these arguments: a caller that
        passes the same dict (and the same arguments) again runs them without
        building them again (see :func:`~outboxer.database.ops.base.hot`).

        This default is one ``UPDATE ... WHERE id IN (SELECT ... LIMIT n [FOR UPDATE
        SKIP LOCKED]) RETURNING *`` (PostgreSQL, SQLite).
        """
        built = {} if built is None else built
        stmt = built.get("claim")
        if stmt is None:
            pick = select_ids(table, cond, order, limit)
            if self.skip_locked:
                pick = pick.with_for_update(skip_locked=True)
            where: list[ColumnElement[bool]] = [table.c.id.in_(pick.scalar_subquery())]
            relax = self.relaxed_condition() if relaxed else None
            if relax is not None:
                where.append(relax)
            stmt = built["claim"] = (
                update(table)
                .where(*where)
                .values(**values)
                .returning(*(table.c if columns is None else columns))
            )
        result = yield Execute(stmt, params, what="claim", context=context)
        return [(row, {}) for row in result.all()]

    # ------------------------------------------------------------------ locks

    def lock_statement(self, name: str) -> Executable | None:
        """A statement returning one truthy value when this session took the
        database-wide lock ``name`` without waiting; None when the database has no
        such lock (SQLite: its single writer serialises the work anyway)."""
        return None

    def unlock_statement(self, name: str) -> Executable | None:
        """Release the lock ``name`` taken by :meth:`lock_statement`."""
        return None

    # ------------------------------------------------------------------ tests

    def scratch_options(self) -> dict[str, Any]:
        """Options of the admin engine that creates and drops scratch databases."""
        return {}

    def create_database_sql(self, quoted: str) -> str:
        return f"CREATE DATABASE {quoted}"

    def drop_database_sql(self, quoted: str) -> str:
        return f"DROP DATABASE IF EXISTS {quoted}"

    @contextmanager
    def scratch_database(self, admin_url: str | URL, name: str) -> Iterator[str]:
        """Create database ``name`` on the server of ``admin_url``, yield its URL and
        drop it afterwards."""
        url = make_url(admin_url)
        # No pool: the drop must not reuse a connection that a server restart (or an
        # idle timeout) closed while the database was in use.
        admin = create_engine(url, poolclass=NullPool, **self.scratch_options())
        # CREATE/DROP DATABASE have no Core construct; the name is ours and quoted.
        quoted = admin.dialect.identifier_preparer.quote_identifier(name)
        try:
            with admin.connect() as conn:
                conn.execute(text(self.create_database_sql(quoted)))
                conn.commit()
            try:
                yield url.set(database=name).render_as_string(hide_password=False)
            finally:
                with admin.connect() as conn:
                    conn.execute(text(self.drop_database_sql(quoted)))
                    conn.commit()
        finally:
            admin.dispose()


def select_ids(
    table: Table, cond: ColumnElement[bool], order: Sequence[ColumnElement[Any]], limit: int
) -> Select[Any]:
    return select(table.c.id).where(cond).order_by(*order).limit(limit)
