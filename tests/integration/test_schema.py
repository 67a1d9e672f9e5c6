"""migrate() is idempotent and builds the same table on every database."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from sqlalchemy import inspect

from outboxer import Outbox, OutboxMessage
from outboxer.database.schema import AUDIT_TABLE, PARKED_TABLE, VERSION_TABLE
from tests.helpers import drop_tables, make_outbox

# The row model and the table must agree column for column, in order.
COLUMNS = tuple(f.name for f in fields(OutboxMessage))


def _describe(ob: Outbox, table: str) -> dict[str, Any]:
    insp = inspect(ob.db.sync_engine)
    columns = {
        c["name"]: (c["nullable"], type(c["type"]).__name__) for c in insp.get_columns(table)
    }
    indexes = sorted((i["name"], tuple(i["column_names"])) for i in insp.get_indexes(table))
    pk = insp.get_pk_constraint(table)["constrained_columns"]
    return {"columns": columns, "indexes": indexes, "pk": pk}


def test_migrate_twice_gives_the_same_schema(db_url: str, service: str) -> None:
    ob = make_outbox(db_url)
    ob.register_service(service)
    ob.migrate()
    table = ob.table_for(service).name
    first = _describe(ob, table)
    ob.migrate()
    again = make_outbox(db_url)
    again.register_service(service)
    again.migrate()
    assert _describe(ob, table) == first
    assert _describe(again, table) == first
    drop_tables(ob)
    ob.close()
    again.close()


async def test_migrate_async(db_url: str, service: str) -> None:
    ob = make_outbox(db_url)
    ob.register_service(service)
    await ob.migrate_async()
    await ob.migrate_async()
    assert set(_describe(ob, ob.table_for(service).name)["columns"]) == set(COLUMNS)
    drop_tables(ob)
    await ob.aclose()


def _portable(desc: dict[str, Any]) -> dict[str, Any]:
    # Type names differ by dialect (TIMESTAMP vs DATETIME vs VARCHAR); what must agree
    # everywhere is the column set, nullability, key and indexes.
    return {
        "columns": {name: nullable for name, (nullable, _) in desc["columns"].items()},
        "indexes": [cols for _, cols in desc["indexes"]],
        "pk": desc["pk"],
    }


_seen: dict[str, dict[str, Any]] = {}


def test_schema_is_the_same_on_every_database(db_url: str, service: str) -> None:
    ob = make_outbox(db_url)
    ob.register_service("same_everywhere", table=f"{service}_same")
    ob.migrate()
    desc = _portable(_describe(ob, f"{service}_same"))
    drop_tables(ob)
    ob.close()
    assert list(desc["columns"]) == list(COLUMNS)
    assert desc["pk"] == ["id"]
    assert desc["indexes"] == [  # by name: _due, _event, _key, _status_updated
        ("status", "next_retry_at", "id"),
        ("event_id",),
        ("message_key", "id"),
        ("status", "updated_at"),
    ]
    nullable = {c for c, n in desc["columns"].items() if n}
    assert nullable == {
        "next_retry_at",
        "published_at",
        "consumed_at",
        "last_error",
        "headers",
        "requeued_at",
        "event_id",
        "deliver_at",
        "coordinates",
        "consumer_group",
    }
    _seen[ob.db.family] = desc
    for other in _seen.values():
        assert other == desc


def test_metadata_lists_registered_tables(db_url: str, service: str) -> None:
    ob = make_outbox(db_url, topic_prefix="shop")
    ob.register_event("a.happened", service)
    ob.register_service(service + "_x", table=f"{service}_custom")
    assert sorted(ob.metadata.tables) == sorted(
        [
            f"{service}_outbox_messages",
            f"{service}_custom",
            VERSION_TABLE,
            AUDIT_TABLE,
            PARKED_TABLE,
        ]
    )
    ob.close()


def test_long_table_names_get_valid_index_names(db_url: str) -> None:
    ob = make_outbox(db_url)
    long_name = "t" * 55 + "_" + "x" * 7
    ob.register_service("longish", table=long_name)
    ob.migrate()
    names = [n for n, _ in _describe(ob, long_name)["indexes"]]
    assert all(len(n) <= 63 for n in names)
    assert len(set(names)) == len(ob.table_for("longish").indexes) == 4
    drop_tables(ob)
    ob.close()
