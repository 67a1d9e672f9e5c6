"""The in-memory broker users test with, drain(), and the transport registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict
from sqlalchemy import Connection

from outboxer import (
    ConfigurationError,
    Envelope,
    InvalidIdentifierError,
    Outbox,
    OutboxSettings,
    Status,
)
from outboxer import settings as settings_module
from outboxer.routing import ServiceRoute
from outboxer.testing import InMemoryTransport, drain
from outboxer.transports import make_transport, register_transport, registry
from outboxer.transports.base import OutgoingMessage
from outboxer.transports.local import LocalTransport


def _outbox(tmp_path: Path, transport: Any = None, **settings: Any) -> Outbox:
    values: dict[str, Any] = {"retry_unit": 0.01, "poll_interval": 0.05, **settings}
    ob = Outbox(
        f"sqlite:///{tmp_path}/mem.db",
        transport=transport if transport is not None else InMemoryTransport(),
        settings=OutboxSettings.from_values(**values),
    )
    ob.register_event("order.placed", "billing")
    ob.migrate()
    return ob


def _publish(ob: Outbox, *payloads: dict[str, Any]) -> list[int]:
    with ob.db.sync_engine.begin() as conn:
        return [ob.publish(conn, "order.placed", p, key=f"o{p['id']}") for p in payloads]


async def test_events_sent_and_handled(tmp_path: Path) -> None:
    transport = InMemoryTransport()
    ob = _outbox(tmp_path, transport)
    seen: list[int] = []

    @ob.handler("order.placed")
    def handle(event: Envelope, tx: Connection) -> None:
        seen.append(event.payload["id"])

    ids = _publish(ob, {"id": 1}, {"id": 2})
    await drain(ob)
    assert [e.outbox_id for e in transport.events("order.placed")] == ids
    assert [m.key for m in transport.messages()] == [b"o1", b"o2"]
    assert seen == [1, 2]
    assert ob.store("billing").status().counts[Status.CONSUMED.value] == 2
    assert transport.pending() == 0
    await ob.aclose()


async def test_refusals_are_retried_or_dead(tmp_path: Path) -> None:
    transport = InMemoryTransport()
    ob = _outbox(tmp_path, transport)
    ob.register_handler("order.placed", lambda event, tx: None)
    first, second = _publish(ob, {"id": 1}, {"id": 2})
    transport.fail_next(1, "busy")  # the first send of the first row
    transport.fail_next(1, "too large", permanent=True)  # the first send of the second
    await drain(ob)
    st = ob.store("billing")
    one, two = st.get_by_id(first), st.get_by_id(second)
    assert one is not None
    assert two is not None
    assert (one.status, one.retry_count) == (Status.CONSUMED, 1)
    assert (two.status, two.retry_count) == (Status.DEAD, 0)
    assert two.last_error is not None
    assert "too large" in two.last_error
    await ob.aclose()


async def test_unacknowledged_messages_go_to_the_next_reader() -> None:
    transport = InMemoryTransport()
    route = ServiceRoute("svc", "svc_outbox_messages", "t.svc", "t.svc.consumer")
    await transport.start([route])
    env = Envelope(1, "1", "e", "v1", "k", {})
    sent = await transport.send(route, [OutgoingMessage.from_envelope(env, key="k", retry_count=0)])
    assert sent[0].ok
    first = await transport.subscribe(route)
    got = await first.receive(10, 0.1)
    assert [m.position for m in got] == [0]
    await first.close()  # never acknowledged
    second = await transport.subscribe(route)
    again = await second.receive(10, 0.1)
    assert [m.position for m in again] == [0]
    await second.ack(again)
    assert transport.pending() == 0
    await transport.close()


async def test_drain_times_out_while_work_remains(tmp_path: Path) -> None:
    transport = InMemoryTransport()
    ob = _outbox(tmp_path, transport)
    ob.register_handler("order.placed", lambda event, tx: None)
    _publish(ob, {"id": 1})
    transport.fail_next(10_000, "busy")
    with pytest.raises(TimeoutError):
        await drain(ob, timeout=0.5)
    await ob.aclose()


def test_transport_urls() -> None:
    settings = OutboxSettings.from_values()
    assert isinstance(make_transport("local", settings), LocalTransport)
    assert isinstance(make_transport("memory", settings), InMemoryTransport)
    with pytest.raises(ConfigurationError, match="unknown transport"):
        make_transport("carrier-pigeon://loft", settings)
    with pytest.raises(ConfigurationError, match="names no bootstrap servers"):
        make_transport("kafka://", settings)
    # The transport's section is validated with the settings, before any transport.
    with pytest.raises(ConfigurationError, match=r"'kafka\.partitons' \(did you mean"):
        OutboxSettings.from_values(kafka={"partitons": 3})


def test_a_registered_scheme_builds_its_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    # Registered for this test only (the contract suite runs a case per scheme).
    monkeypatch.setattr(registry, "_factories", dict(registry._factories))
    monkeypatch.setattr(settings_module, "_sections", settings_module.registered_sections())
    monkeypatch.setattr(settings_module, "_sections_model", None)

    class LoftSettings(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        birds: int = 1

    built: list[tuple[str, BaseModel]] = []

    def factory(spec: str, settings: OutboxSettings) -> InMemoryTransport:
        built.append((spec, settings.section("testonly")))
        return InMemoryTransport()

    register_transport("testonly", factory, settings=LoftSettings)
    assert "testonly" in registry.schemes()
    settings = OutboxSettings.from_values(testonly={"birds": 3})
    assert isinstance(make_transport("testonly://x", settings), InMemoryTransport)
    assert built == [("testonly://x", LoftSettings(birds=3))]
    with pytest.raises(ConfigurationError, match=r"unknown setting 'testonly\.bird'"):
        OutboxSettings.from_values(testonly={"bird": 3})
    with pytest.raises(ConfigurationError):
        register_transport("not a scheme", factory)


def test_a_transport_refuses_a_route_when_it_is_declared(tmp_path: Path) -> None:
    class NoUnderscores(InMemoryTransport):
        """Stands for a broker whose names are stricter than the neutral rule."""

        def check_route(self, route: ServiceRoute) -> None:
            if "_" in route.topic:
                raise InvalidIdentifierError(f"no '_' in {route.topic!r}", topic=route.topic)

    ob = Outbox(
        f"sqlite:///{tmp_path / 'o.db'}",
        transport=NoUnderscores(),
        settings=OutboxSettings.from_values(),
    )
    try:
        with pytest.raises(InvalidIdentifierError, match="no '_'"):
            ob.register_service("orders", topic="shop_orders")
        with pytest.raises(InvalidIdentifierError, match="no '_'"):
            ob.register_event("parcel.sent", "parcels_v2")  # its default topic has the '_'
        assert ob.routes.routes() == []  # nothing half-declared
        assert ob.register_service("orders", topic="shop.orders").destination == "shop.orders"
    finally:
        ob.close()
