"""The sync engine's ping (install_idle_ping): every checkout pings, as
``pool_pre_ping`` does, except on a thread inside ``fresh_connections_trusted`` (a
worker's handler thread) for a connection checked in a moment ago; a connection the
server closed is replaced without the caller seeing an error."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import text

from outboxer.database.engines import create_sync_engine, fresh_connections_trusted


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


def test_a_handler_thread_does_not_ping_a_busy_connection(
    counted: tuple[Any, list[float], str],
) -> None:
    engine, pings, _ = counted
    with engine.connect() as conn:  # new: no ping
        conn.execute(text("SELECT 1"))
    assert pings == []
    with fresh_connections_trusted():
        for _ in range(20):
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        assert pings == []
        time.sleep(0.4)
        with engine.connect() as conn:  # idled: pinged
            conn.execute(text("SELECT 1"))
        assert len(pings) == 1
    # Anywhere else every checkout pings.
    for _ in range(3):
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    assert len(pings) == 4


def test_a_connection_killed_a_moment_ago_is_replaced_for_a_caller(
    counted: tuple[Any, list[float], str], server_url: str
) -> None:
    engine, pings, backend = counted
    with engine.connect() as conn:
        before = _backend_id(conn, backend)
    _kill(server_url, backend, before)
    with engine.connect() as conn:  # at once: the ping finds it gone, no error
        after = _backend_id(conn, backend)
    assert after != before
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
