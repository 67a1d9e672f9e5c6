"""The application of the benchmark's worker processes:

    BENCH_URL=... BENCH_SERVICE=... BENCH_EFFECTS=... outboxer --app bench.app:outbox run

One service with one event type; its handler writes one row per event into the
effects table (outbox id, handler start, process id) in the transaction that marks
the event consumed. outboxer's own settings come from ``OUTBOXER_*`` variables (the
transport, the topic prefix, the poll interval), as in a deployment. At exit the
process leaves its ``Outbox.stats`` totals as JSON in ``BENCH_STATS``.
"""

from __future__ import annotations

import atexit
import json
import os
from pathlib import Path

from bench.core import EVENT
from bench.workers import effect_handler
from outboxer import Outbox

outbox = Outbox(os.environ["BENCH_URL"])
outbox.register_event(EVENT, os.environ["BENCH_SERVICE"])
effect_handler(outbox, os.environ["BENCH_EFFECTS"])


def _dump_stats() -> None:
    target = os.environ.get("BENCH_STATS")
    if target:
        Path(target).write_text(json.dumps(dict(outbox.stats.totals())))


atexit.register(_dump_stats)
