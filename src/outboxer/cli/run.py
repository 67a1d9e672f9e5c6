"""``outboxer migrate`` and ``outboxer run``."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from outboxer.cli.common import (
    EXIT_USAGE,
    LogFormat,
    LogLevel,
    _fail,
    _logging,
    _opened,
    _options,
    _routes,
    _serve_metrics,
    app,
)
from outboxer.database.migrations import sql_script

logger = logging.getLogger(__name__)


@app.command()
def migrate(
    ctx: typer.Context,
    sql: Annotated[
        bool,
        typer.Option(
            "--sql", help="Print the DDL and version rows for review instead of applying them."
        ),
    ] = False,
) -> None:
    """Bring the outbox tables to the latest schema version (idempotent)."""
    with _opened(ctx) as outbox:
        routes = _routes(outbox)
        if sql:
            script = sql_script(
                outbox.migration_plan(), outbox.tables, outbox.db.sync_engine.dialect
            )
            sys.stdout.write(script)
            return
        plans = {p.table: p for p in outbox.migrate()}
    console = Console()
    console.print(f"database {escape(outbox.db.safe_url)}", highlight=False)
    table = Table("service", "table", "version", "state")
    for route in routes:
        plan = plans[route.table_name]
        if plan.current == 0:
            state = "[green]created[/]"
        elif plan.up_to_date:
            state = "[dim]up to date[/]"
        else:
            state = f"[green]upgraded from {plan.current}[/]"
        table.add_row(route.service_name, route.table_name, str(plan.target), state)
    console.print(table)
    for plan in plans.values():
        for note in plan.notes:
            console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)


@app.command()
def run(
    ctx: typer.Context,
    service: Annotated[
        list[str] | None,
        typer.Option(
            "--service",
            "-s",
            help="Run only this service (repeatable). Default: every registered service.",
            show_default=False,
        ),
    ] = None,
    relay_only: Annotated[
        bool, typer.Option("--relay-only", help="Run relays only (needs a broker transport).")
    ] = False,
    consume_only: Annotated[
        bool,
        typer.Option("--consume-only", help="Run consumers only (needs a broker transport)."),
    ] = False,
    log_level: Annotated[LogLevel, typer.Option(help="Level of the process's log.")] = (
        LogLevel.INFO
    ),
    log_format: Annotated[
        LogFormat,
        typer.Option(help="rich on a terminal, plain text otherwise (auto); json for machines."),
    ] = LogFormat.AUTO,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            envvar="OUTBOXER_METRICS_PORT",
            help="Serve Prometheus metrics on this port (/metrics; needs the prometheus extra).",
            show_default=False,
        ),
    ] = None,
    metrics_addr: Annotated[
        str, typer.Option(help="Address the metrics endpoint listens on.")
    ] = "0.0.0.0",  # noqa: S104 - an exporter listens for the scraper
) -> None:
    """Run relays and consumers until SIGTERM or SIGINT, then stop cleanly."""
    if relay_only and consume_only:
        _fail(
            "--relay-only and --consume-only are mutually exclusive; "
            "give neither to run relays and consumers together",
            code=EXIT_USAGE,
        )
    with _logging(log_level.value, log_format), _opened(ctx) as outbox:
        logger.info(
            "starting outboxer for %s on %s",
            _options(ctx).app,
            outbox.db.safe_url,
            extra={"transport": outbox.transport.name},
        )
        server = None
        if metrics_port is not None:
            server = _serve_metrics(outbox, service, metrics_port, metrics_addr)
        try:
            outbox.run(relay=not consume_only, consume=not relay_only, services=service or None)
        except KeyboardInterrupt:
            # Only before the engine installed its signal handlers (during start-up).
            raise typer.Exit(130) from None
        finally:
            if server is not None:
                server.close()
