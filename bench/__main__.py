"""The benchmark of issue 8: ``python -m bench`` (``make bench``), ``--quick``
(``make bench-quick``) or ``--tiny`` (what the test suite runs, so it cannot rot).

Every comparison runs in this one process, its contenders interleaved over the
rounds; each run is checked for correctness (every event delivered, each effect
once). The report goes to ``--out`` (``bench/results``): ``latest.md``,
``results.json`` and PNG plots. The exit code is 1 when a correctness check failed,
never because a target was missed.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from types import ModuleType

from bench import e2e, growth, latency, memory, publish, relay, report, scale
from bench.core import FULL, QUICK, ROOT, TINY, Bench, LogTally, Section, say

MEASURES: dict[str, ModuleType] = {
    "publish": publish,
    "relay": relay,
    "e2e": e2e,
    "latency": latency,
    "scale": scale,
    "growth": growth,
    "memory": memory,
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=(__doc__ or "").splitlines()[0]
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    size.add_argument("--tiny", action="store_true", help="smallest sizes, one round (tests)")
    parser.add_argument(
        "--only",
        default=",".join(MEASURES),
        help=f"comma-separated measures to run (default: all of {', '.join(MEASURES)})",
    )
    parser.add_argument("--rounds", type=int, help="rounds per comparison (default: 5; tiny 1)")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results", help="report folder"
    )
    args = parser.parse_args(argv)
    unknown = [m for m in args.only.split(",") if m not in MEASURES]
    if unknown:
        parser.error(f"unknown measure(s) {', '.join(unknown)}; choose from {', '.join(MEASURES)}")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    sizes = TINY if args.tiny else QUICK if args.quick else FULL
    if args.rounds:
        sizes = dataclasses.replace(sizes, rounds=args.rounds)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        filename=out / "bench.log",
        filemode="w",
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    command = report.command_line()
    started, t0 = report.now(), time.perf_counter()
    say(f"outboxer benchmark, mode {sizes.mode}, {sizes.rounds} round(s): {command}")
    info = report.facts()
    bench = Bench(sizes, out)
    sections: list[Section] = []
    try:
        for key in args.only.split(","):
            say(f"== {key}")
            began = time.perf_counter()
            tally = LogTally()
            with tally.attached():
                try:
                    section = MEASURES[key].run(bench)
                except Exception as exc:
                    section = Section(key, key, "")
                    section.failed(key, exc)
            section.seconds = time.perf_counter() - began
            section.extra["log"] = {"count": tally.count, "first": tally.first}
            if hasattr(os, "getloadavg"):  # how busy the machine was (others run too)
                section.extra["load"] = os.getloadavg()[0]
            sections.append(section)
    finally:
        bench.close()
    seconds = time.perf_counter() - t0
    path = report.write(
        out,
        sections,
        command=command,
        mode=sizes.mode,
        rounds=sizes.rounds,
        started=started,
        seconds=seconds,
        info=info,
    )
    print("\n".join(report.summary_table(sections)))
    failed = [c for s in sections for c in s.checks if not c.ok]
    checks = sum(len(s.checks) for s in sections)
    print(
        f"\n{checks} correctness checks, "
        + ("all passed" if not failed else f"{len(failed)} FAILED")
        + f"; report: {path} ({seconds / 60:.1f} min)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
