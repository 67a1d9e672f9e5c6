"""A NATS subscription: the route's durable pull consumers, one per lane, read on a
connection of its own.

Messages are acknowledged only for batches whose database transaction has
committed; while a batch is being handled its messages are kept in progress
(``+WPI`` every third of ``nats.ack_wait``, for at most ``nats.max_in_progress``
seconds), so a long batch is not delivered to
another reader meanwhile, while a reader that died leaves its messages to come
again after ``ack_wait``. ``close`` gives what it still holds back at once.
A connection that closed, or a consumer the server no longer knows (a server that
lost its store; looked for after ten seconds of fetches that found nothing), is
replaced: the next ``receive`` builds the connection and the
consumers again, spaced out while that fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

from outboxer.errors import TransportError
from outboxer.routing import ServiceRoute
from outboxer.transports.base import IncomingMessage
from outboxer.transports.nats.admin import NatsAdmin, durable_name, stream_name
from outboxer.transports.nats.client import JetStreamContext, Msg, js_errors, nats_errors
from outboxer.transports.nats.connection import Connection, Servers, connect
from outboxer.transports.nats.errors import describe
from outboxer.transports.nats.producer import KEY
from outboxer.transports.nats.settings import NatsSettings

logger = logging.getLogger(__name__)

_BUILD_RETRY_FIRST = 1.0
_BUILD_RETRY_MAX = 30.0
"""Bounds (seconds) of the wait between attempts to build a subscription that failed."""

_FETCH_MIN = 0.05
"""The shortest wait (seconds) of one fetch: JetStream expires a pull request."""
_CHECK_EVERY = 10.0
"""Seconds of fetches that found nothing before the subscription asks whether its
consumers still exist (a fetch from a consumer the server lost only times out)."""
_LANE_WAIT = 0.25
"""The longest wait (seconds) of one round of fetches over the lanes."""


class NatsSubscription:
    """One route's durable pull consumers (one per lane) on a connection of its own."""

    def __init__(
        self, route: ServiceRoute, servers: Servers, settings: NatsSettings, admin: NatsAdmin
    ) -> None:
        self.route = route
        self._servers = servers
        self._settings = settings
        self._admin = admin
        self._conn: Connection | None = None
        self._pulls: list[JetStreamContext.PullSubscription] = []
        self._held: dict[int, tuple[Msg, float]] = {}
        """Messages received and not yet acknowledged or given back (by id()), with
        when they were received."""
        self._keeper: asyncio.Task[None] | None = None
        self._closed = False
        self.rebuilds = 0
        self._build_retry_at = 0.0
        self._build_backoff = _BUILD_RETRY_FIRST
        self._checked_at = time.monotonic()

    async def open(self) -> None:
        await self._build()
        self._keeper = asyncio.create_task(self._keep_in_progress())

    async def _build(self) -> None:
        conn = await connect(
            self._servers, self._settings, name=f"outboxer-{self.route.service_name}"
        )
        try:
            await self._admin.ensure_consumers(conn.js, self.route)
            stream = stream_name(self.route.topic)
            self._pulls = [
                await conn.js.pull_subscribe_bind(
                    durable=durable_name(self.route.group_id, lane), stream=stream
                )
                for lane in range(self._settings.lanes)
            ]
        except BaseException:
            await conn.close()
            raise
        self._conn = conn

    async def _rebuild(self, reason: str) -> None:
        extra = {"service": self.route.service_name}
        logger.warning("rebuilding the NATS subscription: %s", reason, extra=extra)
        old, self._conn = self._conn, None
        self._pulls = []
        # What the old connection held comes again after ack_wait (its acks cannot go).
        self._held.clear()
        if old is not None:
            await old.close()
        self.rebuilds += 1
        self._build_backoff = _BUILD_RETRY_FIRST
        if not self._closed:
            await self._try_build()

    async def _try_build(self) -> None:
        extra = {"service": self.route.service_name}
        try:
            await self._build()
        except (TimeoutError, TransportError, nats_errors.Error, OSError) as exc:
            first = self._build_backoff == _BUILD_RETRY_FIRST
            (logger.warning if first else logger.debug)(
                "building the NATS subscription failed (trying again every %.0fs at most): %s",
                _BUILD_RETRY_MAX,
                describe(exc),
                extra=extra,
            )
            self._build_retry_at = time.monotonic() + self._build_backoff
            self._build_backoff = min(self._build_backoff * 2, _BUILD_RETRY_MAX)
            return
        if self._build_backoff != _BUILD_RETRY_FIRST:
            logger.info("the NATS subscription is built again", extra=extra)
        self._build_backoff = _BUILD_RETRY_FIRST

    async def receive(self, max_messages: int, timeout: float) -> list[IncomingMessage]:
        if self._closed:
            return []
        conn = self._conn
        if conn is None:
            wait = self._build_retry_at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(min(wait, timeout))
            else:
                await self._try_build()
            return []
        if not conn.usable:
            await self._rebuild(conn.broken or "the connection closed")
            return []
        out: list[Msg] = []
        deadline = time.monotonic() + timeout
        round_wait = _FETCH_MIN  # first what is there already, then wait longer
        while True:
            # Every lane at once, each wait short so a lane that has messages is not
            # kept behind an idle one for the whole timeout.
            left = deadline - time.monotonic()
            wait = max(_FETCH_MIN, min(left, round_wait))
            round_wait = _LANE_WAIT
            wanted = max_messages - len(out)
            per_lane = max(1, -(-wanted // len(self._pulls)))
            results = await asyncio.gather(
                *(pull.fetch(per_lane, timeout=wait) for pull in self._pulls),
                return_exceptions=True,
            )
            failure: BaseException | None = None
            for result in results:
                if isinstance(result, list):
                    out.extend(result)
                elif not isinstance(result, nats_errors.TimeoutError | asyncio.TimeoutError):
                    failure = result
            if failure is not None:
                # A connection that closed, or a consumer the server no longer knows
                # (a server that lost its store): build both again.
                if not isinstance(failure, nats_errors.Error | OSError):
                    raise failure
                return self._hand_out(out) + await self._rebuilt(describe(failure))
            if out:
                self._checked_at = time.monotonic()
                return self._hand_out(out)
            if time.monotonic() >= deadline:
                if time.monotonic() - self._checked_at >= _CHECK_EVERY:
                    self._checked_at = time.monotonic()
                    missing = await self._missing_consumer(conn)
                    if missing:
                        return await self._rebuilt(f"the server lost the consumer {missing}")
                return []

    async def _missing_consumer(self, conn: Connection) -> str | None:
        """The first of the route's consumers the server does not know (None when it
        knows them all, or cannot answer now: an outage is not a lost consumer)."""
        stream = stream_name(self.route.topic)
        for lane in range(len(self._pulls)):
            name = durable_name(self.route.group_id, lane)
            try:
                await conn.js.consumer_info(stream, name, timeout=self._settings.connect_timeout)
            except js_errors.NotFoundError:
                return f"{stream}/{name}"
            except (TimeoutError, nats_errors.Error, OSError):
                return None
        return None

    async def _rebuilt(self, reason: str) -> list[IncomingMessage]:
        await self._rebuild(reason)
        return []

    def _hand_out(self, msgs: list[Msg]) -> list[IncomingMessage]:
        out = []
        now = time.monotonic()
        for msg in msgs:
            headers = {k: v.encode() for k, v in (msg.headers or {}).items()}
            key = headers.get(KEY)
            self._held[id(msg)] = (msg, now)
            out.append(
                IncomingMessage(
                    route=self.route,
                    value=msg.data,
                    key=key,
                    headers=headers,
                    position=msg,
                    coordinates=_coordinates(msg),
                )
            )
        return out

    async def _settle(self, messages: Sequence[IncomingMessage], delay: float | None) -> None:
        conn = self._conn
        extra = {"service": self.route.service_name}
        try:
            for m in messages:
                msg: Msg = m.position
                self._held.pop(id(msg), None)
                if delay is None:
                    await msg.ack()
                else:
                    await msg.nak(delay=delay or None)
            if conn is not None:
                await conn.client.flush(timeout=self._settings.connect_timeout)  # type: ignore[arg-type]
        except (TimeoutError, nats_errors.Error, OSError) as exc:
            # Not acknowledged: JetStream delivers them again after ack_wait, and the
            # database skips what it already committed.
            what = "acknowledging" if delay is None else "giving back"
            logger.warning(
                "%s NATS messages failed (they will be delivered again): %s",
                what,
                describe(exc),
                extra=extra,
            )

    async def ack(self, messages: Sequence[IncomingMessage]) -> None:
        if messages:
            await self._settle(messages, None)

    async def nack(self, messages: Sequence[IncomingMessage], *, delay: float = 0.0) -> None:
        if messages:
            await self._settle(messages, max(0.0, delay))

    async def _keep_in_progress(self) -> None:
        """Tell the server, every third of ``ack_wait``, that held messages are still
        being handled (a batch that outlives ``ack_wait`` is not delivered twice)."""
        period = self._settings.ack_wait / 3
        bound = self._settings.max_in_progress
        while not self._closed:
            await asyncio.sleep(period)
            now = time.monotonic()
            for msg, since in list(self._held.values()):
                if now - since > bound:
                    continue  # held too long: let JetStream deliver it again
                try:
                    await msg.in_progress()
                except (nats_errors.Error, OSError) as exc:
                    logger.debug("in-progress ack failed: %s", describe(exc))
                    break

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        held = [msg for msg, _ in self._held.values()]
        if held and self._conn is not None and self._conn.usable:
            # Give back at once what was received and not acknowledged.
            with contextlib.suppress(nats_errors.Error, OSError):
                for msg in held:
                    await msg.nak()
                await self._conn.client.flush(timeout=self._settings.connect_timeout)  # type: ignore[arg-type]
        self._held.clear()
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


def _coordinates(msg: Msg) -> str | None:
    """The stream and its sequence of a received message (lineage), when the reply
    subject carries them (always, for a JetStream delivery)."""
    try:
        meta = msg.metadata
    except Exception:  # noqa: BLE001 - not a JetStream delivery
        return None
    return f"{meta.stream}@{meta.sequence.stream}"
