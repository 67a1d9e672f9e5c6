"""A Redis server of a test's own: ``redis-server`` on a free loopback port with its
data directory under the test's temporary directory, killed by its pid and started
again on the same port and directory (the shared server is never touched)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

from outboxer.testing import free_port

REDIS_SERVER = os.environ.get("OUTBOXER_TEST_REDIS_SERVER", "redis-server")


class PrivateRedis:
    """``persistence``: ``aof`` (``appendonly yes``, ``appendfsync everysec``: a kill
    loses at most about the last second) or ``none`` (a restart loses everything)."""

    def __init__(self, directory: Path, *, persistence: str = "aof") -> None:
        if shutil.which(REDIS_SERVER) is None:
            raise FileNotFoundError(f"{REDIS_SERVER} is not installed")
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.persistence = persistence
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        aof = "yes" if self.persistence == "aof" else "no"
        argv = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--appendonly", aof,
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        try:
            while True:
                try:
                    if client.ping():
                        return self
                except redis.exceptions.BusyLoadingError:
                    pass
                except redis.exceptions.ConnectionError:
                    if self.process.poll() is not None:
                        raise RuntimeError(
                            f"redis-server exited: {(self.directory / 'redis.log').read_text()}"
                        ) from None
                if time.monotonic() > deadline:
                    raise TimeoutError("redis-server did not answer within 30 s")
                time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL, by pid: what was not yet written to disk is lost."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
        self.process = None

    def restart(self, down: float = 0.0) -> None:
        self.kill()
        time.sleep(down)
        self.start()
        self.restarts += 1

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(15)
        self.process = None
