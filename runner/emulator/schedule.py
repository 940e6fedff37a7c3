"""A limit that moves at run time: scale factors over time (EmulatorConfig.limit_schedule).

A schedule is a tuple of (seconds, factor) pairs with strictly increasing times: from `seconds`
after the schedule's origin (the first request after start or reset) every rate limit is the
configured one times `factor`, until the next pair. Before the first pair the factor is 1.

    ((30.0, 0.5), (60.0, 1.0))   # halve every limit at t = 30 s, restore it at t = 60 s
    "30:0.5,60:1"                # the same, as `runner emulator --limit-schedule` takes it
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

Schedule = tuple[tuple[float, float], ...]


def parse_limit_schedule(text: str) -> Schedule:
    """Parse ``"30:0.5,60:1"`` into ``((30.0, 0.5), (60.0, 1.0))``; ValueError otherwise."""
    pairs = []
    for part in text.split(","):
        seconds, sep, factor = part.partition(":")
        if not sep:
            raise ValueError(
                f"bad limit schedule {text!r}: expected SECONDS:FACTOR[,SECONDS:FACTOR...]"
            )
        try:
            pairs.append((float(seconds), float(factor)))
        except ValueError:
            raise ValueError(
                f"bad limit schedule {text!r}: {part.strip()!r} is not two numbers"
            ) from None
    return check_schedule(pairs)


def check_schedule(pairs: Iterable[Any] | str) -> Schedule:
    """Normalise a schedule (pairs or the "S:F,S:F" text) to a tuple of float pairs; times must
    be finite, >= 0 and strictly increasing, factors finite and > 0."""
    if isinstance(pairs, str):
        return parse_limit_schedule(pairs)
    out: list[tuple[float, float]] = []
    for pair in pairs:
        try:
            seconds, factor = pair
        except (TypeError, ValueError):
            raise ValueError(f"limit_schedule entries are (seconds, factor) pairs, got {pair!r}") from None
        for name, value in (("time", seconds), ("factor", factor)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"limit_schedule {name} must be a finite number, got {value!r}")
        if seconds < 0 or factor <= 0:
            raise ValueError(
                f"limit_schedule needs times >= 0 and factors > 0, got ({seconds!r}, {factor!r})"
            )
        if out and seconds <= out[-1][0]:
            raise ValueError(f"limit_schedule times must increase, got {seconds!r} after {out[-1][0]!r}")
        out.append((float(seconds), float(factor)))
    return tuple(out)


def factor_at(schedule: Schedule, elapsed: float) -> tuple[float, float]:
    """The factor in force `elapsed` seconds after the origin, and the elapsed time of the next
    change (``inf`` when none is left)."""
    factor = 1.0
    for seconds, value in schedule:
        if seconds > elapsed:
            return factor, seconds
        factor = value
    return factor, math.inf


__all__ = ["Schedule", "check_schedule", "factor_at", "parse_limit_schedule"]
