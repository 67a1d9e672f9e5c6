"""The consumer's side: one subscription per route, reading its lanes in the route's
consumer group under lane leases.

Redis spreads one stream's entries over a group's consumers; a lane keeps a key's
order only if one reader takes its entries at a time. So each lane has a lease,
``SET <stream>:lease:<group> <token> NX PX <lane_lease>``: a subscription reads only
the lanes it holds, renews them every third of the lease (a script that extends the
lease only when it still holds the token), acknowledges only while it holds the lane
(``XACK`` inside a script that checks the token first: a paused reader whose lease
expired cannot acknowledge what the new holder now owns), and releases them on
close. A dead holder's lanes are free when its lease expires; a subscription tries
to take free lanes every third of the lease.

A lane just taken is read from its pending entries first (``XAUTOCLAIM`` from
``0-0`` with no idle bound and ``JUSTID`` makes the previous holder's unacknowledged
entries this consumer's; ``XREADGROUP`` from id ``0`` then reads them in order,
before anything new), then with ``XREADGROUP ... >`` (blocking up to the receive's
timeout). While it holds a lane, a subscription also claims entries that another
consumer of the group has left idle for ``claim_idle`` seconds (a paused former
holder's reads). ``nack`` reads the lane's pending entries again from the start,
after the delay if one is given (held back here; a crash meanwhile leaves them to
the lane's next holder). Redis's delivery counter is never read: the outbox row
decides when a message is dead.

A server that cannot be reached makes ``receive`` return nothing (logged once when
it starts and once when it ends) and the next call builds a new client; a group or
stream that is gone (a server that lost its data) is created again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any

from outboxer.routing import ServiceRoute
from outboxer.transports.base import IncomingMessage
from outboxer.transports.redis.admin import Topology
from outboxer.transports.redis.client import Redis, call, connect
from outboxer.transports.redis.errors import OUTAGE_ERRORS, describe, is_missing_group
from outboxer.transports.redis.producer import HEADER, KEY, VALUE
from outboxer.transports.redis.settings import RedisSettings

logger = logging.getLogger(__name__)

RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""

RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""

ACK = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('xack', KEYS[2], ARGV[2], unpack(ARGV, 3))
end
return -1
"""


class RedisSubscription:
    """One route's reader: the lanes it holds, their state, and its own client."""

    def __init__(
        self, route: ServiceRoute, url: str, settings: RedisSettings, topology: Topology
    ) -> None:
        self.route = route
        self._url = url
        self._settings = settings
        self._topology = topology
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._token = uuid.uuid4().hex
        self._client: Redis | None = None
        self._closed = False
        self._held: set[int] = set()
        """Lanes this subscription holds a lease on."""
        self._claim: dict[int, bytes] = {}
        """Lanes just taken whose pending entries are not all this consumer's yet,
        and the ``XAUTOCLAIM`` cursor reached."""
        self._pending: dict[int, bytes] = {}
        """Lanes whose own pending entries are read first, and the last id read."""
        self._hold_until: dict[int, float] = {}
        """Lanes given back with a delay, and when to read them again."""
        self._leases_checked = 0.0
        self._claimed_at = time.monotonic()
        self._outage_since: float | None = None
        self.rebuilds = 0
        self.lost_leases = 0

    # ------------------------------------------------------------------ names

    @property
    def _extra(self) -> dict[str, str]:
        return {"service": self.route.service_name}

    def _stream(self, lane: int) -> str:
        return self._topology.stream(self.route.topic, lane)

    def _lease(self, lane: int) -> str:
        return self._topology.lease(self.route.topic, lane, self.route.group_id)

    def _lane_of_stream(self, stream: bytes | str) -> int:
        name = stream.decode() if isinstance(stream, bytes) else stream
        return int(name.rsplit(":", 1)[1])

    # ------------------------------------------------------------------ client

    def _current(self) -> Redis:
        if self._client is None:
            self._client = connect(self._url, self._settings.socket_timeout)
        return self._client

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def _unreachable(self, exc: BaseException, timeout: float) -> None:
        """An outage: log its start once, build a new client next time, and wait."""
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            logger.warning(
                "Redis unreachable for the consumer (receiving again when it answers): %s",
                describe(exc),
                extra=self._extra,
            )
        await self._drop_client()
        self.rebuilds += 1
        # Leases may have expired meanwhile: check them at once when it answers.
        self._leases_checked = 0.0
        await asyncio.sleep(min(timeout, 1.0))

    def _reachable(self) -> None:
        if self._outage_since is not None:
            logger.warning(
                "Redis answers the consumer again after %.1fs",
                time.monotonic() - self._outage_since,
                extra=self._extra,
            )
            self._outage_since = None

    async def open(self) -> None:
        """Create the route's streams and group when allowed (failures only logged:
        ``receive`` keeps trying)."""
        if not self._settings.create_streams:
            return
        try:
            await self._create_groups()
        except OUTAGE_ERRORS as exc:
            logger.warning("Redis: could not declare streams: %s", describe(exc), extra=self._extra)
            await self._drop_client()

    async def _create_groups(self) -> None:
        await self._topology.create_groups(
            self._current(),
            [(s, self.route.group_id) for s in self._topology.streams(self.route.topic)],
        )

    # ------------------------------------------------------------------ leases

    async def _check_leases(self, client: Redis) -> None:
        """Renew the lanes held, take the free ones (every third of the lease)."""
        now = time.monotonic()
        if now - self._leases_checked < self._settings.lane_lease / 3:
            return
        ms = int(self._settings.lane_lease * 1000)
        lanes = list(range(self._settings.lanes))
        pipe = client.pipeline(transaction=False)
        for lane in lanes:
            if lane in self._held:
                pipe.execute_command("EVAL", RENEW, 1, self._lease(lane), self._token, ms)
            else:
                pipe.execute_command("SET", self._lease(lane), self._token, "NX", "PX", ms)
        results = await pipe.execute(raise_on_error=True)
        self._leases_checked = now
        for lane, result in zip(lanes, results, strict=True):
            holds = bool(result) and result != 0
            if lane in self._held and not holds:
                self._lose(lane)
            elif lane not in self._held and holds:
                self._held.add(lane)
                self._claim[lane] = b"0-0"
                self._pending[lane] = b"0"
                logger.debug("took Redis lane %s", self._stream(lane), extra=self._extra)

    def _lose(self, lane: int) -> None:
        self.lost_leases += 1
        logger.warning(
            "lost the lease of Redis lane %s (another reader has it now)",
            self._stream(lane),
            extra=self._extra,
        )
        self._held.discard(lane)
        self._pending.pop(lane, None)
        self._claim.pop(lane, None)
        self._hold_until.pop(lane, None)

    def _readable(self, now: float) -> list[int]:
        for lane, until in list(self._hold_until.items()):
            if until <= now:
                del self._hold_until[lane]
        return sorted(lane for lane in self._held if lane not in self._hold_until)

    # ------------------------------------------------------------------ receive

    async def receive(self, max_messages: int, timeout: float) -> list[IncomingMessage]:
        if self._closed:
            return []
        try:
            client = self._current()
            await self._check_leases(client)
            out = await self._read(client, max_messages, timeout)
        except OUTAGE_ERRORS as exc:
            if is_missing_group(exc):
                await self._regroup(exc)
                return []
            await self._unreachable(exc, timeout)
            return []
        except Exception:
            # A reply this code did not expect: never the end of the consumer loop.
            logger.exception("reading from Redis failed", extra=self._extra)
            await self._drop_client()
            await asyncio.sleep(min(timeout, 1.0))
            return []
        self._reachable()
        return out

    async def _regroup(self, exc: BaseException) -> None:
        logger.warning(
            "Redis lost the stream or group of %s (%s): creating them again",
            self.route.topic,
            exc,
            extra=self._extra,
        )
        if self._settings.create_streams:
            with contextlib.suppress(*OUTAGE_ERRORS):
                await self._create_groups()
        else:
            await asyncio.sleep(0.5)

    async def _read(
        self, client: Redis, max_messages: int, timeout: float
    ) -> list[IncomingMessage]:
        now = time.monotonic()
        lanes = self._readable(now)
        if not lanes:
            await asyncio.sleep(min(timeout, self._settings.lane_lease / 3))
            return []
        group = self.route.group_id
        # 1. A lane just taken: every pending entry of the group moves to this
        #    consumer (a former holder's too), ids only; then this consumer's own
        #    pending entries are read from the start, oldest first, before anything
        #    new (also after a nack).
        for lane in lanes:
            if lane in self._claim:
                await self._take_pending(client, lane)
        for lane in lanes:
            cursor = self._pending.get(lane)
            if cursor is None:
                continue
            reply = await call(
                client,
                "XREADGROUP",
                "GROUP",
                group,
                self.consumer,
                "COUNT",
                max_messages,
                "STREAMS",
                self._stream(lane),
                cursor,
            )
            entries = [e for _, found in _streams_of(reply) for e in found]
            if not entries:
                del self._pending[lane]
                continue
            self._pending[lane] = entries[-1][0]
            out = self._messages(lane, entries)
            if out:
                return out
        # 2. Entries another consumer left idle (a paused former holder's).
        if now - self._claimed_at >= self._settings.claim_idle / 2:
            self._claimed_at = now
            out = await self._claim_idle(client, lanes, max_messages)
            if out:
                return out
        # 3. New entries.
        args: list[Any] = ["XREADGROUP", "GROUP", group, self.consumer, "COUNT", max_messages]
        block = int(min(timeout, self._settings.socket_timeout - 0.5) * 1000)
        if block > 0:
            args += ["BLOCK", block]
        lanes = [lane for lane in lanes if lane not in self._pending]
        if not lanes:
            return []
        args += ["STREAMS", *(self._stream(lane) for lane in lanes), *(">" for _ in lanes)]
        reply = await call(client, *args)
        out = []
        for stream, entries in _streams_of(reply):
            out.extend(self._messages(self._lane_of_stream(stream), entries))
        return out

    async def _take_pending(self, client: Redis, lane: int) -> None:
        """``XAUTOCLAIM ... 0 <cursor> JUSTID`` until the cursor comes back to
        ``0-0``: the lane's pending entries, whoever had them, are this consumer's."""
        cursor = self._claim[lane]
        while True:
            reply = await call(
                client,
                "XAUTOCLAIM",
                self._stream(lane),
                self.route.group_id,
                self.consumer,
                0,
                cursor,
                "COUNT",
                1000,
                "JUSTID",
            )
            cursor = reply[0]
            self._claim[lane] = cursor
            if cursor in (b"0-0", "0-0"):
                del self._claim[lane]
                return

    async def _claim_idle(
        self, client: Redis, lanes: Sequence[int], max_messages: int
    ) -> list[IncomingMessage]:
        idle = int(self._settings.claim_idle * 1000)
        for lane in lanes:
            stream = self._stream(lane)
            pending = await call(
                client,
                "XPENDING",
                stream,
                self.route.group_id,
                "IDLE",
                idle,
                "-",
                "+",
                max_messages,
            )
            ids = [p[0] for p in pending if _text(p[1]) != self.consumer]
            if not ids:
                continue
            entries = await call(
                client, "XCLAIM", stream, self.route.group_id, self.consumer, idle, *ids
            )
            out = self._messages(lane, entries)
            if out:
                logger.info(
                    "claimed %d idle entries of Redis lane %s", len(out), stream, extra=self._extra
                )
                return out
        return []

    def _messages(self, lane: int, entries: Any) -> list[IncomingMessage]:
        out = []
        for entry in entries or []:
            if entry is None or entry[1] is None:
                continue  # an entry trimmed away while pending
            entry_id, raw = entry[0], entry[1]
            fields = _fields(raw)
            headers = {
                name[len(HEADER) :].decode(): value
                for name, value in fields.items()
                if name.startswith(HEADER)
            }
            out.append(
                IncomingMessage(
                    route=self.route,
                    value=fields.get(VALUE),
                    key=fields.get(KEY),
                    headers=headers,
                    position=(lane, entry_id),
                    coordinates=f"{self._stream(lane)}@{_entry_text(entry_id)}",
                )
            )
        return out

    # ------------------------------------------------------------------ ack, nack

    async def ack(self, messages: Sequence[IncomingMessage]) -> None:
        if not messages:
            return
        by_lane: dict[int, list[bytes]] = {}
        for m in messages:
            lane, entry_id = m.position
            by_lane.setdefault(lane, []).append(entry_id)
        lanes = sorted(by_lane)
        try:
            pipe = self._current().pipeline(transaction=False)
            for lane in lanes:
                pipe.execute_command(
                    "EVAL",
                    ACK,
                    2,
                    self._lease(lane),
                    self._stream(lane),
                    self._token,
                    self.route.group_id,
                    *by_lane[lane],
                )
            results = await pipe.execute(raise_on_error=True)
        except OUTAGE_ERRORS as exc:
            logger.warning(
                "acknowledging on Redis failed (the entries will be delivered again): %s",
                describe(exc),
                extra=self._extra,
            )
            if not is_missing_group(exc):
                await self._drop_client()
            return
        for lane, result in zip(lanes, results, strict=True):
            if result == -1 and lane in self._held:
                self._lose(lane)

    async def nack(self, messages: Sequence[IncomingMessage], *, delay: float = 0.0) -> None:
        # The lane is read again from its first pending entry (the oldest given back
        # or later); with a delay, not before then.
        until = time.monotonic() + delay
        for m in messages:
            lane = m.position[0]
            if lane not in self._held:
                continue
            self._pending[lane] = b"0"
            if delay > 0:
                self._hold_until[lane] = until

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        held, self._held = sorted(self._held), set()
        if held and self._client is not None:
            try:
                pipe = self._client.pipeline(transaction=False)
                for lane in held:
                    pipe.execute_command("EVAL", RELEASE, 1, self._lease(lane), self._token)
                await pipe.execute(raise_on_error=False)
            except OUTAGE_ERRORS as exc:
                logger.debug("releasing Redis lane leases: %s", exc, extra=self._extra)
        await self._drop_client()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(raw: Any) -> dict[bytes, bytes]:
    if isinstance(raw, dict):
        return {bytes(k): bytes(v) for k, v in raw.items()}
    items = list(raw)
    return {bytes(items[i]): bytes(items[i + 1]) for i in range(0, len(items) - 1, 2)}


def _streams_of(reply: Any) -> list[tuple[Any, Any]]:
    """XREADGROUP's reply as (stream, entries): a list of pairs (RESP2) or a map (RESP3)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(reply.items())
    return [(item[0], item[1]) for item in reply]


def _entry_text(entry_id: Any) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
