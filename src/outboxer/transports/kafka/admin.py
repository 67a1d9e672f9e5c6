"""Topics and consumer groups: what the Kafka transport asks the broker's admin API.

Blocking calls (run them on a thread): make sure topics exist at start (created when
``kafka.create_topics``, else waited for), create them again after a broker lost
them, and tell whether a consumer group already owns every partition of a topic.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from outboxer.errors import TransportError
from outboxer.routing import ServiceRoute
from outboxer.transports.kafka.client import AdminClient, KafkaError, KafkaException, NewTopic
from outboxer.transports.kafka.errors import kafka_error_of
from outboxer.transports.kafka.settings import KafkaSettings

logger = logging.getLogger(__name__)


class KafkaAdmin:
    """The admin calls of one transport; a new librdkafka admin client per call."""

    def __init__(self, config: dict[str, Any], settings: KafkaSettings) -> None:
        self.config = config
        self.settings = settings

    def _client(self) -> AdminClient:
        return AdminClient({"socket.timeout.ms": 10_000, **self.config})

    def ensure_topics(self, topics: Sequence[str]) -> None:
        """Wait (``kafka.topic_wait_timeout``) until every topic exists, creating the
        missing ones when allowed; TransportError when they are still missing."""
        admin = self._client()
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
                    bootstrap=self.config.get("bootstrap.servers"),
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
                err = kafka_error_of(exc)
                if err is not None and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    continue
                logger.warning("could not create Kafka topic %s: %s", topic, exc)
            except TimeoutError:
                logger.warning("creating Kafka topic %s timed out", topic)

    def ensure_topics_quietly(self, topics: Sequence[str]) -> None:
        """Create missing topics (after a broker lost them); failures only logged."""
        if not self.settings.create_topics:
            return
        admin = self._client()
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
        admin = self._client()
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
