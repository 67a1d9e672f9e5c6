"""The web console's page times on a large outbox table (issue 11):
``python -m bench.web [--rows 1000000] [--db sqlite postgresql mariadb]``.

Fills one service's table with ``--rows`` rows (89 % consumed, 10 % pending, 1 %
dead; last changes spread over the last two hours, so half of them fall in the
chart's hour), then times each page through the ASGI app in this process
(Starlette's TestClient: the queries and the rendering, no network), with the
overview's cache off, so every view pays its queries. Prints a Markdown table of the
median of ``--repeat`` views per page. Nothing is asserted about time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode

from sqlalchemy import insert

from bench.core import MYSQL_ADMIN, PG_ADMIN
from outboxer import Outbox, OutboxSettings
from outboxer.testing import scratch_database

SERVICE = "orders"
EVENT_TYPE = "order.created"
RARE_TYPE = "order.refunded"
CHUNK = 5000


@contextmanager
def database(name: str) -> Iterator[str]:
    if name == "sqlite":
        with tempfile.TemporaryDirectory(prefix="outboxer-web-bench-") as folder:
            yield f"sqlite:///{Path(folder) / 'outbox.db'}"
        return
    admin = PG_ADMIN if name == "postgresql" else MYSQL_ADMIN
    with scratch_database(admin, prefix="outboxer_webbench") as url:
        yield url


def fill(outbox: Outbox, rows: int) -> None:
    """``rows`` rows as the state machine leaves them, inserted ``CHUNK`` at a time."""
    route = outbox.routes.route_for_service(SERVICE)
    table = outbox.table_for(SERVICE)
    now = datetime.now(UTC)
    template = outbox.storage.rows.event(route, EVENT_TYPE, {"n": 0, "note": "x" * 80})
    with outbox.db.sync_engine.begin() as conn:
        for start in range(1, rows + 1, CHUNK):
            batch = []
            for i in range(start, min(start + CHUNK, rows + 1)):
                changed = now - timedelta(seconds=(rows - i) * 7200 / rows)
                status = "dead" if i % 100 == 0 else "pending" if i % 10 == 1 else "consumed"
                batch.append(
                    {
                        **template,
                        "event_type": RARE_TYPE if i % 1000 == 0 else EVENT_TYPE,
                        "message_key": f"customer-{i % 5000}",
                        "status": status,
                        "retry_count": 3 if status == "dead" else 0,
                        "next_retry_at": changed if status == "pending" else None,
                        "consumed_at": changed if status == "consumed" else None,
                        "last_error": "RuntimeError: boom\n  at line 1"
                        if status == "dead"
                        else None,
                        "created_at": changed - timedelta(seconds=1),
                        "updated_at": changed,
                    }
                )
            conn.execute(insert(table), batch)


def pages(rows: int) -> dict[str, str]:
    middle = f"{SERVICE}:{rows // 2}"
    return {
        "overview (counts by status)": "/",
        "overview table refresh": "/overview/services",
        "chart data (last hour)": "/api/activity",
        "messages, first page": "/messages",
        "messages, a page in the middle": "/messages?" + urlencode({"before": middle}),
        "search by key": "/messages?q=customer-77",
        "search by outbox id": f"/messages?q={rows // 3}&by=id",
        "search by event type (1 in 1000)": f"/messages?q={RARE_TYPE}&by=event_type",
        "filter status=dead (1 %)": "/messages?status=dead",
        "search by event id (payload scan)": f"/messages?q=missing-{rows}&by=event_id",
        "dead letters, first page": "/dead",
        "one message": f"/messages/{SERVICE}/{rows // 2}",
    }


def measure(name: str, rows: int, repeat: int) -> dict[str, float]:
    from starlette.testclient import TestClient  # noqa: PLC0415 - the web extra

    from outboxer.web import create_app  # noqa: PLC0415

    with database(name) as url:
        outbox = Outbox(url, settings=OutboxSettings.from_values())
        outbox.register_event(EVENT_TYPE, SERVICE)
        outbox.register_event(RARE_TYPE, SERVICE)
        outbox.migrate()
        started = time.perf_counter()
        fill(outbox, rows)
        print(f"{name}: {rows:,} rows in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        times: dict[str, float] = {}
        try:
            app = create_app(outbox, cache_seconds=0, chart_cache_seconds=0)
            # The console answers only to its own names (TestClient's default is "testserver").
            with TestClient(app, base_url="http://127.0.0.1") as client:
                for label, path in pages(rows).items():
                    samples = []
                    for _ in range(repeat):
                        t0 = time.perf_counter()
                        response = client.get(path)
                        samples.append(time.perf_counter() - t0)
                        assert response.status_code == 200, (path, response.text[:300])
                    times[label] = statistics.median(samples) * 1000
        finally:
            outbox.close()
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.web", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--db", nargs="+", default=["sqlite", "postgresql", "mariadb"], help="databases"
    )
    args = parser.parse_args(argv)
    results = {name: measure(name, args.rows, args.repeat) for name in args.db}
    print(f"\nmedian ms of {args.repeat} views, {args.rows:,} rows, cache off\n")
    print("| page | " + " | ".join(args.db) + " |")
    print("| --- |" + " ---: |" * len(args.db))
    for label in pages(args.rows):
        cells = " | ".join(f"{results[name][label]:,.0f}" for name in args.db)
        print(f"| {label} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
