"""Dead letters (list, show, requeue, edit, purge), cancel, and retention purge.

Every change made here is written to the audit table (``outboxer audit list``) with
the OS user as its actor."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn
from rich.table import Table

from outboxer.admin import PurgeResult, os_user
from outboxer.cli.common import (
    EXIT_ERROR,
    EXIT_USAGE,
    EventTypeOption,
    JsonOption,
    ServiceOption,
    _duration,
    _failer,
    _opened,
    _routes,
    app,
)
from outboxer.durations import format_duration
from outboxer.errors import OutboxError
from outboxer.models import OutboxMessage, Status
from outboxer.outbox import Outbox

dead_app = typer.Typer(
    help="Dead letters: list, show, requeue, edit, purge.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(dead_app, name="dead")


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def message_json(m: OutboxMessage) -> dict[str, Any]:
    """A row as JSON: every column, the envelope decoded, the headers parsed."""
    try:
        envelope: Any = m.envelope().to_dict()
    except OutboxError:
        envelope = None
    return {
        "id": m.id,
        "service": m.service_name,
        "event_type": m.event_type,
        "status": m.status.value,
        "message_key": m.message_key,
        "topic": m.topic,
        "attempts": m.retry_count,
        "max_retry": m.max_retry,
        "requeue_count": m.requeue_count,
        "requeued_at": _iso(m.requeued_at),
        "created_at": _iso(m.created_at),
        "updated_at": _iso(m.updated_at),
        "next_retry_at": _iso(m.next_retry_at),
        "published_at": _iso(m.published_at),
        "consumed_at": _iso(m.consumed_at),
        "last_error": m.last_error,
        "headers": m.header_map(),
        "envelope": envelope,
        "payload": None if envelope is not None else m.payload,
    }


def _ago(value: datetime) -> str:
    return format_duration(max(0.0, (datetime.now(UTC) - value).total_seconds()))


@dead_app.command("list")
def dead_list(
    ctx: typer.Context,
    service: ServiceOption = None,
    event_type: EventTypeOption = None,
    older_than: Annotated[
        str | None,
        typer.Option(metavar="DURATION", help="Died at least this long ago.", show_default=False),
    ] = None,
    newer_than: Annotated[
        str | None,
        typer.Option(metavar="DURATION", help="Died less than this long ago.", show_default=False),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Rows per page.")] = 50,
    after: Annotated[
        str | None,
        typer.Option(metavar="CURSOR", help="Next page: the cursor printed by the previous one."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Dead letters, oldest first per service, one page at a time."""
    older = _duration(older_than, "--older-than", as_json=as_json)
    newer = _duration(newer_than, "--newer-than", as_json=as_json)
    with _opened(ctx, as_json=as_json) as outbox:
        _routes(outbox, service)
        page = outbox.admin.dead_letters(
            services=service,
            event_type=event_type,
            older_than=older,
            newer_than=newer,
            limit=limit,
            after=after,
        )
    if as_json:
        doc = {"messages": [message_json(m) for m in page.messages], "next_after": page.next_after}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    console = Console()
    if not page.messages:
        console.print("no dead letters")
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
    table.add_column("id", justify="right", no_wrap=True)
    table.add_column("service", overflow="fold", max_width=16)
    table.add_column("event type", overflow="fold", max_width=24)
    table.add_column("tries", justify="right", no_wrap=True)
    table.add_column("died", justify="right", no_wrap=True)
    table.add_column("last error", overflow="ellipsis", no_wrap=True, ratio=1, min_width=12)
    for m in page.messages:
        table.add_row(
            str(m.id),
            escape(m.service_name),
            escape(m.event_type),
            str(m.retry_count) + (f" r{m.requeue_count}" if m.requeue_count else ""),
            _ago(m.updated_at) + " ago",
            escape(_first_line(m.last_error)),
        )
    console.print(table)
    if page.next_after:
        console.print(f"[dim]more: --after {page.next_after}[/]", highlight=False)


def _first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


@dead_app.command("show")
def dead_show(
    ctx: typer.Context,
    outbox_id: Annotated[int, typer.Argument(metavar="ID", help="The outbox id.")],
    service: Annotated[
        str | None,
        typer.Option("--service", "-s", help="The service, if several have this id."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """One message (any status): its envelope, attempts, headers and full last error."""
    with _opened(ctx, as_json=as_json) as outbox:
        m = outbox.admin.message(outbox_id, service=service)
    doc = message_json(m)
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    console = Console()
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    status = f"[bold red]{m.status.value}[/]" if m.status is Status.DEAD else m.status.value
    rows = [
        ("id", str(m.id)),
        ("service", escape(m.service_name)),
        ("event type", escape(m.event_type)),
        ("status", status),
        ("key", escape(m.message_key)),
        ("attempts", f"{m.retry_count} of {m.max_retry}"),
        ("created", f"{doc['created_at']} ({_ago(m.created_at)} ago)"),
        ("last change", f"{doc['updated_at']} ({_ago(m.updated_at)} ago)"),
    ]
    if m.requeue_count:
        rows.append(("requeued", f"{m.requeue_count} time(s), last {doc['requeued_at']}"))
    if m.headers:
        rows.append(("headers", escape(json.dumps(m.header_map()))))
    for key, value in rows:
        grid.add_row(key, value)
    console.print(grid)
    console.print("[bold]envelope[/]")
    if doc["envelope"] is not None:
        console.print_json(data=doc["envelope"])
    else:
        console.print(escape(m.payload), highlight=False)
    console.print("[bold]last error[/]")
    console.print(escape(m.last_error or "-"), highlight=False, soft_wrap=True)


@dead_app.command("requeue")
def dead_requeue(
    ctx: typer.Context,
    ids: Annotated[
        list[int] | None,
        typer.Argument(metavar="[ID]...", help="Outbox ids of dead letters.", show_default=False),
    ] = None,
    service: ServiceOption = None,
    event_type: EventTypeOption = None,
    since: Annotated[
        str | None,
        typer.Option(metavar="DURATION", help="Only those that died within this long."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be requeued; change nothing.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Send dead letters again: pending, due now, a fresh attempt count (the row notes
    that it was requeued and when). Give ids, or --service (with --event-type/--since)."""
    if not ids and not service:
        _failer(as_json)(
            "name the dead letters to requeue: their ids, or --service S "
            "(optionally with --event-type and --since)",
            EXIT_USAGE,
        )
    window = _duration(since, "--since", as_json=as_json)
    with _opened(ctx, as_json=as_json) as outbox:
        done = outbox.admin.requeue(
            ids or None,
            services=service,
            event_type=event_type,
            since=window,
            dry_run=dry_run,
            actor=os_user(),
        )
    total = sum(done.values())
    if as_json:
        doc = {"requeued": total, "by_service": done, "dry_run": dry_run}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    verb = "would requeue" if dry_run else "requeued"
    detail = ", ".join(f"{svc} {n}" for svc, n in done.items())
    Console().print(f"{verb} {total} dead letter(s)" + (f": {detail}" if detail else ""))


class EditError(ValueError):
    """An edit the command line cannot make (the path or the value of ``--set``)."""


def _set_path(document: Any, assignment: str) -> Any:
    """``document`` with ``path=value`` applied: dotted keys (a number indexes a list),
    ``value`` read as JSON, or taken as a string when it is not JSON."""
    path, sep, raw = assignment.partition("=")
    if not sep or not path:
        raise EditError(f"--set takes path=value, got {assignment!r}")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    parts = path.split(".")
    if not isinstance(document, dict | list):
        raise EditError(f"--set {path}: the payload is not an object or a list")
    node: Any = document
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise EditError(f"--set {path}: {part!r} is not an index of the list")
            key: Any = int(part)
        elif isinstance(node, dict):
            key = part
            if not last and key not in node:
                node[key] = {}
        else:
            raise EditError(f"--set {path}: {'.'.join(parts[:i])} is not an object or a list")
        if last:
            node[key] = value
        else:
            node = node[key]
    return document


def _current_payload(m: OutboxMessage) -> Any:
    try:
        return m.envelope().payload
    except OutboxError:
        try:
            return json.loads(m.payload)
        except ValueError:
            return m.payload


@dead_app.command("edit")
def dead_edit(
    ctx: typer.Context,
    outbox_id: Annotated[int, typer.Argument(metavar="ID", help="The dead letter's outbox id.")],
    service: Annotated[
        str | None,
        typer.Option("--service", "-s", help="The service, if several have this id."),
    ] = None,
    assignments: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="PATH=VALUE",
            help="Set one field of the payload (dotted path; VALUE read as JSON, else text). "
            "Repeatable.",
            show_default=False,
        ),
    ] = None,
    payload_file: Annotated[
        Path | None,
        typer.Option(
            "--payload-file",
            metavar="FILE",
            help="The new payload as a JSON file ('-': standard input).",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Fix a dead letter's payload and send it again: opens the payload in $EDITOR
    (or takes --set / --payload-file), checks it as publish does (JSON, size limit,
    the event type's registered schema), then requeues it. The change is audited
    with the payload before and after."""
    fail = _failer(as_json)
    if assignments and payload_file is not None:
        fail("give --set or --payload-file, not both", EXIT_USAGE)
    with _opened(ctx, as_json=as_json) as outbox:
        m = outbox.admin.message(outbox_id, service=service)
        if m.status is not Status.DEAD:
            fail(
                f"outbox message {m.id} of {m.service_name} is {m.status.value}, not dead: "
                "only dead letters are edited",
                EXIT_ERROR,
            )
        before = _current_payload(m)
        try:
            if payload_file is not None:
                raw = sys.stdin.read() if str(payload_file) == "-" else payload_file.read_text()
                payload = json.loads(raw)
            elif assignments:
                payload = json.loads(json.dumps(before))
                for assignment in assignments:
                    payload = _set_path(payload, assignment)
            else:
                text = json.dumps(before, indent=2, ensure_ascii=False) + "\n"
                edited = click.edit(text, extension=".json", require_save=True)
                if edited is None:
                    fail("no change: the payload was not saved; nothing requeued", EXIT_ERROR)
                payload = json.loads(edited)
        except (ValueError, EditError) as exc:
            fail(f"the new payload is not valid: {exc}", EXIT_USAGE)
        except OSError as exc:
            fail(f"cannot read the payload: {exc}", EXIT_USAGE)
        if payload == before:
            fail("no change: the payload is the same; nothing requeued", EXIT_ERROR)
        edited_row = outbox.admin.edit(m.id, payload, service=m.service_name, actor=os_user())
    if as_json:
        sys.stdout.write(json.dumps(message_json(edited_row), indent=2) + "\n")
        return
    Console().print(
        f"edited dead letter {edited_row.id} of {escape(edited_row.service_name)} "
        f"({len(m.payload.encode()):,} -> {len(edited_row.payload.encode()):,} bytes) "
        f"and requeued it",
        highlight=False,
    )


@dead_app.command("purge")
def dead_purge(
    ctx: typer.Context,
    older_than: Annotated[
        str, typer.Option(metavar="DURATION", help="Delete dead letters that died this long ago.")
    ],
    service: ServiceOption = None,
    event_type: EventTypeOption = None,
    batch_size: Annotated[
        int | None, typer.Option(min=1, max=10_000, help="Rows per delete.", show_default=False)
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be deleted; delete nothing.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Delete dead letters older than a duration, in small batches."""
    age = _duration(older_than, "--older-than", as_json=as_json)
    with _opened(ctx, as_json=as_json) as outbox:
        _routes(outbox, service)
        result = _purge(
            outbox,
            as_json,
            dead_older_than=age,
            services=service,
            event_type=event_type,
            batch_size=batch_size,
            pause=None,
            dry_run=dry_run,
        )
    _report_purge(result, dry_run, as_json)


# ---------------------------------------------------------------------- cancel


@app.command()
def cancel(
    ctx: typer.Context,
    event_id: Annotated[str, typer.Argument(metavar="EVENT_ID", help="The event id.")],
    service: Annotated[
        str | None,
        typer.Option("--service", "-s", help="The service, if several have this event id."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Take back an event published with this event id that is still waiting (not
    sent yet, not on its way): it becomes cancelled and is never sent. Exits 1 when
    it could not be cancelled (not there, or already sent, consumed or dead)."""
    with _opened(ctx, as_json=as_json) as outbox:
        done = outbox.admin.cancel(event_id, service=service, actor=os_user())
    if as_json:
        sys.stdout.write(json.dumps({"event_id": event_id, "cancelled": done}, indent=2) + "\n")
    elif done:
        Console().print(f"cancelled event {escape(event_id)}", highlight=False)
    else:
        Console(stderr=True).print(
            f"[red]not cancelled: event {escape(event_id)} is not waiting "
            f"(no such event id, or already sent, on its way, consumed, dead or cancelled)",
            highlight=False,
        )
    if not done:
        raise typer.Exit(EXIT_ERROR)


@app.command()
def purge(
    ctx: typer.Context,
    consumed_older_than: Annotated[
        str | None,
        typer.Option(metavar="DURATION", help="Delete rows consumed this long ago."),
    ] = None,
    published_older_than: Annotated[
        str | None,
        typer.Option(
            metavar="DURATION",
            help="Delete published rows this old, of services with no handlers in this app "
            "(consumed elsewhere).",
        ),
    ] = None,
    dead_older_than: Annotated[
        str | None,
        typer.Option(metavar="DURATION", help="Delete dead letters that died this long ago."),
    ] = None,
    service: ServiceOption = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            min=1, max=10_000, help="Rows per delete (default: retention.batch_size, 500)."
        ),
    ] = None,
    pause: Annotated[
        str | None,
        typer.Option(
            metavar="DURATION", help="Pause between batches (default: retention.batch_pause)."
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be deleted; delete nothing.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Retention: delete old consumed (and published, dead) rows in small batches, so
    no long lock is held and replicas see no spike."""
    ages = {
        "consumed_older_than": _duration(consumed_older_than, "--consumed-older-than"),
        "published_older_than": _duration(published_older_than, "--published-older-than"),
        "dead_older_than": _duration(dead_older_than, "--dead-older-than"),
    }
    if all(v is None for v in ages.values()):
        _failer(as_json)(
            "nothing to purge: give --consumed-older-than, --published-older-than "
            "or --dead-older-than",
            EXIT_USAGE,
        )
    pause_s = _duration(pause, "--pause", as_json=as_json)
    with _opened(ctx, as_json=as_json) as outbox:
        _routes(outbox, service)
        result = _purge(
            outbox,
            as_json,
            services=service,
            batch_size=batch_size,
            pause=pause_s,
            dry_run=dry_run,
            **ages,
        )
    _report_purge(result, dry_run, as_json)


def _purge(
    outbox: Outbox,
    as_json: bool,
    *,
    batch_size: int | None,
    pause: float | None,
    **options: Any,
) -> PurgeResult:
    retention = outbox.settings.retention
    size = batch_size or retention.batch_size
    wait = retention.batch_pause if pause is None else pause
    if not options.get("dry_run"):
        options["actor"] = os_user()
    if as_json or not sys.stderr.isatty():
        return outbox.admin.purge(batch_size=size, pause=wait, **options)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task("purging", total=None)

        def report(service: str, status: Status, deleted: int) -> None:
            progress.update(task, description=f"{service} {status.value}: {deleted:,} deleted")

        return outbox.admin.purge(batch_size=size, pause=wait, progress=report, **options)


def _report_purge(result: PurgeResult, dry_run: bool, as_json: bool) -> None:
    if as_json:
        doc = {
            "dry_run": dry_run,
            "total": result.total,
            "deleted": [
                {"service": svc, "status": st.value, "rows": n}
                for (svc, st), n in result.deleted.items()
            ],
            "skipped": result.skipped,
        }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    console = Console()
    table = Table("service", "status", "would delete" if dry_run else "deleted", box=box.SIMPLE)
    for (svc, st), n in result.deleted.items():
        table.add_row(escape(svc), st.value, f"{n:,}")
    console.print(table)
    for note in result.skipped:
        console.print(f"[dim]{escape(note)}[/]", highlight=False)
    verb = "would delete" if dry_run else "deleted"
    console.print(f"{verb} {result.total:,} row(s)")
