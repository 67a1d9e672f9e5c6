"""OpenTelemetry tracing (``pip install 'outboxer[otel]'``).

:class:`Tracing` is an observer that carries the caller's trace across the outbox:

1. ``publish()`` starts a ``publish <event type>`` span (child of whatever span is
   current, e.g. the web request) and stores its context with the row (the
   ``headers`` column: W3C ``traceparent``, ``tracestate``, ``baggage``);
2. the relay starts a ``send <event type>`` span, child of that stored context, and
   sends its context as message headers (Kafka headers, or in-process);
3. the consumer runs the handler inside a ``process <event type>`` span that
   continues the context found in the message headers; the handler's own spans
   (database calls, HTTP) nest under it.

So one trace shows request -> publish -> send -> process. Only the OpenTelemetry
API is needed here; the application configures the SDK (exporters, sampling) as
usual, and without an SDK every span is a no-op::

    outbox = Outbox(url, observers=[Tracing()])
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any

from outboxer.hooks import Observer

try:
    from opentelemetry import propagate, trace
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.trace import SpanKind, TracerProvider
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "outboxer's tracing needs opentelemetry-api: pip install 'outboxer[otel]'"
    ) from exc

SYSTEM = "outboxer"


class Tracing(Observer):
    """Propagates the trace context from ``publish`` through the relay to the handler.

    ``tracer_provider`` defaults to the global one; ``propagator`` to the global text
    map propagator (W3C trace context and baggage unless ``OTEL_PROPAGATORS`` says
    otherwise).
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        self._tracer = trace.get_tracer("outboxer", tracer_provider=tracer_provider)
        self._propagator = propagator

    @property
    def propagator(self) -> TextMapPropagator:
        return self._propagator or propagate.get_global_textmap()

    def inject_context(self, service: str, event_type: str, carrier: dict[str, str]) -> None:
        with self._tracer.start_as_current_span(
            f"publish {event_type}",
            kind=SpanKind.PRODUCER,
            attributes=_attributes(service, event_type, "create"),
        ):
            self.propagator.inject(carrier)

    def message_sending(
        self, service: str, outbox_id: int, event_type: str, headers: dict[str, str]
    ) -> None:
        parent = self.propagator.extract(headers)
        span = self._tracer.start_span(
            f"send {event_type}",
            context=parent,
            kind=SpanKind.PRODUCER,
            attributes={
                **_attributes(service, event_type, "send"),
                "messaging.message.id": str(outbox_id),
            },
        )
        try:
            self.propagator.inject(headers, context=trace.set_span_in_context(span))
        finally:
            span.end()

    def handler_context(
        self, service: str, event: Any, headers: Mapping[str, bytes]
    ) -> AbstractContextManager[Any] | None:
        carrier = {k: v.decode("utf-8", "replace") for k, v in headers.items()}
        return self._tracer.start_as_current_span(
            f"process {event.event_type}",
            context=self.propagator.extract(carrier),
            kind=SpanKind.CONSUMER,
            attributes={
                **_attributes(service, event.event_type, "process"),
                "messaging.message.id": str(event.outbox_id),
            },
        )


def _attributes(service: str, event_type: str, operation: str) -> dict[str, str]:
    return {
        "messaging.system": SYSTEM,
        "messaging.operation.type": operation,
        "messaging.destination.name": service,
        "outboxer.service": service,
        "outboxer.event_type": event_type,
    }
