"""What an op can ask of its runner: run a statement, or call a callback.

Ops (:mod:`outboxer.database.ops`) are generators that yield these instructions and
receive their results; :mod:`outboxer.database.runner` performs them on a sync or an
async connection.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy.sql import Executable

T = TypeVar("T")

Callback = Callable[..., Any]


@dataclass(slots=True)
class Execute:
    """Run a statement; the op receives the (buffered) result."""

    statement: Executable
    params: Any = None
    what: str = "statement"
    context: dict[str, Any] = field(default_factory=dict)
    driver: bool = False
    """Run it as the driver's SQL text (compiled once per dialect) where that is the
    same as SQLAlchemy's execution (see ``runner.driver_form``): the publish path's
    INSERT, where SQLAlchemy's per-call compiled-statement work is a tenth of the
    call. Cursor events (``before_cursor_execute``: statement guards, tracing) still
    fire; ``before_execute`` and ORM session events do not."""


@dataclass(slots=True)
class Invoke:
    """Call a callback with a session joined to the op's transaction.

    ``savepoint``: run it inside a SAVEPOINT. ``capture``: an exception does not
    propagate; the op receives it (``None`` on success) and the savepoint is
    rolled back (without a savepoint, the op must make its caller roll back).
    ``guard``: the callback is a handler that must leave the transaction open:
    statements that would end it are refused, and a transaction ended anyway
    (through the driver, or an implicitly committing statement) aborts the op with
    :class:`~outboxer.errors.TransactionAbortedError`.
    """

    fn: Callback
    args: tuple[Any, ...] = ()
    savepoint: bool = False
    capture: bool = False
    guard: bool = False


Instruction = Execute | Invoke
Op = Generator[Instruction, Any, T]
