"""Signal handling in one place: SIGTERM and SIGINT ask a running loop to stop."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def stop_on_signals(
    loop: asyncio.AbstractEventLoop, on_signal: Callable[[], object], *, enabled: bool = True
) -> Iterator[None]:
    """Call ``on_signal`` on the loop when SIGTERM or SIGINT arrives, until the block
    ends (then the previous handling is back). Only the main thread can own signal
    handlers: elsewhere, or when not ``enabled``, this does nothing."""
    installed: list[signal.Signals] = []
    if enabled and threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, on_signal)
            installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
