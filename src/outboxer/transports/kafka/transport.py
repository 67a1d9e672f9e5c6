"""The Kafka transport, on confluent-kafka (librdkafka).

Producer: idempotent, ``acks=all``; the message key is the outbox message key, the
value the envelope JSON, and event id/type/version travel as headers too. A
background thread serves librdkafka's delivery callbacks and resolves one asyncio
future per message, so a batch is sent at once and its acknowledgements awaited
together. A fatal producer error (librdkafka ``fatal``) makes the next send build a
new producer; messages the broker will never accept (too large, invalid) are
reported as permanent failures and end dead instead of being retried.

Consumers: one per service route, in the route's consumer group, auto-commit off.
Each runs its blocking librdkafka calls on its own thread, and offsets are committed
only for batches whose database transaction has committed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, cast

from outboxer.errors import ConfigurationError, TransportError
from outboxer.routing import ServiceRoute
from outboxer.transports.base import Delivery, IncomingMessage, OutgoingMessage
from outboxer.transports.kafka.settings import KafkaSettings

try:
    from confluent_kafka import (
        Consumer,
        KafkaError,
        KafkaException,
        Message,
        Producer,
        TopicPartition,
    )
    from confluent_kafka import admin as kafka_admin
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the Kafka transport needs confluent-kafka: pip install 'outboxer[kafka]'"
    ) from exc

AdminClient = kafka_admin.AdminClient
NewTopic = kafka_admin.NewTopic  # type: ignore[attr-defined]  # re-exported without __all__

logger = logging.getLogger(__name__)
librdkafka_logger = logging.getLogger("outboxer.librdkafka")

# Errors that no retry can fix: the row is marked dead at once.
PERMANENT_ERRORS = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError._INVALID_ARG,
    }
)


def _describe(err: KafkaError) -> str:
    return f"{err.name()}: {err.str()}"


class _ProducerHandle:
    """A librdkafka producer with a thread serving its callbacks."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.fatal: KafkaError | None = None
        self._stop = threading.Event()
        self.producer = Producer({**config, "error_cb": self._on_error})
        self._thread = threading.Thread(
            target=self._poll, name="outboxer-kafka-producer", daemon=True
        )
        self._thread.start()

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self.fatal = err
            logger.error("fatal Kafka producer error: %s", _describe(err))
        else:
            logger.warning("Kafka producer: %s", _describe(err))

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0.05)

    def close(self, timeout: float) -> int:
        """Flush, then stop the callback thread; returns messages still unflushed."""
        remaining = int(self.producer.flush(timeout))
        self._stop.set()
        self._thread.join(timeout=5)
        self.producer.poll(0)
        return remaining


class KafkaSubscription:
    """One route's consumer; its blocking calls run on a dedicated thread."""

    def __init__(self, route: ServiceRoute, config: dict[str, Any]) -> None:
        self.route = route
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"outboxer-kafka-{route.service_name}"
        )
        self._config = config
        self._consumer: Consumer | None = None
        self._closed = False

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def open(self) -> None:
        def make() -> Consumer:
            consumer = Consumer(self._config)
            consumer.subscribe([self.route.topic])
            return consumer

        self._consumer = await self._call(make)

    def _fetch(self, max_messages: int, timeout: float) -> list[Message]:
        assert self._consumer is not None
        first = self._consumer.poll(timeout)
        if first is None:
            return []
        rest = self._consumer.consume(max_messages - 1, 0) if max_messages > 1 else []
        return [first, *rest]

    async def receive(self, max_messages: int, timeout: float) -> list[IncomingMessage]:
        if self._closed or self._consumer is None:
            return []
        raw: list[Message] = await self._call(self._fetch, max_messages, timeout)
        out: list[IncomingMessage] = []
        for m in raw:
            err = m.error()
            if err is not None:
                if err.fatal():
                    raise TransportError(f"fatal Kafka consumer error: {_describe(err)}")
                if err.code() != KafkaError._PARTITION_EOF:
                    logger.warning(
                        "Kafka consumer: %s",
                        _describe(err),
                        extra={"service": self.route.service_name},
                    )
                continue
            raw_headers: Any = m.headers() or []
            pairs = raw_headers.items() if isinstance(raw_headers, dict) else raw_headers
            headers = {
                str(k): v if isinstance(v, bytes) else str(v).encode()
                for k, v in pairs
                if v is not None
            }
            out.append(
                IncomingMessage(
                    route=self.route,
                    value=m.value(),
                    key=m.key(),
                    headers=headers,
                    position=(m.topic(), m.partition(), m.offset()),
                )
            )
        return out

    async def ack(self, messages: Sequence[IncomingMessage]) -> None:
        if not messages or self._consumer is None:
            return
        highest: dict[tuple[str, int], int] = {}
        for m in messages:
            topic, partition, offset = m.position
            key = (topic, partition)
            highest[key] = max(highest.get(key, -1), offset)
        offsets = [TopicPartition(t, p, o + 1) for (t, p), o in highest.items()]
        consumer = self._consumer
        try:
            await self._call(partial(consumer.commit, offsets=offsets, asynchronous=False))
        except KafkaException as exc:
            # Typically a rebalance took the partition away: the new owner gets the
            # messages again and the row lock makes the repeat a no-op.
            logger.warning(
                "offset commit failed (messages will be redelivered): %s",
                exc,
                extra={"service": self.route.service_name},
            )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        consumer = self._consumer
        if consumer is not None:
            try:
                await self._call(consumer.close)
            except KafkaException as exc:
                logger.warning("closing Kafka consumer: %s", exc)
        self._executor.shutdown(wait=True)


class KafkaTransport:
    """Kafka (or any Kafka-protocol broker) through confluent-kafka."""

    name = "kafka"

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        settings: KafkaSettings | None = None,
        lease: float = 30.0,
        client_id: str = "outboxer",
    ) -> None:
        if not bootstrap_servers.strip():
            raise ConfigurationError("Kafka bootstrap servers are empty")
        self.bootstrap_servers = bootstrap_servers
        self.settings = settings or KafkaSettings()
        self.client_id = client_id
        # A send must give up before the claim's lease runs out, or another relay
        # sends the same rows again while this one is still waiting.
        self.delivery_timeout_ms = max(1000, int(lease * 1000 * 0.8))
        self._producer: _ProducerHandle | None = None
        self._producer_lock = asyncio.Lock()
        self._subscriptions: list[KafkaSubscription] = []

    @property
    def delivers_in_process(self) -> bool:
        return False

    # ------------------------------------------------------------------ config

    def _common(self) -> dict[str, Any]:
        # librdkafka's own log lines go to Python logging, not to stderr.
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            "logger": librdkafka_logger,
        }

    def producer_config(self) -> dict[str, Any]:
        return {
            **self._common(),
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "message.timeout.ms": self.delivery_timeout_ms,
            **self.settings.config,
        }

    def consumer_config(self, route: ServiceRoute) -> dict[str, Any]:
        return {
            **self._common(),
            "group.id": route.group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": self.settings.session_timeout_ms,
            "enable.partition.eof": False,
            **self.settings.config,
        }

    # ------------------------------------------------------------------ lifecycle

    async def start(self, routes: Sequence[ServiceRoute]) -> None:
        # A lock belongs to the loop that first waits on it; each run may be a new loop.
        self._producer_lock = asyncio.Lock()
        topics = sorted({r.topic for r in routes})
        if topics:
            await asyncio.to_thread(self._ensure_topics, topics)
        await self._current_producer()

    def _ensure_topics(self, topics: list[str]) -> None:
        admin = AdminClient(self._common())
        deadline = time.monotonic() + self.settings.topic_wait_timeout
        announced = False
        while True:
            try:
                existing = set(admin.list_topics(timeout=10).topics)
            except KafkaException as exc:
                existing = set()
                logger.warning("Kafka metadata request failed: %s", exc)
            missing = [t for t in topics if t not in existing]
            if not missing:
                return
            if self.settings.create_topics:
                self._create(admin, missing)
            elif not announced:
                logger.warning("waiting for Kafka topics to be created: %s", ", ".join(missing))
                announced = True
            if time.monotonic() > deadline:
                raise TransportError(
                    f"Kafka topics not ready after {self.settings.topic_wait_timeout:.0f}s: "
                    + ", ".join(missing),
                    bootstrap=self.bootstrap_servers,
                )
            time.sleep(0.5)

    def _create(self, admin: AdminClient, topics: list[str]) -> None:
        new = [
            NewTopic(
                t,
                num_partitions=self.settings.partitions,
                replication_factor=self.settings.replication_factor,
            )
            for t in topics
        ]
        for topic, future in admin.create_topics(new).items():
            try:
                future.result(timeout=30)
                logger.info("created Kafka topic %s", topic)
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    continue
                logger.warning("could not create Kafka topic %s: %s", topic, exc)

    async def subscribe(self, route: ServiceRoute) -> KafkaSubscription:
        sub = KafkaSubscription(route, self.consumer_config(route))
        await sub.open()
        self._subscriptions.append(sub)
        return sub

    async def close(self) -> None:
        for sub in self._subscriptions:
            await sub.close()
        self._subscriptions = []
        async with self._producer_lock:
            handle, self._producer = self._producer, None
        if handle is not None:
            remaining = await asyncio.to_thread(handle.close, 30.0)
            if remaining:
                logger.warning(
                    "%d message(s) were not flushed before close; their rows are sent again "
                    "after their lease",
                    remaining,
                )

    # ------------------------------------------------------------------ sending

    async def _current_producer(self) -> _ProducerHandle:
        async with self._producer_lock:
            handle = self._producer
            if handle is None:
                handle = self._producer = _ProducerHandle(self.producer_config())
            elif handle.fatal is not None:
                logger.error("recreating the Kafka producer after a fatal error")
                old = handle
                handle = self._producer = _ProducerHandle(self.producer_config())
                await asyncio.to_thread(old.close, 0)
            return handle

    async def send(
        self, route: ServiceRoute, messages: Sequence[OutgoingMessage]
    ) -> list[Delivery]:
        handle = await self._current_producer()
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Delivery]] = []
        for m in messages:
            fut: asyncio.Future[Delivery] = loop.create_future()
            futures.append(fut)
            callback = partial(self._delivered, loop, fut, m.outbox_id)
            while True:
                try:
                    handle.producer.produce(
                        route.topic,
                        value=m.value,
                        key=m.key.encode(),
                        headers=cast(Any, m.headers()),
                        on_delivery=callback,
                    )
                    break
                except BufferError:
                    await asyncio.sleep(0.005)  # local queue full: let deliveries drain
                except KafkaException as exc:
                    err = exc.args[0] if exc.args else None
                    code = err.code() if isinstance(err, KafkaError) else None
                    text = _describe(err) if isinstance(err, KafkaError) else str(exc)
                    fut.set_result(
                        Delivery(m.outbox_id, error=text, permanent=code in PERMANENT_ERRORS)
                    )
                    break
        timeout = self.delivery_timeout_ms / 1000 + 5
        done, _ = await asyncio.wait(futures, timeout=timeout)
        results: list[Delivery] = []
        for m, fut in zip(messages, futures, strict=True):
            if fut in done:
                results.append(fut.result())
            else:
                fut.cancel()
                results.append(Delivery(m.outbox_id, error="no delivery report before timeout"))
        return results

    @staticmethod
    def _delivered(
        loop: asyncio.AbstractEventLoop,
        fut: asyncio.Future[Delivery],
        outbox_id: int,
        err: KafkaError | None,
        msg: Message,
    ) -> None:
        if err is None:
            result = Delivery(outbox_id)
        else:
            result = Delivery(
                outbox_id, error=_describe(err), permanent=err.code() in PERMANENT_ERRORS
            )
        loop.call_soon_threadsafe(_resolve, fut, result)


def _resolve(fut: asyncio.Future[Delivery], result: Delivery) -> None:
    if not fut.done():
        fut.set_result(result)
