"""Prometheus metrics scraped over HTTP and parsed; a trace from publish to handler;
one log line per failed attempt or dead letter."""

from __future__ import annotations

import json
import logging
import urllib.request
import uuid
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session

from outboxer import Envelope, Observer, Outbox
from outboxer.logs import JsonFormatter
from outboxer.metrics import PrometheusMetrics
from outboxer.testing import InMemoryTransport, drain
from outboxer.tracing import Tracing
from tests.helpers import drop_tables, isolated_settings, make_outbox


def _outbox(db_url: str, service: str, **kw: Any) -> Outbox:
    ob = Outbox(
        db_url,
        transport=InMemoryTransport(),
        settings=isolated_settings(retry_unit=0.01, poll_interval=0.05, topic_prefix="t"),
        **kw,
    )
    ob.register_event(f"{service}.ok", service)
    ob.register_event(f"{service}.poison", service)
    ob.migrate()
    return ob


def _scrape(port: int) -> dict[str, list[Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _value(families: dict[str, list[Any]], sample: str, **labels: str) -> float:
    for samples in families.values():
        for s in samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {sample} {labels}")


async def test_metrics_endpoint_is_scraped_and_parsed(db_url: str, service: str) -> None:
    ob = _outbox(db_url, service)
    metrics = PrometheusMetrics(ob.admin, min_interval=0)
    ob.add_observer(metrics)

    @ob.handler(f"{service}.ok")
    def ok(event: Envelope, tx: Session) -> None:
        pass

    @ob.handler(f"{service}.poison")
    def poison(event: Envelope, tx: Session) -> None:
        raise RuntimeError("poison pill")

    with ob.db.sync_engine.begin() as conn:
        for i in range(5):
            ob.publish(conn, f"{service}.ok", {"i": i})
        ob.publish(conn, f"{service}.poison", {}, max_retry=2)
        ob.publish(conn, f"{service}.ok", {"late": True})
        ob.publish(conn, f"{service}.ok", {"tomorrow": True}, delay=86400)
    server = metrics.serve(0, "127.0.0.1")
    try:
        before = _scrape(server.port)
        assert _value(before, "outboxer_messages", service=service, status="pending") == 8
        assert _value(before, "outboxer_messages_due", service=service) == 7
        assert _value(before, "outboxer_messages_scheduled", service=service) == 1
        assert _value(before, "outboxer_oldest_due_age_seconds", service=service) >= 0
        assert _value(before, "outboxer_database_up") == 1
        assert _value(before, "outboxer_events_published_total", service=service) == 8

        await drain(ob)
        after = _scrape(server.port)
    finally:
        server.close()
    assert _value(after, "outboxer_messages", service=service, status="consumed") == 6
    assert _value(after, "outboxer_messages", service=service, status="dead") == 1
    assert _value(after, "outboxer_messages_due", service=service) == 0
    assert _value(after, "outboxer_messages_scheduled", service=service) == 1
    assert _value(after, "outboxer_messages_sent_total", service=service) >= 7
    assert _value(after, "outboxer_messages_consumed_total", service=service) == 6
    assert _value(after, "outboxer_messages_retried_total", service=service, stage="handler") == 1
    assert _value(after, "outboxer_messages_dead_total", service=service) == 1
    handled = _value(
        after,
        "outboxer_handler_duration_seconds_count",
        service=service,
        event_type=f"{service}.ok",
        outcome="ok",
    )
    # Every call is timed: the fast path runs a batch's handlers again (isolated) after
    # the poison failed, so the successful calls may outnumber the six events.
    assert handled >= 6
    assert _value(after, "outboxer_commit_to_handler_seconds_count", service=service) == 8
    assert _value(after, "outboxer_relay_batch_size_count", service=service) >= 1
    assert _value(after, "outboxer_relay_round_duration_seconds_count", service=service) >= 1
    drop_tables(ob)
    await ob.aclose()


def test_metrics_report_an_unreachable_database(tmp_path: Any) -> None:
    ob = Outbox("postgresql+psycopg://nobody@127.0.0.1:1/none", settings=isolated_settings())
    ob.register_service("x")
    metrics = PrometheusMetrics(ob.admin)
    server = metrics.serve(0, "127.0.0.1")
    try:
        assert _value(_scrape(server.port), "outboxer_database_up") == 0
    finally:
        server.close()
        ob.close()


@pytest.fixture
def spans() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _by_name(finished: tuple[ReadableSpan, ...], prefix: str) -> ReadableSpan:
    [span] = [s for s in finished if s.name.startswith(prefix)]
    return span


def _parent(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


@pytest.mark.parametrize("sync_handler", [True, False])
async def test_a_trace_crosses_publish_relay_and_handler(
    db_url: str,
    service: str,
    spans: tuple[TracerProvider, InMemorySpanExporter],
    sync_handler: bool,
) -> None:
    provider, exporter = spans
    ob = _outbox(db_url, service, observers=[Tracing(tracer_provider=provider)])
    tracer = provider.get_tracer("test")
    inside: list[Any] = []

    def note() -> None:
        inside.append(trace.get_current_span().get_span_context())
        with tracer.start_as_current_span("handler work"):
            pass

    if sync_handler:

        @ob.handler(f"{service}.ok")
        def handle(event: Envelope, tx: Session) -> None:
            note()

    else:

        @ob.handler(f"{service}.ok")
        async def handle_async(event: Envelope, tx: Any) -> None:
            note()

    with tracer.start_as_current_span("request") as request, ob.db.sync_engine.begin() as conn:
        oid = ob.publish(conn, f"{service}.ok", {"order": 1})
    row = ob.store(service).get_by_id(oid)
    assert row is not None
    assert "traceparent" in row.header_map()

    transport = ob.transport
    assert isinstance(transport, InMemoryTransport)
    await drain(ob)
    [sent] = transport.messages()
    assert "traceparent" in sent.headers

    finished = exporter.get_finished_spans()
    publish = _by_name(finished, "publish ")
    send = _by_name(finished, "send ")
    process = _by_name(finished, "process ")
    work = _by_name(finished, "handler work")
    trace_id = request.get_span_context().trace_id
    assert {s.context.trace_id for s in (publish, send, process, work)} == {trace_id}
    assert _parent(publish) == request.get_span_context().span_id
    assert _parent(send) == publish.context.span_id
    assert _parent(process) == send.context.span_id
    assert _parent(work) == process.context.span_id
    assert inside[0].span_id == process.context.span_id
    assert process.attributes is not None
    assert process.attributes["messaging.message.id"] == str(oid)
    # The header on the wire names the send span.
    assert sent.headers["traceparent"].decode().split("-")[2] == f"{send.context.span_id:016x}"
    drop_tables(ob)
    await ob.aclose()


async def test_a_failing_handler_marks_its_span_as_an_error(
    db_url: str, service: str, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    ob = _outbox(db_url, service, observers=[Tracing(tracer_provider=provider)])

    @ob.handler(f"{service}.poison")
    async def poison(event: Envelope, tx: Any) -> None:
        raise RuntimeError("poison pill")

    with ob.db.sync_engine.begin() as conn:
        ob.publish(conn, f"{service}.poison", {}, max_retry=1)
    await drain(ob)
    process = _by_name(exporter.get_finished_spans(), "process ")
    assert not process.status.is_ok
    assert any(e.name == "exception" for e in process.events)
    drop_tables(ob)
    await ob.aclose()


async def test_failed_attempts_and_dead_letters_log_one_line_each(
    db_url: str, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    ob = _outbox(db_url, service)

    @ob.handler(f"{service}.poison")
    async def poison(event: Envelope, tx: Any) -> None:
        raise RuntimeError("poison pill\nsecond line of the message")

    with ob.db.sync_engine.begin() as conn:
        oid = ob.publish(conn, f"{service}.poison", {}, max_retry=3)
    with caplog.at_level(logging.INFO, logger="outboxer"):
        await drain(ob)
    mine = [r for r in caplog.records if getattr(r, "outbox_id", None) == oid]
    assert [r.levelname for r in mine] == ["WARNING", "WARNING", "ERROR"]
    assert all(r.exc_info is None for r in mine)
    dead = mine[-1]
    assert dead.getMessage() == (
        f"event {oid} ({service}.poison) is dead after 3 attempt(s): RuntimeError: poison pill"
    )
    assert (dead.service, dead.event_type, dead.attempts) == (service, f"{service}.poison", 3)
    doc = json.loads(JsonFormatter().format(dead))
    assert doc["level"] == "ERROR"
    assert (doc["service"], doc["outbox_id"], doc["event_type"]) == (
        service,
        oid,
        f"{service}.poison",
    )
    # The full traceback is kept in the row.
    row = ob.store(service).get_by_id(oid)
    assert row is not None
    assert row.last_error is not None
    assert "Traceback" not in row.last_error.splitlines()[0]
    assert "second line of the message" in row.last_error
    drop_tables(ob)
    await ob.aclose()


def test_publish_many_mixes_rows_with_and_without_a_trace(db_url: str) -> None:
    """Rows of one publish_many statement bind the same columns whether or not a
    propagation header was injected for each."""
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    class EverySecond(Observer):
        def __init__(self) -> None:
            self.seen = 0

        def inject_context(self, service: str, event_type: str, carrier: dict[str, str]) -> None:
            self.seen += 1
            if self.seen % 2 == 0:
                carrier["traceparent"] = traceparent

    ob = make_outbox(db_url, observers=[EverySecond()])
    service = f"svc_{uuid.uuid4().hex[:8]}"
    ob.register_event(f"{service}.e", service)
    ob.migrate()
    try:
        with ob.db.sync_engine.begin() as conn:
            ids = ob.publish_many(conn, [(f"{service}.e", {"n": n}) for n in range(2)])
        first, second = (ob.store(service).get_by_id(i) for i in ids)
        assert first is not None
        assert second is not None
        assert first.headers is None
        assert second.headers == f'{{"traceparent":"{traceparent}"}}'  # kept, not dropped
    finally:
        drop_tables(ob)
        ob.close()
