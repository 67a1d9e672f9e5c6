"""Does the retention sweep slow the claim down? (``python -m bench.sweep``)

Fills one service's table with ``--old`` consumed rows (aged past the retention
age) and ``--due`` due rows, then measures how many due rows per second a loop of
``claim_due(batch) -> mark_published_many`` gets through, first alone, then while
the retention purge deletes the consumed rows in batches in another thread. Prints
both rates and how many rows the sweep deleted during the measurement.

    python -m bench.sweep --url postgresql+psycopg://postgres@127.0.0.1/postgres
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

from sqlalchemy import update

from outboxer import Outbox, OutboxSettings
from outboxer.database.schema import db_now_plus
from outboxer.settings import DEFAULT_PURGE_PAUSE
from outboxer.testing import fill_due, scratch_database

SERVICE = "bench_sweep"


def _prepare(ob: Outbox, old: int, due: int) -> None:
    fill_due(ob, SERVICE, old)
    table = ob.table_for(SERVICE)
    with ob.db.sync_engine.begin() as conn:
        # The first `old` rows become consumed an hour ago (past the retention age).
        rows = conn.execute(
            update(table).where(table.c.id <= old).values(status="consumed", next_retry_at=None)
        )
        assert rows.rowcount == old
    with ob.db.sync_engine.begin() as conn:
        conn.execute(
            update(table)
            .where(table.c.status == "consumed")
            .values(updated_at=db_now_plus(-3600), consumed_at=db_now_plus(-3600))
        )
    fill_due(ob, SERVICE, due)


def _claim_rate(ob: Outbox, seconds: float, batch: int) -> tuple[float, int]:
    store = ob.store(SERVICE)
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        rows = store.claim_due(batch, 30.0)
        if not rows:
            break
        store.mark_published_many([r.id for r in rows])
        done += len(rows)
    elapsed = time.perf_counter() - started
    return done / elapsed, done


def _sweep(
    ob: Outbox, stop: threading.Event, purge_batch: int, pause: float, out: dict[str, Any]
) -> None:
    result = ob.admin.purge(
        consumed_older_than=60,
        services=[SERVICE],
        batch_size=purge_batch,
        pause=pause,
        should_stop=stop.is_set,
    )
    out["deleted"] = result.total
    out["still_running"] = result.stopped


def run(
    url: str, old: int, due: int, seconds: float, batch: int, purge_batch: int, pause: float
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for phase in ("alone", "with sweep"):
        with scratch_database(url, prefix="outboxer_bench") as db_url:
            ob = Outbox(db_url, settings=OutboxSettings.from_values())
            ob.register_service(SERVICE)
            ob.migrate()
            _prepare(ob, old, due)
            stop = threading.Event()
            sweep: dict[str, Any] = {"deleted": 0, "still_running": False}
            sweeper = None
            if phase == "with sweep":
                sweeper = threading.Thread(
                    target=_sweep, args=(ob, stop, purge_batch, pause, sweep)
                )
                sweeper.start()
                time.sleep(0.2)  # the sweep is under way before the claims start
            rate, claimed = _claim_rate(ob, seconds, batch)
            stop.set()
            if sweeper is not None:
                sweeper.join()
            results[phase] = {
                "claimed_per_s": round(rate),
                "claimed": claimed,
                "swept": sweep["deleted"],
                "sweep_outlasted_window": sweep["still_running"],
            }
            ob.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--url", default="sqlite:///bench-sweep.db", help="admin URL of the server")
    parser.add_argument("--old", type=int, default=200_000, help="consumed rows to sweep")
    parser.add_argument("--due", type=int, default=50_000, help="due rows to claim")
    parser.add_argument("--seconds", type=float, default=10.0, help="claiming time per phase")
    parser.add_argument("--batch", type=int, default=100, help="rows per claim")
    parser.add_argument("--purge-batch", type=int, default=500, help="rows per delete")
    parser.add_argument(
        "--pause", type=float, default=DEFAULT_PURGE_PAUSE, help="seconds between deletes"
    )
    args = parser.parse_args()
    results = run(
        args.url, args.old, args.due, args.seconds, args.batch, args.purge_batch, args.pause
    )
    for phase, r in results.items():
        print(
            f"{phase:>10}: {r['claimed_per_s']:>7} rows/s claimed+marked "
            f"({r['claimed']} in the window), sweep deleted {r['swept']}"
            + (" and was still running" if r["sweep_outlasted_window"] else "")
        )


if __name__ == "__main__":
    main()
