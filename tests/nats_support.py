"""Helpers of the NATS JetStream tests: the server to use, and the clean-up of the
streams a test declared (their durable consumers go with them)."""

from __future__ import annotations

import asyncio
import os
import re
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

NATS_URL = os.environ.get("OUTBOXER_TEST_NATS_URL", "nats://127.0.0.1:4222")

T = TypeVar("T")


def run_aside(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to its end on a loop of its own (on a thread: the caller may be
    inside a running loop, in a fixture's teardown)."""
    result: list[Any] = []

    def target() -> None:
        try:
            result.append(asyncio.run(make()))  # type: ignore[arg-type]
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=target, name="nats-test-aside")
    thread.start()
    thread.join(60)
    if not result:
        raise TimeoutError("a NATS call of the test helpers did not finish in 60s")
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]  # type: ignore[no-any-return]


async def _streams(url: str) -> set[str]:
    import nats  # noqa: PLC0415

    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=1)
    try:
        return {info.config.name for info in await nc.jetstream().streams_info()}
    finally:
        await nc.close()


async def _delete(url: str, names: set[str]) -> None:
    import nats  # noqa: PLC0415

    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=1)
    try:
        js = nc.jetstream()
        for name in sorted(names):
            await js.delete_stream(name)
    finally:
        await nc.close()


def stream_names(url: str = NATS_URL) -> set[str]:
    """Every stream of the server (raises when JetStream does not answer)."""
    return run_aside(lambda: _streams(url))


class StreamJanitor:
    """Deletes the streams declared between its creation and ``clean()`` whose names
    match ``pattern`` (tests name their destinations uniquely)."""

    def __init__(self, url: str, pattern: str) -> None:
        self.url = url
        self.pattern = re.compile(pattern)
        self.before = stream_names(url)

    def clean(self) -> set[str]:
        new = {n for n in stream_names(self.url) - self.before if self.pattern.match(n)}
        if new:
            run_aside(lambda: _delete(self.url, new))
        return new
