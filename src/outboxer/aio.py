"""Small asyncio helpers shared by the relay and the consumer."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def sleep_unless(stopping: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` or until ``stopping`` is set; True if it was set."""
    try:
        await asyncio.wait_for(stopping.wait(), seconds)
    except TimeoutError:
        return False
    return True


IDLE_SECONDS = 10.0
"""A :class:`HandlerThread` ends after this long without work (the next call starts
a new one)."""


class HandlerThread:
    """One long-lived daemon thread that runs calls in turn, for one consumer's sync
    handlers (no thread started per batch).

    Not the default executor: its threads are joined at interpreter exit, so a
    blocking sync handler could hold a stopping process beyond ``shutdown_timeout``.
    A daemon thread dies with the process; its transaction is then rolled back by
    the database and the batch is delivered again. It ends after
    :data:`IDLE_SECONDS` without work, so an idle or finished consumer leaves no
    thread behind. Calls are meant to come one at a time (the consumer awaits each
    batch); more queue up.
    """

    def __init__(self, name: str = "outboxer-handlers") -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Callable[..., None]]] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._running = False

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the thread and await its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def settle(value: T | None, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)  # type: ignore[arg-type]

        def report(value: T | None, error: BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(settle, value, error)

        self._jobs.put((lambda: fn(*args), report))
        with self._lock:
            if not self._running:
                self._running = True
                threading.Thread(target=self._work, name=self.name, daemon=True).start()
        return await future

    def _work(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():  # a job put now finds _running False
                        self._running = False
                        return
                continue
            call, report = job
            value: Any = None
            error: BaseException | None = None
            try:
                value = call()
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
                error = exc
            report(value, error)
            del job, call, report, value, error
