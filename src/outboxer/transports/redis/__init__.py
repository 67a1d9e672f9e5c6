"""The Redis Streams transport (redis-py's asyncio client); ``pip install 'outboxer[redis]'``.

:class:`RedisSettings` (the ``[redis]`` section) and :func:`create` (the factory of
``redis://[[user]:password@]host:port/db``) import
without redis-py; :class:`RedisTransport` needs it and says how to install it when
it is missing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from outboxer.errors import ConfigurationError
from outboxer.transports.redis.settings import RedisSettings

if TYPE_CHECKING:
    from outboxer.settings import OutboxSettings
    from outboxer.transports.redis.transport import RedisTransport


def create(spec: str, settings: OutboxSettings) -> RedisTransport:
    """The transport of ``redis://host:port/db`` with ``[redis]``."""
    parts = urlsplit(spec.strip())
    if parts.scheme.lower() != "redis" or not parts.hostname:
        raise ConfigurationError(
            f"transport {spec!r} names no Redis server: use redis://host:port/db"
        )
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        raise ConfigurationError(f"transport {spec!r}: invalid port") from exc
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ConfigurationError(f"transport {spec!r}: the database must be a number, got {db!r}")
    section = RedisSettings.parse(settings.section("redis"))
    # Optional dependency: imported only when asked for.
    from outboxer.transports.redis.transport import RedisTransport  # noqa: PLC0415

    return RedisTransport(spec.strip(), settings=section)


def __getattr__(name: str) -> Any:
    if name == "RedisTransport":
        from outboxer.transports.redis.transport import RedisTransport  # noqa: PLC0415

        return RedisTransport
    raise AttributeError(name)


__all__ = ["RedisSettings", "RedisTransport", "create"]
