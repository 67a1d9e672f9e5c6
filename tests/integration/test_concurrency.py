"""Many claimers at once never get the same row (PostgreSQL and MariaDB)."""

from __future__ import annotations

import threading
import time
from collections import Counter

from outboxer.testing import fill_due
from tests.helpers import backdate, drop_tables, make_outbox, unique_service

ROWS = 20_000
WORKERS = 8


def test_eight_claimers_claim_every_row_once(server_url: str) -> None:
    service = unique_service()
    ob = make_outbox(server_url)
    ob.register_event(f"{service}.created", service)
    ob.migrate()
    fill_due(ob, service, ROWS)
    claims: list[list[int]] = [[] for _ in range(WORKERS)]
    errors: list[BaseException] = []
    start = threading.Barrier(WORKERS)

    def worker(slot: int) -> None:
        try:
            st = ob.store(service)
            start.wait()
            empty = 0
            while empty < 3:
                got = st.claim_due(limit=100, lease=600)
                if not got:
                    empty += 1
                    time.sleep(0.01)
                    continue
                empty = 0
                claims[slot].extend(m.id for m in got)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    counts = Counter(i for c in claims for i in c)
    assert len(counts) == ROWS
    assert max(counts.values()) == 1
    assert sum(1 for c in claims if c) >= 2, "claims were not spread over workers"
    assert ob.store(service).list_due_messages() == []
    drop_tables(ob)
    ob.close()


def test_lease_expiry_returns_rows_to_other_claimers(server_url: str) -> None:
    service = unique_service()
    ob = make_outbox(server_url)
    ob.register_event(f"{service}.created", service)
    ob.migrate()
    fill_due(ob, service, 50)
    st = ob.store(service)
    crashed = st.claim_due(limit=50, lease=60)  # this worker "dies" now
    assert len(crashed) == 50
    assert ob.store(service).claim_due(limit=50, lease=30) == []
    for m in crashed:  # its lease runs out
        backdate(ob, service, m.id, "next_retry_at", 61)
    again = ob.store(service).claim_due(limit=100, lease=30)
    assert sorted(m.id for m in again) == sorted(m.id for m in crashed)
    drop_tables(ob)
    ob.close()
