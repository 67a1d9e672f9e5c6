"""Publishing a batch to JetStream: every message published at once, each PubAck
awaited together; a message counts as sent only once its stream stored it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from outboxer.transports.base import Delivery, OutgoingMessage
from outboxer.transports.nats.admin import lane_of, lane_subject
from outboxer.transports.nats.client import JetStreamContext
from outboxer.transports.nats.errors import delivery_of

MSG_ID = "Nats-Msg-Id"
KEY = "Outboxer-Key"
RESERVED = frozenset({MSG_ID, KEY})
"""Headers outboxer sets itself; a row's propagation headers cannot replace them."""


def msg_id(message: OutgoingMessage) -> str:
    """The stream's deduplication id: the event id and the row's attempt, so a resend
    after a lost PubAck is stored once, and a later attempt (a row sent again after
    ``redeliver_after``) is not taken for a duplicate."""
    return f"{message.event_id}:{message.retry_count}"


def headers_of(message: OutgoingMessage) -> dict[str, str]:
    headers = {MSG_ID: msg_id(message), KEY: message.key}
    for name, value in message.headers():
        if name not in RESERVED:
            headers[name] = value.decode()
    return headers


async def publish_batch(
    js: JetStreamContext,
    destination: str,
    messages: Sequence[OutgoingMessage],
    *,
    lanes: int,
    timeout: float,
) -> list[tuple[Delivery, BaseException | None]]:
    """Publish ``messages`` at once (in order: one key's messages keep their order on
    the connection) and await their PubAcks together; per message, in order, its
    :class:`Delivery` and the error it met."""

    async def one(m: OutgoingMessage) -> tuple[Delivery, BaseException | None]:
        subject = lane_subject(destination, lane_of(m.key, lanes))
        try:
            ack = await js.publish(subject, m.value, timeout=timeout, headers=headers_of(m))
        except (TimeoutError, Exception) as exc:  # noqa: BLE001 - sorted by delivery_of
            return delivery_of(m.outbox_id, exc), exc
        # Where the stream stored it: its name and sequence (lineage).
        return Delivery(m.outbox_id, coordinates=f"{ack.stream}@{ack.seq}"), None

    return list(await asyncio.gather(*(one(m) for m in messages)))
