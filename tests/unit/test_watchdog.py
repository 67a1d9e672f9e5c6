"""The watchdog of database calls, without a database: a socket pair stands for a
connection whose peer does not answer."""

from __future__ import annotations

import socket
import time

from outboxer.database import connections
from outboxer.database.connections import Watchdog


def test_a_call_unanswered_past_the_timeout_has_its_socket_shut_down() -> None:
    client, server = socket.socketpair()
    with client, server:
        dog = Watchdog(0.2, lambda conn: conn.fileno())
        started = time.monotonic()
        with dog.watch(client, "statement"):
            assert client.recv(1) == b""  # blocked until the watchdog shuts it down
        assert 0.2 <= time.monotonic() - started < 2.0
        assert dog.fired == 1


def test_a_call_that_answers_in_time_is_left_alone() -> None:
    client, server = socket.socketpair()
    with client, server:
        dog = Watchdog(0.2, lambda conn: conn.fileno())
        with dog.watch(client, "statement"):
            server.sendall(b"x")
            assert client.recv(1) == b"x"
        time.sleep(0.5)
        server.sendall(b"y")
        assert client.recv(1) == b"y"
        assert dog.fired == 0


def test_an_idle_watchdog_ends_its_thread(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(connections, "IDLE_TICKS", 2)
    dog = Watchdog(0.2, lambda conn: None)
    with dog.watch(object(), "statement"):
        pass
    thread = dog._thread
    assert thread is not None
    thread.join(5)
    assert not thread.is_alive()
    assert dog._thread is None
    with dog.watch(object(), "statement"):
        assert dog._thread is not None  # started again
