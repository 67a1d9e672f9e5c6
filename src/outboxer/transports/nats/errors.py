"""What nats-py's errors mean to the relay: permanent (the row ends dead) or
transient (the server's trouble: no attempt counted; a whole batch so is an outage)."""

from __future__ import annotations

from outboxer.transports.base import Delivery
from outboxer.transports.nats.client import js_errors, nats_errors

# JetStream API error codes that no resend can fix (the message's own fault).
# 10054: message size exceeds the stream's maximum; 10060: expected stream mismatch.
PERMANENT_API_CODES = frozenset({10054, 10060})

# Errors of the message itself: larger than the server's max_payload, a header or
# subject the protocol cannot carry.
PERMANENT = (nats_errors.MaxPayloadError, nats_errors.BadHeaderError, nats_errors.BadSubjectError)


def describe(exc: BaseException) -> str:
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}"


def is_permanent(exc: BaseException) -> bool:
    if isinstance(exc, PERMANENT):
        return True
    if isinstance(exc, js_errors.APIError):
        return exc.err_code in PERMANENT_API_CODES
    return False


def delivery_of(outbox_id: int, exc: BaseException) -> Delivery:
    """A failed publish: permanent when it is the message's fault, else transient
    (no responders, no stream, timed out, disconnected, storage full, ...)."""
    permanent = is_permanent(exc)
    return Delivery(outbox_id, error=describe(exc), permanent=permanent, transient=not permanent)


def stream_missing(exc: BaseException) -> bool:
    """The subject has no stream (a server that lost its store, a stream deleted)."""
    return isinstance(exc, js_errors.NoStreamResponseError | nats_errors.NoRespondersError)
