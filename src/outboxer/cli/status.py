"""``outboxer status``: counts, due rows, rates; ``--watch``; ``--fail-on``."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from outboxer.cli.common import (
    EXIT_MISSING_TABLES,
    EXIT_UNHEALTHY,
    EXIT_USAGE,
    _duration,
    _failer,
    _masked,
    _one_line,
    _opened,
    _routes,
    app,
)
from outboxer.durations import format_duration
from outboxer.errors import ConfigurationError, OutboxError
from outboxer.health import Condition, failures, parse_conditions
from outboxer.models import ServiceStatus, Status
from outboxer.outbox import Outbox
from outboxer.routing import ServiceRoute


def _count(n: int | None) -> str:
    """A count in at most 6 characters (12345, 123.4k, 12.3M)."""
    if n is None:
        return "-"
    if n < 100_000:
        return str(n)
    for unit, size in (("M", 1e6), ("G", 1e9)):
        if n < size * 1000:
            value = n / size
            return f"{value:.1f}{unit}" if value < 100 else f"{value:.0f}{unit}"
    return f"{n / 1e12:.0f}T"


def _rate(n: int | None) -> str:
    if n is None:
        return "-"
    per_second = n / 60.0
    if per_second == 0:
        return "0"
    if per_second < 10:
        return f"{per_second:.2f}"
    if per_second < 1000:
        return f"{per_second:.1f}"
    return _count(round(per_second))


def _status_json(route: ServiceRoute, st: ServiceStatus | None) -> dict[str, Any]:
    if st is None:
        return {"service": route.service_name, "table": route.table_name, "migrated": False}
    return {
        "service": st.service,
        "table": st.table,
        "migrated": True,
        "counts": st.counts,
        "total": st.total,
        "due": st.due,
        "scheduled": st.scheduled,
        "oldest_due_seconds": st.oldest_due_seconds,
        "dead": st.dead,
        "published_per_second": _per_second(st.published_last_minute),
        "consumed_per_second": _per_second(st.consumed_last_minute),
    }


def _per_second(n: int | None) -> float | None:
    return None if n is None else round(n / 60.0, 3)


def status_table(
    results: Sequence[tuple[ServiceRoute, ServiceStatus | None]], title: str | None = None
) -> Table:
    """The status of each service as a table that fits 80 columns."""
    table = Table(
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        show_edge=False,
        collapse_padding=True,
        caption="rates: per second over the last minute",
        caption_justify="left",
    )
    table.add_column("service\n[dim]table[/]", overflow="fold", min_width=10)
    shown = (Status.PENDING, Status.PUBLISHED, Status.CONSUMED, Status.DEAD)
    headings = (
        "pending",
        "sched-\nuled",
        "published",
        "consumed",
        "dead",
        "due\nnow",
        "oldest\ndue",
    )
    for name in (*headings, "pub/s", "con/s"):
        table.add_column(name, justify="right", no_wrap=True)
    for route, st in results:
        name = f"{escape(route.service_name)}\n[dim]{escape(route.table_name)}[/]"
        if st is None:
            table.add_row(name, "[yellow]no table", *[""] * 8)
            continue
        counts = [_count(st.counts.get(s.value, 0)) for s in shown]
        if st.dead:
            counts[shown.index(Status.DEAD)] = f"[bold red]{_count(st.dead)}"
        counts.insert(1, _count(st.scheduled))
        table.add_row(
            name,
            *counts,
            _count(st.due),
            format_duration(st.oldest_due_seconds),
            _rate(st.published_last_minute),
            _rate(st.consumed_last_minute),
        )
    return table


@app.command()
def status(
    ctx: typer.Context,
    service: Annotated[
        list[str] | None,
        typer.Option("--service", "-s", help="Only this service (repeatable).", show_default=False),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Machine-readable output (errors too).")
    ] = False,
    fail_on: Annotated[
        str | None,
        typer.Option(
            "--fail-on",
            metavar="CONDITIONS",
            help="Exit 4 when a condition holds for a service, e.g. dead>0,oldest-due>60s "
            "(measures: pending, published, consumed, dead, cancelled, total, due, scheduled, "
            "oldest-due).",
            show_default=False,
        ),
    ] = None,
    watch: Annotated[
        bool, typer.Option("--watch", help="Refresh a live table until Ctrl-C.")
    ] = False,
    interval: Annotated[
        str, typer.Option(metavar="DURATION", help="Refresh interval of --watch.")
    ] = "2s",
    count: Annotated[
        int | None,
        typer.Option(
            min=1, help="With --watch: stop after this many refreshes.", show_default=False
        ),
    ] = None,
) -> None:
    """Counts by status, rows due now, the oldest due row's age and last-minute rates,
    per service. Exit 1 when the database cannot be read, 3 when tables are missing,
    4 when a --fail-on condition holds, else 0."""
    conditions: list[Condition] = []
    if fail_on is not None:
        try:
            conditions = parse_conditions(fail_on)
        except ConfigurationError as exc:
            _failer(as_json)(exc.message, EXIT_USAGE)
    every = _duration(interval, "--interval", as_json=as_json) or 2.0
    with _opened(ctx, as_json=as_json) as outbox:
        _routes(outbox, service)
        if watch:
            _watch(outbox, service, max(every, 0.1), count)
            return
        results = outbox.admin.status(service, rates=True)
    missing = [route.table_name for route, st in results if st is None]
    failing = failures(conditions, [st for _, st in results if st is not None])
    code = EXIT_MISSING_TABLES if missing else EXIT_UNHEALTHY if failing else 0
    if as_json:
        doc = {
            "ok": code == 0,
            "exit_code": code,
            "database": outbox.db.safe_url,
            "services": [_status_json(route, st) for route, st in results],
            "missing_tables": missing,
            "failing": [str(f) for f in failing],
        }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        raise typer.Exit(code)
    console = Console()
    console.print(f"outboxer status: {escape(outbox.db.safe_url)}", highlight=False)
    console.print(status_table(results))
    if missing:
        console.print(
            f"[yellow]table(s) missing: {', '.join(missing)}; run `outboxer migrate`",
            highlight=False,
        )
    for f in failing:
        console.print(f"[red]failing: {escape(str(f))}", highlight=False)
    raise typer.Exit(code)


def _watch(outbox: Outbox, services: list[str] | None, every: float, count: int | None) -> None:
    console = Console()
    title = f"outboxer status: {escape(outbox.db.safe_url)}"

    def render() -> Any:
        try:
            results = outbox.admin.status(services, rates=True)
        except OutboxError as exc:
            return Text(f"{title}\nerror: {_masked(_one_line(str(exc)), outbox)}", style="red")
        stamp = datetime.now(UTC).strftime("%H:%M:%S UTC")
        return status_table(results, title=f"{title}  [dim]{stamp}[/]")

    try:
        with Live(render(), console=console, auto_refresh=False) as live:
            shown = 1
            while count is None or shown < count:
                time.sleep(every)
                live.update(render(), refresh=True)
                shown += 1
    except KeyboardInterrupt:
        return
