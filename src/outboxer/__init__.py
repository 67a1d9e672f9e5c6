"""outboxer: the transactional outbox for Python services."""

from outboxer.admin import Admin, DeadLetterPage, PurgeResult
from outboxer.backoff import RetryPolicy
from outboxer.envelope import Envelope
from outboxer.errors import (
    AmbiguousMessageError,
    CommitOutcomeUnknownError,
    ConfigurationError,
    ConnectionLostError,
    DuplicateEventError,
    EnvelopeDecodeError,
    EventNotRegisteredError,
    EventServiceConflictError,
    HandlerError,
    InvalidEventError,
    InvalidIdentifierError,
    MessageNotFoundError,
    OutboxError,
    PayloadError,
    PayloadNotSerializableError,
    PayloadTooLargeError,
    RouteConflictError,
    RoutingError,
    SchemaViolationError,
    ServiceMismatchError,
    StoreError,
    TransactionAbortedError,
    TransactionRequiredError,
    TransportError,
)
from outboxer.hooks import Observer, Stats
from outboxer.models import Event, OutboxMessage, ServiceStatus, Status
from outboxer.outbox import Outbox
from outboxer.routing import RouteRegistry, ServiceRoute, default_route
from outboxer.settings import OutboxSettings, load_settings
from outboxer.store import Store

__version__ = "0.1.0"

__all__ = [
    "Admin",
    "AmbiguousMessageError",
    "DeadLetterPage",
    "CommitOutcomeUnknownError",
    "ConnectionLostError",
    "DuplicateEventError",
    "PurgeResult",
    "ConfigurationError",
    "Envelope",
    "Event",
    "EnvelopeDecodeError",
    "EventNotRegisteredError",
    "EventServiceConflictError",
    "HandlerError",
    "InvalidEventError",
    "SchemaViolationError",
    "InvalidIdentifierError",
    "MessageNotFoundError",
    "Outbox",
    "OutboxError",
    "Observer",
    "OutboxMessage",
    "OutboxSettings",
    "PayloadError",
    "PayloadNotSerializableError",
    "PayloadTooLargeError",
    "RetryPolicy",
    "RouteConflictError",
    "RouteRegistry",
    "RoutingError",
    "ServiceMismatchError",
    "ServiceRoute",
    "ServiceStatus",
    "Stats",
    "Status",
    "Store",
    "StoreError",
    "TransactionAbortedError",
    "TransactionRequiredError",
    "TransportError",
    "__version__",
    "default_route",
    "load_settings",
]
