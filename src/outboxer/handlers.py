"""Handlers: their types and the registry of one application (event type -> handler).

The facade, the runtime and the consumer name a handler through this module; none of
them needs the database layer for it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from outboxer.envelope import Envelope
from outboxer.errors import HandlerError
from outboxer.routing import RouteRegistry

Handler = Callable[..., Any]
"""``async def h(event: Envelope, tx: AsyncSession)`` or ``def h(event, tx: Session)``."""


@dataclass(frozen=True, slots=True)
class BatchHandler:
    """A handler that takes a list of events: ``fn(events, tx)``. The fast path calls
    it once with consecutive events of its type (in order); after a failure each
    event is run again alone, in its own savepoint."""

    fn: Callable[..., Any]

    def __call__(self, events: list[Envelope], tx: Any) -> Any:
        return self.fn(events, tx)


def callable_name(fn: Callable[..., Any]) -> str:
    """A callable's qualified name, for messages."""
    return str(getattr(fn, "__qualname__", None) or repr(fn))


def is_async_callable(fn: Callable[..., Any]) -> bool:
    """True for ``async def`` functions and objects whose ``__call__`` is one."""
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - looking for an async __call__
    return call is not None and inspect.iscoroutinefunction(call)


def check_handler(event_type: str, fn: Handler) -> None:
    """Refuse, at registration, a handler that cannot take ``(event, tx)``."""
    if not callable(fn):
        raise HandlerError(f"handler for {event_type!r} is not callable", event_type=event_type)
    try:
        inspect.signature(fn).bind(object(), object())
    except TypeError as exc:
        raise HandlerError(
            f"handler for {event_type!r} must accept (event, tx): {exc}", event_type=event_type
        ) from exc
    except ValueError:  # builtins without a signature: let them be
        pass


def handler_fn(handler: Handler | BatchHandler) -> Handler:
    """The function a handler calls (a batch handler's ``fn``)."""
    return handler.fn if isinstance(handler, BatchHandler) else handler


class Handlers:
    """Event type -> handler (or batch handler), for the consumers of one application."""

    def __init__(self) -> None:
        self._by_type: dict[str, Handler | BatchHandler] = {}

    def register(self, event_type: str, fn: Handler | BatchHandler) -> None:
        event_type = event_type.strip()
        check_handler(event_type, handler_fn(fn))
        existing = self._by_type.get(event_type)
        if (
            existing is not None
            and existing is not fn
            and handler_fn(existing) is not handler_fn(fn)
        ):
            raise HandlerError(
                f"event type {event_type!r} already has a handler "
                f"({callable_name(handler_fn(existing))})",
                event_type=event_type,
            )
        self._by_type[event_type] = fn

    def __bool__(self) -> bool:
        return bool(self._by_type)

    def by_service(self, routes: RouteRegistry) -> dict[str, dict[str, Handler]]:
        """The handlers grouped by the service owning their event type."""
        grouped: dict[str, dict[str, Handler]] = {}
        for event_type, fn in self._by_type.items():
            service = routes.service_of(event_type)
            if service is None:
                raise HandlerError(
                    f"handler registered for {event_type!r}, which belongs to no service; "
                    "call register_event(event_type, service) or pass service=",
                    event_type=event_type,
                )
            grouped.setdefault(service, {})[event_type] = fn
        return grouped
