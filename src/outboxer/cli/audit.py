"""The audit trail of operator actions: list, purge."""

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
    EXIT_USAGE,
    JsonOption,
    ServiceOption,
    _duration,
    _failer,
    _opened,
    _routes,
    app,
)
from outboxer.models import AuditEntry

audit_app = typer.Typer(
    help="The audit trail of operator actions (requeue, purge, edit, cancel, ...).",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(audit_app, name="audit")


def audit_json(e: AuditEntry) -> dict[str, Any]:
    """An audit row as JSON."""
    return {
        "id": e.id,
        "at": e.at.isoformat(),
        "actor": e.actor,
        "action": e.action,
        "service": e.service_name,
        "outbox_ids": e.outbox_ids,
        "detail": e.detail,
        "payload_before": e.payload_before,
        "payload_after": e.payload_after,
    }


def _ids(ids: list[int]) -> str:
    shown = ", ".join(map(str, ids[:8]))
    return shown + (f" (+{len(ids) - 8})" if len(ids) > 8 else "")


@audit_app.command("list")
def audit_list(
    ctx: typer.Context,
    service: ServiceOption = None,
    action: Annotated[
        str | None, typer.Option(help="Only this action (requeue, purge, edit, ...).")
    ] = None,
    outbox_id: Annotated[
        int | None, typer.Option("--id", metavar="ID", help="Only actions on this outbox id.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Rows per page.")] = 50,
    before: Annotated[
        int | None,
        typer.Option(metavar="CURSOR", help="Next page: the cursor printed by the previous one."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Operator actions, newest first: who, when, what, on which rows."""
    with _opened(ctx, as_json=as_json) as outbox:
        if service:
            _routes(outbox, service)
        page = outbox.admin.audit(
            services=service, action=action, outbox_id=outbox_id, limit=limit, before=before
        )
    if as_json:
        doc = {"entries": [audit_json(e) for e in page.entries], "next_before": page.next_before}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    console = Console()
    if not page.entries:
        console.print("no audited actions")
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
    for name in ("id", "at", "actor", "action", "service", "rows", "detail"):
        table.add_column(name, no_wrap=name != "detail", overflow="fold")
    for e in page.entries:
        detail = {k: v for k, v in e.detail.items() if v is not None}
        table.add_row(
            str(e.id),
            e.at.isoformat(timespec="seconds"),
            escape(e.actor),
            e.action,
            escape(e.service_name),
            _ids(e.outbox_ids),
            escape(json.dumps(detail, sort_keys=True)) if detail else "",
        )
    console.print(table)
    if page.next_before is not None:
        console.print(f"[dim]more: --before {page.next_before}[/]")


@audit_app.command("purge")
def audit_purge(
    ctx: typer.Context,
    older_than: Annotated[
        str, typer.Option(metavar="DURATION", help="Delete audit rows written this long ago.")
    ],
    as_json: JsonOption = False,
) -> None:
    """Delete old audit rows (the retention purge never does)."""
    age = _duration(older_than, "--older-than", as_json=as_json)
    if age is None:
        _failer(as_json)("--older-than is required", EXIT_USAGE)
    with _opened(ctx, as_json=as_json) as outbox:
        deleted = outbox.admin.purge_audit(older_than=age)
    if as_json:
        sys.stdout.write(json.dumps({"deleted": deleted}, indent=2) + "\n")
        return
    Console().print(f"deleted {deleted:,} audit row(s)")
