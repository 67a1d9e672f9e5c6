"""Retry policy: how long a failed message waits before its next attempt."""

from __future__ import annotations

from dataclasses import dataclass

from outboxer.errors import ConfigurationError

DEFAULT_MAX_RETRY = 20


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Quadratic backoff, as the seed: attempt ``n`` waits ``n*n`` seconds.

    ``n`` is capped at ``cap_attempt`` (10: at most 100 s) and ``n <= 0`` waits one
    unit. ``unit`` scales every delay (1 s by default; tests and latency-sensitive
    deployments shorten it through configuration).
    """

    max_retry: int = DEFAULT_MAX_RETRY
    unit: float = 1.0
    cap_attempt: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.max_retry, bool) or not isinstance(self.max_retry, int):
            raise ConfigurationError(f"max_retry must be an int, got {self.max_retry!r}")
        if self.max_retry < 1:
            raise ConfigurationError(f"max_retry must be at least 1, got {self.max_retry}")
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
    """The seed's backoff with the default policy: 1, 4, 9, ..., 100 seconds."""
    return RetryPolicy().delay(retry_count)
