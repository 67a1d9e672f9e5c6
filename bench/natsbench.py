"""NATS JetStream for the benchmark: the server (``OUTBOXER_BENCH_NATS_URL``, default
the local one), the streams a run declared (deleted at its end), and the raw nats-py
contender of the relay measure."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

NATS_URL = os.environ.get("OUTBOXER_BENCH_NATS_URL", "nats://127.0.0.1:4222")
STREAM_PREFIX = "bench"
"""Streams of a run: ``bench<hex>_<service>`` (``unique("bench")`` topic prefixes)."""

T = TypeVar("T")


def _run(make: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(make())  # type: ignore[arg-type]


async def _streams(url: str) -> set[str]:
    import nats  # noqa: PLC0415 - optional

    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=1)
    try:
        infos = await nc.jetstream().streams_info()
        return {info.config.name for info in infos if info.config.name}
    finally:
        await nc.close()


def streams(url: str = NATS_URL) -> set[str]:
    """The server's streams (raises when JetStream does not answer)."""
    return _run(lambda: _streams(url))


async def _delete(url: str, names: set[str]) -> None:
    import nats  # noqa: PLC0415 - optional

    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=1)
    try:
        js = nc.jetstream()
        for name in sorted(names):
            await js.delete_stream(name)
    finally:
        await nc.close()


def delete_new_streams(url: str, before: set[str]) -> None:
    """Delete the streams of this run (new since ``before``, named ``bench...``)."""
    new = {n for n in streams(url) - before if n.startswith(STREAM_PREFIX)}
    if new:
        _run(lambda: _delete(url, new))


Message = tuple[str, bytes, list[tuple[str, str | bytes | None]]]
"""(key, value, headers), as the relay measure reads them from the table."""


async def _publish(
    url: str, destination: str, messages: Sequence[Message], concurrency: int, lanes: int
) -> tuple[float, int, list[str]]:
    import zlib  # noqa: PLC0415

    import nats  # noqa: PLC0415 - optional

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        acked = 0
        errors: list[str] = []

        async def one(i: int, m: Message) -> None:
            nonlocal acked
            key, value, headers = m
            lane = zlib.crc32(key.encode()) % lanes if lanes > 1 else 0
            hdrs: dict[str, Any] = {
                k: v.decode() if isinstance(v, bytes) else v for k, v in headers if v is not None
            }
            hdrs["Nats-Msg-Id"] = f"raw-{time.monotonic_ns()}-{i}"
            hdrs["Outboxer-Key"] = key
            try:
                await js.publish(f"{destination}.{lane}", value, headers=hdrs)
                acked += 1
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

        start = time.perf_counter()
        for at in range(0, len(messages), concurrency):
            chunk = messages[at : at + concurrency]
            await asyncio.gather(*(one(at + i, m) for i, m in enumerate(chunk)))
        return time.perf_counter() - start, acked, errors
    finally:
        await nc.close()


def publish_raw(
    url: str, destination: str, messages: Sequence[Message], *, concurrency: int, lanes: int
) -> tuple[float, int, list[str]]:
    """Publish ``messages`` with plain nats-py, ``concurrency`` at a time (the relay's
    batch size), each awaiting its PubAck: seconds, messages acknowledged, errors."""
    return _run(lambda: _publish(url, destination, messages, concurrency, lanes))
