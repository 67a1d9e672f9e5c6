"""The shared RabbitMQ broker of the tests: a virtual host of their own per session or
scenario (created with ``rabbitmqctl``, deleted with everything in it), and faults on it
(every connection of the vhost closed)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from types import TracebackType

HOST = os.environ.get("OUTBOXER_TEST_RABBITMQ_HOST", "127.0.0.1")
PORT = int(os.environ.get("OUTBOXER_TEST_RABBITMQ_PORT", "5672"))
USER = "guest"
PASSWORD = "guest"


def rabbitmqctl(*args: str, timeout: float = 60.0) -> str:
    binary = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    done = subprocess.run(
        [binary, "--quiet", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip() or done.stdout}")
    return done.stdout


class RabbitVhost:
    """A throw-away virtual host on the shared broker (context manager)."""

    def __init__(self, prefix: str = "outboxer_t") -> None:
        self.name = f"{prefix}_{uuid.uuid4().hex[:10]}"

    @property
    def url(self) -> str:
        return f"amqp://{USER}:{PASSWORD}@{HOST}:{PORT}/{self.name}"

    def start(self) -> RabbitVhost:
        socket.create_connection((HOST, PORT), 3).close()
        rabbitmqctl("add_vhost", self.name)
        rabbitmqctl("set_permissions", "-p", self.name, USER, ".*", ".*", ".*")
        return self

    def close_all_connections(self) -> None:
        """Close every client connection of this vhost (a broker-side cut)."""
        rabbitmqctl(
            "close_all_connections", "--vhost", self.name, "outboxer test: connections closed"
        )

    def stop(self) -> None:
        rabbitmqctl("delete_vhost", self.name)

    def __enter__(self) -> RabbitVhost:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
