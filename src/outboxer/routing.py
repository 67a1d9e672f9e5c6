"""Routes: event type -> owning service -> (table, topic, consumer group).

A route's words are broker-neutral: ``topic`` is the destination the transport sends
to (a Kafka topic, a RabbitMQ exchange or queue, a NATS subject, a Redis stream; also
``ServiceRoute.destination``), ``group_id`` the group of consumers that share its
messages (``ServiceRoute.group``). The names follow one neutral rule here that every
built-in transport accepts; a transport refuses what its broker cannot carry
(``Transport.check_route``).

The registry is an object the application owns (one per :class:`~outboxer.Outbox`);
there is no module-level state.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from outboxer.errors import (
    ConfigurationError,
    EventNotRegisteredError,
    EventServiceConflictError,
    InvalidEventError,
    InvalidIdentifierError,
    RouteConflictError,
)

logger = logging.getLogger(__name__)

TABLE_NAME_MAX = 63
TOPIC_NAME_MAX = 249
EVENT_TYPE_MAX = 255
_TABLE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TOPIC_RE = re.compile(r"[A-Za-z0-9._-]+")
_SERVICE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
TABLE_SUFFIX = "_outbox_messages"
INBOX_SUFFIX = "_inbox"
DEFAULT_TOPIC_PREFIX = "outboxer"
ENVELOPE = "envelope"
CLOUDEVENTS = "cloudevents"
CLOUDEVENTS_STRUCTURED = "cloudevents-structured"
FORMATS = (ENVELOPE, CLOUDEVENTS, CLOUDEVENTS_STRUCTURED)
"""How a service's messages look on the wire (see :mod:`outboxer.cloudevents`)."""


def validate_format(value: str) -> str:
    if value not in FORMATS:
        raise ConfigurationError(
            f"unknown format {value!r}; choose one of {', '.join(FORMATS)}", format=value
        )
    return value


def validate_source(value: str) -> str:
    """A CloudEvents ``source``: a non-empty URI-reference without spaces."""
    if not isinstance(value, str) or not value or any(c.isspace() or ord(c) < 32 for c in value):
        raise ConfigurationError(
            f"invalid CloudEvents source {value!r}: a non-empty URI-reference without "
            "spaces, e.g. /orders or https://example.com/orders",
            source=value,
        )
    return value


def validate_table_name(name: str) -> str:
    """Return ``name`` if it is a safe SQL identifier, else raise InvalidIdentifierError."""
    if not isinstance(name, str) or len(name) > TABLE_NAME_MAX or not _TABLE_RE.fullmatch(name):
        raise InvalidIdentifierError(
            f"invalid table name {name!r}: must match [A-Za-z_][A-Za-z0-9_]* "
            f"and be at most {TABLE_NAME_MAX} characters",
            table=name,
        )
    return name


def validate_topic_name(name: str, *, what: str = "topic") -> str:
    """Return ``name`` if it is a valid destination or group name, else raise.

    The neutral rule ([A-Za-z0-9._-]+, at most 249 characters, not ``.`` or ``..``)
    fits every built-in transport; a transport may refuse more (``check_route``)."""
    if (
        not isinstance(name, str)
        or len(name) > TOPIC_NAME_MAX
        or not _TOPIC_RE.fullmatch(name)
        or name in (".", "..")
    ):
        raise InvalidIdentifierError(
            f"invalid {what} name {name!r}: must match [A-Za-z0-9._-]+ "
            f"and be at most {TOPIC_NAME_MAX} characters",
            **{what: name},
        )
    return name


def validate_service_name(name: str) -> str:
    """Service names become part of table and topic names, so both rules apply."""
    if not isinstance(name, str) or not _SERVICE_RE.fullmatch(name):
        raise InvalidIdentifierError(
            f"invalid service name {name!r}: must match [A-Za-z_][A-Za-z0-9_-]*",
            service=name,
        )
    return name


def validate_event_type(event_type: object) -> str:
    """Strip and check an event type; blank or non-string types are errors."""
    if not isinstance(event_type, str):
        raise InvalidEventError(
            f"event type must be a string, got {type(event_type).__name__}",
            event_type=event_type,
        )
    return _checked_event_type(event_type)


@functools.lru_cache(maxsize=4096)
def _checked_event_type(event_type: str) -> str:
    """:func:`validate_event_type` of a string, remembered (an app has few types and
    publishes them many times; a rejected one raises and is not remembered)."""
    stripped = event_type.strip()
    if not stripped:
        raise InvalidEventError("event type is empty", event_type=event_type)
    if len(stripped) > EVENT_TYPE_MAX or any(ord(c) < 32 for c in stripped):
        raise InvalidEventError(
            f"event type {stripped[:80]!r} is longer than {EVENT_TYPE_MAX} characters "
            "or contains control characters",
            event_type=stripped[:80],
        )
    return stripped


def index_name(table: str, suffix: str) -> str:
    """An index name unique per table that stays within identifier limits."""
    name = f"ix_{table}_{suffix}"
    if len(name) <= TABLE_NAME_MAX:
        return name
    digest = hashlib.sha1(table.encode(), usedforsecurity=False).hexdigest()[:8]
    keep = TABLE_NAME_MAX - len(suffix) - len(digest) - 5
    return f"ix_{table[:keep]}_{digest}_{suffix}"


@dataclass(frozen=True, slots=True)
class ServiceRoute:
    """Where one service's events live: its outbox table, topic and consumer group.

    ``inbox``: this application consumes the service's events into an inbox table of
    its own database (the service publishes them from another database).
    ``ordered``: events with the same key are handled in publish order, across
    failures. ``format``: the messages' form on the wire (``envelope``,
    ``cloudevents``, ``cloudevents-structured``); ``source``: the CloudEvents source
    (None: ``/outboxer/<service>``).
    """

    service_name: str
    table_name: str
    topic: str
    group_id: str
    inbox: bool = False
    ordered: bool = False
    format: str = ENVELOPE
    source: str | None = None

    @property
    def destination(self) -> str:
        """Where the transport sends this route's messages (the ``topic`` key)."""
        return self.topic

    @property
    def group(self) -> str:
        """The consumer group that shares this route's messages (the ``group`` key)."""
        return self.group_id

    def __post_init__(self) -> None:
        validate_service_name(self.service_name)
        validate_table_name(self.table_name)
        validate_topic_name(self.topic, what="topic")
        validate_topic_name(self.group_id, what="group")
        validate_format(self.format)
        if self.source is not None:
            validate_source(self.source)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceOverride:
    """Per-service overrides from configuration (any key may be omitted)."""

    table: str | None = None
    topic: str | None = None
    group: str | None = None
    ordered: bool | None = None
    format: str | None = None
    source: str | None = None


def _join(prefix: str, *parts: str) -> str:
    return ".".join(p for p in (prefix, *parts) if p)


def default_route(service_name: str, topic_prefix: str = DEFAULT_TOPIC_PREFIX) -> ServiceRoute:
    """The route a service gets when nothing else is said about it.

    Table ``<name>_outbox_messages`` (``-`` becomes ``_``), topic ``<prefix>.<name>``,
    group ``<prefix>.<name>.consumer``.
    """
    table, topic, group = _default_names(service_name, topic_prefix)
    return ServiceRoute(service_name=service_name, table_name=table, topic=topic, group_id=group)


def _default_names(service_name: str, topic_prefix: str) -> tuple[str, str, str]:
    validate_service_name(service_name)
    return (
        service_name.replace("-", "_") + TABLE_SUFFIX,
        _join(topic_prefix, service_name),
        _join(topic_prefix, service_name, "consumer"),
    )


def _pick(*values: str | None) -> str:
    return next(v for v in values if v is not None)


def _override_key(service_name: str) -> str:
    # Environment variables cannot carry '-', and are case-insensitive in practice.
    return service_name.lower().replace("-", "_")


class RouteRegistry:
    """Event type -> service -> route, owned by the application.

    Precedence for a service's route, highest first: arguments given to
    :meth:`register_service`, configuration overrides, the default route.
    """

    def __init__(
        self,
        *,
        topic_prefix: str = DEFAULT_TOPIC_PREFIX,
        overrides: Mapping[str, ServiceOverride] | None = None,
    ) -> None:
        if topic_prefix:
            validate_topic_name(topic_prefix, what="topic prefix")
        self.topic_prefix = topic_prefix
        self._overrides = {_override_key(k): v for k, v in (overrides or {}).items()}
        self._routes: dict[str, ServiceRoute] = {}
        self._explicit: set[str] = set()
        """Services declared by register_service/register_inbox (not defaults)."""
        self.check: Callable[[ServiceRoute], None] | None = None
        """The transport's ``check_route``: every route built here passes it before it is
        registered (the ``Outbox`` sets it)."""
        self._events: dict[str, str] = {}
        self._lock = threading.Lock()

    def _build(
        self,
        name: str,
        table: str | None,
        topic: str | None,
        group: str | None,
        ordered: bool | None = None,
        inbox_of: str | None = None,
        wire: ServiceOverride | None = None,
    ) -> ServiceRoute:
        default_table, default_topic, default_group = _default_names(name, self.topic_prefix)
        if inbox_of is not None:
            # The consumer's own table and group: several apps consume one service.
            default_table = f"{inbox_of}_{name}".replace("-", "_") + INBOX_SUFFIX
            default_group = _join(self.topic_prefix, name, inbox_of)
        override = self._overrides.get(_override_key(name), ServiceOverride())
        for key, code_value, config_value in (
            ("table", table, override.table),
            ("topic", topic, override.topic),
            ("group", group, override.group),
        ):
            if code_value is not None and config_value is not None and code_value != config_value:
                logger.warning(
                    "service %s: %s %r given in code wins over %r from configuration",
                    name,
                    key,
                    code_value,
                    config_value,
                    extra={"service": name, "key": key},
                )
        route = ServiceRoute(
            service_name=name,
            table_name=_pick(table, override.table, default_table),
            topic=_pick(topic, override.topic, default_topic),
            group_id=_pick(group, override.group, default_group),
            inbox=inbox_of is not None,
            ordered=bool(ordered if ordered is not None else override.ordered),
            format=_pick(wire.format if wire else None, override.format, ENVELOPE),
            source=_pick(wire.source if wire else None, override.source, "") or None,
        )
        if self.check is not None:
            self.check(route)
        return route

    def register_service(
        self,
        name: str,
        *,
        table: str | None = None,
        topic: str | None = None,
        group: str | None = None,
        ordered: bool | None = None,
        format: str | None = None,
        source: str | None = None,
    ) -> ServiceRoute:
        """Declare a service and its route; the same declaration again is a no-op."""
        validate_service_name(name)
        wire = ServiceOverride(format=format, source=source)
        return self._declare(self._build(name, table, topic, group, ordered, wire=wire))

    def register_inbox(
        self,
        name: str,
        *,
        consumer: str,
        table: str | None = None,
        topic: str | None = None,
        group: str | None = None,
        ordered: bool | None = None,
        format: str | None = None,
    ) -> ServiceRoute:
        """Declare that this application (``consumer``) consumes service ``name``'s
        events, published from another database, into an inbox table of its own.

        Defaults: table ``<consumer>_<name>_inbox``, the service's default topic, group
        ``<prefix>.<name>.<consumer>`` (each consuming application has its own group).
        """
        validate_service_name(name)
        validate_service_name(consumer)
        wire = ServiceOverride(format=format)
        return self._declare(
            self._build(name, table, topic, group, ordered, inbox_of=consumer, wire=wire)
        )

    def _declare(self, route: ServiceRoute) -> ServiceRoute:
        name = route.service_name
        with self._lock:
            existing = self._routes.get(name)
            if existing is not None and existing != route and name in self._explicit:
                raise RouteConflictError(
                    f"service {name!r} is already registered with a different route",
                    service=name,
                    existing=existing,
                    requested=route,
                )
            self._check_table_unused(route)
            self._routes[name] = route  # replaces a default route taken on first use
            self._explicit.add(name)
        return route

    def _check_table_unused(self, route: ServiceRoute) -> None:
        for other in self._routes.values():
            if other.service_name != route.service_name and other.table_name == route.table_name:
                raise RouteConflictError(
                    f"table {route.table_name!r} is already used by service {other.service_name!r}",
                    service=route.service_name,
                    table=route.table_name,
                )

    def route_for_service(self, name: str) -> ServiceRoute:
        """The service's route, registering its default (plus overrides) on first use
        (a later register_service/register_inbox may still replace it)."""
        route = self._routes.get(name)
        if route is not None:
            return route
        validate_service_name(name)
        route = self._build(name, None, None, None)
        with self._lock:
            existing = self._routes.get(name)
            if existing is not None:
                return existing
            self._check_table_unused(route)
            self._routes[name] = route
        return route

    def register_event(self, event_type: str, service: str) -> ServiceRoute:
        """Make ``service`` the owner of ``event_type``.

        Registering it again to the same service is a no-op; to another service it
        raises :class:`EventServiceConflictError`.
        """
        event_type = validate_event_type(event_type)
        route = self.route_for_service(service)
        with self._lock:
            owner = self._events.get(event_type)
            if owner is not None and owner != service:
                raise EventServiceConflictError(
                    f"event type {event_type!r} already belongs to service {owner!r}",
                    event_type=event_type,
                    service=owner,
                    requested_service=service,
                )
            self._events[event_type] = service
        return route

    def resolve_event(self, event_type: str) -> ServiceRoute:
        """The route of the service owning ``event_type``."""
        event_type = validate_event_type(event_type)
        owner = self._events.get(event_type)
        if owner is None:
            raise EventNotRegisteredError(
                f"event type {event_type!r} is not registered to any service",
                event_type=event_type,
            )
        return self._routes[owner]

    def service_of(self, event_type: str) -> str | None:
        """The owning service's name, or ``None`` if the event type is unknown."""
        return self._events.get(event_type.strip())

    def routes(self) -> list[ServiceRoute]:
        """Every registered route, in registration order."""
        return list(self._routes.values())

    def select(self, services: Sequence[str] | None = None) -> list[ServiceRoute]:
        """The routes of ``services`` (every registered one when empty or None); an
        unknown name is a ConfigurationError listing the known ones."""
        if not services:
            return self.routes()
        chosen = []
        for name in services:
            route = self._routes.get(name)
            if route is None:
                known = ", ".join(self._routes) or "none"
                raise ConfigurationError(
                    f"unknown service {name!r}; registered services: {known}", service=name
                )
            chosen.append(route)
        return chosen

    def events_of(self, service: str) -> list[str]:
        """Event types owned by ``service``."""
        return [e for e, s in self._events.items() if s == service]
