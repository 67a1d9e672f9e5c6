"""Durations, --fail-on conditions, settings typos, the JSON log formatter, hooks."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from outboxer import ConfigurationError, OutboxSettings, ServiceStatus
from outboxer.durations import format_duration, parse_duration
from outboxer.health import failures, parse_conditions
from outboxer.hooks import Hooks, LogReports, Observer, Stats
from outboxer.logs import ExtrasFormatter, JsonFormatter, first_line
from outboxer.metrics import PrometheusMetrics

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("15m", 900),
        ("12h", 43200),
        ("7d", 604800),
        ("2w", 1209600),
        ("1h30m", 5400),
        ("250ms", 0.25),
        ("90", 90),
        ("1.5h", 5400),
        (12, 12),
    ],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7x", "-5s", "s", "1h 30", "nan", True])
def test_bad_durations(text: Any) -> None:
    with pytest.raises(ConfigurationError):
        parse_duration(text)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (None, 0.42, 42, 307, 11100, 187200)] == [
        "-",
        "0.4s",
        "42s",
        "5m07s",
        "3h05m",
        "2d04h",
    ]


def _st(service: str, dead: int = 0, due: int = 0, oldest: float | None = None) -> ServiceStatus:
    counts = {"pending": due, "published": 0, "consumed": 5, "dead": dead}
    return ServiceStatus(service, f"{service}_t", counts, due, oldest)


def test_fail_on_conditions() -> None:
    conditions = parse_conditions("dead>0, oldest-due>60s")
    assert [str(c) for c in conditions] == ["dead>0", "oldest-due>1m00s"]
    assert failures(conditions, [_st("a"), _st("b", due=3, oldest=59.0)]) == []
    found = failures(conditions, [_st("a", dead=2), _st("b", due=3, oldest=61.0)])
    assert [str(f) for f in found] == [
        "a: dead>0 (dead is 2)",
        "b: oldest-due>1m00s (oldest-due is 1m01s)",
    ]
    assert failures(parse_conditions("due>=3,total<1"), [_st("b", due=3)])[0].value == 3
    for bad in ("dead>>0", "deadd>0", "dead>1m", "", "oldest-due>soon"):
        with pytest.raises(ConfigurationError):
            parse_conditions(bad)


def test_unknown_settings_are_refused_with_a_suggestion() -> None:
    with pytest.raises(ConfigurationError, match=r"'max_retyr' \(did you mean 'max_retry'\?\)"):
        OutboxSettings.from_values(max_retyr=3)
    with pytest.raises(ConfigurationError, match=r"retention\.consumed_after"):
        OutboxSettings.from_values(retention={"consumed_aftr": "7d"})
    settings = OutboxSettings.from_values(retention={"consumed_after": "7d", "batch_pause": "0"})
    assert settings.retention.consumed_after == 604800
    assert settings.retention.enabled
    assert not OutboxSettings.from_values().retention.enabled


def test_json_formatter_one_object_per_line() -> None:
    record = logging.makeLogRecord(
        {
            "name": "outboxer.x",
            "levelname": "ERROR",
            "levelno": 40,
            "msg": "event %s dead",
            "args": (7,),
            "service": "billing",
            "outbox_id": 7,
            "event_type": "a.b",
        }
    )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["message"] == "event 7 dead"
    assert (doc["level"], doc["service"], doc["outbox_id"], doc["event_type"]) == (
        "ERROR",
        "billing",
        7,
        "a.b",
    )
    try:
        raise ValueError("x\ny")
    except ValueError:
        record.exc_info = sys.exc_info()
    doc = json.loads(JsonFormatter().format(record))
    assert "ValueError: x" in doc["exc"]
    text = ExtrasFormatter("%(message)s").format(
        logging.makeLogRecord({"msg": "hi", "service": "s"})
    )
    assert text == "hi service=s"
    assert first_line("\n  RuntimeError: boom\n  File x") == "RuntimeError: boom"


def test_hooks_combine_handler_contexts_and_never_swallow() -> None:
    entered: list[str] = []

    class Span(Observer):
        def __init__(self, name: str) -> None:
            self.name = name

        def handler_context(self, service: str, event: Any, headers: Any) -> Any:
            @contextmanager
            def cm() -> Iterator[None]:
                entered.append(f"+{self.name}")
                try:
                    yield
                finally:
                    entered.append(f"-{self.name}")

            return cm()

    class Broken(Observer):
        def handler_context(self, service: str, event: Any, headers: Any) -> Any:
            raise RuntimeError("exporter down")

    hooks = Hooks([Span("a"), Broken(), Span("b")])
    assert hooks.wants("handler_context")
    assert not Hooks([Observer()]).wants("handler_context")
    cm = hooks.handler_context("s", object(), {})
    assert cm is not None
    with pytest.raises(KeyError), cm:
        raise KeyError("handler failed")
    assert entered == ["+a", "+b", "-b", "-a"]
    assert Hooks([Observer()]).handler_context("s", object(), {}) is None


def test_the_grafana_dashboard_uses_metrics_that_exist() -> None:
    exported = {
        sample
        for family in PrometheusMetrics().registry.collect()
        for sample in (
            family.name,
            f"{family.name}_total",
            f"{family.name}_bucket",
            f"{family.name}_sum",
            f"{family.name}_count",
        )
    }
    exported |= {
        "outboxer_database_up",
        "outboxer_table_present",
        "outboxer_messages",
        "outboxer_messages_due",
        "outboxer_messages_scheduled",
        "outboxer_oldest_due_age_seconds",
    }  # the backlog gauges, read from the database at scrape time
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"outboxer_[a-z_]+", e)}
    assert used
    assert used <= exported, used - exported
    ops = (DOCS / "operations.md").read_text()
    assert set(re.findall(r"expr: .*?(outboxer_[a-z_]+)", ops)) <= exported


def test_an_outage_logs_once_at_start_and_once_at_end(caplog: pytest.LogCaptureFixture) -> None:
    hooks = Hooks([LogReports(), stats := Stats()])
    with caplog.at_level(logging.INFO, logger="outboxer.hooks"):
        hooks.outage_started("billing", "KafkaError: _TRANSPORT")
        hooks.outage_ended("billing", 42.5)
    assert [(r.levelname, r.service) for r in caplog.records] == [  # type: ignore[attr-defined]
        ("ERROR", "billing"),
        ("INFO", "billing"),
    ]
    assert "KafkaError: _TRANSPORT" in caplog.records[0].getMessage()
    assert "after 42.5s" in caplog.records[1].getMessage()
    assert stats.get("outages", "billing") == 1
