"""Keys of ordered services held back: list them, retry or skip the head, park and
release a key. Every change is audited with the OS user as its actor."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from outboxer.admin import os_user
from outboxer.cli.common import JsonOption, ServiceOption, _opened, _routes, app
from outboxer.cli.dead import message_json
from outboxer.durations import format_duration
from outboxer.models import BlockedKey

keys_app = typer.Typer(
    help="Keys of ordered services held back: blocked, retry, skip, park, release.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(keys_app, name="keys")

ServiceArg = Annotated[str, typer.Argument(metavar="SERVICE", help="The ordered service.")]
KeyArg = Annotated[str, typer.Argument(metavar="KEY", help="The message key.")]


def blocked_json(b: BlockedKey) -> dict[str, Any]:
    """A blocked key as JSON."""
    return {
        "service": b.service_name,
        "key": b.message_key,
        "by": b.by,
        "waiting": b.waiting,
        "since": b.since.isoformat(),
        "parked_by": b.parked_by,
        "reason": b.reason,
        "head": None if b.head is None else message_json(b.head),
    }


def _first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


@keys_app.command("blocked")
def keys_blocked(
    ctx: typer.Context,
    service: ServiceOption = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Keys per service.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """Keys held back, oldest first: by a failing head (waiting for its retry), a
    dead head (ordered_after_dead = "block"), or parked by an operator."""
    with _opened(ctx, as_json=as_json) as outbox:
        if service:
            _routes(outbox, service)
        found = outbox.admin.blocked_keys(service, limit=limit)
    if as_json:
        sys.stdout.write(json.dumps({"blocked": [blocked_json(b) for b in found]}, indent=2) + "\n")
        return
    console = Console()
    if not found:
        console.print("no blocked keys")
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
    for name in ("service", "key", "by", "head", "waiting", "since", "error"):
        table.add_column(name, no_wrap=name not in ("error", "key"), overflow="fold")
    now = datetime.now(UTC)
    for b in found:
        head = "-" if b.head is None else str(b.head.id)
        error = b.reason if b.by == "parked" else (b.head.last_error if b.head else None)
        who = f" ({escape(b.parked_by)})" if b.parked_by else ""
        table.add_row(
            escape(b.service_name),
            escape(b.message_key),
            b.by + who,
            head,
            str(b.waiting),
            format_duration(max(0.0, (now - b.since).total_seconds())) + " ago",
            escape(_first_line(error)),
        )
    console.print(table)


@keys_app.command("retry")
def keys_retry(
    ctx: typer.Context, service: ServiceArg, key: KeyArg, as_json: JsonOption = False
) -> None:
    """Retry the key's head now (a failing one keeps its attempts; a dead one is requeued)."""
    with _opened(ctx, as_json=as_json) as outbox:
        oid = outbox.admin.retry_head(service, key, actor=os_user())
    _done(as_json, {"service": service, "key": key, "retried": oid}, f"retrying {oid} now")


@keys_app.command("skip")
def keys_skip(
    ctx: typer.Context,
    service: ServiceArg,
    key: KeyArg,
    reason: Annotated[str, typer.Option(help="Why (kept as the dead letter's error).")],
    as_json: JsonOption = False,
) -> None:
    """Mark the key's head dead with a reason, so the events behind it go on."""
    with _opened(ctx, as_json=as_json) as outbox:
        oid = outbox.admin.skip_head(service, key, reason, actor=os_user())
    _done(as_json, {"service": service, "key": key, "skipped": oid}, f"skipped {oid} (now dead)")


@keys_app.command("park")
def keys_park(
    ctx: typer.Context,
    service: ServiceArg,
    key: KeyArg,
    reason: Annotated[str | None, typer.Option(help="Why (shown with the key).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Hold every event of the key (none is handled) until it is released."""
    with _opened(ctx, as_json=as_json) as outbox:
        done = outbox.admin.park(service, key, reason=reason, actor=os_user())
    text = f"parked {escape(key)}" if done else f"{escape(key)} was parked already"
    _done(as_json, {"service": service, "key": key, "parked": done}, text)


@keys_app.command("release")
def keys_release(
    ctx: typer.Context, service: ServiceArg, key: KeyArg, as_json: JsonOption = False
) -> None:
    """Release a parked key: its waiting events are due at once."""
    with _opened(ctx, as_json=as_json) as outbox:
        n = outbox.admin.release(service, key, actor=os_user())
    _done(
        as_json,
        {"service": service, "key": key, "released": n},
        f"released {escape(key)}: {n} event(s) due now",
    )


def _done(as_json: bool, doc: dict[str, Any], text: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        Console().print(text, highlight=False)
