"""The sync engine pings a pooled connection only after it idled (install_idle_ping):
a busy worker's handler transactions pay no ping round trip, and a connection the
server closed while it idled is replaced without the caller seeing an error."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import text

from outboxer.database.engines import create_sync_engine


def _backend_id(conn: Any, backend: str) -> int:
    sql = "SELECT pg_backend_pid()" if backend == "postgresql" else "SELECT CONNECTION_ID()"
    return int(conn.execute(text(sql)).scalar_one())


def _kill(url: str, backend: str, pid: int) -> None:
    engine = create_sync_engine(url)
    try:
        with engine.begin() as conn:
            if backend == "postgresql":
                conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
            else:
                conn.execute(text(f"KILL {int(pid)}"))
    finally:
        engine.dispose()


@pytest.fixture
def counted(server_url: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[float], str]:
    monkeypatch.setattr("outboxer.database.engines.PING_AFTER_IDLE", 0.3)
    engine = create_sync_engine(server_url, pool_size=1, max_overflow=0)
    pings: list[float] = []
    real = engine.dialect.do_ping

    def do_ping(dbapi_connection: Any) -> bool:
        pings.append(time.monotonic())
        return bool(real(dbapi_connection))

    monkeypatch.setattr(engine.dialect, "do_ping", do_ping)
    backend = "postgresql" if server_url.startswith("postgresql") else "mariadb"
    yield engine, pings, backend
    engine.dispose()


def test_a_busy_connection_is_not_pinged(counted: tuple[Any, list[float], str]) -> None:
    engine, pings, _ = counted
    for _ in range(20):
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    assert pings == []
    time.sleep(0.4)
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert len(pings) == 1


def test_a_connection_closed_while_idle_is_replaced(
    counted: tuple[Any, list[float], str], server_url: str
) -> None:
    engine, pings, backend = counted
    with engine.connect() as conn:
        before = _backend_id(conn, backend)
    _kill(server_url, backend, before)
    time.sleep(0.4)
    with engine.connect() as conn:  # no error: the ping found it gone
        after = _backend_id(conn, backend)
    assert after != before
    assert len(pings) == 1
