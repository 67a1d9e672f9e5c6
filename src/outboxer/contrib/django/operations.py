"""``MigrateOutbox()``: the outbox tables as part of ``manage.py migrate``.

Add it to a migration of your own app::

    operations = [..., MigrateOutbox()]

Forwards, it creates the tables of every service of ``settings.OUTBOXER_APP`` (or
brings them to outboxer's latest schema version) on the outbox's database, with the
statements of ``outboxer migrate --sql`` run by Django's schema editor, so
``manage.py sqlmigrate app 0001`` prints them (for a database without the tables).
Backwards it does nothing: the tables hold events, so reversing the migration keeps
them (drop them by hand once they are drained). Services registered later need a
new migration with another ``MigrateOutbox()``, or ``manage.py outboxer migrate``.
"""

from __future__ import annotations

from typing import Any

from django.db.migrations.operations.base import Operation

from outboxer.contrib.django.outbox import load_outbox
from outboxer.database import migrations


class MigrateOutbox(Operation):  # type: ignore[misc]  # Django ships no types
    """Create or upgrade the outbox tables of ``settings.OUTBOXER_APP``."""

    reversible = True
    reduces_to_sql = True

    def state_forwards(self, app_label: str, state: Any) -> None:
        """The tables are not Django models: the model state does not change."""

    def database_forwards(
        self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any
    ) -> None:
        outbox = load_outbox()
        if schema_editor.connection.alias != outbox.using:
            return
        dialect = outbox.db.sync_engine.dialect
        if schema_editor.collect_sql:
            plans = migrations.fresh_plans(outbox.tables)
        else:
            plans = outbox.django_connector.plan(schema_editor.connection.alias, outbox.tables)
        for statement in migrations.sql_statements(plans, outbox.tables, dialect):
            if not statement.startswith("-- "):
                schema_editor.execute(statement, params=None)

    def database_backwards(
        self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any
    ) -> None:
        """Keeps the tables (they hold events)."""

    def describe(self) -> str:
        return "Create or upgrade the outboxer tables of settings.OUTBOXER_APP"

    def deconstruct(self) -> tuple[str, list[Any], dict[str, Any]]:
        return ("outboxer.contrib.django.operations.MigrateOutbox", [], {})
