"""Small asyncio helpers shared by the relay and the consumer."""

from __future__ import annotations

import asyncio
import contextlib
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


async def in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` on a daemon thread and await its result.

    Not the default executor: its threads are joined at interpreter exit, so a
    blocking sync handler could hold a stopping process beyond ``shutdown_timeout``.
    A daemon thread dies with the process; its transaction is then rolled back by
    the database and the batch is delivered again.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(value: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)  # type: ignore[arg-type]

    def work() -> None:
        value: T | None = None
        error: BaseException | None = None
        try:
            value = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            loop.call_soon_threadsafe(settle, value, error)

    threading.Thread(target=work, name="outboxer-sync-batch", daemon=True).start()
    return await future
