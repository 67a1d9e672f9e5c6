"""Counters of what the relay and consumers did in this process."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Stats:
    """Per-service counters; ``totals()`` sums them over services.

    relay: ``claimed``, ``sent``, ``published``, ``send_failed``, ``send_dead``,
    ``undecodable_rows``. consumer: ``received``, ``consumed``, ``retried``, ``dead``,
    ``skipped`` (already consumed/dead, missing row, duplicate), ``undecodable``,
    ``no_outbox_id``, ``handler_errors``.
    """

    by_service: dict[str, Counter[str]] = field(default_factory=dict)

    def add(self, service: str, name: str, n: int = 1) -> None:
        if n:
            self.by_service.setdefault(service, Counter())[name] += n

    def get(self, name: str, service: str | None = None) -> int:
        if service is not None:
            return self.by_service.get(service, Counter())[name]
        return sum(c[name] for c in self.by_service.values())

    def totals(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for c in self.by_service.values():
            total.update(c)
        return total
