"""The rules of a new row: every check and the encoding of an event, before any SQL.

:class:`RowBuilder` turns what ``publish`` (or an inbox) is given into the columns of
a new row, or refuses it with a typed error; nothing here touches the database.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from outboxer.backoff import RetryPolicy, check_max_retry
from outboxer.database.schema import MAX_EVENT_ID_CHARS, MAX_KEY_CHARS
from outboxer.envelope import DEFAULT_VERSION, JsonDefault, build_stored_envelope, encode_json
from outboxer.errors import ConfigurationError, InvalidEventError, PayloadNotSerializableError
from outboxer.routing import ServiceRoute, validate_event_type
from outboxer.settings import DEFAULT_SCHEDULE_HORIZON


def clean_key(key: object, event_type: str | None = None) -> str:
    """A message key trimmed and checked: a string of at most 255 characters with no
    control characters (C0, DEL, C1)."""
    if not isinstance(key, str):
        raise InvalidEventError(
            f"message key must be a string, got {type(key).__name__}", event_type=event_type
        )
    key = key.strip()
    if len(key) > MAX_KEY_CHARS:
        raise InvalidEventError(
            f"message key is longer than {MAX_KEY_CHARS} characters ({len(key)})",
            event_type=event_type,
        )
    if any(unicodedata.category(c) == "Cc" for c in key):
        raise InvalidEventError(
            f"message key {key[:40]!r} contains control characters", event_type=event_type
        )
    try:
        key.encode()
    except UnicodeEncodeError as exc:
        raise InvalidEventError(
            f"message key is not valid Unicode: {exc}", event_type=event_type
        ) from exc
    return key


def check_event_id(event_id: object) -> str:
    """An event id as given to ``cancel``: a non-empty string (trimmed, as publish
    stores it)."""
    if not isinstance(event_id, str) or not event_id.strip():
        raise InvalidEventError(f"event id must be a non-empty string, got {event_id!r}")
    if len(event_id.strip()) > MAX_EVENT_ID_CHARS:
        raise InvalidEventError(f"event id is longer than {MAX_EVENT_ID_CHARS} characters")
    return event_id.strip()


@dataclass(frozen=True, slots=True, kw_only=True)
class RowBuilder:
    """The rules of a new row: every check and the encoding, before any SQL."""

    policy: RetryPolicy
    strict_json: bool = True
    json_default: JsonDefault | None = None
    max_payload_bytes: int | None = None
    schedule_horizon: float = DEFAULT_SCHEDULE_HORIZON
    """Seconds ahead ``delay``/``deliver_at`` may schedule an event."""

    def schedule(
        self,
        delay: float | timedelta | None,
        deliver_at: datetime | None,
        event_type: str | None = None,
    ) -> dict[str, Any]:
        """The due time of a new row as insert parameters: ``{}`` (due now),
        ``{"_delay": seconds}`` (the database clock) or ``{"_at": utc_datetime}``."""
        if delay is not None and deliver_at is not None:
            raise InvalidEventError("give delay or deliver_at, not both", event_type=event_type)
        horizon = self.schedule_horizon
        if delay is not None:
            if isinstance(delay, timedelta):
                seconds = delay.total_seconds()
            elif isinstance(delay, int | float) and not isinstance(delay, bool):
                seconds = float(delay)
            else:
                raise InvalidEventError(
                    f"delay must be seconds or a timedelta, got {type(delay).__name__}",
                    event_type=event_type,
                )
            if not math.isfinite(seconds) or seconds < 0:
                raise InvalidEventError(
                    f"delay must be zero or more seconds, got {delay!r}", event_type=event_type
                )
            if seconds > horizon:
                raise InvalidEventError(
                    f"delay of {seconds:g} s is beyond the schedule horizon ({horizon:g} s)",
                    event_type=event_type,
                )
            return {"_delay": seconds} if seconds > 0 else {}
        if deliver_at is not None:
            if not isinstance(deliver_at, datetime):
                raise InvalidEventError(
                    f"deliver_at must be a datetime, got {type(deliver_at).__name__}",
                    event_type=event_type,
                )
            if deliver_at.tzinfo is None or deliver_at.utcoffset() is None:
                raise InvalidEventError(
                    f"deliver_at must be an aware datetime (with a time zone), got "
                    f"{deliver_at.isoformat()}",
                    event_type=event_type,
                )
            at = deliver_at.astimezone(UTC)
            ahead = (at - datetime.now(UTC)).total_seconds()
            if ahead > horizon:
                raise InvalidEventError(
                    f"deliver_at {at.isoformat()} is beyond the schedule horizon "
                    f"({horizon:g} s from now)",
                    event_type=event_type,
                )
            return {"_at": at} if ahead > 0 else {}  # a time already past: due now
        return {}

    def row(
        self, route: ServiceRoute, event_type: str, key: str, document: Any, max_retry: int
    ) -> dict[str, Any]:
        """The columns of a new row: ``document`` encoded (checked against the JSON and
        size rules) and the route's service and topic."""
        if document is None:
            raise PayloadNotSerializableError("payload is None", event_type=event_type)
        text = encode_json(
            document,
            strict=self.strict_json,
            json_default=self.json_default,
            max_bytes=self.max_payload_bytes,
            event_type=event_type,
        )
        return {
            "event_type": event_type,
            "service_name": route.service_name,
            "topic": route.topic,
            "message_key": key,
            "payload": text,
            "max_retry": max_retry,
        }

    def received(
        self,
        route: ServiceRoute,
        *,
        event_id: str,
        event_type: str,
        key: str,
        payload: Any,
        version: str,
        aggregate_id: str,
    ) -> dict[str, Any]:
        """The inbox row of an event received from another producer: stored as it
        came (no strictness or size rule: it was already accepted once), with its
        key made to fit the column."""
        if not event_id or len(event_id) > MAX_EVENT_ID_CHARS:
            raise InvalidEventError(
                f"event id must have 1 to {MAX_EVENT_ID_CHARS} characters", event_type=event_type
            )
        event_type = validate_event_type(event_type)
        document = build_stored_envelope(
            event_type=event_type,
            payload=payload,
            event_id=event_id,
            version=version or DEFAULT_VERSION,
            aggregate_id=aggregate_id or key,
        )
        text = encode_json(document, strict=False, json_default=self.json_default)
        fitted = "".join("?" if unicodedata.category(c) == "Cc" else c for c in key.strip())
        return {
            "event_type": event_type,
            "service_name": route.service_name,
            "topic": route.topic,
            "message_key": fitted[:MAX_KEY_CHARS],
            "payload": text,
            "max_retry": self.policy.max_retry,
            "event_id": event_id,
        }

    def event(
        self,
        route: ServiceRoute,
        event_type: str,
        payload: Any,
        *,
        key: str | None = None,
        aggregate_id: str | None = None,
        event_id: str | None = None,
        version: str | None = None,
        max_retry: int | None = None,
        delay: float | timedelta | None = None,
        deliver_at: datetime | None = None,
    ) -> dict[str, Any]:
        """The row of an event as ``publish`` writes it (``event_type`` already
        validated and routed to ``route``); the explicit event id in ``event_id``,
        the due time of a scheduled event in ``_delay``/``_at`` (see
        :meth:`schedule`)."""
        for name, value in (
            ("key", key),
            ("aggregate_id", aggregate_id),
            ("event_id", event_id),
            ("version", version),
        ):
            if value is not None and not isinstance(value, str):
                raise InvalidEventError(
                    f"{name} must be a string, got {type(value).__name__}", event_type=event_type
                )
        if max_retry is None:
            max_retry = self.policy.max_retry
        else:
            try:
                check_max_retry(max_retry)
            except ConfigurationError as exc:
                raise InvalidEventError(exc.message, event_type=event_type) from None
        event_id = event_id.strip() if event_id is not None and event_id.strip() else None
        resolved_key = clean_key(key or "", event_type) or event_id or event_type
        if event_id is not None:
            clean_key(event_id, event_type)
        due = self.schedule(delay, deliver_at, event_type)
        envelope = build_stored_envelope(
            event_type=event_type,
            payload=payload,
            event_id=event_id,
            version=(version or "").strip() or DEFAULT_VERSION,
            aggregate_id=(aggregate_id or "").strip() or resolved_key,
        )
        values = self.row(route, event_type, resolved_key, envelope, max_retry)
        values["event_id"] = event_id
        values.update(due)
        return values
