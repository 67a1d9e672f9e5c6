"""Retry policy (how long a failed message waits) and the loops' error backoff."""

from __future__ import annotations

from dataclasses import dataclass

from outboxer.errors import ConfigurationError

DEFAULT_MAX_RETRY = 20
MAX_RETRY_LIMIT = 2**31 - 1
"""``max_retry`` and ``retry_count`` are 32-bit INTEGER columns."""


def check_max_retry(value: object, *, what: str = "max_retry") -> int:
    """``value`` if it is an int in ``1 .. 2**31-1``, else ConfigurationError.

    The one rule for every place a ``max_retry`` enters (settings, ``publish``,
    ``create_message``, the retry policy), checked before any SQL.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{what} must be an int, got {value!r}")
    if not 1 <= value <= MAX_RETRY_LIMIT:
        raise ConfigurationError(f"{what} must be between 1 and {MAX_RETRY_LIMIT}, got {value}")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Quadratic backoff: attempt ``n`` waits ``n*n`` seconds.

    ``n`` is capped at ``cap_attempt`` (10: at most 100 s) and ``n <= 0`` waits one
    unit. ``unit`` scales every delay (1 s by default; tests and latency-sensitive
    deployments shorten it through configuration).
    """

    max_retry: int = DEFAULT_MAX_RETRY
    unit: float = 1.0
    cap_attempt: int = 10

    def __post_init__(self) -> None:
        check_max_retry(self.max_retry)
        if not self.unit > 0:
            raise ConfigurationError(f"backoff unit must be > 0 seconds, got {self.unit!r}")
        if self.cap_attempt < 1:
            raise ConfigurationError(f"cap_attempt must be at least 1, got {self.cap_attempt}")

    def delay(self, retry_count: int) -> float:
        """Seconds to wait after the ``retry_count``-th failure."""
        if retry_count <= 0:
            return self.unit
        n = min(retry_count, self.cap_attempt)
        return float(n * n) * self.unit


def backoff_seconds(retry_count: int) -> float:
    """The backoff of the default policy: 1, 4, 9, ..., 100 seconds."""
    return RetryPolicy().delay(retry_count)


class ErrorBackoff:
    """How long a loop waits after a round that failed as a whole (the database or
    the broker unreachable): ``first`` seconds, doubling up to ``cap``; ``reset()``
    after a round that worked."""

    def __init__(self, first: float = 1.0, cap: float = 30.0) -> None:
        self.first = first
        self.cap = cap
        self.current = first

    def next(self) -> float:
        """The delay to wait now; the following one is twice as long (capped)."""
        delay = self.current
        self.current = min(self.current * 2, self.cap)
        return delay

    def reset(self) -> None:
        self.current = self.first
