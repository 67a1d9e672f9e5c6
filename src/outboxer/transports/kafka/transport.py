"""The Kafka transport, on confluent-kafka (librdkafka).

Producer: idempotent, ``acks=all``; the message key is the outbox message key, the
value the envelope JSON, and event id/type/version travel as headers too. A
background thread serves librdkafka's delivery callbacks and resolves one asyncio
future per message, so a batch is sent at once and its acknowledgements awaited
together. Messages the broker will never accept (too large, invalid) are reported
as permanent failures and end dead; broker-side failures (unreachable, timed out,
producer state) are reported as transient, which the relay treats as an outage.

A producer that can no longer deliver is rebuilt by the next send, without a
restart: after a fatal error (raised by ``poll``/``produce`` or reported to the
error callback), after a delivery report that only a new producer identity can
clear (``UNKNOWN_PRODUCER_ID`` and kin: an idempotent producer whose broker lost its
state loops on epoch bumps forever), and after deliveries have timed out with no
success for a whole ``message.timeout.ms``. Topics are ensured again when it is
rebuilt (a replaced broker has lost them).

Consumers: one per service route, in the route's consumer group, auto-commit off.
Each runs its blocking librdkafka calls on its own thread, and offsets are committed
only for batches whose database transaction has committed. A consumer that meets a
fatal error, or that has had no partition for ``kafka.unassigned_rebuild_after``
seconds while the group does not cover the topic's partitions, is closed and built
again.
"""

from __future__ import annotations

import asyncio
import contextlib
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

# Delivery reports that only a new producer (a new producer id) can clear; librdkafka
# does not flag them fatal.
REBUILD_ERRORS = frozenset(
    {
        KafkaError._FATAL,
        KafkaError.UNKNOWN_PRODUCER_ID,
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.INVALID_PRODUCER_ID_MAPPING,
    }
)

# The broker's trouble, not the message's: when a whole batch fails so, the relay
# treats it as an outage and counts no attempt.
TRANSIENT_ERRORS = REBUILD_ERRORS | frozenset(
    {
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._QUEUE_FULL,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError._DESTROY,
        # librdkafka purges what a producer still holds when that producer fails
        # fatally or is closed for a rebuild: the producer's end, not the message's.
        KafkaError._PURGE_QUEUE,
        KafkaError._PURGE_INFLIGHT,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NETWORK_EXCEPTION,
        KafkaError.NOT_ENOUGH_REPLICAS,
        KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
        KafkaError.BROKER_NOT_AVAILABLE,
        KafkaError.NOT_CONTROLLER,
        KafkaError.KAFKA_STORAGE_ERROR,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError._AUTHENTICATION,
        KafkaError._SSL,
    }
)

NO_REPORT = "no delivery report before timeout"


def _describe(err: KafkaError) -> str:
    return f"{err.name()}: {err.str()}"


def _delivery(outbox_id: int, err: KafkaError) -> Delivery:
    code = err.code()
    return Delivery(
        outbox_id,
        error=_describe(err),
        permanent=code in PERMANENT_ERRORS,
        transient=code in TRANSIENT_ERRORS or err.fatal(),
    )


def _kafka_error(exc: KafkaException) -> KafkaError | None:
    err = exc.args[0] if exc.args else None
    return err if isinstance(err, KafkaError) else None


class _ProducerHandle:
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
            self.break_(f"fatal error {_describe(err)}")
        else:
            logger.warning("Kafka producer: %s", _describe(err))

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self.producer.poll(0.05)
            except KafkaException as exc:
                # librdkafka raises fatal errors from poll() instead of calling the
                # error callback; keep polling so queued delivery reports resolve.
                err = _kafka_error(exc)
                self.break_(_describe(err) if err is not None else str(exc))
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
            self.break_(f"delivery failed with {_describe(err)}")
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


class KafkaSubscription:
    """One route's consumer; its blocking calls run on a dedicated thread."""

    def __init__(
        self, route: ServiceRoute, config: dict[str, Any], transport: KafkaTransport
    ) -> None:
        self.route = route
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"outboxer-kafka-{route.service_name}"
        )
        self._config = config
        self._transport = transport
        self._consumer: Consumer | None = None
        self._closed = False
        self._unassigned_since: float | None = None
        self._rebuild_after = transport.settings.unassigned_rebuild_after
        self.rebuilds = 0

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _make(self) -> Consumer:
        consumer = Consumer(self._config)
        consumer.subscribe([self.route.topic])
        return consumer

    async def open(self) -> None:
        self._consumer = await self._call(self._make)
        self._unassigned_since = time.monotonic()

    def _fetch(self, max_messages: int, timeout: float) -> tuple[list[Message], bool]:
        assert self._consumer is not None
        first = self._consumer.poll(timeout)
        rest = self._consumer.consume(max_messages - 1, 0) if first and max_messages > 1 else []
        assigned = bool(self._consumer.assignment())
        return ([first, *rest] if first is not None else []), assigned

    async def receive(self, max_messages: int, timeout: float) -> list[IncomingMessage]:
        if self._closed or self._consumer is None:
            return []
        try:
            raw, assigned = await self._call(self._fetch, max_messages, timeout)
        except KafkaException as exc:
            await self._rebuild(f"consumer call failed: {exc}")
            return []
        out: list[IncomingMessage] = []
        for m in raw:
            err = m.error()
            if err is not None:
                if err.fatal():
                    await self._rebuild(f"fatal consumer error {_describe(err)}")
                    return out
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
        await self._watch_assignment(assigned or bool(out))
        return out

    async def _watch_assignment(self, assigned: bool) -> None:
        now = time.monotonic()
        if assigned:
            self._unassigned_since = None
            return
        if self._unassigned_since is None:
            self._unassigned_since = now
            return
        if now - self._unassigned_since < self._rebuild_after:
            return
        covered = await asyncio.to_thread(self._transport.group_covers_topic, self.route)
        if covered:
            # A spare member: every partition has another owner. Look again later.
            self._unassigned_since = now
            return
        await self._rebuild(f"no partition assigned for {now - self._unassigned_since:.0f}s")

    async def _rebuild(self, reason: str) -> None:
        """Close the consumer (its group membership goes with it) and build it again."""
        extra = {"service": self.route.service_name}
        logger.warning("rebuilding the Kafka consumer: %s", reason, extra=extra)
        old, self._consumer = self._consumer, None
        if old is not None:
            try:
                await self._call(old.close)
            except Exception as exc:  # noqa: BLE001 - the old consumer is discarded anyway
                logger.warning("closing the old Kafka consumer: %s", exc, extra=extra)
        if self._closed:
            return
        await asyncio.to_thread(self._transport.ensure_topics_quietly, [self.route.topic])
        try:
            self._consumer = await self._call(self._make)
        except KafkaException as exc:
            logger.warning("building the Kafka consumer failed: %s", exc, extra=extra)
        self._unassigned_since = time.monotonic()
        self._rebuild_after = min(self._rebuild_after * 2, 300.0)
        self.rebuilds += 1

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
            self._rebuild_after = self._transport.settings.unassigned_rebuild_after
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
        self._topics: list[str] = []
        self.producer_rebuilds = 0

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
            # Notice a recreated topic in seconds, not the default 5 minutes.
            "topic.metadata.refresh.interval.ms": 10_000,
            # A broker that vanished without closing: requests time out, the
            # connection is rebuilt (the default would wait a minute).
            "socket.timeout.ms": self.settings.socket_timeout_ms,
            "socket.keepalive.enable": True,
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
        self._topics = sorted({r.topic for r in routes})
        if self._topics:
            await asyncio.to_thread(self._ensure_topics, self._topics)
        await self._current_producer()

    def _admin(self) -> AdminClient:
        return AdminClient(self._common())

    def _ensure_topics(self, topics: list[str]) -> None:
        admin = self._admin()
        wait = self.settings.topic_wait_timeout
        deadline = time.monotonic() + wait
        announced = False
        last_error = ""
        while True:
            remaining = max(0.5, deadline - time.monotonic())
            try:
                existing = set(admin.list_topics(timeout=min(10.0, remaining)).topics)
            except KafkaException as exc:
                existing = set()
                last_error = str(exc)
                logger.warning("Kafka metadata request failed: %s", exc)
            missing = [t for t in topics if t not in existing]
            if not missing:
                return
            if self.settings.create_topics and not last_error:
                self._create(admin, missing, min(10.0, remaining))
            elif not announced and not last_error:
                logger.warning("waiting for Kafka topics to be created: %s", ", ".join(missing))
                announced = True
            if time.monotonic() >= deadline:
                why = f"the broker is unreachable ({last_error})" if last_error else "missing"
                raise TransportError(
                    f"Kafka topics not ready after {wait:.0f}s (kafka.topic_wait_timeout), "
                    f"{why}: " + ", ".join(missing),
                    bootstrap=self.bootstrap_servers,
                )
            last_error = ""
            time.sleep(0.5)

    def _create(self, admin: AdminClient, topics: list[str], timeout: float) -> None:
        new = [
            NewTopic(
                t,
                num_partitions=self.settings.partitions,
                replication_factor=self.settings.replication_factor,
            )
            for t in topics
        ]
        futures = admin.create_topics(
            new, request_timeout=timeout, operation_timeout=timeout
        ).items()
        for topic, future in futures:
            try:
                future.result(timeout=timeout + 5)
                logger.info("created Kafka topic %s", topic)
            except KafkaException as exc:
                err = _kafka_error(exc)
                if err is not None and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    continue
                logger.warning("could not create Kafka topic %s: %s", topic, exc)
            except TimeoutError:
                logger.warning("creating Kafka topic %s timed out", topic)

    def ensure_topics_quietly(self, topics: Sequence[str]) -> None:
        """Create missing topics (after a broker lost them); failures only logged."""
        if not self.settings.create_topics:
            return
        admin = self._admin()
        try:
            existing = set(admin.list_topics(timeout=5).topics)
        except KafkaException as exc:
            logger.debug("Kafka metadata request failed: %s", exc)
            return
        missing = [t for t in topics if t not in existing]
        if missing:
            self._create(admin, missing, 5.0)

    def group_covers_topic(self, route: ServiceRoute) -> bool:
        """Whether the route's consumer group already owns every partition of its
        topic (so a member without partitions is a spare, not a stuck one).
        False when the broker cannot say."""
        admin = self._admin()
        try:
            meta = admin.list_topics(topic=route.topic, timeout=5)
            partitions = set(meta.topics[route.topic].partitions)
            described = admin.describe_consumer_groups([route.group_id])[route.group_id]
            group = described.result(timeout=10)
        except Exception as exc:  # noqa: BLE001 - any failure means "cannot tell"
            logger.debug("cannot describe consumer group %s: %s", route.group_id, exc)
            return False
        owned = {
            tp.partition
            for member in group.members
            if member.assignment is not None
            for tp in member.assignment.topic_partitions
            if tp.topic == route.topic
        }
        return bool(partitions) and partitions <= owned

    async def subscribe(self, route: ServiceRoute) -> KafkaSubscription:
        sub = KafkaSubscription(route, self.consumer_config(route), self)
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
                handle = self._producer = self._new_producer()
            elif handle.broken is not None:
                old = handle
                logger.warning("rebuilding the Kafka producer: %s", old.broken)
                await asyncio.to_thread(self.ensure_topics_quietly, self._topics)
                handle = self._producer = self._new_producer()
                self.producer_rebuilds += 1
                await asyncio.to_thread(old.close, 0)
            return handle

    def _new_producer(self) -> _ProducerHandle:
        return _ProducerHandle(self.producer_config(), self.delivery_timeout_ms / 1000)

    async def send(
        self, route: ServiceRoute, messages: Sequence[OutgoingMessage]
    ) -> list[Delivery]:
        handle = await self._current_producer()
        loop = asyncio.get_running_loop()
        waiter = _BatchWaiter(loop, len(messages))
        produce = handle.producer.produce
        topic = route.topic
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
                    err = _kafka_error(exc)
                    if err is None:
                        waiter.settle(i, Delivery(m.outbox_id, error=str(exc), transient=True))
                        break
                    if err.code() in REBUILD_ERRORS or err.fatal():
                        handle.break_(f"produce failed with {_describe(err)}")
                    waiter.settle(i, _delivery(m.outbox_id, err))
                    break
        timeout = self.delivery_timeout_ms / 1000 + 5
        try:
            await asyncio.wait_for(asyncio.shield(waiter.done), timeout)
        except TimeoutError:
            handle.timed_out()
        return [
            d if d is not None else Delivery(m.outbox_id, error=NO_REPORT, transient=True)
            for m, d in zip(messages, waiter.results, strict=True)
        ]


class _BatchWaiter:
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
        handle: _ProducerHandle,
        err: KafkaError | None,
        msg: Message,
    ) -> None:
        handle.delivered(err)
        self.settle(index, Delivery(outbox_id) if err is None else _delivery(outbox_id, err))


def _finish(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
