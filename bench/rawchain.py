"""The latency floor of outboxer's in-process delivery on PostgreSQL: the same chain
of statements on the raw driver, in a process of its own, with no framework.

    python -m bench.rawchain CONNINFO TABLE CHANNEL EFFECTS

On each notification of ``CHANNEL`` (the one outboxer's publish sends), or every
``POLL`` seconds, it drains due rows the way outboxer's worker does: claim them
(one autocommit UPDATE ... FOR UPDATE SKIP LOCKED, pushing their due time by a lease),
mark them as being handled (one autocommit UPDATE), then one transaction that locks
them, runs the handler (the benchmark's: one INSERT into ``EFFECTS`` noting
``time.time()`` when it starts) and marks them consumed. The statements are written
as outboxer sends them; only the Python around them is missing. It stops on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import psycopg

POLL = 0.5
LEASE = 30.0
BATCH = 1000


def main(conninfo: str, table: str, channel: str, effects: str) -> int:
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    t = '"' + table.replace('"', '""') + '"'
    e = '"' + effects.replace('"', '""') + '"'
    claim = (
        f"UPDATE {t} SET next_retry_at = statement_timestamp() + make_interval(secs => %s), "
        f"updated_at = statement_timestamp() WHERE id IN (SELECT id FROM {t} "
        f"WHERE status = 'pending' AND next_retry_at <= statement_timestamp() "
        f"ORDER BY next_retry_at, id LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING id, payload"
    )
    mark = (
        f"UPDATE {t} SET handling = %s WHERE id = ANY(%s) "
        f"AND status NOT IN ('consumed', 'dead', 'cancelled') AND handling = 0 RETURNING id"
    )
    lock = f"SELECT id, status, retry_count FROM {t} WHERE id = ANY(%s) ORDER BY id FOR UPDATE"
    effect = f"INSERT INTO {e} (outbox_id, started_at, worker) VALUES (%s, %s, %s)"
    consumed = (
        f"UPDATE {t} SET status = 'consumed', handling = 0, "
        f"updated_at = statement_timestamp() WHERE id = ANY(%s)"
    )
    pid = os.getpid()
    listen = psycopg.connect(conninfo, autocommit=True)
    work = psycopg.connect(conninfo, autocommit=True)
    tx = psycopg.connect(conninfo)
    listen.execute(f'LISTEN "{channel}"')
    try:
        while not stop:
            while not stop:
                rows = work.execute(claim, (LEASE, BATCH)).fetchall()
                if not rows:
                    break
                ids = [r[0] for r in rows]
                work.execute(mark, (2 if len(ids) == 1 else 1, ids)).fetchall()
                with tx.transaction():
                    tx.execute(lock, (ids,)).fetchall()
                    for oid, _payload in rows:
                        tx.execute(effect, (oid, time.time(), pid))
                    tx.execute(consumed, (ids,))
            for _ in listen.notifies(timeout=POLL, stop_after=1):
                pass
    finally:
        for conn in (listen, work, tx):
            conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
