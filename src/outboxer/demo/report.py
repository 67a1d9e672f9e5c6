"""What the demo shows: its live progress and the summary with the exactly-once verdict."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table as RichTable
from rich.text import Text


@dataclass(frozen=True, slots=True)
class ServiceCounts:
    """One service's numbers in the demo summary."""

    published: int
    consumed: int
    dead: int
    retried: int
    effects: int


@dataclass(frozen=True, slots=True)
class DemoSummary:
    """What the demo did, counted from the outbox tables and the business tables."""

    transport: str
    db_path: Path
    published: int
    consumed: int
    dead: int
    retried: int
    """Handler failures that were retried (attempts after the first)."""
    effects: int
    """Rows the handlers wrote to ``activity`` (one per consumed event)."""
    duplicate_effects: int
    """Effect rows beyond the first for the same event (0 means exactly once)."""
    handled_rows: int
    """Sum of the business rows' ``handled`` counters."""
    seconds: float
    by_service: dict[str, ServiceCounts] = field(default_factory=dict)

    @property
    def events_per_second(self) -> float:
        return self.published / self.seconds if self.seconds > 0 else 0.0

    def problems(self) -> list[str]:
        """Broken invariants, in words; empty when the run was exactly-once."""
        found = []
        if self.published != self.consumed + self.dead:
            found.append(
                f"published {self.published} != consumed {self.consumed} + dead {self.dead}"
            )
        if self.effects != self.consumed:
            found.append(f"effects {self.effects} != consumed {self.consumed}")
        if self.duplicate_effects:
            found.append(f"{self.duplicate_effects} duplicate effect(s)")
        if self.handled_rows != self.consumed:
            found.append(f"handled business rows {self.handled_rows} != consumed {self.consumed}")
        if self.dead != 1:
            found.append(f"{self.dead} dead letters, expected exactly the poison event")
        return found

    @property
    def ok(self) -> bool:
        return not self.problems()


class DemoProgress(Progress):
    footer = ""

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        if self.footer:
            yield Text(self.footer, style="dim", overflow="ellipsis", no_wrap=True)


def progress_display(console: Console) -> DemoProgress:
    return DemoProgress(
        TextColumn("[bold]{task.description:<13}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        refresh_per_second=8,
    )


def render_summary(summary: DemoSummary, console: Console) -> None:
    """Print the summary table and the exactly-once verdict."""
    table = RichTable(title=f"outboxer demo — {summary.transport} transport", title_justify="left")
    table.add_column("service")
    for name in ("published", "consumed", "retried", "dead", "effects"):
        table.add_column(name, justify="right")
    for service, c in summary.by_service.items():
        table.add_row(
            service,
            str(c.published),
            str(c.consumed),
            str(c.retried),
            f"[red]{c.dead}[/]" if c.dead else "0",
            str(c.effects),
        )
    table.add_section()
    table.add_row(
        "[bold]total",
        f"[bold]{summary.published}",
        f"[bold]{summary.consumed}",
        f"[bold]{summary.retried}",
        f"[bold red]{summary.dead}" if summary.dead else "[bold]0",
        f"[bold]{summary.effects}",
    )
    console.print(table)
    startup = " (including the consumer groups' start-up)" if summary.transport == "kafka" else ""
    console.print(
        f"{summary.published} events in {summary.seconds:.2f}s{startup}: "
        f"[bold]{summary.events_per_second:,.0f} events/s[/]"
    )
    problems = summary.problems()
    if problems:
        console.print(f"[bold red]exactly-once check FAILED:[/] {'; '.join(problems)}")
    else:
        console.print(
            "[green]exactly-once check passed[/]: published = consumed + dead, "
            f"one effect per consumed event, {summary.duplicate_effects} duplicates; "
            "the dead letter is the poison event"
        )
    console.print(f"SQLite database: {escape(str(summary.db_path))}")
