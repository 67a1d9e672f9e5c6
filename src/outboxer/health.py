"""Health conditions over service status, for ``outboxer status --fail-on``.

A condition reads ``<measure><op><value>``: ``dead>0``, ``due>=1000``,
``oldest-due>60s``. Measures are the row counts by status (``pending``,
``published``, ``consumed``, ``dead``, ``cancelled``), ``total``, ``due`` (rows due
now), ``scheduled`` (pending rows published for later, not yet due) and
``oldest-due`` (age of the oldest due row, a duration: ``90``, ``60s``, ``5m``; a
scheduled row counts from its due time, not its publish).
Operators: ``>``, ``>=``, ``<``, ``<=``, ``=``, ``!=``. A condition holds when it holds
for at least one service.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from outboxer.durations import format_duration, parse_duration
from outboxer.errors import ConfigurationError
from outboxer.models import ServiceStatus, Status

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
    "=": operator.eq,
    "==": operator.eq,
}
_CONDITION = re.compile(r"\s*([a-z_-]+)\s*(>=|<=|!=|==|>|<|=)\s*([0-9][0-9a-z.]*)\s*")
COUNTS = (*(s.value for s in Status), "total", "due", "scheduled")
DURATIONS = ("oldest-due",)


@dataclass(frozen=True, slots=True)
class Condition:
    """One ``--fail-on`` condition."""

    measure: str
    op: str
    value: float

    def __str__(self) -> str:
        value = format_duration(self.value) if self.measure in DURATIONS else f"{self.value:g}"
        return f"{self.measure}{self.op}{value}"

    def measured(self, st: ServiceStatus) -> float:
        """The measure's value for one service."""
        if self.measure == "oldest-due":
            return st.oldest_due_seconds or 0.0
        if self.measure == "total":
            return float(st.total)
        if self.measure == "due":
            return float(st.due)
        if self.measure == "scheduled":
            return float(st.scheduled)
        return float(st.counts.get(self.measure, 0))

    def holds(self, st: ServiceStatus) -> bool:
        return _OPS[self.op](self.measured(st), self.value)


def parse_conditions(text: str) -> list[Condition]:
    """``"dead>0,oldest-due>60s"`` -> conditions; ConfigurationError when malformed."""
    conditions = []
    for part in text.split(","):
        if not part.strip():
            continue
        match = _CONDITION.fullmatch(part.lower())
        if match is None:
            raise ConfigurationError(
                f"invalid condition {part.strip()!r}: write it like dead>0 or oldest-due>60s"
            )
        measure, op, raw = match.groups()
        measure = measure.replace("_", "-")
        if measure in ("oldest", "oldest-due-age"):
            measure = "oldest-due"
        if measure in DURATIONS:
            value = parse_duration(raw, what=measure)
        elif measure in COUNTS:
            try:
                value = float(int(raw))
            except ValueError:
                raise ConfigurationError(
                    f"invalid condition {part.strip()!r}: {measure} is a count"
                ) from None
        else:
            known = ", ".join((*COUNTS, *DURATIONS))
            raise ConfigurationError(f"unknown measure {measure!r} in {part.strip()!r}: {known}")
        conditions.append(Condition(measure, op, value))
    if not conditions:
        raise ConfigurationError("no condition given: e.g. dead>0,oldest-due>60s")
    return conditions


@dataclass(frozen=True, slots=True)
class Failure:
    """A condition that holds for a service."""

    service: str
    condition: Condition
    value: float

    def __str__(self) -> str:
        c = self.condition
        now = format_duration(self.value) if c.measure in DURATIONS else f"{self.value:g}"
        return f"{self.service}: {c} ({c.measure} is {now})"


def failures(conditions: Sequence[Condition], statuses: Sequence[ServiceStatus]) -> list[Failure]:
    """Every (service, condition) that holds."""
    return [
        Failure(st.service, c, c.measured(st)) for c in conditions for st in statuses if c.holds(st)
    ]
