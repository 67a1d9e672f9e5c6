"""What outboxer writes to its log, and formatters for the process that shows it.

The library never configures logging. It logs with ``extra=`` fields (``service``,
``outbox_id``, ``event_type``, ``attempts``, ...) that :class:`JsonFormatter` turns
into one JSON object per line for log shippers, and :class:`ExtrasFormatter` appends
as ``key=value`` for people. ``outboxer run --log-format json|plain`` uses them; an
application that runs the loops itself can attach them to its own handlers.

A failed attempt is one WARNING line, a dead letter one ERROR line (id, event type,
attempts, the first line of the reason); the traceback goes to DEBUG and to the
row's ``last_error``, so a poison message costs one line per attempt, not a page.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from functools import partial
from typing import Any

RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
"""Attributes every LogRecord has; anything else on a record came from ``extra=``."""


def record_extras(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra=`` fields of ``record``."""
    return {k: v for k, v in vars(record).items() if k not in RECORD_FIELDS and k[:1] != "_"}


def first_line(text: str, limit: int = 300) -> str:
    """The first non-empty line of ``text``, at most ``limit`` characters."""
    for raw in text.splitlines():
        line = raw.strip()
        if line:
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return ""


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO-8601), ``level``, ``logger``,
    ``message``, every ``extra=`` field, and ``exc`` (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record_extras(record).items():
            doc.setdefault(key, value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        return json.dumps(doc, default=str, ensure_ascii=False)


class ExtrasFormatter(logging.Formatter):
    """The stock formatter, with the ``extra=`` fields appended as ``key=value``."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        extras = record_extras(record)
        if extras:
            text += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return text


def _log_attempt(
    level: int,
    template: str,
    logger: logging.Logger,
    *,
    service: str,
    outbox_id: int,
    event_type: str,
    attempts: int,
    reason: str,
    error: BaseException | None = None,
) -> None:
    fields = {
        "service": service,
        "outbox_id": outbox_id,
        "event_type": event_type,
        "attempts": attempts,
    }
    logger.log(level, template, outbox_id, event_type, attempts, first_line(reason), extra=fields)
    _debug_traceback(logger, error, fields)


# One WARNING line for a failed attempt, one ERROR line for a message that became a
# dead letter; the traceback at DEBUG (and in last_error), not a page per attempt.
log_retried = partial(
    _log_attempt, logging.WARNING, "event %s (%s) failed attempt %d; will retry: %s"
)
log_dead = partial(_log_attempt, logging.ERROR, "event %s (%s) is dead after %d attempt(s): %s")


def _debug_traceback(
    logger: logging.Logger, error: BaseException | None, fields: dict[str, Any]
) -> None:
    if error is not None and logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "traceback of event %s's failure", fields["outbox_id"], exc_info=error, extra=fields
        )
