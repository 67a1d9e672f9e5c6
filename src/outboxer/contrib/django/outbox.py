"""``DjangoOutbox``: an :class:`~outboxer.Outbox` whose every op runs on Django's
connection (see :mod:`outboxer.contrib.django.connector`)."""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.conf import settings as django_settings
from django.db import transaction
from sqlalchemy.engine import URL, make_url

from outboxer.contrib.django.connector import DjangoConnector, DjangoTransaction
from outboxer.database.dialects import DIALECTS, dialect_for
from outboxer.errors import ConfigurationError, HandlerError
from outboxer.handlers import is_async_callable
from outboxer.outbox import Outbox

F = TypeVar("F", bound=Callable[..., Any])


def database_url(using: str = "default") -> URL:
    """The URL of the database Django calls ``using`` (from ``settings.DATABASES``),
    for outboxer's own connections: migrations, table listing, notifications, locks."""
    databases = django_settings.DATABASES
    if using not in databases:
        raise ConfigurationError(f"settings.DATABASES has no database {using!r}")
    config = databases[using]
    engine = str(config.get("ENGINE", ""))
    dialect = next((d for d in DIALECTS if d.django_engine == engine), None)
    if dialect is None:
        raise ConfigurationError(
            f"DATABASES[{using!r}] uses {engine!r}: outboxer supports "
            f"{', '.join(sorted(str(d.django_engine) for d in DIALECTS))}"
        )
    name = str(config.get("NAME") or "")
    if not name or name == ":memory:" or name.startswith("file:"):
        raise ConfigurationError(
            f"DATABASES[{using!r}] needs a NAME outboxer's worker can also open "
            "(an in-memory SQLite database is private to one connection)"
        )
    port = config.get("PORT")
    return URL.create(
        dialect.family,
        username=config.get("USER") or None,
        password=config.get("PASSWORD") or None,
        host=config.get("HOST") or None,
        port=int(port) if port else None,
        database=name,
    )


def django_database(url: str | URL) -> dict[str, Any]:
    """A ``settings.DATABASES`` entry for a database URL (``sqlite:///shop.db``,
    ``postgresql://user@host/db``, ``mysql://root@host/db``; a ``+driver`` is ignored).
    """
    parsed = make_url(url)
    engine = dialect_for(parsed.get_backend_name()).django_engine
    if engine is None:
        raise ConfigurationError(f"no Django database engine for {parsed.get_backend_name()!r}")
    return {
        "ENGINE": engine,
        "NAME": parsed.database or "",
        "USER": parsed.username or "",
        "PASSWORD": parsed.password or "",
        "HOST": parsed.host or "",
        "PORT": str(parsed.port or ""),
    }


def load_outbox() -> DjangoOutbox:
    """The outbox named by ``settings.OUTBOXER_APP`` (``"module:attribute"``)."""
    spec = getattr(django_settings, "OUTBOXER_APP", None)
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigurationError(
            "settings.OUTBOXER_APP must name the DjangoOutbox, e.g. 'shop.events:outbox'"
        )
    module_name, attr = spec.split(":", 1)
    obj = getattr(importlib.import_module(module_name), attr, None)
    if not isinstance(obj, DjangoOutbox):
        raise ConfigurationError(
            f"settings.OUTBOXER_APP {spec!r} is not a DjangoOutbox (got {type(obj).__name__})"
        )
    return obj


class DjangoOutbox(Outbox):
    """An outbox on Django's database ``using`` (``"default"``).

    ``publish`` writes in the caller's ``transaction.atomic()`` block; handlers
    (``fn(event)``, ``fn(events)`` for batch handlers) run inside
    ``transaction.atomic(using=...)`` on the connection that marks the event
    consumed, so their ORM writes and the mark commit together. Other keyword
    arguments are those of :class:`~outboxer.Outbox` (``transport=``, ...); the
    database is Django's, not ``OUTBOXER_URL``.
    """

    def __init__(self, *, using: str = "default", **options: Any) -> None:
        self.using = using
        super().__init__(
            database_url(using),
            connector=lambda db: DjangoConnector(db, using),
            **options,
        )

    @property
    def django_connector(self) -> DjangoConnector:
        connector = self.storage.connector
        assert isinstance(connector, DjangoConnector)
        return connector

    def publish(  # type: ignore[override]
        self, event_type: str, payload: Any, *, autocommit: bool = False, **options: Any
    ) -> int:
        """Write one event in the open ``transaction.atomic()`` block of ``using`` and
        return its outbox id: it commits with the block and disappears with its
        rollback (or a savepoint's). Outside an atomic block it raises
        :class:`~outboxer.errors.TransactionRequiredError`, unless ``autocommit=True``
        (the event is then written in a transaction of its own; inside an open block it
        joins that block all the same). ``options`` are those
        of :meth:`Outbox.publish` (``key``, ``event_id``, ``delay``, ...)."""
        # Publisher types SQLAlchemy's transactions; the connector checks this one.
        tx: Any = DjangoTransaction(self.using)
        if autocommit:
            with transaction.atomic(using=self.using):
                return self._publisher.publish(tx, event_type, payload, **options)
        return self._publisher.publish(tx, event_type, payload, **options)

    async def apublish(
        self, event_type: str, payload: Any, *, autocommit: bool = False, **options: Any
    ) -> int:
        """:meth:`publish` for async views, on Django's thread for the ORM
        (``sync_to_async``). An async view has no atomic block open on that thread, so
        pass ``autocommit=True`` (the event is written alone). To write the event with
        ORM writes, put both in a plain function that opens ``transaction.atomic()`` and
        calls :meth:`publish`, and run it with ``sync_to_async``."""
        call = functools.partial(self.publish, autocommit=autocommit, **options)
        return int(await sync_to_async(call)(event_type, payload))

    def handler(self, event_type: str, *, service: str | None = None) -> Callable[[F], F]:
        """Decorator: ``fn(event)`` handles ``event_type`` inside the atomic block that
        marks it consumed (raising rolls its writes back; the event is retried)."""

        def decorate(fn: F) -> F:
            self.register_handler(event_type, _with_tx(fn, event_type), service=service)
            return fn

        return decorate

    def batch_handler(self, event_type: str, *, service: str | None = None) -> Callable[[F], F]:
        """Decorator: ``fn(events)`` handles lists of ``event_type`` events (see
        :meth:`Outbox.register_batch_handler`), in the atomic block of their marks."""

        def decorate(fn: F) -> F:
            self.register_batch_handler(event_type, _with_tx(fn, event_type), service=service)
            return fn

        return decorate

    def close(self) -> None:
        super().close()
        self.django_connector.close()


def _with_tx(fn: Callable[..., Any], event_type: str) -> Callable[[Any, Any], Any]:
    """``fn(event)`` as outboxer calls handlers: ``(event, tx)``."""
    if is_async_callable(fn):
        raise ConfigurationError(
            f"the handler of {event_type!r} is async: Django handlers are plain functions "
            "(the ORM is synchronous; they run on the worker's threads)"
        )

    try:
        inspect.signature(fn).bind(object())
    except TypeError as exc:
        raise HandlerError(
            f"the handler of {event_type!r} must accept (event): {exc}", event_type=event_type
        ) from exc
    except ValueError:  # builtins without a signature
        pass

    @functools.wraps(fn)
    def call(event: Any, tx: Any) -> Any:
        return fn(event)

    del call.__wrapped__  # outboxer checks (event, tx), not the signature of fn
    return call
