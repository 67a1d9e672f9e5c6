"""A private NATS server with JetStream for the fault scenarios: its store on disk
under the test's directory, on a free loopback port, stopped (SIGTERM or SIGKILL)
by its pid and started again on the same port and store."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from outboxer.testing import free_port
from tests.faults.harness import stop_process, wait_for

NATS_SERVER = os.environ.get("OUTBOXER_TEST_NATS_SERVER", "nats-server")


def nats_server_binary() -> str | None:
    return shutil.which(NATS_SERVER)


class PrivateNats:
    """``nats-server -js -sd <dir>/store -a 127.0.0.1 -p <port>``, started on demand."""

    def __init__(self, directory: Path) -> None:
        binary = nats_server_binary()
        if binary is None:
            raise FileNotFoundError(f"{NATS_SERVER} not found on PATH")
        self.binary = binary
        self.directory = directory
        self.store = directory / "store"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> PrivateNats:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log = (self.directory / f"nats-server.{self.starts}.log").open("wb")
        with log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "-js",
                    "-sd",
                    str(self.store),
                    "-a",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self._accepting, 30, "the private NATS server accepting", every=0.1)
        return self

    def _accepting(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"nats-server exited with {self.proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                return sock.recv(4).startswith(b"INFO")
        except OSError:
            return False

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if sig == signal.SIGKILL:
            proc.kill()
            proc.wait(timeout=30)
        else:
            stop_process(proc, grace=30)

    def restart(self, sig: signal.Signals, down_for: float) -> None:
        self.stop(sig)
        time.sleep(down_for)
        self.start()

    def replace(self) -> None:
        """SIGKILL, then a fresh server on the same port with an empty store: every
        stream, consumer and stored message is gone."""
        self.stop(signal.SIGKILL)
        shutil.rmtree(self.store, ignore_errors=True)
        self.start()

    def close(self) -> None:
        self.stop(signal.SIGKILL)
