"""``outboxer web``: the console, its security options checked before it starts."""

from __future__ import annotations

import logging
import ssl
import sys
from pathlib import Path
from typing import Annotated

import typer

from outboxer.cli.common import (
    EXIT_ERROR,
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
from outboxer.errors import ConfigurationError

logger = logging.getLogger(__name__)

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
