"""The supported databases, one module each, found by SQLAlchemy backend name."""

from __future__ import annotations

from sqlalchemy import BigInteger
from sqlalchemy.types import TypeEngine

from outboxer.database.dialects.base import READ_ONLY_OPTION, Dialect
from outboxer.database.dialects.mysql import MySQLDialect
from outboxer.database.dialects.postgresql import PostgreSQLDialect
from outboxer.database.dialects.sqlite import SQLiteDialect
from outboxer.errors import ConfigurationError

DIALECTS: tuple[Dialect, ...] = (SQLiteDialect(), PostgreSQLDialect(), MySQLDialect())
_BY_BACKEND = {backend: d for d in DIALECTS for backend in d.backends}


def id_type() -> TypeEngine[int]:
    """The id column's type: BIGINT, or what a dialect needs instead (``id_type``)."""
    base: TypeEngine[int] = BigInteger()
    for dialect in DIALECTS:
        variant = dialect.id_type()
        if variant is not None:
            base = base.with_variant(variant, *dialect.backends)
    return base


def dialect_for(backend: str) -> Dialect:
    """The dialect of a SQLAlchemy backend or dialect name (``mariadb`` -> MySQL)."""
    dialect = _BY_BACKEND.get(backend)
    if dialect is None:
        raise ConfigurationError(
            f"unsupported database {backend!r}: use sqlite, postgresql, mysql or mariadb"
        )
    return dialect


__all__ = ["DIALECTS", "READ_ONLY_OPTION", "Dialect", "dialect_for", "id_type"]
