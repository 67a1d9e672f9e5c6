"""What the commands share: the Typer app and its global options, loading the
application's Outbox, errors as one line (or JSON), logging, the metrics endpoint."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.text import Text

from outboxer.durations import parse_duration
from outboxer.errors import ConfigurationError, OutboxError
from outboxer.logs import ExtrasFormatter, JsonFormatter
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

ServiceOption = Annotated[
    list[str] | None,
    typer.Option("--service", "-s", help="Only this service (repeatable).", show_default=False),
]
EventTypeOption = Annotated[
    str | None, typer.Option("--event-type", "-t", help="Only this event type.", show_default=False)
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output (errors too).")]
