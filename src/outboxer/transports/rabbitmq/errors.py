"""What aio-pika's errors mean to the relay: permanent (the message's own fault: the
row ends dead), transient (the broker's trouble: no attempt counted; a whole batch so
is an outage), and whether the connection must be rebuilt before the next call."""

from __future__ import annotations

import asyncio
import re

from outboxer.transports.base import Delivery
from outboxer.transports.rabbitmq.client import amqp_errors

_TOO_LARGE = re.compile(r"larger than configured max size (\d+)")


def describe(exc: BaseException) -> str:
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}"


def needs_rebuild(exc: BaseException) -> bool:
    """Whether the channel or the connection is unusable after ``exc``."""
    return not isinstance(exc, amqp_errors.PublishError | amqp_errors.DeliveryError)


def broker_max_size(exc: BaseException) -> int | None:
    """The broker's ``max_message_size`` when ``exc`` is the channel it closed for a
    message larger than that (``PRECONDITION_FAILED``)."""
    found = _TOO_LARGE.search(str(exc))
    return int(found.group(1)) if found else None


def delivery_of(outbox_id: int, exc: BaseException, size: int) -> Delivery:
    """The Delivery of a message whose publish raised ``exc``.

    A return (``mandatory``: no queue bound for its lane) and a nack are the broker's
    trouble; so are a closed channel or connection and a confirm that did not come.
    Only a message larger than the broker's limit is the message's own fault."""
    if isinstance(exc, amqp_errors.PublishError):
        error = (
            "returned by the broker: no queue bound for its lane (has no consumer group "
            f"subscribed yet?): {describe(exc)}"
        )
    elif isinstance(exc, amqp_errors.DeliveryError):
        error = f"nacked by the broker: {describe(exc)}"
    elif isinstance(exc, asyncio.TimeoutError | TimeoutError):
        error = "no publisher confirm before the timeout"
    else:
        error = describe(exc)
    limit = broker_max_size(exc)
    if limit is not None and size > limit:
        return Delivery(outbox_id, error=error, permanent=True)
    return Delivery(outbox_id, error=error, transient=True)
