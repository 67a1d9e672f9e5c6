"""Prometheus metrics (``pip install 'outboxer[prometheus]'``).

:class:`PrometheusMetrics` is an observer of the loops (counters and histograms of
what this process did) and a collector of the outbox tables (backlog gauges read
from the database when Prometheus scrapes, at most every ``min_interval`` seconds).
``outboxer run --metrics-port 9108`` attaches one and serves ``/metrics``; in your
own process::

    metrics = PrometheusMetrics(outbox.admin)
    outbox.add_observer(metrics)
    metrics.serve(9108)          # or pass registry=prometheus_client.REGISTRY

Metric names follow Prometheus conventions (``_total`` counters, ``_seconds``
durations, base units); every series has a ``service`` label.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from outboxer.admin import Admin
from outboxer.hooks import Observer
from outboxer.models import ServiceStatus
from outboxer.routing import ServiceRoute

try:
    from prometheus_client import (
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        ProcessCollector,
        start_http_server,
    )
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "outboxer's Prometheus metrics need prometheus-client: pip install 'outboxer[prometheus]'"
    ) from exc

logger = logging.getLogger(__name__)

DEFAULT_PORT = 9108
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)


@dataclass
class MetricsServer:
    """The HTTP server of :meth:`PrometheusMetrics.serve`."""

    port: int
    addr: str
    _httpd: Any
    _thread: threading.Thread

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


BLOCKED_KEYS_COUNTED = 1000
"""The blocked keys gauge counts at most this many keys per ordered service."""


class _Backlog(Collector):
    """Backlog gauges read from the database at scrape time (cached ``min_interval``)."""

    def __init__(self, admin: Admin, services: Sequence[str] | None, min_interval: float) -> None:
        self.admin = admin
        self.services = services
        self.min_interval = min_interval
        self._lock = threading.Lock()
        self._cached: tuple[float, list[GaugeMetricFamily]] | None = None

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []  # read at scrape time only; nothing to check at registration

    def collect(self) -> Iterable[GaugeMetricFamily]:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self.min_interval:
                self._cached = (now, self._read())
            return list(self._cached[1])

    def _read(self) -> list[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "outboxer_database_up", "1 when the last read of the outbox tables worked"
        )
        rows = GaugeMetricFamily(
            "outboxer_messages", "Rows in the outbox table by status", labels=["service", "status"]
        )
        due = GaugeMetricFamily(
            "outboxer_messages_due", "Rows due to be sent now", labels=["service"]
        )
        scheduled = GaugeMetricFamily(
            "outboxer_messages_scheduled",
            "Rows published for later whose time has not come (not due, not a backlog)",
            labels=["service"],
        )
        oldest = GaugeMetricFamily(
            "outboxer_oldest_due_age_seconds",
            "How long the oldest due row has been due (0: nothing due)",
            labels=["service"],
        )
        migrated = GaugeMetricFamily(
            "outboxer_table_present", "1 when the service's outbox table exists", labels=["service"]
        )
        try:
            found = self.admin.status(self.services)
        except Exception:
            logger.warning("metrics: cannot read the outbox tables", exc_info=True)
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        for route, st in found:
            service = route.service_name
            migrated.add_metric([service], 0 if st is None else 1)
            if st is None:
                continue
            for status, n in st.counts.items():
                rows.add_metric([service, status], n)
            due.add_metric([service], st.due)
            scheduled.add_metric([service], st.scheduled)
            oldest.add_metric([service], st.oldest_due_seconds or 0.0)
        return [up, migrated, rows, due, scheduled, oldest, *self._blocked(found)]

    def _blocked(self, found: list[tuple[ServiceRoute, ServiceStatus | None]]) -> list[Any]:
        ordered = [r.service_name for r, st in found if r.ordered and st is not None]
        if not ordered:
            return []
        blocked = GaugeMetricFamily(
            "outboxer_blocked_keys",
            "Keys of an ordered service held back, by what holds them (failing, dead, "
            f"parked; counted up to {BLOCKED_KEYS_COUNTED} per service)",
            labels=["service", "by"],
        )
        try:
            keys = self.admin.blocked_keys(ordered, limit=BLOCKED_KEYS_COUNTED)
        except Exception:
            logger.warning("metrics: cannot read the blocked keys", exc_info=True)
            return []
        counts = {(s, by): 0 for s in ordered for by in ("failing", "dead", "parked")}
        for b in keys:
            counts[(b.service_name, b.by)] += 1
        for (service, by), n in sorted(counts.items()):
            blocked.add_metric([service, by], n)
        return [blocked]


class PrometheusMetrics(Observer):
    """Counters and histograms of this process, and backlog gauges of the tables.

    ``admin`` (``outbox.admin``) enables the backlog gauges; ``registry`` defaults to a
    registry of its own (with process metrics), so several outboxes in one test
    process do not collide; pass ``prometheus_client.REGISTRY`` to join your app's.
    """

    def __init__(
        self,
        admin: Admin | None = None,
        *,
        registry: CollectorRegistry | None = None,
        services: Sequence[str] | None = None,
        min_interval: float = 5.0,
    ) -> None:
        own = registry is None
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        if own:
            ProcessCollector(registry=self.registry)
        r = self.registry
        by_service = ["service"]
        self.published = Counter(
            "outboxer_events_published",
            "Events written by publish() in this process (counted before the commit)",
            by_service,
            registry=r,
        )
        self.claimed = Counter(
            "outboxer_messages_claimed", "Due rows claimed by relays", by_service, registry=r
        )
        self.redelivered = Counter(
            "outboxer_messages_redelivered",
            "Published rows nobody consumed, sent again",
            by_service,
            registry=r,
        )
        self.sent = Counter(
            "outboxer_messages_sent",
            "Messages acknowledged by the transport (or handed over in-process)",
            by_service,
            registry=r,
        )
        self.consumed = Counter(
            "outboxer_messages_consumed", "Messages consumed by handlers", by_service, registry=r
        )
        self.retried = Counter(
            "outboxer_messages_retried",
            "Failed attempts that will be retried (stage: send or handler)",
            ["service", "stage"],
            registry=r,
        )
        self.dead = Counter(
            "outboxer_messages_dead", "Messages that became dead letters", by_service, registry=r
        )
        self.crashes = Counter(
            "outboxer_worker_crashes",
            "Messages found to have killed the worker process handling them alone",
            by_service,
            registry=r,
        )
        self.skipped = Counter(
            "outboxer_messages_skipped",
            "Received messages not handled, by reason",
            ["service", "reason"],
            registry=r,
        )
        self.loop_errors = Counter(
            "outboxer_loop_errors",
            "Relay, consumer or sweeper rounds that failed as a whole",
            ["service", "loop"],
            registry=r,
        )
        self.outages = Counter(
            "outboxer_outages", "Transport outages that began", by_service, registry=r
        )
        self.in_outage = Gauge(
            "outboxer_outage", "1 while the transport is unusable", by_service, registry=r
        )
        self.purged = Counter(
            "outboxer_rows_purged",
            "Rows deleted by the retention sweep",
            ["service", "status"],
            registry=r,
        )
        self.batch_size = Histogram(
            "outboxer_relay_batch_size",
            "Rows claimed per relay round",
            by_service,
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.round_seconds = Histogram(
            "outboxer_relay_round_duration_seconds",
            "Duration of one relay round (claim, send, mark)",
            by_service,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.handler_seconds = Histogram(
            "outboxer_handler_duration_seconds",
            "Duration of handler calls",
            ["service", "event_type", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "outboxer_commit_to_handler_seconds",
            "From an event's insert (publish, close to its commit) to its handler's start",
            by_service,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.sign_ins_failed = Counter(
            "outboxer_web_sign_ins_failed",
            "Wrong tokens the web console refused (method: form or bearer)",
            ["method"],
            registry=r,
        )
        self.sign_in_lockouts = Counter(
            "outboxer_web_sign_in_lockouts",
            "Times the web console locked a client address out of signing in",
            registry=r,
        )
        if admin is not None:
            r.register(_Backlog(admin, services, min_interval))

    def serve(self, port: int = DEFAULT_PORT, addr: str = "0.0.0.0") -> MetricsServer:  # noqa: S104 - an exporter listens for the scraper
        """Serve ``/metrics`` on ``addr:port`` from a daemon thread (port 0: any free
        port; the server says which)."""
        httpd, thread = start_http_server(port, addr=addr, registry=self.registry)
        return MetricsServer(int(httpd.server_address[1]), addr, httpd, thread)

    # ------------------------------------------------------------------ reports

    def event_published(self, service: str, event_type: str, tx: Any) -> None:
        self.published.labels(service).inc()

    def batch_claimed(self, service: str, due: int, redelivered: int) -> None:
        self.claimed.labels(service).inc(due)
        if redelivered:
            self.redelivered.labels(service).inc(redelivered)

    def batch_sent(self, service: str, sent: int, published: int, seconds: float) -> None:
        self.sent.labels(service).inc(sent)

    def batch_failed(self, service: str, failed: int, dead: int, reason: str) -> None:
        if failed:
            self.retried.labels(service, "send").inc(failed)
        if dead:
            self.dead.labels(service).inc(dead)

    def rows_undecodable(self, service: str, count: int) -> None:
        self.dead.labels(service).inc(count)

    def relay_round(self, service: str, claimed: int, seconds: float) -> None:
        self.batch_size.labels(service).observe(claimed)
        self.round_seconds.labels(service).observe(seconds)

    def messages_skipped(self, service: str, reason: str, count: int) -> None:
        self.skipped.labels(service, reason).inc(count)

    def worker_crashed(self, service: str, outbox_id: int, event_type: str) -> None:
        self.crashes.labels(service).inc()

    def messages_consumed(self, service: str, count: int) -> None:
        self.consumed.labels(service).inc(count)

    def message_retried(self, service: str, outbox_id: int, attempts: int, error: str) -> None:
        self.retried.labels(service, "handler").inc()

    def message_dead(self, service: str, outbox_id: int, attempts: int, reason: str) -> None:
        self.dead.labels(service).inc()

    def handler_finished(
        self, service: str, event_type: str, seconds: float, error: BaseException | None
    ) -> None:
        outcome = "ok" if error is None else "error"
        self.handler_seconds.labels(service, event_type, outcome).observe(seconds)

    def event_latency(self, service: str, event_type: str, seconds: float) -> None:
        self.latency.labels(service).observe(max(seconds, 0.0))

    def loop_error(self, service: str, loop: str, error: BaseException) -> None:
        self.loop_errors.labels(service, loop).inc()

    def outage_started(self, service: str, reason: str) -> None:
        self.outages.labels(service).inc()
        self.in_outage.labels(service).set(1)

    def outage_ended(self, service: str, seconds: float) -> None:
        self.in_outage.labels(service).set(0)

    def rows_purged(self, service: str, status: str, count: int) -> None:
        self.purged.labels(service, status).inc(count)

    def sign_in_failed(self, client: str, method: str) -> None:
        self.sign_ins_failed.labels(method).inc()

    def sign_in_locked(self, client: str, seconds: float) -> None:
        self.sign_in_lockouts.inc()
