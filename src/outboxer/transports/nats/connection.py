"""Connections to the NATS servers of a ``nats://`` URL.

nats-py reconnects a connection by itself when its server goes away (forever here,
every ``nats.reconnect_wait`` seconds), resubscribing its subscriptions; what happens
meanwhile (publishes that time out, fetches that return nothing) is the relay's and
the consumer's outage, which they log once at its start and once at its end. The
client's own callbacks therefore log at debug level only. A connection that closed
for good (or that the first connect could not open) is replaced by the next call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from outboxer.errors import TransportError
from outboxer.transports.nats.client import Client, nats
from outboxer.transports.nats.errors import describe
from outboxer.transports.nats.settings import NatsSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Servers:
    """The servers of a ``nats://[user:pass@]host:port[,host:port]`` URL."""

    urls: tuple[str, ...]
    user: str | None = None
    password: str | None = None

    def __str__(self) -> str:
        return ",".join(self.urls)


class Connection:
    """One nats-py client and what is known about whether it can still be used."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.js = client.jetstream()
        self.broken: str | None = None
        """Why this connection must be replaced (None: it is fine)."""

    @property
    def usable(self) -> bool:
        return self.broken is None and not self.client.is_closed

    def break_(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
            logger.warning("the NATS connection will be rebuilt: %s", reason)

    async def close(self) -> None:
        if self.broken is None:
            self.broken = "closed"  # on purpose: nothing to warn about
        if self.client.is_closed:
            return
        try:
            await self.client.close()
        except Exception as exc:  # noqa: BLE001 - a connection being discarded anyway
            logger.debug("closing a NATS connection: %s", describe(exc))


async def connect(servers: Servers, settings: NatsSettings, *, name: str) -> Connection:
    """A new connection; TransportError when no server answers."""
    holder: list[Connection] = []

    async def on_error(exc: Exception) -> None:
        logger.debug("NATS client (%s): %s", name, describe(exc))

    async def on_disconnected() -> None:
        logger.debug("NATS client (%s) disconnected", name)

    async def on_reconnected() -> None:
        logger.debug("NATS client (%s) reconnected", name)

    async def on_closed() -> None:
        if holder:
            holder[0].break_("the connection closed")

    try:
        client = await nats.connect(
            servers=list(servers.urls),
            user=servers.user,
            password=servers.password,
            name=name,
            allow_reconnect=True,
            # nats-py's first connect retries forever unless this is positive: two
            # tries per server, then an error; once connected, reconnect forever.
            max_reconnect_attempts=1,
            reconnect_time_wait=settings.reconnect_wait,
            connect_timeout=settings.connect_timeout,
            error_cb=on_error,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
            closed_cb=on_closed,
        )
    except Exception as exc:
        raise TransportError(
            f"cannot connect to NATS at {servers}: {describe(exc)}", servers=str(servers)
        ) from exc
    client.options["max_reconnect_attempts"] = -1
    conn = Connection(client)
    holder.append(conn)
    return conn
