"""The harness's own checks can fail, and its private cluster can be restarted."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, insert, text
from sqlalchemy.pool import NullPool

from outboxer.testing import scratch_database
from tests.faults.harness import EFFECTS, PrivatePostgres, Scenario, database_name, wait_for

pytestmark = pytest.mark.faults


def test_the_audit_sees_losses_duplicates_and_dead_rows_without_reason(tmp_path: Path) -> None:
    sc = Scenario("audit", tmp_path / "app", f"sqlite:///{tmp_path / 'app.db'}", "local", setup="")
    try:
        sc.migrate()
        pub = sc.publish(12, 1000.0)
        wait_for(lambda: pub.done, 60, "publishing")
        billing = sc.outbox.store("billing")
        twice, without, fine = (m.id for m in billing.list_due_messages(limit=3))
        for oid in (twice, without, fine):
            billing.mark_consumed(oid)
        with sc.outbox.db.sync_engine.begin() as conn:
            for oid in (twice, twice, fine):
                conn.execute(insert(EFFECTS).values(outbox_id=oid, service="billing", worker=1))
            conn.execute(insert(EFFECTS).values(outbox_id=999, service="billing", worker=1))
            table = sc.outbox.table_for("billing")
            conn.execute(
                table.update().where(table.c.id == 4).values(status="dead", last_error=None)
            )
        sc.audit()
        f = sc.figures
        assert f.events == 12
        assert f.rows == 12
        assert f.consumed == 3
        assert f.applied_twice == 1
        assert f.missing_effects == 1
        assert f.effects_of_unconsumed == 1  # id 999 has no row
        assert f.dead_without_reason == 1
        assert f.unsettled == 12 - 3 - 1  # still pending
        assert f.lost == 1 + 8
        with pytest.raises(AssertionError, match="lost 9, applied twice 1"):
            sc.check()
    finally:
        sc.close()


def test_a_scratch_database_is_dropped_after_its_server_restarted(
    private_pg: PrivatePostgres,
) -> None:
    # Before the scratch helper's admin engine lost its pool, the drop reused a
    # connection the restart had closed and failed.
    with scratch_database(private_pg.admin_url, prefix="outboxer_faults") as url:
        name = database_name(url)
        private_pg.restart("immediate", down_for=0.0)
    engine = create_engine(private_pg.admin_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            found = conn.execute(
                text("SELECT count(*) FROM pg_database WHERE datname = :n"), {"n": name}
            ).scalar_one()
        assert found == 0
    finally:
        engine.dispose()
