"""The Kafka producer: one librdkafka producer, a thread serving its callbacks, and
a batch sent at once with its acknowledgements awaited together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from functools import partial
from typing import Any, cast

from outboxer.transports.base import Delivery, OutgoingMessage
from outboxer.transports.kafka.client import KafkaError, KafkaException, Message, Producer
from outboxer.transports.kafka.errors import (
    NO_REPORT,
    REBUILD_ERRORS,
    delivery_of,
    describe,
    kafka_error_of,
)

logger = logging.getLogger(__name__)


class ProducerHandle:
    """A librdkafka producer with a thread serving its callbacks, and what it has
    learnt about whether it can still deliver."""

    def __init__(self, config: dict[str, Any], timeout_s: float) -> None:
        self.broken: str | None = None
        """Why this producer must be replaced (None: it is fine)."""
        self.timeout_s = timeout_s
        self.created = time.monotonic()
        self.last_success = self.created
        self._stop = threading.Event()
        self.producer = Producer({**config, "error_cb": self._on_error})
        self._thread = threading.Thread(
            target=self._poll, name="outboxer-kafka-producer", daemon=True
        )
        self._thread.start()

    def break_(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
            logger.error("the Kafka producer will be rebuilt: %s", reason)

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self.break_(f"fatal error {describe(err)}")
        else:
            logger.warning("Kafka producer: %s", describe(err))

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self.producer.poll(0.05)
            except KafkaException as exc:
                # librdkafka raises fatal errors from poll() instead of calling the
                # error callback; keep polling so queued delivery reports resolve.
                err = kafka_error_of(exc)
                self.break_(describe(err) if err is not None else str(exc))
            except Exception:
                logger.exception("Kafka producer poll failed")
                self._stop.wait(0.5)

    def delivered(self, err: KafkaError | None) -> None:
        """Learn from one delivery report (runs on the poll thread)."""
        if err is None:
            self.last_success = time.monotonic()
            return
        code = err.code()
        if code in REBUILD_ERRORS or err.fatal():
            self.break_(f"delivery failed with {describe(err)}")
        elif code == KafkaError._MSG_TIMED_OUT:
            self.timed_out()

    def timed_out(self) -> None:
        # Deliveries time out while nothing got through for a whole message timeout:
        # the broker may be down (a new producer costs nothing then) or this producer
        # may be stuck on a broker that lost its state (only a new one recovers).
        if time.monotonic() - self.last_success >= self.timeout_s:
            self.break_("deliveries timed out with no success for a whole message timeout")

    def close(self, timeout: float) -> int:
        """Flush, then stop the callback thread; returns messages still unflushed."""
        try:
            remaining = int(self.producer.flush(timeout))
        except KafkaException as exc:
            logger.warning("flushing the Kafka producer failed: %s", exc)
            remaining = len(self.producer)
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(KafkaException):
            self.producer.poll(0)
        return remaining


async def produce_batch(
    handle: ProducerHandle, topic: str, messages: Sequence[OutgoingMessage], timeout: float
) -> list[Delivery]:
    """Produce ``messages`` at once and await their reports together (at most
    ``timeout`` seconds); one :class:`Delivery` per message, in order."""
    produce = handle.producer.produce
    loop = asyncio.get_running_loop()
    waiter = BatchWaiter(loop, len(messages))
    for i, m in enumerate(messages):
        callback = partial(waiter.delivered, i, m.outbox_id, handle)
        while True:
            try:
                produce(
                    topic,
                    value=m.value,
                    key=m.key.encode(),
                    headers=cast(Any, m.headers()),
                    on_delivery=callback,
                )
                break
            except BufferError:
                await asyncio.sleep(0.005)  # local queue full: let deliveries drain
            except KafkaException as exc:
                err = kafka_error_of(exc)
                if err is None:
                    waiter.settle(i, Delivery(m.outbox_id, error=str(exc), transient=True))
                    break
                if err.code() in REBUILD_ERRORS or err.fatal():
                    handle.break_(f"produce failed with {describe(err)}")
                waiter.settle(i, delivery_of(m.outbox_id, err))
                break
    try:
        await asyncio.wait_for(asyncio.shield(waiter.done), timeout)
    except TimeoutError:
        handle.timed_out()
    return [
        d if d is not None else Delivery(m.outbox_id, error=NO_REPORT, transient=True)
        for m, d in zip(messages, waiter.results, strict=True)
    ]


class BatchWaiter:
    """Collects one batch's delivery reports on the producer's thread and wakes the
    event loop once, when the last one is in (not once per message)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int) -> None:
        self.loop = loop
        self.results: list[Delivery | None] = [None] * size
        self.missing = size
        self.done: asyncio.Future[None] = loop.create_future()
        self._lock = threading.Lock()
        if size == 0:
            self.done.set_result(None)

    def settle(self, index: int, delivery: Delivery) -> None:
        with self._lock:
            if self.results[index] is not None:
                return
            self.results[index] = delivery
            self.missing -= 1
            last = self.missing == 0
        if last:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                self.loop.call_soon_threadsafe(_finish, self.done)

    def delivered(
        self,
        index: int,
        outbox_id: int,
        handle: ProducerHandle,
        err: KafkaError | None,
        msg: Message | None,
    ) -> None:
        handle.delivered(err)
        if err is None:
            where = None if msg is None else f"{msg.topic()}/{msg.partition()}@{msg.offset()}"
            self.settle(index, Delivery(outbox_id, coordinates=where))
        else:
            self.settle(index, delivery_of(outbox_id, err))


def _finish(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
