"""Consumers: receive -> mark -> lock rows -> run handlers -> mark -> commit -> ack.

``dispatcher`` runs one route's batches (``Dispatcher``, ``InboxDispatcher``),
``batch`` holds the dispatch policy (fast path, isolation, batch handlers, key
order), ``loop`` the receive/dispatch/acknowledge loop.
"""

from __future__ import annotations

from outboxer.consumer.dispatcher import Dispatcher, InboxDispatcher
from outboxer.consumer.loop import consume_loop

__all__ = ["Dispatcher", "InboxDispatcher", "consume_loop"]
