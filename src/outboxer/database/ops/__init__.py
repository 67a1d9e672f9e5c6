"""Every SQL statement of outboxer, written once, by the role of the rows it works on.

Each operation is a generator (an *op*) that yields the statements it needs and
receives their results (see :mod:`outboxer.database.instructions`); a connector
(:mod:`outboxer.database.connector`) runs it on outboxer's own connection or on the
caller's transaction, sync or async. Statements are SQLAlchemy Core expressions;
what differs per database comes from the dialect (:mod:`outboxer.database.dialects`).

=================  ==========================================================
``base``           ``OpContext``, ``truncate_error``, the row and id helpers
``writes``         new rows: ``op_insert``, ``op_publish``, ``op_cancel``
``transitions``    claim, mark published/consumed/dead/failed, consume, defer
``handling``       the consumer's handling marks (``op_start``) and batch reads
``inbox``          received events stored once and started
``tools``          ``RowFilter``, find, count, requeue, purge, status, activity
``maintenance``    schema versions, version 4's copy of event ids, locks
=================  ==========================================================
"""
