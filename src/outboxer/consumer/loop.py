"""The consumer loop: receive, dispatch, acknowledge."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from outboxer.aio import sleep_unless
from outboxer.backoff import ErrorBackoff
from outboxer.consumer.dispatcher import Dispatcher
from outboxer.settings import OutboxSettings
from outboxer.transports.base import IncomingMessage, Subscription

logger = logging.getLogger(__name__)


async def consume_loop(
    sub: Subscription,
    dispatcher: Dispatcher,
    stopping: asyncio.Event,
    settings: OutboxSettings,
    *,
    poll_timeout: float = 0.5,
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
        batch = await sub.receive(settings.batch_size, poll_timeout)
        if not batch:
            continue
        if await _process(batch, dispatcher, stopping, settings):
            await sub.ack(batch)


async def _process(
    batch: Sequence[IncomingMessage],
    dispatcher: Dispatcher,
    stopping: asyncio.Event,
    settings: OutboxSettings,
) -> bool:
    service = dispatcher.route.service_name
    try:
        await dispatcher.dispatch(batch)
        return True
    except Exception as exc:
        logger.exception(
            "consumer batch failed; processing its messages one by one",
            extra={"service": service, "size": len(batch)},
        )
        dispatcher.hooks.loop_error(service, "consumer", exc)
    backoff = ErrorBackoff(settings.error_delay, settings.error_delay_max)
    while True:
        try:
            for message in batch:
                await dispatcher.dispatch_alone(message)
            return True
        except Exception as exc:
            logger.exception(
                "consumer cannot record its batch; retrying",
                extra={"service": service, "size": len(batch)},
            )
            dispatcher.hooks.loop_error(service, "consumer", exc)
        if stopping.is_set() or await sleep_unless(stopping, backoff.next()):
            return False
