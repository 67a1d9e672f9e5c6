"""What redis-py's errors mean to the transport.

Redis refuses no message for what it is (an entry is a few fields of bytes, and a
bulk string may be 512 MB): every failure is the server's or the connection's, so
it is transient (no attempt counted; a whole batch so is an outage). A connection
error or a timeout also means "drop this client and build a new one": redis-py
reconnects by itself, but a connection left half-read (a timeout in the middle of
a reply) must not be used again.
"""

from __future__ import annotations

from outboxer.transports.base import Delivery
from outboxer.transports.redis.client import (
    RedisConnectionError,
    RedisError,
    RedisTimeoutError,
    ResponseError,
)

REBUILD_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    TimeoutError,
    OSError,
)
"""Errors after which the client is dropped and the next call builds a new one."""

OUTAGE_ERRORS: tuple[type[BaseException], ...] = (RedisError, *REBUILD_ERRORS)
"""Errors that are the server's or the network's, never the message's."""


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def is_missing_group(exc: BaseException) -> bool:
    """``NOGROUP``: the stream or its group is gone (a server that lost its data)."""
    return isinstance(exc, ResponseError) and str(exc).startswith("NOGROUP")


def is_busy_group(exc: BaseException) -> bool:
    """``BUSYGROUP``: the group exists already (creating it again is fine)."""
    return isinstance(exc, ResponseError) and str(exc).startswith("BUSYGROUP")


def failed(outbox_id: int, exc: BaseException | str) -> Delivery:
    error = exc if isinstance(exc, str) else describe(exc)
    return Delivery(outbox_id, error=error, transient=True)
