"""Command line interface (filled in by the engine work)."""

from __future__ import annotations


def main() -> None:
    raise SystemExit("outboxer: the command line arrives with the engine")
