"""Consumer dispatch: receive -> lock rows -> run handlers -> mark -> commit -> ack.

A batch from one route is processed in one database transaction: the batch's outbox
rows are locked (in id order, so concurrent consumers cannot deadlock), each live
message's handler runs in its own SAVEPOINT (one failure does not undo another's
work), then consumed/failed/dead marks are written and everything commits at once.
Only then is the batch acknowledged to the transport.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import select

from outboxer.aio import in_daemon_thread, sleep_unless
from outboxer.envelope import Envelope
from outboxer.errors import HandlerError
from outboxer.metrics import Stats
from outboxer.models import FINAL_STATUSES, Status
from outboxer.routing import ServiceRoute
from outboxer.runner import AsyncRunner, Execute, Invoke, Op, SyncRunner, is_async_callable
from outboxer.store import OpContext, op_mark_consumed, op_mark_dead, op_mark_failed
from outboxer.transports.base import IncomingMessage, Subscription

if TYPE_CHECKING:
    from outboxer.outbox import Outbox

logger = logging.getLogger(__name__)

T = TypeVar("T")

Handler = Callable[..., Any]
"""``async def h(event: Envelope, tx: AsyncSession)`` or ``def h(event, tx: Session)``."""


def check_handler(event_type: str, fn: Handler) -> None:
    """Refuse, at registration, a handler that cannot take ``(event, tx)``."""
    if not callable(fn):
        raise HandlerError(f"handler for {event_type!r} is not callable", event_type=event_type)
    try:
        inspect.signature(fn).bind(object(), object())
    except TypeError as exc:
        raise HandlerError(
            f"handler for {event_type!r} must accept (event, tx): {exc}", event_type=event_type
        ) from exc
    except ValueError:  # builtins without a signature: let them be
        pass


def describe_error(exc: BaseException, limit: int = 6) -> str:
    """``Type: message`` followed by the innermost frames, for ``last_error``."""
    head = f"{type(exc).__name__}: {exc}"
    frames = traceback.format_tb(exc.__traceback__)[-limit:]
    return head + ("\n" + "".join(frames) if frames else "")


@dataclass
class BatchOutcome:
    consumed: list[int] = field(default_factory=list)
    retried: list[int] = field(default_factory=list)
    dead: list[int] = field(default_factory=list)
    skipped: int = 0
    handler_errors: list[tuple[int, BaseException]] = field(default_factory=list)


def op_dispatch(
    c: OpContext, envelopes: Sequence[Envelope], handlers: Mapping[str, Handler]
) -> Op[BatchOutcome]:
    """The consumer's batch transaction (see the module docstring)."""
    t = c.table
    out = BatchOutcome()
    ids = sorted({e.outbox_id for e in envelopes})
    result = yield Execute(
        select(t.c.id, t.c.status, t.c.event_type)
        .where(t.c.id.in_(ids))
        .order_by(t.c.id)
        .with_for_update(),
        what="lock batch",
        context=c.ctx(),
    )
    rows = {r.id: r for r in result.all()}
    seen: set[int] = set()
    failures: list[tuple[int, str]] = []
    dead: dict[str, list[int]] = {}
    for env in envelopes:
        row = rows.get(env.outbox_id)
        if row is None or row.status in FINAL_STATUSES or env.outbox_id in seen:
            out.skipped += 1
            continue
        seen.add(env.outbox_id)
        if row.event_type != env.event_type and env.event_type.strip():
            # An envelope whose id points at another event (produced to the wrong
            # topic, or by hand): never touch a row that is not its own.
            logger.warning(
                "envelope %s says event type %r but the row holds %r; skipped",
                env.outbox_id,
                env.event_type,
                row.event_type,
                extra={"service": c.route.service_name, "outbox_id": env.outbox_id},
            )
            out.skipped += 1
            continue
        if not env.event_type.strip():
            dead.setdefault("envelope has no event type", []).append(env.outbox_id)
            continue
        handler = handlers.get(env.event_type)
        if handler is None:
            reason = (
                f"no handler registered for event type {env.event_type!r} "
                f"in service {c.route.service_name!r}"
            )
            dead.setdefault(reason, []).append(env.outbox_id)
            continue
        error = yield Invoke(handler, (env,), savepoint=True, capture=True)
        if error is None:
            out.consumed.append(env.outbox_id)
        else:
            failures.append((env.outbox_id, describe_error(error)))
            out.handler_errors.append((env.outbox_id, error))
    yield from op_mark_consumed(c, out.consumed)
    if failures:
        outcome = yield from op_mark_failed(c, failures)
        for oid, status in outcome.items():
            if status is None:
                continue
            (out.dead if status is Status.DEAD else out.retried).append(oid)
    for reason, dead_ids in dead.items():
        yield from op_mark_dead(c, dead_ids, reason)
        out.dead.extend(dead_ids)
    return out


class Dispatcher:
    """Runs one route's batches through the handlers, in the database."""

    def __init__(
        self, outbox: Outbox, route: ServiceRoute, handlers: Mapping[str, Handler], stats: Stats
    ) -> None:
        self.outbox = outbox
        self.route = route
        self.handlers = handlers
        self.stats = stats
        self._ctx = outbox.op_context(route)
        self._async_types = {e for e, h in handlers.items() if is_async_callable(h)}

    def decode(self, batch: Sequence[IncomingMessage], *, report: bool = True) -> list[Envelope]:
        """Valid envelopes of a batch; the rest are skipped (logged and counted when
        ``report``: a batch processed again does not count them twice)."""
        envelopes: list[Envelope] = []
        for msg in batch:
            try:
                obj = json.loads(msg.value) if msg.value is not None else None
                if isinstance(obj, dict) and obj.get("outbox_id") is None:
                    if report:
                        self._skipped(msg, "no_outbox_id", "message without outbox_id skipped")
                    continue
                envelopes.append(Envelope.from_dict(obj))
            except Exception as exc:  # noqa: BLE001 - any undecodable input (RecursionError too)
                if report:
                    self._skipped(msg, "undecodable", "undecodable message skipped", exc)
        return envelopes

    def _skipped(
        self, msg: IncomingMessage, counter: str, text: str, exc: BaseException | None = None
    ) -> None:
        service = self.route.service_name
        logger.warning(text, exc_info=exc, extra={"service": service, "at": msg.position})
        self.stats.add(service, counter)

    async def dispatch(
        self, batch: Sequence[IncomingMessage], *, first_pass: bool = True
    ) -> BatchOutcome:
        """Process a batch and commit; raises only if the database transaction failed."""
        service = self.route.service_name
        if first_pass:
            self.stats.add(service, "received", len(batch))
        envelopes = self.decode(batch, report=first_pass)
        if not envelopes:
            return BatchOutcome()
        op = op_dispatch(self._ctx, envelopes, self.handlers)
        if not any(e.event_type in self._async_types for e in envelopes):
            # Only sync handlers: run the whole transaction in a worker thread on the
            # sync engine, so blocking handler code never stalls the event loop.
            out = await in_daemon_thread(self._run_sync, op)
        else:
            async with self.outbox.db.async_engine.begin() as conn:
                out = await AsyncRunner(conn).run(op)
        for oid, exc in out.handler_errors:
            logger.warning(
                "handler failed for outbox id %s: %s",
                oid,
                exc,
                exc_info=exc,
                extra={"service": service, "outbox_id": oid},
            )
        self.stats.add(service, "consumed", len(out.consumed))
        self.stats.add(service, "retried", len(out.retried))
        self.stats.add(service, "dead", len(out.dead))
        self.stats.add(service, "skipped", out.skipped)
        self.stats.add(service, "handler_errors", len(out.handler_errors))
        return out

    async def dispatch_alone(self, message: IncomingMessage) -> None:
        """One message in its own transaction; if that fails, a failed attempt is
        recorded for it in a transaction of its own. Raises only if the database
        cannot record anything."""
        try:
            await self.dispatch([message], first_pass=False)
            return
        except Exception as exc:  # noqa: BLE001 - whatever broke it is recorded below
            failure = exc
        envelopes = self.decode([message], report=False)
        if not envelopes:
            return
        env = envelopes[0]
        logger.error(
            "message %s breaks its own transaction; counted as a failed attempt",
            env.outbox_id,
            exc_info=failure,
            extra={"service": self.route.service_name, "outbox_id": env.outbox_id},
        )
        store = self.outbox.store(self.route.service_name)
        outcome = await store.mark_failed_many_async([(env.outbox_id, describe_error(failure))])
        status = outcome.get(env.outbox_id)
        if status is not None:
            self.stats.add(self.route.service_name, "dead" if status is Status.DEAD else "retried")
            self.stats.add(self.route.service_name, "handler_errors")

    def _run_sync(self, op: Op[BatchOutcome]) -> BatchOutcome:
        with self.outbox.db.sync_engine.begin() as conn:
            return SyncRunner(conn).run(op)


async def consume_loop(
    sub: Subscription,
    dispatcher: Dispatcher,
    stopping: asyncio.Event,
    *,
    batch_size: int,
    poll_timeout: float = 0.5,
    retry_delay: float = 1.0,
) -> None:
    """Receive, dispatch and acknowledge until ``stopping`` is set.

    A batch is acknowledged only after its database transaction committed. When the
    batch transaction fails, its messages are processed again one per transaction, so
    one message that breaks its transaction (a handler that aborts it, an id the
    database refuses) is recorded as a failed attempt of its own and cannot hold the
    others back; when even that fails (the database is down), the batch is retried
    after a growing delay. On stop, an unprocessed batch stays unacknowledged and is
    delivered again.
    """
    while not stopping.is_set():
        batch = await sub.receive(batch_size, poll_timeout)
        if not batch:
            continue
        if await _process(batch, dispatcher, stopping, retry_delay):
            await sub.ack(batch)


async def _process(
    batch: Sequence[IncomingMessage],
    dispatcher: Dispatcher,
    stopping: asyncio.Event,
    retry_delay: float,
) -> bool:
    service = dispatcher.route.service_name
    try:
        await dispatcher.dispatch(batch)
        return True
    except Exception:
        logger.exception(
            "consumer batch failed; processing its messages one by one",
            extra={"service": service, "size": len(batch)},
        )
    delay = retry_delay
    while True:
        try:
            for message in batch:
                await dispatcher.dispatch_alone(message)
            return True
        except Exception:
            logger.exception(
                "consumer cannot record its batch; retrying",
                extra={"service": service, "size": len(batch)},
            )
        if stopping.is_set() or await sleep_unless(stopping, delay):
            return False
        delay = min(delay * 2, 30.0)
