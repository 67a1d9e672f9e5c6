"""``outboxer schemas``: export the AsyncAPI document; check a change against an
older one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from outboxer.cli.common import EXIT_USAGE, JsonOption, _failer, _opened, _routes, app
from outboxer.contracts import breaking_changes

EXIT_BREAKING = 5

schemas_app = typer.Typer(
    help="Event contracts: export the AsyncAPI document, check a change for consumers.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(schemas_app, name="schemas")


@schemas_app.command("export")
def export(
    ctx: typer.Context,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write the document here instead of stdout."),
    ] = None,
    title: Annotated[str | None, typer.Option(help="info.title of the document.")] = None,
    doc_version: Annotated[
        str, typer.Option("--doc-version", help="info.version of the document.")
    ] = "1.0.0",
) -> None:
    """Write the AsyncAPI 3 document (JSON) of the app's services, channels, messages."""
    with _opened(ctx) as outbox:
        _routes(outbox)
        doc = outbox.asyncapi(title=title, version=doc_version)
    text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    if output is None:
        typer.echo(text, nl=False)
        return
    output.write_text(text, encoding="utf-8")
    messages = len(doc["components"]["messages"])
    Console(stderr=True).print(
        f"wrote {escape(str(output))}: {len(doc['channels'])} channel(s), {messages} "
        f"message(s), {len(doc['components']['schemas'])} schema(s)",
        highlight=False,
    )


@schemas_app.command("check")
def check(
    ctx: typer.Context,
    old: Annotated[Path, typer.Argument(help="An earlier `schemas export` document.")],
    as_json: JsonOption = False,
) -> None:
    """Compare the app's schemas with OLD; exit 5 if a change breaks consumers (a
    message removed, a required field removed or retyped)."""
    fail = _failer(as_json)
    try:
        before = json.loads(old.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        fail(f"cannot read {old}: {exc}", EXIT_USAGE)
    with _opened(ctx, as_json=as_json) as outbox:
        _routes(outbox)
        changes = breaking_changes(before, outbox.asyncapi())
    breaking = [c for c in changes if c.breaking]
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "breaking": bool(breaking),
                    "changes": [
                        {
                            "event_type": c.event_type,
                            "version": c.version,
                            "path": c.path,
                            "change": c.what,
                            "breaking": c.breaking,
                        }
                        for c in changes
                    ],
                }
            )
        )
    else:
        console = Console(highlight=False, soft_wrap=True)
        for change in changes:
            colour = "red" if change.breaking else "green"
            console.print(f"[{colour}]{escape(str(change))}[/]")
        verdict = (
            f"[red]{len(breaking)} breaking change(s)[/] for consumers of {escape(str(old))}"
            if breaking
            else f"[green]no breaking change[/] for consumers of {escape(str(old))}"
        )
        console.print(verdict)
    if breaking:
        raise typer.Exit(EXIT_BREAKING)
