"""Batch handlers: one call for many events, one statement for their writes."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from outboxer import Envelope
from tests.integration.engine_helpers import (
    all_final,
    build_app,
    drop_app,
    effects,
    publish_many,
    run_until,
    status_counts,
)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_batch_handler_writes_many_events_at_once(db_url: str, kind: str) -> None:
    app = build_app(db_url, "local", handlers=False, batch_size=50, max_retry=3)
    svc = app.services[0]
    calls: list[int] = []
    poison = 17  # always fails: ends dead; the others of its batches are consumed

    def rows(events: list[Envelope]) -> list[dict[str, Any]]:
        calls.append(len(events))
        if any(e.payload["n"] == poison for e in events):
            raise RuntimeError("poison in this batch")
        return [{"outbox_id": e.outbox_id, "service": svc, "n": e.payload["n"]} for e in events]

    if kind == "sync":

        @app.outbox.batch_handler(app.event(svc))
        def handle(events: list[Envelope], tx: Session) -> None:
            tx.execute(insert(app.effects), rows(events))

    else:

        @app.outbox.batch_handler(app.event(svc))
        async def handle_async(events: list[Envelope], tx: AsyncSession) -> None:
            await tx.execute(insert(app.effects), rows(events))

    try:
        publish_many(app, 400)
        await run_until([app.outbox], lambda: all_final(app), timeout=120)
        counts = status_counts(app)
        assert counts["consumed"] == 399
        assert counts["dead"] == 1
        assert effects(app) == (399, 399)  # a failed batch's writes were rolled back
        assert max(calls) > 1  # events did arrive together
    finally:
        drop_app(app)
