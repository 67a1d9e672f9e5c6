"""Streams, consumer groups and lane names: the topology of the Redis transport.

A destination is ``lanes`` streams, ``<prefix><destination>:<lane>``; a key's lane is
``crc32(key) % lanes`` (stable across processes and versions). Each group reads a
lane under a lease, ``<stream>:lease:<group>`` (see ``subscription.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Iterable, Sequence

from outboxer.errors import TransportError
from outboxer.routing import ServiceRoute
from outboxer.transports.redis.client import Redis, call
from outboxer.transports.redis.errors import OUTAGE_ERRORS, describe, is_busy_group
from outboxer.transports.redis.settings import RedisSettings

logger = logging.getLogger(__name__)


class Topology:
    """Names of one transport's streams and leases, and the calls that declare them."""

    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings

    def lane_of(self, key: str) -> int:
        return zlib.crc32(key.encode()) % self.settings.lanes

    def stream(self, destination: str, lane: int) -> str:
        return f"{self.settings.key_prefix}{destination}:{lane}"

    def streams(self, destination: str) -> list[str]:
        return [self.stream(destination, lane) for lane in range(self.settings.lanes)]

    def lease(self, destination: str, lane: int, group: str) -> str:
        return f"{self.stream(destination, lane)}:lease:{group}"

    async def create_groups(self, client: Redis, pairs: Iterable[tuple[str, str]]) -> None:
        """``XGROUP CREATE <stream> <group> 0 MKSTREAM`` for each (stream, group); a
        group that exists is fine. From ``0``: a group created after its stream was
        lost and written again reads what was written meanwhile."""
        pipe = client.pipeline(transaction=False)
        todo = list(pairs)
        for stream, group in todo:
            pipe.execute_command("XGROUP", "CREATE", stream, group, "0", "MKSTREAM")
        results = await pipe.execute(raise_on_error=False)
        for (stream, group), result in zip(todo, results, strict=True):
            if isinstance(result, BaseException) and not is_busy_group(result):
                raise result
            if not isinstance(result, BaseException):
                logger.info("created Redis stream %s with consumer group %s", stream, group)

    async def missing(self, client: Redis, pairs: Sequence[tuple[str, str]]) -> list[str]:
        """The (stream, group) pairs that do not exist, as ``stream/group``."""
        out = []
        for stream, group in pairs:
            try:
                groups = await call(client, "XINFO", "GROUPS", stream)
            except OUTAGE_ERRORS as exc:
                if "no such key" not in str(exc).lower():
                    raise
                groups = []
            names = {_group_name(g) for g in groups}
            if group.encode() not in names:
                out.append(f"{stream}/{group}")
        return out

    def pairs(self, routes: Sequence[ServiceRoute]) -> list[tuple[str, str]]:
        return sorted({(stream, r.group_id) for r in routes for stream in self.streams(r.topic)})

    async def ensure(self, client: Redis, routes: Sequence[ServiceRoute], url: str) -> None:
        """Wait (``redis.stream_wait_timeout``) until every route's streams and group
        exist, creating them when allowed; TransportError when they still do not."""
        pairs = self.pairs(routes)
        if not pairs:
            return
        wait = self.settings.stream_wait_timeout
        deadline = time.monotonic() + wait
        announced = False
        while True:
            last_error = ""
            missing: list[str] = []
            try:
                if self.settings.create_streams:
                    await self.create_groups(client, pairs)
                else:
                    missing = await self.missing(client, pairs)
            except OUTAGE_ERRORS as exc:
                last_error = describe(exc)
                if not announced:
                    logger.warning("Redis is not answering at start: %s", last_error)
                    announced = True
            if not last_error and not missing:
                return
            if missing and not announced:
                logger.warning("waiting for Redis streams and groups: %s", ", ".join(missing))
                announced = True
            if time.monotonic() >= deadline:
                why = f"the server is unreachable ({last_error})" if last_error else "missing"
                raise TransportError(
                    f"Redis streams not ready after {wait:.0f}s (redis.stream_wait_timeout), "
                    f"{why}: " + ", ".join(missing or [s for s, _ in pairs]),
                    url=url,
                )
            await asyncio.sleep(0.5)


def _group_name(info: object) -> bytes:
    if isinstance(info, dict):
        name = info.get(b"name", info.get("name", b""))
    elif isinstance(info, list | tuple):
        fields = dict(zip(info[::2], info[1::2], strict=False))
        name = fields.get(b"name", b"")
    else:
        name = b""
    return name if isinstance(name, bytes) else str(name).encode()
