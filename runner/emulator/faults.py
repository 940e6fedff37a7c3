"""Fault names, their rates, and the deterministic per-attempt draw.

A fault is chosen per attempt from a hash of (seed, row key, attempt number), never from a
shared random stream, so a row's fate does not depend on concurrency or arrival order, and a
retried row moves on to a fresh draw (with total rate < 1 it eventually succeeds).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from .frozen import FrozenPairs

# Canonical order: the cumulative intervals are laid out in this order whatever order the
# caller gave, so the same rates always map the same draws to the same faults.
FAULT_NAMES: tuple[str, ...] = (
    "429",  # Throttling.RateQuota / limit_requests
    "429burst",  # Throttling.BurstRate / limit_burst_rate
    "429tpm",  # Throttling.AllocationQuota / insufficient_quota
    "500",  # InternalError / internal_error
    "502",  # gateway HTML page
    "503",  # ModelUnavailable
    "400",  # InvalidParameter, input too long (permanent)
    "moderation",  # DataInspectionFailed (permanent)
    "arrearage",  # Arrearage (permanent, account-level)
    "slow",  # normal answer after slow_ms
    "hang",  # 504 after hang_seconds
    "drop",  # connection closed without a response
    "malformed",  # 200 with a truncated JSON body (a stream: like stream_malformed)
    # Stream-only faults: a non-streaming request that draws one answers normally.
    "stream_drop",  # some frames, then the TCP connection is aborted mid-body
    "stream_truncate",  # some frames, then a clean end without the final frame(s)
    "stream_malformed",  # some frames, then one frame whose data is not JSON, then the end
    "stream_error",  # some frames, then an in-band quota error (429 AllocationQuota), then the end
    # Capacity throttling at peak time (dashscope-api.md 5.2): it does not depend on the caller's
    # rate. Appended, not inserted, so the intervals of the older names keep their places.
    "429throttling",  # Throttling: "Requests throttling triggered."
    "429concurrency",  # Throttling.Concurrency: "Too many concurrent requests."
    "500capacity",  # 500 ModelServingError: "... throttled due to system capacity limits ..."
    "503capacity",  # 503 ModelServingError, the same body
    # Structured output: a 200 whose answer is not JSON or breaks the requested schema (instance.py),
    # so re-asks can be rehearsed. Only requests that ask for JSON draw it; others answer normally.
    "bad_json",
)
STREAM_FAULTS: frozenset[str] = frozenset(n for n in FAULT_NAMES if n.startswith("stream_"))
_ORDER = {name: i for i, name in enumerate(FAULT_NAMES)}
_VALID = ", ".join(FAULT_NAMES)


def parse_fault_spec(text: str) -> tuple[str, float]:
    """Parse ``"429=0.1"`` into ``("429", 0.1)``; ValueError with a one-line message otherwise."""
    name, sep, rate_text = text.partition("=")
    name = name.strip()
    if not sep:
        raise ValueError(f"bad fault spec {text!r}: expected NAME=RATE (valid names: {_VALID})")
    if name not in _ORDER:
        raise ValueError(f"bad fault spec {text!r}: unknown fault {name!r} (valid names: {_VALID})")
    try:
        rate = float(rate_text)
    except ValueError:
        raise ValueError(
            f"bad fault spec {text!r}: rate {rate_text.strip()!r} is not a number "
            f"(valid names: {_VALID})"
        ) from None
    _check_rate(text, rate)
    return name, rate


def _check_rate(label: str, rate: float) -> None:
    # `not 0 <= rate <= 1` is also true for NaN.
    if not 0.0 <= rate <= 1.0:
        raise ValueError(
            f"bad fault spec {label!r}: rate {rate} is outside [0, 1] (valid names: {_VALID})"
        )


class FaultRates(FrozenPairs):
    """A read-only, hashable mapping of fault name -> probability per attempt.

    Accepts a mapping, an iterable of (name, rate) pairs, or of "name=rate" strings.
    Checks names, each rate in [0, 1], and a sum of rates <= 1.
    """

    __slots__ = ("_cumulative",)

    def __init__(self, rates: Mapping[str, float] | Iterable[Any] = ()) -> None:
        items = rates.items() if isinstance(rates, Mapping) else rates
        merged: dict[str, float] = {}
        for item in items:
            name, rate = parse_fault_spec(item) if isinstance(item, str) else item
            if name not in _ORDER:
                raise ValueError(f"unknown fault {name!r} (valid names: {_VALID})")
            rate = float(rate)
            _check_rate(f"{name}={rate}", rate)
            merged[name] = rate
        pairs = tuple(sorted(((n, r) for n, r in merged.items() if r > 0), key=_order_key))
        total = sum(r for _, r in pairs)
        # A little slack so that e.g. ten rates of 0.1 are not rejected for float rounding.
        if total > 1.0 + 1e-9:
            spec = ", ".join(f"{n}={r:g}" for n, r in pairs)
            raise ValueError(f"fault rates sum to {total:g}, more than 1 ({spec})")
        cumulative: list[tuple[float, str]] = []
        acc = 0.0
        for name, rate in pairs:
            acc += rate
            cumulative.append((acc, name))
        self._pairs = pairs
        self._cumulative = tuple(cumulative)

    def pick(self, seed: int, key: str, attempt: int) -> str | None:
        """The fault for the `attempt`-th request (1-based) for `key`, or None."""
        if not self._cumulative:
            return None
        u = draw(seed, key, attempt)
        for upper, name in self._cumulative:
            if u < upper:
                return name
        return None


def _order_key(pair: tuple[str, float]) -> int:
    return _ORDER[pair[0]]


def draw(seed: int, key: str, attempt: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, key, attempt)."""
    digest = hashlib.blake2b(f"{seed}\x1f{key}\x1f{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 18446744073709551616.0  # 2**64


def row_key(messages: Any) -> str:
    """The row key used when no X-Runner-Row-Key header is sent: the sha1 hex digest of
    ``json.dumps(messages, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``
    encoded as UTF-8."""
    canonical = json.dumps(messages, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha1(canonical.encode("utf-8", "surrogatepass")).hexdigest()
