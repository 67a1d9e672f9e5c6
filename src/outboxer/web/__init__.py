"""The web console (``outboxer --app mod:attr web``; the ``outboxer[web]`` extra).

A server-rendered Starlette application over :class:`~outboxer.admin.Admin`:
an overview of every service with a live chart, message search, one message's
envelope and last error, and the dead letters (requeue, purge). See
docs/operations.md for running it safely (token, read-only, binding).
"""

from __future__ import annotations

from outboxer.web.app import create_app
from outboxer.web.security import is_loopback

__all__ = ["create_app", "is_loopback", "serve"]


def serve(
    app: object, *, host: str, port: int, log_level: str = "info"
) -> None:  # pragma: no cover - exercised by the browser tests as a process
    """Serve ``app`` with uvicorn until SIGINT/SIGTERM."""
    import uvicorn  # noqa: PLC0415 - only the server needs it

    uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False)  # type: ignore[arg-type]
