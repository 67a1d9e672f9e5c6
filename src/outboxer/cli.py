"""The ``outboxer`` command line: migrate, run, status, dead letters, cancel, purge,
the demo.

``--app module:attribute`` (or ``OUTBOXER_APP``) names the application's
:class:`~outboxer.Outbox`, the way uvicorn names an ASGI app; the current directory
is put first on ``sys.path`` so a project's modules import as they would from its
root. ``--config FILE`` is read by ``Outbox()`` while the app is imported (as
``OUTBOXER_CONFIG``), unless the app passes its own ``settings=``.

Errors from outboxer are printed as one red line (with ``--json``: a JSON object on
stdout) and exit with status 1; usage mistakes exit with status 2. ``status`` also
exits 3 when outbox tables are missing and 4 when a ``--fail-on`` condition holds.
Durations read like ``30s``, ``15m``, ``12h``, ``7d``.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import json
import logging
import os
import ssl
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich import box
from rich.console import Console
from rich.live import Live
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn
from rich.table import Table
from rich.text import Text

from outboxer.admin import PurgeResult
from outboxer.database.migrations import sql_script
from outboxer.demo import HideDemoFailures, run_demo
from outboxer.durations import format_duration, parse_duration
from outboxer.errors import ConfigurationError, OutboxError
from outboxer.health import Condition, failures, parse_conditions
from outboxer.logs import ExtrasFormatter, JsonFormatter
from outboxer.models import OutboxMessage, ServiceStatus, Status
from outboxer.outbox import Outbox
from outboxer.routing import ServiceRoute
from outboxer.settings import CONFIG_ENV, config_path

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_MISSING_TABLES = 3
EXIT_UNHEALTHY = 4

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
    JSON = "json"


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


def _fail_json(message: str, code: int = EXIT_ERROR) -> NoReturn:
    doc = {"ok": False, "exit_code": code, "error": _one_line(message)}
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    raise typer.Exit(code)


def _failer(as_json: bool) -> Callable[[str, int], NoReturn]:
    return _fail_json if as_json else _fail


@contextmanager
def _reported(outbox: Outbox | None = None, *, as_json: bool = False) -> Iterator[None]:
    try:
        yield
    except OutboxError as exc:
        _failer(as_json)(_masked(str(exc), outbox), EXIT_ERROR)


def _duration(value: str | None, option: str, *, as_json: bool = False) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value, what=option)
    except ConfigurationError as exc:
        _failer(as_json)(exc.message, EXIT_USAGE)


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
def _opened(ctx: typer.Context, *, as_json: bool = False) -> Iterator[Outbox]:
    options = _options(ctx)
    if not options.app:
        _failer(as_json)(
            f"the {ctx.command_path.removeprefix('outboxer ')!r} command needs the "
            "application's Outbox: --app module:attribute (or OUTBOXER_APP)",
            EXIT_USAGE,
        )
    with _reported(as_json=as_json):
        outbox = load_app(options.app, config=options.config)
    try:
        with _reported(outbox, as_json=as_json):
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


def _log_handler(fmt: LogFormat, console: Console | None = None) -> logging.Handler:
    if fmt is LogFormat.AUTO:
        fmt = LogFormat.RICH if sys.stderr.isatty() or console is not None else LogFormat.PLAIN
    handler: logging.Handler
    if fmt is LogFormat.RICH:
        handler = RichHandler(
            console=console or Console(stderr=True), rich_tracebacks=True, show_path=False
        )
        handler.setFormatter(ExtrasFormatter("%(message)s"))
    elif fmt is LogFormat.JSON:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    else:
        # outboxer logs its context (service, outbox_id, ...) as extra= fields, which
        # the stock formatters drop: they are appended as key=value.
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(ExtrasFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
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


def _version() -> str:
    try:
        return importlib.metadata.version("outboxer")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source checkout
        return "unknown"


def _show_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"outboxer {_version()}\n")
        raise typer.Exit()


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
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    ctx.obj = _Options(app_spec, config)


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


def _serve_metrics(
    outbox: Outbox, services: list[str] | None, port: int, addr: str, *, backlog: bool = True
) -> Any:
    try:
        from outboxer.metrics import PrometheusMetrics  # noqa: PLC0415 - optional extra
    except ImportError as exc:
        raise ConfigurationError(str(exc)) from None
    metrics = PrometheusMetrics(outbox.admin if backlog else None, services=services or None)
    outbox.add_observer(metrics)
    try:
        server = metrics.serve(port, addr)
    except OSError as exc:
        raise ConfigurationError(f"cannot serve metrics on {addr}:{port}: {exc}") from exc
    logger.info(
        "serving Prometheus metrics on http://%s:%d/metrics",
        addr,
        server.port,
        extra={"metrics_port": server.port},
    )
    return server


# ---------------------------------------------------------------------- status


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


# ---------------------------------------------------------------------- dead letters

dead_app = typer.Typer(
    help="Dead letters: list, show, requeue, purge.", no_args_is_help=True, add_completion=False
)
app.add_typer(dead_app, name="dead")

ServiceOption = Annotated[
    list[str] | None,
    typer.Option("--service", "-s", help="Only this service (repeatable).", show_default=False),
]
EventTypeOption = Annotated[
    str | None, typer.Option("--event-type", "-t", help="Only this event type.", show_default=False)
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output (errors too).")]


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
        )
    total = sum(done.values())
    if as_json:
        doc = {"requeued": total, "by_service": done, "dry_run": dry_run}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    verb = "would requeue" if dry_run else "requeued"
    detail = ", ".join(f"{svc} {n}" for svc, n in done.items())
    Console().print(f"{verb} {total} dead letter(s)" + (f": {detail}" if detail else ""))


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
        done = outbox.admin.cancel(event_id, service=service)
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


WEB_TOKEN_ENV = "OUTBOXER_WEB_TOKEN"  # noqa: S105 - a variable name
WEB_HOSTS_ENV = "OUTBOXER_WEB_ALLOWED_HOSTS"
WEB_PROXIES_ENV = "OUTBOXER_WEB_TRUSTED_PROXIES"


@app.command()
def web(
    ctx: typer.Context,
    host: Annotated[
        str, typer.Option(help="Address to listen on (anything but loopback needs a token).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8089,
    token: Annotated[
        str | None,
        typer.Option(
            envvar=WEB_TOKEN_ENV,
            help=(
                f"Require this token from every visitor (or set {WEB_TOKEN_ENV}); 'generate' "
                "makes a random one and prints it once. Off loopback: 16 characters or more."
            ),
            show_default=False,
        ),
    ] = None,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            envvar=WEB_HOSTS_ENV,
            help=(
                "A name the console is reached by, besides loopback and the bind address "
                f"(repeat it, or list them in {WEB_HOSTS_ENV}); other Host headers get 400."
            ),
            show_default=False,
        ),
    ] = None,
    trusted_proxy: Annotated[
        list[str] | None,
        typer.Option(
            envvar=WEB_PROXIES_ENV,
            help=(
                "Address or network of a reverse proxy whose X-Forwarded-Proto and "
                f"X-Forwarded-For are believed (repeat it, or list them in {WEB_PROXIES_ENV})."
            ),
            show_default=False,
        ),
    ] = None,
    read_only: Annotated[
        bool, typer.Option("--read-only", help="Show only: no requeue or purge, POST refused.")
    ] = False,
    log_level: Annotated[LogLevel, typer.Option(help="Level of the process's log.")] = (
        LogLevel.INFO
    ),
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            envvar="OUTBOXER_WEB_TLS_CERT",
            exists=True,
            dir_okay=False,
            help="Serve HTTPS with this certificate chain (PEM file; with --tls-key).",
            show_default=False,
        ),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option(
            envvar="OUTBOXER_WEB_TLS_KEY",
            exists=True,
            dir_okay=False,
            help="The private key of --tls-cert (PEM file, not encrypted).",
            show_default=False,
        ),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            envvar="OUTBOXER_WEB_METRICS_PORT",
            help="Serve the console's Prometheus metrics here (needs the prometheus extra).",
            show_default=False,
        ),
    ] = None,
    metrics_addr: Annotated[
        str, typer.Option(help="Address the metrics endpoint listens on.")
    ] = "0.0.0.0",  # noqa: S104 - an exporter listens for the scraper
) -> None:
    """The web console: overview, message search, dead letters (needs the web extra)."""
    try:
        from outboxer.web import (  # noqa: PLC0415 - optional extra
            GENERATE,
            allowed_host_names,
            check_token,
            create_app,
            generate_token,
            is_loopback,
            serve,
            trusted_networks,
        )
    except ImportError as exc:
        _fail(
            f"the web console needs its extra: pip install 'outboxer[web]' ({exc})",
            EXIT_ERROR,
        )
    if not token and not is_loopback(host):
        _fail(
            f"refusing to serve the console on {host} without a token: give --token or set "
            f"{WEB_TOKEN_ENV} (--token generate makes one), or bind 127.0.0.1",
            EXIT_USAGE,
        )
    generated = token == GENERATE
    if generated:
        token = generate_token()
    try:
        hosts = allowed_host_names([host, *(allowed_host or ())])
        proxies = [str(net) for net in trusted_networks(trusted_proxy or ())]
        check_token(
            token or None,
            bind=host,
            reached_from_elsewhere=bool(proxies) or not all(is_loopback(h) for h in hosts),
        )
        tls = _tls_files(tls_cert, tls_key)
    except ConfigurationError as exc:
        _fail(str(exc), EXIT_USAGE)
    if generated:
        # Printed here once, never logged: logs travel further than a terminal.
        sys.stdout.write(f"console token (shown only now): {token}\n")
        sys.stdout.flush()
    with _logging(log_level.value, LogFormat.AUTO), _opened(ctx) as outbox:
        _routes(outbox)
        console_app = create_app(
            outbox,
            token=token or None,
            read_only=read_only,
            allowed_hosts=hosts,
            trusted_proxies=proxies,
        )
        server = None
        if metrics_port is not None:
            server = _serve_metrics(outbox, None, metrics_port, metrics_addr, backlog=False)
        logger.info(
            "outboxer console for %s on %s://%s:%d/%s",
            _options(ctx).app,
            "https" if tls else "http",
            host,
            port,
            " (read-only)" if read_only else "",
            extra={
                "database": outbox.db.safe_url,
                "allowed_hosts": hosts,
                "trusted_proxies": proxies,
            },
        )
        try:
            serve(console_app, host=host, port=port, log_level=log_level.value.lower(), tls=tls)
        finally:
            if server is not None:
                server.close()


def _tls_files(cert: Path | None, key: Path | None) -> tuple[str, str] | None:
    """The certificate and key to serve HTTPS with, checked now rather than by the
    server after the console has started."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigurationError("--tls-cert and --tls-key go together: give both or neither")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigurationError(
            f"cannot serve HTTPS with {cert} and {key}: {exc} (PEM files, key not encrypted)"
        ) from exc
    return str(cert), str(key)


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
