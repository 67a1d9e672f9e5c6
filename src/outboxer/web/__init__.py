"""The web console (``outboxer --app mod:attr web``; the ``outboxer[web]`` extra).

A server-rendered Starlette application over :class:`~outboxer.admin.Admin`:
an overview of every service with a live chart, message search, one message's
envelope and last error, and the dead letters (requeue, purge). See
docs/operations.md for running it safely (token, read-only, binding, allowed hosts,
proxies, throttling).
"""

from __future__ import annotations

from outboxer.web.app import create_app
from outboxer.web.security import (
    GENERATE,
    MIN_TOKEN_LENGTH,
    Throttle,
    allowed_host_names,
    check_token,
    generate_token,
    is_loopback,
    trusted_networks,
)

__all__ = [
    "GENERATE",
    "MIN_TOKEN_LENGTH",
    "Throttle",
    "allowed_host_names",
    "check_token",
    "create_app",
    "generate_token",
    "is_loopback",
    "serve",
    "trusted_networks",
]


def serve(
    app: object,
    *,
    host: str,
    port: int,
    log_level: str = "info",
    tls: tuple[str, str] | None = None,
) -> None:  # pragma: no cover - exercised by the browser tests as a process
    """Serve ``app`` with uvicorn until SIGINT/SIGTERM; over HTTPS with ``tls``
    (the certificate chain's and the private key's PEM files).

    uvicorn's own proxy headers are off: by default it would believe
    ``X-Forwarded-For`` from 127.0.0.1, so anyone on the host (or through an SSH
    tunnel) could pick the address the throttle counts. The console reads those
    headers itself, only from its ``trusted_proxies``.
    """
    import uvicorn  # noqa: PLC0415 - only the server needs it

    uvicorn.run(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        log_level=log_level,
        server_header=False,
        proxy_headers=False,
        ssl_certfile=tls[0] if tls else None,
        ssl_keyfile=tls[1] if tls else None,
    )
