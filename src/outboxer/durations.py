"""Durations as people write them: ``30s``, ``15m``, ``12h``, ``7d`` (and ``1h30m``).

The command line and the configuration file read durations with
:func:`parse_duration`; a bare number is seconds. :func:`format_duration` writes
them back compactly for tables and logs.
"""

from __future__ import annotations

import math
import re

from outboxer.errors import ConfigurationError

UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def parse_duration(text: str | float, *, what: str = "duration") -> float:
    """Seconds in ``text``: ``"90"``, ``"30s"``, ``"15m"``, ``"12h"``, ``"7d"``, ``"2w"``,
    ``"1h30m"``, ``"250ms"``. Negative, empty or malformed values raise
    :class:`ConfigurationError` (a ``ValueError``)."""
    if isinstance(text, bool):
        raise ConfigurationError(f"{what} must be a duration such as 30s, 15m or 7d, got {text!r}")
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        raw = str(text).strip().lower().replace(" ", "")
        if _NUMBER.fullmatch(raw):
            seconds = float(raw)
        else:
            parts = _PART.findall(raw)
            if not raw or "".join(n + u for n, u in parts) != raw:
                raise ConfigurationError(
                    f"{what} {text!r} is not valid: write it like 30s, 15m, 12h or 7d"
                )
            seconds = sum(float(n) * UNITS[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigurationError(f"{what} must be a finite, non-negative duration, got {text!r}")
    return seconds


def format_duration(seconds: float | None) -> str:
    """A compact, readable duration: ``0.4s``, ``42s``, ``5m07s``, ``3h05m``, ``2d04h``;
    ``-`` for None."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{int(seconds)}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"
