"""The supported databases, one module each, found by SQLAlchemy backend name."""

from __future__ import annotations

from outboxer.database.dialects.base import Dialect
from outboxer.database.dialects.mysql import MySQLDialect
from outboxer.database.dialects.postgresql import PostgreSQLDialect
from outboxer.database.dialects.sqlite import SQLiteDialect
from outboxer.errors import ConfigurationError

DIALECTS: tuple[Dialect, ...] = (SQLiteDialect(), PostgreSQLDialect(), MySQLDialect())
_BY_BACKEND = {backend: d for d in DIALECTS for backend in d.backends}


def dialect_for(backend: str) -> Dialect:
    """The dialect of a SQLAlchemy backend or dialect name (``mariadb`` -> MySQL)."""
    dialect = _BY_BACKEND.get(backend)
    if dialect is None:
        raise ConfigurationError(
            f"unsupported database {backend!r}: use sqlite, postgresql, mysql or mariadb"
        )
    return dialect


__all__ = ["DIALECTS", "Dialect", "dialect_for"]
