"""Hooks: what the relay, the consumers, ``publish`` and the web console report, and
who listens.

The loops call one :class:`Hooks` object; it passes each report to every
:class:`Observer` attached to it. An observer subclasses :class:`Observer` and
overrides the methods it cares about (the rest do nothing): :class:`Stats` (the
in-process counters behind ``Outbox.stats``) is one, and metrics or tracing
exporters are others. Reports are made per batch where possible, so the hot path
pays one call per batch, not per message.

An observer must be quick and must not raise: an exception from it is logged (with
its traceback) and otherwise ignored, so a broken exporter never stops delivery.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

logger = logging.getLogger(__name__)


class Observer:
    """Base class of everything that listens to the loops (every method a no-op)."""

    def wants(self, name: str) -> bool:
        """True when this observer overrides report ``name``, so a loop can skip
        preparing a per-message report nobody listens to."""
        default = getattr(Observer, name)
        return getattr(type(self), name, default) is not default

    # ---------------------------------------------------------------- publish

    def event_published(self, service: str, event_type: str, tx: Any) -> None:
        """``publish`` wrote an event on the caller's transaction ``tx`` (not yet
        committed: it may still roll back)."""

    # ---------------------------------------------------------------- relay

    def batch_claimed(self, service: str, due: int, redelivered: int) -> None:
        """A relay claimed ``due`` due rows and ``redelivered`` published rows nobody
        consumed (sent again)."""

    def batch_sent(self, service: str, sent: int, published: int, seconds: float) -> None:
        """``sent`` messages were acknowledged by the transport (or handed over
        in-process) in ``seconds``; ``published`` rows were marked published."""

    def batch_failed(self, service: str, failed: int, dead: int, reason: str) -> None:
        """The transport refused messages: ``failed`` will be retried, ``dead`` never
        can be (``reason`` is the first error)."""

    def resend_failed(self, service: str, count: int, reason: str) -> None:
        """Sending published rows again failed; they stay published (no attempt is
        counted: a copy was delivered before) and are tried again later."""

    def rows_undecodable(self, service: str, count: int) -> None:
        """Stored rows whose envelope cannot be decoded were marked dead."""

    def relay_round(self, service: str, claimed: int, seconds: float) -> None:
        """One relay round (claim, send, mark) took ``seconds``."""

    # ---------------------------------------------------------------- consumer

    def messages_received(self, service: str, count: int) -> None:
        """A consumer received a batch of ``count`` messages."""

    def messages_skipped(self, service: str, reason: str, count: int) -> None:
        """Messages not handled: ``undecodable``, ``no_outbox_id``, ``busy`` (another
        worker is handling them now), or ``settled``
        (missing row, already consumed or dead, a duplicate, another event's id)."""

    def messages_consumed(self, service: str, count: int) -> None:
        """Messages consumed (their handlers' effects committed with the mark)."""

    def message_retried(self, service: str, outbox_id: int, attempts: int, error: str) -> None:
        """A failed attempt; the message will be delivered again after its backoff."""

    def message_dead(self, service: str, outbox_id: int, attempts: int, reason: str) -> None:
        """A message became a dead letter after ``attempts`` attempts."""

    def worker_crashed(self, service: str, outbox_id: int, event_type: str) -> None:
        """A delivery found that the worker process died while handling this message
        alone (its mark was left behind); one attempt was charged to it (reported
        with ``message_retried`` or ``message_dead`` too)."""

    def handler_finished(
        self, service: str, event_type: str, seconds: float, error: BaseException | None
    ) -> None:
        """A handler returned (``error`` None) or raised, after ``seconds``."""

    def event_latency(self, service: str, event_type: str, seconds: float) -> None:
        """An event's handler starts ``seconds`` after the event was written (its
        ``created_at``, the database clock at ``publish``, close to its commit)."""

    # ---------------------------------------------------------------- both

    def loop_error(self, service: str, loop: str, error: BaseException) -> None:
        """A whole round of a ``relay``, ``consumer`` or ``sweeper`` loop failed; it
        will retry."""

    def outage_started(self, service: str, reason: str) -> None:
        """The transport (broker) became unusable as a whole for ``service``: the
        relay backs off without spending attempts. Reported once per outage."""

    def outage_ended(self, service: str, seconds: float) -> None:
        """The outage reported by :meth:`outage_started` ended after ``seconds``."""

    # ---------------------------------------------------------------- retention

    def rows_purged(self, service: str, status: str, count: int) -> None:
        """The retention sweep deleted ``count`` rows of ``status``."""

    # ---------------------------------------------------------------- web console

    def sign_in_failed(self, client: str, method: str) -> None:
        """The web console refused a wrong token from ``client`` (an address);
        ``method`` is ``form`` (the sign-in page) or ``bearer`` (a header)."""

    def sign_in_locked(self, client: str, seconds: float) -> None:
        """The web console locked sign-ins from ``client`` out for ``seconds`` after
        failures in a row (it answers 429 until then)."""

    # ---------------------------------------------------------------- propagation
    # These three may change what travels with an event (tracing); the others only
    # report.

    def inject_context(self, service: str, event_type: str, carrier: dict[str, str]) -> None:
        """``publish`` is writing an event: add propagation fields (a W3C
        ``traceparent``) to ``carrier``. They are stored with the row (``headers``)
        and sent with the message as headers."""

    def message_sending(
        self, service: str, outbox_id: int, event_type: str, headers: dict[str, str]
    ) -> None:
        """The relay is about to send a row; ``headers`` holds what was stored at
        ``publish`` and may be changed (to continue the trace from this send)."""

    def handler_context(
        self, service: str, event: Any, headers: Mapping[str, bytes]
    ) -> AbstractContextManager[Any] | None:
        """A context manager the handler of ``event`` (an :class:`Envelope`) runs
        inside, e.g. a span continuing the trace in the message ``headers``; or None."""
        return None


_METHODS = tuple(
    name
    for name, value in vars(Observer).items()
    if callable(value) and not name.startswith("_") and name not in ("handler_context", "wants")
)


class Hooks(Observer):
    """Passes every report to the attached observers, in the order they were added.

    Calls go straight to the observers' own methods, and only to the observers that
    override a report (their class or the instance defines it; a nested
    :class:`Hooks` always hears everything): a report nobody listens to costs one
    empty loop, whatever the number of observers.
    """

    def __init__(self, observers: Iterable[Observer] = ()) -> None:
        self._observers: list[Observer] = []
        self._listeners: dict[str, list[Observer]] = {name: [] for name in _METHODS}
        for observer in observers:
            self.add(observer)

    def add(self, observer: Observer) -> None:
        if not isinstance(observer, Observer):
            raise TypeError(f"an observer must subclass outboxer.hooks.Observer: {observer!r}")
        self._set([*self._observers, observer])  # copy: safe while reporting

    def remove(self, observer: Observer) -> None:
        self._set([o for o in self._observers if o is not observer])

    def _set(self, observers: list[Observer]) -> None:
        self._listeners = {name: [o for o in observers if _listens(o, name)] for name in _METHODS}
        self._observers = observers

    @property
    def observers(self) -> tuple[Observer, ...]:
        return tuple(self._observers)

    def wants(self, name: str) -> bool:
        """True when an attached observer overrides report ``name``."""
        return any(o.wants(name) for o in self._observers)

    def handler_context(
        self, service: str, event: Any, headers: Mapping[str, bytes]
    ) -> AbstractContextManager[Any] | None:
        contexts = []
        for observer in self._observers:
            try:
                cm = observer.handler_context(service, event, headers)
            except Exception:
                logger.exception("observer %r failed in handler_context", observer)
                continue
            if cm is not None:
                contexts.append((observer, cm))
        return _Contexts(contexts) if contexts else None


class _Contexts(AbstractContextManager[None]):
    """Observers' handler contexts entered in order, exited in reverse; their own
    errors are logged, never raised, and a handler's exception is never swallowed."""

    def __init__(self, contexts: list[tuple[Observer, AbstractContextManager[Any]]]) -> None:
        self._contexts = contexts
        self._entered: list[tuple[Observer, AbstractContextManager[Any]]] = []

    def __enter__(self) -> None:
        for observer, cm in self._contexts:
            try:
                cm.__enter__()
            except Exception:
                logger.exception("observer %r failed entering handler_context", observer)
                continue
            self._entered.append((observer, cm))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for observer, cm in reversed(self._entered):
            try:
                cm.__exit__(exc_type, exc, tb)
            except Exception:
                logger.exception("observer %r failed leaving handler_context", observer)
        self._entered = []


def _listens(observer: Observer, name: str) -> bool:
    return (
        isinstance(observer, Hooks)
        or observer.wants(name)
        or name in getattr(observer, "__dict__", ())
    )


def _fan_out(name: str) -> Any:
    def report(self: Hooks, *args: Any) -> None:
        for observer in self._listeners[name]:
            try:
                getattr(observer, name)(*args)
            except Exception:
                logger.exception("observer %r failed in %s", observer, name)

    report.__name__ = name
    report.__doc__ = getattr(Observer, name).__doc__
    return report


for _name in _METHODS:
    setattr(Hooks, _name, _fan_out(_name))


class LogReports(Observer):
    """Logs what no loop logs itself: an outage once when it starts (ERROR) and once
    when it ends (INFO), whatever the number of messages waiting. Attached to every
    :class:`~outboxer.Outbox`."""

    def outage_started(self, service: str, reason: str) -> None:
        logger.error(
            "outage: the transport is unusable for service %s; relaying waits without "
            "spending attempts: %s",
            service,
            reason,
            extra={"service": service},
        )

    def outage_ended(self, service: str, seconds: float) -> None:
        logger.info(
            "outage over for service %s after %.1fs; relaying resumes",
            service,
            seconds,
            extra={"service": service, "outage_seconds": round(seconds, 3)},
        )


@dataclass
class Stats(Observer):
    """Per-service counters of this process; ``totals()`` sums them over services.

    relay: ``claimed``, ``redelivered``, ``sent``, ``published``, ``send_failed``,
    ``send_dead``, ``redeliver_failed``, ``undecodable_rows``. consumer: ``received``, ``consumed``,
    ``retried``, ``dead``, ``skipped`` (already consumed/dead, missing row,
    duplicate), ``undecodable``, ``no_outbox_id``, ``handler_errors``. publish:
    ``published_events``. ``dead`` counts every message that became a dead letter
    (after failed handler attempts, or failed sends that used up ``max_retry``).
    ``outages``; retention: ``purged_consumed``, ``purged_published``, ``purged_dead``.
    """

    by_service: dict[str, Counter[str]] = field(default_factory=dict)

    def add(self, service: str, name: str, n: int = 1) -> None:
        if n:
            counter = self.by_service.get(service)
            if counter is None:
                counter = self.by_service[service] = Counter()
            counter[name] += n

    def get(self, name: str, service: str | None = None) -> int:
        if service is not None:
            return self.by_service.get(service, Counter())[name]
        return sum(c[name] for c in self.by_service.values())

    def totals(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for c in self.by_service.values():
            total.update(c)
        return total

    # -- as an observer

    def event_published(self, service: str, event_type: str, tx: Any) -> None:
        self.add(service, "published_events")

    def batch_claimed(self, service: str, due: int, redelivered: int) -> None:
        self.add(service, "claimed", due)
        self.add(service, "redelivered", redelivered)

    def batch_sent(self, service: str, sent: int, published: int, seconds: float) -> None:
        self.add(service, "sent", sent)
        self.add(service, "published", published)

    def batch_failed(self, service: str, failed: int, dead: int, reason: str) -> None:
        self.add(service, "send_failed", failed)
        self.add(service, "send_dead", dead)

    def resend_failed(self, service: str, count: int, reason: str) -> None:
        self.add(service, "redeliver_failed", count)

    def rows_undecodable(self, service: str, count: int) -> None:
        self.add(service, "undecodable_rows", count)

    def messages_received(self, service: str, count: int) -> None:
        self.add(service, "received", count)

    def messages_skipped(self, service: str, reason: str, count: int) -> None:
        self.add(service, "skipped" if reason == "settled" else reason, count)

    def messages_consumed(self, service: str, count: int) -> None:
        self.add(service, "consumed", count)

    def message_retried(self, service: str, outbox_id: int, attempts: int, error: str) -> None:
        self.add(service, "retried")

    def message_dead(self, service: str, outbox_id: int, attempts: int, reason: str) -> None:
        self.add(service, "dead")

    def worker_crashed(self, service: str, outbox_id: int, event_type: str) -> None:
        self.add(service, "crashes")

    def handler_finished(
        self, service: str, event_type: str, seconds: float, error: BaseException | None
    ) -> None:
        if error is not None:
            self.add(service, "handler_errors")

    def outage_started(self, service: str, reason: str) -> None:
        self.add(service, "outages")

    def rows_purged(self, service: str, status: str, count: int) -> None:
        self.add(service, f"purged_{status}", count)
