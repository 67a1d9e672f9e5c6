"""Hooks: observers hear what the loops do; a failing observer never stops delivery."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from outboxer import Envelope, Observer, Outbox, OutboxSettings, Stats
from outboxer.hooks import Hooks
from outboxer.testing import InMemoryTransport, drain


class Recorder(Observer):
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def event_published(self, service: str, event_type: str, tx: Any) -> None:
        self.calls.append(("event_published", (service, event_type)))

    def batch_claimed(self, service: str, due: int, redelivered: int) -> None:
        self.calls.append(("batch_claimed", (service, due, redelivered)))

    def batch_sent(self, service: str, sent: int, published: int, seconds: float) -> None:
        self.calls.append(("batch_sent", (service, sent, published)))

    def messages_consumed(self, service: str, count: int) -> None:
        self.calls.append(("messages_consumed", (service, count)))

    def message_retried(self, service: str, outbox_id: int, attempts: int, error: str) -> None:
        self.calls.append(("message_retried", (service, outbox_id, attempts)))

    def message_dead(self, service: str, outbox_id: int, attempts: int, reason: str) -> None:
        self.calls.append(("message_dead", (service, outbox_id, attempts)))

    def handler_finished(
        self, service: str, event_type: str, seconds: float, error: BaseException | None
    ) -> None:
        self.calls.append(("handler_finished", (service, event_type, error is None)))

    def names(self) -> set[str]:
        return {name for name, _ in self.calls}


class Broken(Observer):
    def batch_claimed(self, service: str, due: int, redelivered: int) -> None:
        raise RuntimeError("exporter down")


async def test_observers_hear_the_loops(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()
    ob = Outbox(
        f"sqlite:///{tmp_path}/hooks.db",
        transport=InMemoryTransport(),
        settings=OutboxSettings.from_values(retry_unit=0.01, poll_interval=0.05),
        observers=[Broken(), recorder],
    )
    ob.register_event("a.e", "svc")
    ob.migrate()
    failures = {"left": 1}

    @ob.handler("a.e")
    def handle(event: Envelope, tx: Any) -> None:
        if event.payload["fail"] == "always":
            raise RuntimeError("poison")
        if event.payload["fail"] and failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("flaky")

    with ob.db.sync_engine.begin() as conn:
        ok = ob.publish(conn, "a.e", {"fail": False})
        flaky = ob.publish(conn, "a.e", {"fail": True})
        poison = ob.publish(conn, "a.e", {"fail": "always"}, max_retry=2)
    with caplog.at_level(logging.ERROR, logger="outboxer.hooks"):
        await drain(ob)
    assert ("event_published", ("svc", "a.e")) in recorder.calls
    assert {"batch_claimed", "batch_sent", "messages_consumed", "handler_finished"} <= (
        recorder.names()
    )
    assert ("message_retried", ("svc", flaky, 1)) in recorder.calls
    assert ("message_dead", ("svc", poison, 2)) in recorder.calls
    consumed = sum(c[1][1] for c in recorder.calls if c[0] == "messages_consumed")
    assert consumed == 2  # ok and flaky
    assert ok not in {c[1][1] for c in recorder.calls if c[0] == "message_retried"}
    # The broken observer was logged with its traceback and delivery went on.
    assert any("exporter down" in r.exc_text for r in caplog.records if r.exc_text)
    assert ob.stats.get("consumed") == 2
    assert ob.stats.get("dead") == 1
    await ob.aclose()


def test_hooks_refuse_what_is_not_an_observer() -> None:
    with pytest.raises(TypeError, match="subclass"):
        Hooks([object()])  # type: ignore[list-item]


def test_stats_counts_per_service() -> None:
    stats = Stats()
    hooks = Hooks([stats])
    hooks.batch_claimed("a", 3, 1)
    hooks.batch_claimed("b", 2, 0)
    hooks.messages_skipped("a", "undecodable", 1)
    hooks.messages_skipped("a", "settled", 2)
    assert stats.get("claimed") == 5
    assert stats.get("redelivered", "a") == 1
    assert stats.get("undecodable", "a") == 1
    assert stats.get("skipped", "a") == 2
    assert stats.totals()["claimed"] == 5


def test_wants_names_the_reports_an_observer_overrides() -> None:
    class Contexts(Observer):
        def handler_context(self, service: str, event: Any, headers: Any) -> None:
            return None

    plain, contexts = Observer(), Contexts()
    assert not plain.wants("handler_context")
    assert contexts.wants("handler_context")
    assert not contexts.wants("message_sending")
    # A loop handed one observer asks it directly; Hooks asks each attached one.
    assert Hooks([plain, contexts]).wants("handler_context")
    assert not Hooks([plain]).wants("handler_context")
    with pytest.raises(AttributeError):
        plain.wants("no_such_report")


def test_a_report_reaches_exactly_the_observers_that_listen_to_it() -> None:
    """Only observers overriding a report are called for it; one defined on the
    instance counts, a nested Hooks passes everything on, and remove stops it."""
    heard: list[str] = []

    class Consumed(Observer):
        def messages_consumed(self, service: str, count: int) -> None:
            heard.append(f"class {service} {count}")

    class Silent(Observer):
        def __getattribute__(self, name: str) -> Any:
            if name == "messages_consumed":
                raise AssertionError("a report reached an observer that does not override it")
            return super().__getattribute__(name)

    by_instance = Observer()
    by_instance.messages_consumed = lambda service, count: heard.append(  # type: ignore[method-assign]
        f"instance {service} {count}"
    )
    inner = Hooks([Consumed()])
    hooks = Hooks([Silent(), Consumed(), by_instance, inner])
    hooks.messages_consumed("svc", 3)
    assert heard == ["class svc 3", "instance svc 3", "class svc 3"]
    heard.clear()
    hooks.remove(inner)
    hooks.messages_consumed("svc", 1)
    assert heard == ["class svc 1", "instance svc 1"]
    assert hooks.wants("messages_consumed")
    assert not Hooks([Silent()]).wants("messages_consumed")
