"""The database layer: dialects (one module per database), the schema, every SQL
statement (:mod:`outboxer.database.ops`), the runner that executes them sync or
async, and the engines outboxer opens (:mod:`outboxer.database.engines`)."""

from outboxer.database.engines import Database

__all__ = ["Database"]
