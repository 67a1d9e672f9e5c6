"""A fault-injecting TCP proxy on loopback, between workers and a database or broker.

Modes, switched at any time from the test:

- ``pass``: bytes go through (after ``delay`` seconds each way, when set);
- ``black_hole()``: a peer that vanished: nothing is forwarded any more and nothing
  is closed (no FIN, no RST). The connections open at that moment stay silent; new
  connections are accepted and stay silent too. ``restore()``: the peer is back, as
  after a restart: silent connections are closed, new ones pass.
  (The proxy's own TCP stack still acknowledges what the client sends, so kernel
  keepalive cannot see this; only the client's own timeouts can.)
- ``cut()``: close every connection on both sides at once;
- ``lose_answer(pattern)``: the next client message that matches ``pattern`` (by
  default a ``COMMIT`` of PostgreSQL's or MySQL's protocol) is forwarded to the
  server, the server's answer is awaited and thrown away, and the connection is
  closed on both sides: the client cannot know that the statement took effect.
  With ``forward=False`` the message is dropped instead (it never took effect);
  the client sees the same thing.

Threads, one accept loop plus four per connection (a reader and a writer each
way, so a delay adds latency without limiting throughput).
"""

from __future__ import annotations

import contextlib
import queue
import re
import socket
import threading
import time
from dataclasses import dataclass, field

COMMIT = re.compile(
    rb"Q\x00\x00\x00\x0bCOMMIT\x00"  # PostgreSQL simple query 'COMMIT'
    rb"|\x03COMMIT\Z"  # MySQL COM_QUERY 'COMMIT' (the end of a packet)
    rb"|\x03COMMIT(?=[\x00-\xff]{3}\x00)",  # ... followed by another packet
    re.IGNORECASE,
)
"""A COMMIT as PostgreSQL's and MySQL's client protocols send it."""


@dataclass
class _Rule:
    pattern: re.Pattern[bytes]
    forward: bool
    count: int
    after: re.Pattern[bytes] | None = None
    """Only on a connection that has sent a message matching this before."""


@dataclass
class _Link:
    client: socket.socket
    upstream: socket.socket | None = None
    silent: bool = False
    """Black-holed: forwards nothing, ever again."""
    losing: bool = False
    """A matched message went to the server: its answer is thrown away, then both close."""
    closed: bool = False
    primed: set[int] = field(default_factory=set)
    """Rules (by id) whose ``after`` this connection has sent."""
    to_server: queue.Queue[tuple[float, bytes] | None] = field(default_factory=queue.Queue)
    to_client: queue.Queue[tuple[float, bytes] | None] = field(default_factory=queue.Queue)


class FaultProxy:
    """Listens on 127.0.0.1:``port`` (a free one by default) and forwards to
    ``target_port``. A context manager; ``close()`` stops every thread it started."""

    def __init__(self, target_port: int, *, port: int = 0, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self._listener = socket.create_server((host, port))
        self.port = int(self._listener.getsockname()[1])
        self.delay = 0.0
        self._black_hole = False
        self._rules: list[_Rule] = []
        self._links: list[_Link] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.answers_lost = 0
        """Messages whose answer was lost (or that were dropped) by ``lose_answer``."""
        self.connections = 0
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept, "accept")

    # ------------------------------------------------------------------ control

    def set_delay(self, seconds: float) -> None:
        """Add ``seconds`` to each direction of every connection (0: none)."""
        self.delay = seconds

    def black_hole(self) -> None:
        with self._lock:
            self._black_hole = True
            for link in self._links:
                link.silent = True

    def restore(self) -> None:
        """The peer is back: new connections pass again, and the black-holed ones are
        closed, as a peer that restarted answers the next packet of a connection it
        no longer knows with a reset (a client that never sends again would hold a
        silent connection for good; the broker, too, sees its side close)."""
        with self._lock:
            self._black_hole = False
            self.delay = 0.0
            silent = [link for link in self._links if link.silent and not link.closed]
        for link in silent:
            self._close(link)

    def cut(self) -> int:
        """Close every open connection on both sides; how many."""
        with self._lock:
            links = [link for link in self._links if not link.closed]
        for link in links:
            self._close(link)
        return len(links)

    def lose_answer(
        self,
        pattern: re.Pattern[bytes] = COMMIT,
        *,
        forward: bool = True,
        count: int = 1,
        after: re.Pattern[bytes] | None = None,
    ) -> None:
        """Lose the answer of the next ``count`` client messages matching ``pattern``
        (``after``: on a connection that sent a message matching it first, e.g. the
        COMMIT of a transaction that wrote to a given table)."""
        with self._lock:
            self._rules.append(_Rule(pattern, forward, count, after))

    @property
    def armed(self) -> int:
        """Answers still to be lost."""
        with self._lock:
            return sum(r.count for r in self._rules)

    def disarm(self) -> None:
        with self._lock:
            self._rules.clear()

    # ------------------------------------------------------------------ the work

    def _spawn(self, target: object, name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=f"proxy-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client)
            with self._lock:
                self.connections += 1
                link.silent = self._black_hole
                self._links.append(link)
            if not link.silent:
                try:
                    link.upstream = socket.create_connection(self.target, timeout=10)
                    link.upstream.settimeout(None)
                    link.upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    self._close(link)
                    continue
            self._spawn(self._read_client, "c2s", link)
            self._spawn(self._write, "to-server", link, link.to_server, True)
            self._spawn(self._read_server, "s2c", link)
            self._spawn(self._write, "to-client", link, link.to_client, False)

    def _match(self, link: _Link, data: bytes) -> _Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.after is not None and id(rule) not in link.primed:
                    if rule.after.search(data):
                        link.primed.add(id(rule))
                    continue
                if rule.count > 0 and rule.pattern.search(data):
                    rule.count -= 1
                    self.answers_lost += 1
                    self._rules = [r for r in self._rules if r.count > 0]
                    return rule
        return None

    def _read_client(self, link: _Link) -> None:
        while True:
            try:
                data = link.client.recv(65536)
            except OSError:
                data = b""
            if not data:
                self._close(link)
                return
            if link.silent or link.losing:
                continue  # a vanished peer: read and forget, never close
            rule = self._match(link, data)
            if rule is not None:
                if not rule.forward:
                    self._close(link)  # dropped: it never reaches the server
                    return
                link.losing = True  # the server's answer will be thrown away
            link.to_server.put((time.monotonic() + self.delay, data))

    def _read_server(self, link: _Link) -> None:
        if link.upstream is None:  # accepted into a black hole: nothing to read
            return
        while True:
            try:
                data = link.upstream.recv(65536)
            except OSError:
                data = b""
            if not data:
                self._close(link)
                return
            if link.losing:
                self._close(link)  # the answer arrived (so it took effect): lost
                return
            if link.silent:
                continue
            link.to_client.put((time.monotonic() + self.delay, data))

    def _write(
        self, link: _Link, source: queue.Queue[tuple[float, bytes] | None], up: bool
    ) -> None:
        while True:
            item = source.get()
            if item is None:
                return
            due, data = item
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if link.silent:
                continue
            target = link.upstream if up else link.client
            if target is None:
                continue
            try:
                target.sendall(data)
            except OSError:
                self._close(link)
                return

    def _close(self, link: _Link) -> None:
        with self._lock:
            if link.closed:
                return
            link.closed = True
        for sock in (link.client, link.upstream):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()
        link.to_server.put(None)
        link.to_client.put(None)

    def close(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            links = list(self._links)
        for link in links:
            link.silent = True
            self._close(link)
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
