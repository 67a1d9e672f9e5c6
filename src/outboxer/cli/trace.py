"""``outboxer trace``: one event's life across one or more applications' tables."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from outboxer.cli.common import (
    EXIT_ERROR,
    EXIT_USAGE,
    JsonOption,
    _failer,
    _masked,
    _options,
    app,
    load_app,
)
from outboxer.errors import OutboxError
from outboxer.models import TraceStep
from outboxer.outbox import Outbox


def step_json(s: TraceStep) -> dict[str, Any]:
    """A step of a trace as JSON."""
    return {
        "at": None if s.at is None else s.at.isoformat(),
        "app": s.app,
        "service": s.service_name,
        "outbox_id": s.outbox_id,
        "inbox": s.inbox,
        "step": s.step,
        "detail": s.detail,
    }


@app.command()
def trace(
    ctx: typer.Context,
    event_id: Annotated[
        str,
        typer.Argument(
            metavar="EVENT_ID", help="The event id (or the outbox id of an event without one)."
        ),
    ],
    apps: Annotated[
        list[str] | None,
        typer.Option(
            "--app",
            metavar="MODULE:ATTR",
            help="An application to follow the event through (repeatable: the producer, "
            "then each consumer's inbox). Default: the global --app.",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """An event's life in order: created, attempts and the last error, sent where
    (the broker's coordinates), received by which consumer group, consumed or dead,
    and who requeued, edited or skipped it (from the audit)."""
    fail = _failer(as_json)
    options = _options(ctx)
    specs = list(apps or ([options.app] if options.app else []))
    if not specs:
        fail("name the application(s): --app module:attribute (repeatable)", EXIT_USAGE)
    steps: list[TraceStep] = []
    for spec in specs:
        outbox: Outbox | None = None
        try:
            outbox = load_app(spec, config=options.config)
            found = outbox.admin.trace(event_id)
        except OutboxError as exc:
            fail(f"{spec}: {_masked(str(exc), outbox)}", EXIT_ERROR)
        finally:
            if outbox is not None:
                outbox.close()
        steps += [
            TraceStep(s.at, s.service_name, s.outbox_id, s.step, s.detail, s.inbox, spec)
            for s in found
        ]
    steps.sort(key=lambda s: (s.at is None, s.at.timestamp() if s.at else 0.0))
    if not steps:
        fail(f"no event {event_id!r} in {', '.join(specs)}", EXIT_ERROR)
    if as_json:
        doc = {"event_id": event_id, "found": bool(steps), "steps": [step_json(s) for s in steps]}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for name in ("at", "app", "service", "id", "step", "detail"):
        table.add_column(name, no_wrap=name != "detail", overflow="fold")
    for s in steps:
        table.add_row(
            "-" if s.at is None else s.at.isoformat(timespec="milliseconds"),
            escape(s.app),
            escape(s.service_name) + (" (inbox)" if s.inbox else ""),
            str(s.outbox_id),
            s.step,
            escape(s.detail),
        )
    Console().print(table)
