from __future__ import annotations

import logging

import pytest

from outboxer import (
    EventNotRegisteredError,
    EventServiceConflictError,
    InvalidEventError,
    InvalidIdentifierError,
    RouteConflictError,
    RouteRegistry,
    ServiceRoute,
    default_route,
)
from outboxer.routing import ServiceOverride, index_name


def test_default_route_from_name() -> None:
    route = default_route("agent-memory")
    assert route == ServiceRoute(
        service_name="agent-memory",
        table_name="agent_memory_outbox_messages",
        topic="outboxer.agent-memory",
        group_id="outboxer.agent-memory.consumer",
    )
    assert default_route("task", "shop").topic == "shop.task"
    assert default_route("task", "").topic == "task"
    assert default_route("task", "").group_id == "task.consumer"


def test_register_event_same_service_is_noop_other_is_error() -> None:
    reg = RouteRegistry()
    first = reg.register_event("task.created", "task")
    assert reg.register_event(" task.created ", "task") == first
    with pytest.raises(EventServiceConflictError, match="already belongs to service 'task'"):
        reg.register_event("task.created", "memory")
    assert reg.resolve_event("task.created").service_name == "task"


def test_unregistered_and_blank_event_types() -> None:
    reg = RouteRegistry()
    with pytest.raises(EventNotRegisteredError, match="nobody"):
        reg.resolve_event("nobody")
    for blank in ("", "   ", "\t"):
        with pytest.raises(InvalidEventError):
            reg.register_event(blank, "task")
    with pytest.raises(InvalidEventError):
        reg.register_event("x" * 256, "task")
    with pytest.raises(InvalidEventError):
        reg.register_event(123, "task")  # type: ignore[arg-type]


def test_explicit_registration_overrides_default() -> None:
    reg = RouteRegistry(topic_prefix="shop")
    route = reg.register_service("task", table="tasks_outbox", topic="tasks.v2", group="g1")
    assert route == ServiceRoute("task", "tasks_outbox", "tasks.v2", "g1")
    assert reg.register_event("task.created", "task") == route
    assert reg.register_service("task", table="tasks_outbox", topic="tasks.v2", group="g1") == route
    with pytest.raises(RouteConflictError):
        reg.register_service("task", topic="other")


def test_configuration_overrides_default_and_code_overrides_configuration(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reg = RouteRegistry(
        overrides={
            "task": ServiceOverride(topic="cfg.task"),
            "my_svc": ServiceOverride(table="my_table", group="cfg.group"),
        }
    )
    assert reg.route_for_service("task").topic == "cfg.task"
    assert reg.route_for_service("task").table_name == "task_outbox_messages"
    route = reg.route_for_service("my-svc")
    assert (route.table_name, route.group_id) == ("my_table", "cfg.group")
    with caplog.at_level(logging.WARNING, logger="outboxer.routing"):
        explicit = RouteRegistry(overrides={"task": ServiceOverride(topic="cfg.task")})
        assert explicit.register_service("task", topic="code.task").topic == "code.task"
    assert "wins over" in caplog.text


def test_two_services_cannot_share_a_table() -> None:
    reg = RouteRegistry()
    reg.register_service("a", table="shared")
    with pytest.raises(RouteConflictError, match="shared"):
        reg.register_service("b", table="shared")


@pytest.mark.parametrize(
    "table",
    ["", "1abc", "a-b", "a b", "a;drop table x", "x" * 64, "ta\u00eble", 'q"uote'],
)
def test_bad_table_names(table: str) -> None:
    with pytest.raises(InvalidIdentifierError) as info:
        RouteRegistry().register_service("svc", table=table)
    assert isinstance(info.value, ValueError)
    assert repr(table) in str(info.value)


@pytest.mark.parametrize("topic", ["", "a b", "a/b", "x" * 250, ".", "..", "tópico"])
def test_bad_topic_and_group_names(topic: str) -> None:
    with pytest.raises(InvalidIdentifierError):
        RouteRegistry().register_service("svc", topic=topic)
    with pytest.raises(InvalidIdentifierError):
        RouteRegistry().register_service("svc", group=topic)


def test_good_identifiers_at_the_limits() -> None:
    route = RouteRegistry().register_service("svc", table="_" + "a" * 62, topic="t" * 249)
    assert len(route.table_name) == 63
    assert len(route.topic) == 249


@pytest.mark.parametrize("name", ["", "a.b", "a b", "1x", "x/y"])
def test_bad_service_names(name: str) -> None:
    with pytest.raises(InvalidIdentifierError):
        RouteRegistry().register_service(name)


def test_long_service_name_needs_explicit_table() -> None:
    name = "s" * 60
    with pytest.raises(InvalidIdentifierError, match="table"):
        RouteRegistry().register_service(name)
    assert RouteRegistry().register_service(name, table="short").table_name == "short"


def test_index_names_fit() -> None:
    assert index_name("orders", "due") == "ix_orders_due"
    long_a, long_b = "a" * 60 + "x", "a" * 60 + "y"
    assert len(index_name(long_a, "status_updated")) <= 63
    assert index_name(long_a, "due") != index_name(long_b, "due")


def test_registries_are_independent() -> None:
    one, two = RouteRegistry(), RouteRegistry()
    one.register_event("e", "a")
    two.register_event("e", "b")
    assert one.resolve_event("e").service_name == "a"
    assert two.resolve_event("e").service_name == "b"
    assert one.events_of("a") == ["e"]
    assert two.service_of("e") == "b"
