"""Lineage: one event published on PostgreSQL, relayed through the embedded Kafka
broker into an inbox on another database, then followed by ``outboxer trace`` across
both applications (real processes): created, sent to topic/partition@offset, read
from the same coordinates by the consumer group, a failed attempt with its error,
consumed. And the audit's steps (an edit, who made it) in a trace on each database."""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from outboxer import Envelope, Outbox, Status
from outboxer.testing import EmbeddedKafka
from tests.helpers import drop_tables, isolated_settings, make_outbox
from tests.integration.engine_helpers import run_until
from tests.integration.test_cli import child_env, cli_command

APP = """\
from outboxer import Outbox, OutboxSettings

outbox = Outbox({url!r}, transport={transport!r}, settings=OutboxSettings.from_values(
    topic_prefix={prefix!r}, kafka={{"session_timeout_ms": 6000}}))
{register}
"""


def _settings(prefix: str) -> Any:
    return isolated_settings(
        retry_unit=0.02,
        poll_interval=0.1,
        topic_prefix=prefix,
        kafka={"session_timeout_ms": 6000},
        shutdown_timeout=20.0,
    )


@pytest.mark.kafka
async def test_trace_follows_an_event_through_kafka_into_an_inbox(
    pg_database: Any, kafka_broker: EmbeddedKafka, tmp_path: Path, service: str
) -> None:
    prefix = f"l{uuid.uuid4().hex[:8]}"
    consumer_url = f"sqlite:///{tmp_path / 'billing.db'}"
    producer = Outbox(
        pg_database.url, transport=kafka_broker.transport_url, settings=_settings(prefix)
    )
    producer.register_event(f"{service}.placed", service)
    producer.migrate()
    consumer = Outbox(
        consumer_url, transport=kafka_broker.transport_url, settings=_settings(prefix)
    )
    consumer.register_inbox(service, consumer="billing")
    consumer.register_event(f"{service}.placed", service)
    consumer.migrate()
    failures = {"left": 1}

    @consumer.handler(f"{service}.placed")
    def bill(event: Envelope, tx: Session) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("billing ledger locked")

    event_id = f"order-{uuid.uuid4().hex[:8]}"
    inbox = consumer.store(service)
    try:
        with Session(producer.db.sync_engine) as session, session.begin():
            oid = producer.publish(session, f"{service}.placed", {"total": 12}, event_id=event_id)

        def consumed() -> bool:
            return inbox.status().counts[Status.CONSUMED.value] == 1

        await run_until([producer, consumer], consumed, timeout=120)
        sent = producer.store(service).get_by_id(oid)
        assert sent is not None
        assert sent.status is Status.PUBLISHED
        topic = producer.routes.route_for_service(service).topic
        assert sent.coordinates is not None
        assert re.fullmatch(rf"{re.escape(topic)}/\d+@\d+", sent.coordinates)
        group = consumer.routes.route_for_service(service).group_id

        for name, url, register in (
            (
                "producerapp",
                pg_database.url,
                f"outbox.register_event({service + '.placed'!r}, {service!r})",
            ),
            (
                "consumerapp",
                consumer_url,
                f"outbox.register_inbox({service!r}, consumer='billing')",
            ),
        ):
            (tmp_path / f"{name}.py").write_text(
                APP.format(
                    url=url, transport=kafka_broker.transport_url, prefix=prefix, register=register
                )
            )
        done = subprocess.run(  # noqa: ASYNC221 - the loops are stopped by now
            [
                *cli_command(),
                "trace",
                event_id,
                "--app",
                "producerapp:outbox",
                "--app",
                "consumerapp:outbox",
                "--json",
            ],
            cwd=tmp_path,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        steps = json.loads(done.stdout)["steps"]
        got = [(s["app"], s["step"]) for s in steps]
        assert got == [
            ("producerapp:outbox", "created"),
            ("producerapp:outbox", "sent"),
            ("consumerapp:outbox", "received"),
            ("consumerapp:outbox", "consumed"),
            ("consumerapp:outbox", "attempts"),
        ], steps
        by_step = {s["step"]: s for s in steps}
        assert by_step["sent"]["detail"] == f"to {sent.coordinates}"
        # The consumer read it where the broker said it put it.
        assert by_step["received"]["detail"].startswith(f"from {sent.coordinates} by group {group}")
        assert by_step["consumed"]["detail"] == f"handled by group {group}"
        assert by_step["attempts"]["detail"].startswith("1 failed attempt(s)")
        assert by_step["created"]["outbox_id"] == oid
        assert [s["at"] is not None for s in steps] == [True, True, True, True, False]
        missing = subprocess.run(  # noqa: ASYNC221
            [*cli_command(), "trace", "no-such-event", "--app", "producerapp:outbox"],
            cwd=tmp_path,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert missing.returncode == 1
        assert "no event 'no-such-event'" in missing.stderr
    finally:
        drop_tables(producer)
        producer.close()
        consumer.close()


def test_trace_shows_attempts_death_and_the_edit(db_url: str, service: str) -> None:
    ob = make_outbox(db_url)
    ob.register_event(f"{service}.placed", service)
    ob.migrate()
    try:
        with Session(ob.db.sync_engine) as session, session.begin():
            oid = ob.publish(session, f"{service}.placed", {"total": -1})
        ob.store(service).mark_dead(oid, "ValueError: negative total")
        ob.admin.edit(oid, {"total": 1}, service=service, actor="alice")
        steps = ob.admin.trace(str(oid))  # published without an id: its outbox id
        assert [s.step for s in steps] == ["created", "edit", "waiting"]
        assert steps[1].detail == "by alice"
        assert ob.admin.trace("nothing-here") == []
    finally:
        drop_tables(ob)
        ob.close()
