"""The ``outboxer`` command line: migrate, run, status and the demo.

``--app module:attribute`` (or ``OUTBOXER_APP``) names the application's
:class:`~outboxer.Outbox`, the way uvicorn names an ASGI app; the current directory
is put first on ``sys.path`` so a project's modules import as they would from its
root. ``--config FILE`` is read by ``Outbox()`` while the app is imported (as
``OUTBOXER_CONFIG``), unless the app passes its own ``settings=``.

Errors from outboxer are printed as one red line and exit with status 1; usage
mistakes exit with status 2.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from outboxer.demo import HideDemoFailures, run_demo
from outboxer.errors import ConfigurationError, OutboxError
from outboxer.models import ServiceStatus, Status
from outboxer.outbox import Outbox
from outboxer.routing import ServiceRoute
from outboxer.settings import CONFIG_ENV, config_path

logger = logging.getLogger(__name__)

app = typer.Typer(
    name="outboxer",
    help="The transactional outbox: create tables, run relays and consumers, inspect.",
    no_args_is_help=True,
    add_completion=False,
    # Locals of a failing frame may hold a database URL with its password.
    pretty_exceptions_show_locals=False,
)


class LogLevel(StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


class LogFormat(StrEnum):
    AUTO = "auto"
    RICH = "rich"
    PLAIN = "plain"


class DemoTransport(StrEnum):
    LOCAL = "local"
    KAFKA = "kafka"


@dataclass(frozen=True, slots=True)
class _Options:
    app: str | None
    config: Path | None


# ---------------------------------------------------------------------- errors


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _fail(message: str, code: int = 1) -> NoReturn:
    Console(stderr=True).print(
        Text(f"error: {_one_line(message)}", style="red"), soft_wrap=True, highlight=False
    )
    raise typer.Exit(code)


def _masked(message: str, outbox: Outbox | None) -> str:
    # outboxer's own messages carry safe_url; a driver's text might still echo the URL.
    if outbox is None:
        return message
    url = outbox.db.url
    password = url.password
    if not password:
        return message
    message = message.replace(url.render_as_string(hide_password=False), outbox.db.safe_url)
    # A very short password would also match ordinary words of the message.
    return message.replace(password, "***") if len(password) >= 4 else message


@contextmanager
def _reported(outbox: Outbox | None = None) -> Iterator[None]:
    try:
        yield
    except OutboxError as exc:
        _fail(_masked(str(exc), outbox))


# ---------------------------------------------------------------------- loading


def _ensure_cwd_on_path() -> None:
    cwd = os.getcwd()
    if not sys.path or sys.path[0] not in ("", cwd):
        sys.path.insert(0, cwd)


@contextmanager
def _config_env(config: Path | None) -> Iterator[None]:
    if config is None:
        yield
        return
    path = config_path(config)
    assert path is not None
    previous = os.environ.get(CONFIG_ENV)
    os.environ[CONFIG_ENV] = str(path.resolve())
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(CONFIG_ENV, None)
        else:
            os.environ[CONFIG_ENV] = previous


def load_app(spec: str, *, config: Path | None = None) -> Outbox:
    """Import ``module:attribute`` and return the :class:`Outbox` it names.

    The current directory is put first on ``sys.path``; ``config`` is the TOML file
    ``Outbox()`` reads while the module is imported. Every failure is a
    :class:`ConfigurationError` naming ``spec``.
    """
    module_name, _, attr = spec.partition(":")
    module_name, attr = module_name.strip(), attr.strip()
    if not module_name or not attr:
        raise ConfigurationError(
            f"--app {spec!r} must look like 'module:attribute', e.g. 'myapp.events:outbox'"
        )
    _ensure_cwd_on_path()
    with _config_env(config):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if module_name == missing or module_name.startswith(missing + "."):
                raise ConfigurationError(
                    f"cannot load --app {spec!r}: no module named {missing!r} "
                    f"(searched {os.getcwd()} and sys.path)"
                ) from exc
            raise ConfigurationError(
                f"cannot load --app {spec!r}: importing {module_name!r} failed: {exc}"
            ) from exc
        except Exception as exc:
            raise ConfigurationError(
                f"cannot load --app {spec!r}: importing {module_name!r} raised "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigurationError(
                f"cannot load --app {spec!r}: module {module_name!r} has no attribute {attr!r}"
            ) from None
    if not isinstance(obj, Outbox):
        raise ConfigurationError(
            f"--app {spec!r} is a {type(obj).__module__}.{type(obj).__qualname__}, "
            "not an outboxer.Outbox"
        )
    return obj


def _options(ctx: typer.Context) -> _Options:
    options = ctx.obj
    assert isinstance(options, _Options)
    return options


@contextmanager
def _opened(ctx: typer.Context) -> Iterator[Outbox]:
    options = _options(ctx)
    if not options.app:
        _fail(
            f"the {ctx.info_name!r} command needs the application's Outbox: "
            "--app module:attribute (or OUTBOXER_APP)",
            code=2,
        )
    with _reported():
        outbox = load_app(options.app, config=options.config)
    try:
        with _reported(outbox):
            yield outbox
    finally:
        outbox.close()


def _routes(outbox: Outbox, services: list[str] | None = None) -> list[ServiceRoute]:
    if not outbox.routes.routes():
        raise ConfigurationError(
            f"{outbox!r} registers no services (register_event/register_service)"
        )
    return outbox.routes.select(services)


# ---------------------------------------------------------------------- logging


_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class _ExtrasFormatter(logging.Formatter):
    # outboxer logs its context (service, outbox_id, ...) as extra= fields, which the
    # stock formatters drop: they are appended as key=value.

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        extras = {k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS and k[0] != "_"}
        if extras:
            text += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return text


def _log_handler(fmt: LogFormat, console: Console | None = None) -> logging.Handler:
    if fmt is LogFormat.AUTO:
        fmt = LogFormat.RICH if sys.stderr.isatty() or console is not None else LogFormat.PLAIN
    handler: logging.Handler
    if fmt is LogFormat.RICH:
        handler = RichHandler(
            console=console or Console(stderr=True), rich_tracebacks=True, show_path=False
        )
        handler.setFormatter(_ExtrasFormatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_ExtrasFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    return handler


@contextmanager
def _logging(
    level: str,
    fmt: LogFormat,
    console: Console | None = None,
    filters: tuple[logging.Filter, ...] = (),
) -> Iterator[None]:
    # The library never configures logging; the CLI process does, and undoes it after
    # the command so in-process callers (tests) keep their own configuration.
    handler = _log_handler(fmt, console)
    for f in filters:
        handler.addFilter(f)
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
        handler.close()


# ---------------------------------------------------------------------- commands


@app.callback()
def _main(
    ctx: typer.Context,
    app_spec: Annotated[
        str | None,
        typer.Option(
            "--app",
            envvar="OUTBOXER_APP",
            metavar="MODULE:ATTR",
            help="The application's Outbox, e.g. myapp.events:outbox.",
            show_default=False,
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            metavar="FILE",
            help="outboxer TOML configuration, read by Outbox() when the app is imported.",
            show_default=False,
        ),
    ] = None,
) -> None:
    ctx.obj = _Options(app_spec, config)


@app.command()
def migrate(ctx: typer.Context) -> None:
    """Create the registered services' outbox tables and indexes (idempotent)."""
    with _opened(ctx) as outbox:
        routes = _routes(outbox)
        before = outbox.db.table_names()
        outbox.migrate()
        after = outbox.db.table_names()
    console = Console()
    console.print(f"database {escape(outbox.db.safe_url)}", highlight=False)
    table = Table("service", "table", "state")
    for route in routes:
        if route.table_name in before:
            state = "[dim]already present[/]"
        elif route.table_name in after:
            state = "[green]created[/]"
        else:
            state = "[red]missing[/]"
        table.add_row(route.service_name, route.table_name, state)
    console.print(table)


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
        LogFormat, typer.Option(help="rich on a terminal, plain text otherwise (auto).")
    ] = LogFormat.AUTO,
) -> None:
    """Run relays and consumers until SIGTERM or SIGINT, then stop cleanly."""
    if relay_only and consume_only:
        _fail(
            "--relay-only and --consume-only are mutually exclusive; "
            "give neither to run relays and consumers together",
            code=2,
        )
    with _logging(log_level.value, log_format), _opened(ctx) as outbox:
        logger.info(
            "starting outboxer for %s on %s",
            _options(ctx).app,
            outbox.db.safe_url,
            extra={"transport": outbox.transport.name},
        )
        try:
            outbox.run(relay=not consume_only, consume=not relay_only, services=service or None)
        except KeyboardInterrupt:
            # Only before the engine installed its signal handlers (during start-up).
            raise typer.Exit(130) from None


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    return f"{hours // 24}d {hours % 24:02d}h"


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
        "oldest_due_seconds": st.oldest_due_seconds,
        "dead": st.dead,
    }


@app.command()
def status(
    ctx: typer.Context,
    service: Annotated[
        list[str] | None,
        typer.Option("--service", "-s", help="Only this service (repeatable).", show_default=False),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Counts by status, rows due now and the age of the oldest due row, per service."""
    results: list[tuple[ServiceRoute, ServiceStatus | None]] = []
    with _opened(ctx) as outbox:
        existing = outbox.db.table_names()
        for route in _routes(outbox, service):
            migrated = route.table_name in existing
            results.append((route, outbox.store(route.service_name).status() if migrated else None))
    if as_json:
        doc = {
            "database": outbox.db.safe_url,
            "services": [_status_json(route, st) for route, st in results],
        }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    console = Console()
    table = Table(title=f"outboxer status: {escape(outbox.db.safe_url)}", title_justify="left")
    width = max((len(r.table_name) for r, _ in results), default=0)
    table.add_column("service\n[dim]table[/]", min_width=width, no_wrap=True)
    for name in (*(s.value for s in Status), "due\nnow", "oldest\ndue"):
        table.add_column(name, justify="right", min_width=max(map(len, name.split())))
    missing = []
    for route, st in results:
        name = f"{route.service_name}\n[dim]{route.table_name}[/]"
        if st is None:
            missing.append(route.table_name)
            table.add_row(name, *["[yellow]-"] * (len(Status) + 2))
            continue
        counts = [str(st.counts.get(s.value, 0)) for s in Status]
        if st.dead:
            counts[list(Status).index(Status.DEAD)] = f"[bold red]{st.dead}"
        table.add_row(name, *counts, str(st.due), _age(st.oldest_due_seconds))
    console.print(table)
    if missing:
        console.print(
            f"[yellow]table(s) missing: {', '.join(missing)}; run `outboxer migrate`",
            highlight=False,
        )


@app.command()
def demo(
    events: Annotated[int, typer.Option(help="How many events to publish.")] = 3000,
    transport: Annotated[
        DemoTransport,
        typer.Option(help="local (in-process) or kafka (starts the embedded broker)."),
    ] = DemoTransport.LOCAL,
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
            summary = run_demo(events, transport.value, path, console)
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


def main() -> None:
    """Entry point of the ``outboxer`` console script."""
    app(prog_name="outboxer")


if __name__ == "__main__":
    main()
