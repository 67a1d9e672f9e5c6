"""The NATS JetStream transport (nats-py); ``pip install 'outboxer[nats]'``.

:class:`NatsSettings` (the ``[nats]`` section) and :func:`create` (the factory of
``nats://[user:pass@]host:port[,host:port]``) import without nats-py;
:class:`NatsTransport` needs it and says how to install it when it is missing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from outboxer.errors import ConfigurationError
from outboxer.transports.nats.settings import NatsSettings

if TYPE_CHECKING:
    from outboxer.settings import OutboxSettings
    from outboxer.transports.nats.transport import NatsTransport


def parse_url(spec: str) -> tuple[tuple[str, ...], str | None, str | None]:
    """``nats://[user:pass@]host:port[,host:port]`` -> server URLs, user, password."""
    rest = spec.split("://", 1)[1].strip().strip("/") if "://" in spec else ""
    user = password = None
    if "@" in rest:
        credentials, rest = rest.rsplit("@", 1)
        user, _, password = credentials.partition(":")
        user, password = unquote(user), unquote(password) or None
    if not rest:
        raise ConfigurationError(f"transport {spec!r} names no NATS server")
    urls = []
    for server in rest.split(","):
        host, _, port = server.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigurationError(f"transport {spec!r}: {server.strip()!r} is not host:port")
        urls.append(f"nats://{host}:{port}")
    return tuple(urls), user or None, password


def create(spec: str, settings: OutboxSettings) -> NatsTransport:
    """The transport of ``nats://[user:pass@]host:port[,...]`` with the ``[nats]`` section."""
    urls, user, password = parse_url(spec)
    nats = NatsSettings.parse(settings.section("nats"))
    if 0 < settings.redeliver_after <= nats.duplicate_window:
        raise ConfigurationError(
            f"nats.duplicate_window ({nats.duplicate_window:g}s) must be shorter than "
            f"redeliver_after ({settings.redeliver_after:g}s)"
        )
    # Optional dependency: imported only when asked for.
    from outboxer.transports.nats.connection import Servers  # noqa: PLC0415
    from outboxer.transports.nats.transport import NatsTransport  # noqa: PLC0415

    return NatsTransport(Servers(urls, user, password), settings=nats, lease=settings.lease)


def __getattr__(name: str) -> Any:
    if name == "NatsTransport":
        from outboxer.transports.nats.transport import NatsTransport  # noqa: PLC0415

        return NatsTransport
    raise AttributeError(name)


__all__ = ["NatsSettings", "NatsTransport", "create", "parse_url"]
