"""Helpers shared by the tests (fixtures are in conftest.py).

Servers are found at ``OUTBOXER_TEST_PG_URL`` / ``OUTBOXER_TEST_MYSQL_URL``
(defaults: the local PostgreSQL and MariaDB). A test that needs a server that is
not there is skipped on a laptop and fails under ``CI=true``.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from outboxer import Outbox, OutboxSettings

PG_ADMIN_URL = os.environ.get(
    "OUTBOXER_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
MYSQL_ADMIN_URL = os.environ.get(
    "OUTBOXER_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test"
)
REDIS_URL = os.environ.get("OUTBOXER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
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


def read_topic(bootstrap_servers: str, topic: str, expect: int) -> list[Any]:
    """The raw messages of ``topic`` from its start, read by a consumer of a new group
    until ``expect`` have come (or about a minute passed)."""
    from confluent_kafka import Consumer  # noqa: PLC0415 - the kafka extra

    c = Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": f"reader-{uuid.uuid4().hex[:6]}",
            "auto.offset.reset": "earliest",
            # This broker holds a group's first join for about half the session timeout.
            "session.timeout.ms": 6000,
        }
    )
    c.subscribe([topic])
    got: list[Any] = []
    try:
        for _ in range(120):
            got.extend(m for m in c.consume(100, 0.5) if m.error() is None)
            if len(got) >= expect:
                break
    finally:
        c.close()
    return got


def redis_prefix() -> str:
    """A key prefix of one test's own on the shared Redis server."""
    return f"outboxer-test-{uuid.uuid4().hex[:10]}:"


def delete_redis_keys(url: str, prefix: str) -> int:
    """Delete every key that starts with ``prefix`` (a test's own streams and leases)."""
    import redis  # noqa: PLC0415 - the extra may be missing locally

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=500))
        if keys:
            client.delete(*keys)
        return len(keys)
    finally:
        client.close()
