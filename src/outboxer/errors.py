"""Every exception outboxer raises, rooted in :class:`OutboxError`.

Configuration and input mistakes are also :class:`ValueError` (or :class:`TypeError`
for values of the wrong kind) so generic callers can catch them the usual way.
Driver errors are wrapped at the boundary (``raise StoreError(...) from exc``) and
carry the fields a person on call needs.
"""

from __future__ import annotations

import traceback
from typing import Any


class OutboxError(Exception):
    """Root of every outboxer error.

    Keyword context (``service``, ``table``, ``event_type``, ``outbox_id``, ...) is
    kept as attributes and appended to the message so logs name what went wrong.
    """

    def __init__(self, message: str, **context: Any) -> None:
        self.message = message
        self.context = {k: v for k, v in context.items() if v is not None}
        for key, value in context.items():
            setattr(self, key, value)
        super().__init__(message)

    def __str__(self) -> str:
        if not self.context:
            return self.message
        details = ", ".join(f"{k}={v!r}" for k, v in self.context.items())
        return f"{self.message} ({details})"


class ConfigurationError(OutboxError, ValueError):
    """A setting, route or argument given at construction time is invalid."""


class InvalidIdentifierError(ConfigurationError):
    """A table, topic, group or service name does not match the allowed pattern."""


class RoutingError(OutboxError, ValueError):
    """An event type or service cannot be routed as asked."""


class EventNotRegisteredError(RoutingError, LookupError):
    """The event type has no owning service; nothing was written."""


class EventServiceConflictError(RoutingError):
    """The event type is already registered to another service."""


class RouteConflictError(RoutingError):
    """A service was registered again with a different table, topic or group."""


class ServiceMismatchError(RoutingError):
    """A store bound to one service was asked to handle another service's event."""


class InvalidEventError(OutboxError, ValueError):
    """An event type, key or option given to publish/create is invalid."""


class DuplicateEventError(InvalidEventError):
    """An event with this event id is already in the service's table with another
    event type or payload; nothing was written and the caller's transaction is
    still usable (``outbox_id``: the row that holds the id)."""


class SchemaViolationError(InvalidEventError):
    """The payload does not match the schema registered for its event type and
    version (``event_type``, ``version``, ``path``: where, as ``$.items[0].sku``);
    nothing was written and the caller's transaction is still usable."""


class PayloadError(OutboxError, ValueError):
    """The payload cannot be stored."""


class PayloadNotSerializableError(PayloadError, TypeError):
    """The payload is ``None`` or is not JSON-serialisable."""


class PayloadTooLargeError(PayloadError):
    """The encoded envelope is larger than the configured limit."""


class EnvelopeDecodeError(OutboxError, ValueError):
    """Bytes or stored text are not a valid envelope."""


class StoreError(OutboxError):
    """The database rejected or failed an outbox operation (wraps the driver error)."""


class TransactionAbortedError(StoreError):
    """The database aborted the whole transaction; its batch must be retried."""


class ConnectionLostError(StoreError):
    """The database connection was lost during an operation (closed, reset, or cut by
    the watchdog after ``database_timeout`` without an answer): a fault of the
    network or the server, not of the messages; whether a COMMIT in flight took
    effect is unknown."""


class CommitOutcomeUnknownError(ConnectionLostError):
    """The connection was lost while the database was committing the transaction:
    it may have committed or not, and only the database can tell.

    ``outbox_ids`` are the ids the events of the transaction were given (their rows
    exist only if it committed) and ``event_ids`` the event ids given to publish
    (None for events published without one). Publishing an event again with the
    same ``event_id`` is safe either way: an id already there writes nothing."""

    def __init__(
        self,
        message: str,
        *,
        outbox_ids: list[int] | None = None,
        event_ids: list[str | None] | None = None,
        **context: Any,
    ) -> None:
        super().__init__(message, **context)
        self.outbox_ids = list(outbox_ids or [])
        self.event_ids = list(event_ids or [])


class MessageNotFoundError(StoreError, LookupError):
    """No outbox row with that id in the store's table."""


class AmbiguousMessageError(MessageNotFoundError):
    """The outbox id exists in several services' tables: name the service."""


class TransactionRequiredError(OutboxError, TypeError):
    """The object given as the caller's transaction is not one outboxer can write on."""


class TransportError(OutboxError):
    """The transport (broker) failed."""


class HandlerError(OutboxError):
    """Handler registration is invalid (duplicate handler, bad signature)."""


def describe_error(exc: BaseException, limit: int = 6) -> str:
    """``Type: message`` followed by the innermost frames, for ``last_error``."""
    head = f"{type(exc).__name__}: {exc}"
    frames = traceback.format_tb(exc.__traceback__)[-limit:]
    return head + ("\n" + "".join(frames) if frames else "")
