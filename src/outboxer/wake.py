"""Wake-ups: how a relay learns that there is new work before its next poll.

Sources:

- :class:`CommitWake`, an observer of ``publish`` that wakes this process's relays
  when a transaction that published commits;
- :class:`NotificationWake`, a connection listening for the database's notifications
  (PostgreSQL LISTEN; ``publish`` sends one NOTIFY per transaction and table), so a
  publish in another process wakes the relay at once.

Polling every ``poll_interval`` stays as the fallback that covers everything else
(lost notifications, a dropped listening connection, databases without
notifications). A new source calls :meth:`Waker.notify` with the services that have
new rows.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from outboxer.backoff import ErrorBackoff
from outboxer.database.connector import Connector
from outboxer.database.engines import Database
from outboxer.hooks import Observer

logger = logging.getLogger(__name__)


class Waker:
    """One wake-up flag per service's relay, settable from any thread."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop, services: Iterable[str]) -> None:
        self._loop = loop
        self._events = {s: asyncio.Event() for s in services}

    def unbind(self) -> None:
        self._loop = None
        self._events = {}

    @property
    def active(self) -> bool:
        return self._loop is not None

    def notify(self, services: Iterable[str]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            same_loop = asyncio.get_running_loop() is loop
        except RuntimeError:  # published from another thread
            same_loop = False
        for service in services:
            ev = self._events.get(service)
            if ev is None:
                continue
            if same_loop:
                ev.set()
            else:
                loop.call_soon_threadsafe(ev.set)

    async def wait(self, service: str, timeout: float) -> bool:
        """Wait for a wake-up of ``service`` (True) or ``timeout`` seconds (False)."""
        ev = self._events.get(service)
        if ev is None:
            await asyncio.sleep(timeout)
            return False
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except TimeoutError:
            return False
        finally:
            ev.clear()
        return True


class CommitWake(Observer):
    """Wakes this process's relays when a transaction that published commits.

    Attached to the hooks only while loops run in this process, so publisher-only
    processes pay nothing. One one-shot listener per transaction object; a rollback
    forgets what it published.
    """

    def __init__(self, waker: Waker, connector: Connector) -> None:
        self.waker = waker
        self.connector = connector
        self._armed: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def event_published(self, service: str, event_type: str, tx: Any) -> None:
        target = self.connector.transaction_of(tx)
        with self._lock:
            pending = self._armed.get(target)
            if pending is None:
                pending = set()
                self._armed[target] = pending
                self.connector.when_ended(target, self._fire, self._discard)
            pending.add(service)

    def _take(self, target: Any) -> set[str]:
        with self._lock:
            pending = self._armed.get(target)
            if not pending:
                return set()
            taken = set(pending)
            pending.clear()
            return taken

    def _fire(self, target: Any) -> None:
        services = self._take(target)
        if services:
            self.waker.notify(services)

    def _discard(self, target: Any, *args: Any) -> None:
        self._take(target)


class NotificationWake:
    """Wakes relays from the database's notifications, one listening connection per
    process. ``channels`` maps a notification channel to its service."""

    def __init__(
        self,
        database: Database,
        channels: Mapping[str, str],
        waker: Waker,
        backoff: ErrorBackoff,
    ) -> None:
        self.database = database
        self.channels = dict(channels)
        self.waker = waker
        self.backoff = backoff
        self.connected = False

    def _notified(self, channel: str) -> None:
        service = self.channels.get(channel)
        if service is not None:
            self.waker.notify((service,))

    def _connected(self) -> None:
        self.connected = True
        self.backoff.reset()
        # Notices sent while nobody listened are gone: look once everywhere.
        self.waker.notify(self.channels.values())

    async def run(self) -> None:
        """Listen until cancelled; a lost connection is retried with a growing delay
        (relays poll meanwhile)."""
        lost_since: float | None = None
        while True:
            try:
                await self.database.dialect.listen(
                    self.database.url, list(self.channels), self._notified, self._connected
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: poll, then reconnect
                if lost_since is None or self.connected:
                    lost_since = asyncio.get_running_loop().time()
                    logger.warning(
                        "listening for database notifications failed; relays poll until "
                        "it is back: %s",
                        exc,
                        extra={"channels": list(self.channels)},
                    )
                self.connected = False
            await asyncio.sleep(self.backoff.next())
