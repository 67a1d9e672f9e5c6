"""The relay's side: a batch as ``XADD``s in one pipeline (one round trip).

An entry's fields: ``v`` the value (the envelope JSON), ``k`` the key, and each
header as ``h:<name>`` (event id, type and version, then the propagation headers
stored with the row). A message counts as sent when ``XADD`` replied with its entry
id: the server has it in memory (what survives a crash depends on the server's
persistence, see docs/operations.md); with ``redis.wait_replicas``, only once
``WAIT`` says that many replicas have it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from outboxer.transports.base import Delivery, OutgoingMessage
from outboxer.transports.redis.admin import Topology
from outboxer.transports.redis.client import Redis
from outboxer.transports.redis.errors import failed
from outboxer.transports.redis.settings import RedisSettings

VALUE = b"v"
KEY = b"k"
HEADER = b"h:"


def fields_of(message: OutgoingMessage) -> dict[bytes, bytes]:
    fields = {VALUE: message.value, KEY: message.key.encode()}
    for name, value in message.headers():
        fields[HEADER + name.encode()] = value
    return fields


async def add_batch(
    client: Redis,
    topology: Topology,
    settings: RedisSettings,
    destination: str,
    messages: Sequence[OutgoingMessage],
) -> list[Delivery]:
    """XADD every message to its lane in one non-transactional pipeline; one
    :class:`Delivery` per message, in order. Connection failures raise (the caller
    treats them as an outage); a command the server refused is a transient failure
    of that message."""
    pipe = client.pipeline(transaction=False)
    streams = [topology.stream(destination, topology.lane_of(m.key)) for m in messages]
    for m, stream in zip(messages, streams, strict=True):
        args: list[Any] = ["XADD", stream]
        if settings.maxlen is not None:
            args += ["MAXLEN", "~", settings.maxlen]
        args.append("*")
        for name, value in fields_of(m).items():
            args += [name, value]
        pipe.execute_command(*args)
    if settings.wait_replicas:
        pipe.execute_command("WAIT", settings.wait_replicas, int(settings.wait_timeout * 1000))
    results = await pipe.execute(raise_on_error=False)
    out = [
        failed(m.outbox_id, r)
        if isinstance(r, BaseException)
        else Delivery(m.outbox_id, coordinates=f"{stream}@{_text(r)}")
        for m, stream, r in zip(messages, streams, results, strict=False)
    ]
    if settings.wait_replicas:
        acked = results[-1]
        if isinstance(acked, BaseException) or int(acked) < settings.wait_replicas:
            why = (
                str(acked)
                if isinstance(acked, BaseException)
                else f"{acked} of {settings.wait_replicas} replica(s) acknowledged in "
                f"{settings.wait_timeout:g}s (redis.wait_replicas)"
            )
            out = [d if not d.ok else failed(d.outbox_id, f"WAIT: {why}") for d in out]
    return out


def _text(entry_id: Any) -> str:
    """An entry id as the server replied it (bytes or text)."""
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
