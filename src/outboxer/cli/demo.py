"""``outboxer demo``: four services exchange events on SQLite, then the exactly-once check."""

from __future__ import annotations

import asyncio
import tempfile
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from outboxer.cli.common import (
    LogFormat,
    _fail,
    _logging,
    _reported,
    app,
)
from outboxer.demo import HideDemoFailures, run_demo


class DemoTransport(StrEnum):
    LOCAL = "local"
    KAFKA = "kafka"
    NATS = "nats"
    REDIS = "redis"
    RABBITMQ = "rabbitmq"


@app.command()
def demo(
    events: Annotated[int, typer.Option(help="How many events to publish.")] = 3000,
    transport: Annotated[
        DemoTransport,
        typer.Option(
            help="local (in-process), kafka (starts the embedded broker), nats, redis or "
            "rabbitmq (a running server, see --transport-url)."
        ),
    ] = DemoTransport.LOCAL,
    transport_url: Annotated[
        str | None,
        typer.Option(
            metavar="URL",
            help="The server of --transport nats, redis or rabbitmq (the run's streams, "
            "exchanges and queues are deleted). Default: nats://127.0.0.1:4222, "
            "redis://127.0.0.1:6379/0, amqp://guest:guest@127.0.0.1:5672/.",
            show_default=False,
        ),
    ] = None,
    db: Annotated[
        Path | None,
        typer.Option(
            metavar="PATH",
            help="SQLite file to create (must not exist). Default: a temporary file.",
            show_default=False,
        ),
    ] = None,
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the temporary SQLite file to look at afterwards.")
    ] = False,
) -> None:
    """Four services (agent, task, memory, notification) exchange events on SQLite."""
    console = Console()
    scratch = None if (db is not None or keep) else tempfile.TemporaryDirectory(prefix="outboxer-")
    path = db if scratch is None else Path(scratch.name) / "demo.db"
    try:
        with _logging("WARNING", LogFormat.RICH, console, (HideDemoFailures(),)), _reported():
            summary = run_demo(events, transport.value, path, console, transport_url=transport_url)
    except (KeyboardInterrupt, asyncio.CancelledError):
        # SIGINT/SIGTERM: the demo stopped its engine (and broker) cleanly.
        raise typer.Exit(130) from None
    finally:
        if scratch is not None:
            scratch.cleanup()
    if scratch is not None:
        console.print("[dim](a temporary file, removed now; --keep keeps it)[/]")
    if not summary.ok:
        _fail("the demo's exactly-once check failed: " + "; ".join(summary.problems()))
