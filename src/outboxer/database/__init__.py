"""The database layer: dialects (one module per database), the schema, every SQL
statement (:mod:`outboxer.database.ops`), the connector that runs them
(:mod:`outboxer.database.connector`; SQLAlchemy's runs them sync or async with
:mod:`outboxer.database.runner`), and the engines outboxer opens
(:mod:`outboxer.database.engines`)."""

from outboxer.database.engines import Database

__all__ = ["Database"]
