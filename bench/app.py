"""The application of the benchmark's worker processes:

    BENCH_URL=... BENCH_SERVICE=... BENCH_EFFECTS=... outboxer --app bench.app:outbox run

One service with one event type; its handler writes one row per event into the
effects table (outbox id, handler start, process id) in the transaction that marks
the event consumed. outboxer's own settings come from ``OUTBOXER_*`` variables (the
transport, the topic prefix, the poll interval), as in a deployment. At exit the
process leaves its ``Outbox.stats`` totals as JSON in ``BENCH_STATS``, and, when
``BENCH_STAGES`` names a file, the moment (``time.time()``) the relay had each event's
row in hand, claimed and about to hand it over (the public ``message_sending`` report).
"""

from __future__ import annotations

import atexit
import json
import os
import time
from pathlib import Path

from bench.core import EVENT
from bench.workers import effect_handler
from outboxer import Outbox
from outboxer.hooks import Observer

outbox = Outbox(os.environ["BENCH_URL"])
outbox.register_event(EVENT, os.environ["BENCH_SERVICE"])
effect_handler(outbox, os.environ["BENCH_EFFECTS"])


class _Claimed(Observer):
    def __init__(self) -> None:
        self.at: dict[int, float] = {}

    def message_sending(
        self, service: str, outbox_id: int, event_type: str, headers: dict[str, str]
    ) -> None:
        self.at[outbox_id] = time.time()


_claimed = _Claimed()
if os.environ.get("BENCH_STAGES"):
    outbox.add_observer(_claimed)


def _dump_stats() -> None:
    target = os.environ.get("BENCH_STATS")
    if target:
        Path(target).write_text(json.dumps(dict(outbox.stats.totals())))
    stages = os.environ.get("BENCH_STAGES")
    if stages:
        Path(stages).write_text(json.dumps(_claimed.at))


atexit.register(_dump_stats)
