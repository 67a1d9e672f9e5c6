"""What librdkafka's error codes mean to the relay: permanent (the row ends dead),
transient (the broker's trouble: no attempt counted; a whole batch so is an outage),
or a producer that must be rebuilt."""

from __future__ import annotations

from outboxer.transports.base import Delivery
from outboxer.transports.kafka.client import KafkaError, KafkaException

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


def describe(err: KafkaError) -> str:
    return f"{err.name()}: {err.str()}"


def delivery_of(outbox_id: int, err: KafkaError) -> Delivery:
    code = err.code()
    return Delivery(
        outbox_id,
        error=describe(err),
        permanent=code in PERMANENT_ERRORS,
        transient=code in TRANSIENT_ERRORS or err.fatal(),
    )


def kafka_error_of(exc: KafkaException) -> KafkaError | None:
    err = exc.args[0] if exc.args else None
    return err if isinstance(err, KafkaError) else None
