"""The whole test suite in two lanes at once, as `make test` runs it.

Most of the fault scenarios' time is waiting: a publisher committing at a fixed rate,
workers killed and started again, a broker down for 30 s. Run one after the other with
the rest of the suite, they leave the machine idle for minutes. This runs two pytest
processes side by side:

- lane "slow": the fault scenarios (tests/faults) and the few long end-to-end files
  listed in ``SLOW_LANE``, each with real processes of its own;
- lane "main": everything else.

The lanes share nothing but the servers, where each test already works under names of
its own (scratch databases, prefixed topics, streams and keys). The main lane's output
streams to the terminal; the slow lane's goes to a file (its path is printed) and is
shown at the end: its summary, or all of it when it failed. The exit status is the
first non-zero status of the two.

With arguments, they are given to one plain pytest run instead (``make test
PYTEST_ARGS=tests/unit``), so a chosen subset runs as asked.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SLOW_LANE = [
    "tests/faults",
    "tests/integration/test_state_machine_model.py",
    "tests/integration/test_django_worker.py",
    "tests/integration/test_engine.py",
]


def _pytest(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", *args]


def main(argv: list[str]) -> int:
    if argv:
        return subprocess.call(_pytest(argv), cwd=ROOT)  # noqa: S603 - our own argv
    missing = [p for p in SLOW_LANE if not (ROOT / p).exists()]
    if missing:
        print(f"run_tests: the slow lane names paths that do not exist: {missing}")
        return 2
    work = Path(tempfile.mkdtemp(prefix="outboxer-tests-"))
    log = work / "slow-lane.log"
    ignore = [f"--ignore={p}" for p in SLOW_LANE]
    started = time.monotonic()
    with log.open("wb") as out:
        slow = subprocess.Popen(  # noqa: S603 - fixed arguments
            _pytest(["-p", "no:cacheprovider", f"--basetemp={work / 'slow'}", *SLOW_LANE]),
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )
        print(f"run_tests: slow lane ({', '.join(SLOW_LANE)}) running, output in {log}")
        try:
            main_rc = subprocess.call(  # noqa: S603 - fixed arguments
                _pytest([f"--basetemp={work / 'main'}", *ignore]), cwd=ROOT
            )
        except KeyboardInterrupt:
            slow.terminate()
            slow.wait()
            raise
        slow_rc = slow.wait()
    took = time.monotonic() - started
    text = log.read_text(errors="replace")
    print(f"\n==== slow lane: exit status {slow_rc} ====")
    if slow_rc != 0:
        print(text)
    else:
        lines = text.rstrip().splitlines()
        tail = [line for line in lines if line.startswith(("SKIPPED", "XFAIL", "XPASS"))]
        print("\n".join([*tail, *lines[-1:]]))
    print(f"run_tests: main lane exit status {main_rc}, slow lane {slow_rc}; {took:.0f} s in all")
    return main_rc or slow_rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
