"""redis-py's asyncio client, imported once, with the install hint when it is missing.

Every module of the package that talks to the server imports the client from here,
so ``import outboxer.transports.redis`` (the settings) works without the extra.
"""

from __future__ import annotations

from typing import Any

try:
    from redis import exceptions as redis_exceptions
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the Redis transport needs redis-py: pip install 'outboxer[redis]'") from exc

RedisError = redis_exceptions.RedisError
ResponseError = redis_exceptions.ResponseError
RedisConnectionError = redis_exceptions.ConnectionError
RedisTimeoutError = redis_exceptions.TimeoutError


RAW_REPLIES = ("XREADGROUP", "XAUTOCLAIM", "XCLAIM", "XPENDING", "XINFO GROUPS")
"""Commands whose replies the transport reads as the server sends them (RESP2):
redis-py's parsers of these depend on the options of its own helper methods (an
``XAUTOCLAIM ... JUSTID`` or an ``XPENDING ... IDLE`` sent as a plain command breaks
them) and have changed between versions."""


def connect(url: str, socket_timeout: float) -> Redis:
    """A client of ``url``; no retries of its own (the transport decides what a
    failed call means), bytes in and out, the stream commands' replies raw."""
    client = Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        socket_keepalive=True,
        retry=Retry(NoBackoff(), 0),
        decode_responses=False,
        protocol=2,
    )
    for command in RAW_REPLIES:
        client.response_callbacks.pop(command, None)
    return client


async def call(client: Redis, *args: Any) -> Any:
    """One command (redis-py's ``execute_command`` is untyped)."""
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


__all__ = [
    "Redis",
    "RedisConnectionError",
    "RedisError",
    "RedisTimeoutError",
    "ResponseError",
    "call",
    "connect",
]
