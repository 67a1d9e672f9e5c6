"""The benchmark (``bench/``) runs once at its tiny size, so that it cannot rot.

Nothing about time is asserted: only that every measure ran, that its correctness
checks passed (every event delivered, each effect once) and that the report was
written. Contenders whose packages are missing (procrastinate, matplotlib: the
``bench`` extra) skip with a printed reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ServerDatabase

ROOT = Path(__file__).resolve().parents[2]
MEASURES = {"publish", "relay", "e2e", "latency", "scale", "growth", "memory"}


@pytest.mark.slow
def test_tiny_benchmark_runs_and_writes_its_report(
    tmp_path: Path, pg_database: ServerDatabase, mysql_database: ServerDatabase
) -> None:
    # The fixtures only make sure both servers are there (skip, or fail under CI).
    paths = [str(ROOT / "src"), str(ROOT), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--tiny", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    report = (tmp_path / "latest.md").read_text()
    assert "## Targets (issue 8)" in report
    assert "Command: `python -m bench --tiny" in report
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["checks_failed"] == 0
    sections = {s["key"]: s for s in results["sections"]}
    assert set(sections) == MEASURES
    for key, section in sections.items():
        assert section["checks"], f"{key} checked nothing"
        assert all(c["ok"] for c in section["checks"]), key
        assert section["targets"], f"{key} reported no target line"


def test_the_wire_costs_run(pg_database: ServerDatabase) -> None:
    """``python -m bench.wire``: contracts and CloudEvents on the hot path, at its
    smallest size (every line printed, nothing about time asserted)."""
    paths = [str(ROOT / "src"), str(ROOT), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.wire", "--rounds", "1", "--events", "20"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    for line in (
        "publish with schema",
        "check only, publish with schema",
        "relay CloudEvents binary",
        "relay CloudEvents structured",
        "encode only, relay envelope",
    ):
        assert line in proc.stdout


@pytest.mark.rabbitmq
def test_the_rabbitmq_bench_runs(pg_database: ServerDatabase, rabbitmq_vhost: Any) -> None:
    """``python -m bench.rabbitmq`` at its smallest size: the relay, the raw client and
    end to end each measured (it asserts every row published or consumed)."""
    paths = [str(ROOT / "src"), str(ROOT), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.rabbitmq", "--rounds", "1", "--rows", "200"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    for line in ("outboxer relay (rabbitmq)", "raw aio-pika publish", "end-to-end (rabbitmq)"):
        assert f"round 1: {line}" in proc.stdout
