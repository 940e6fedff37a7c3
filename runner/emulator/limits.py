"""Per-model rate limits with DashScope's semantics (dashscope-api.md section 6).

RPM and TPM are enforced per second, as the real service does: RPS = RPM/60 and TPS = TPM/60.
Each model has its own gate (the request's ``model`` string, so ``qwen-plus`` and
``qwen-plus-latest`` are independent), made of:

- a requests bucket holding at most one second's worth (RPS) and refilled continuously at RPS
  per second, starting full;
- a tokens bucket likewise holding TPS tokens, refilled at TPS per second, starting full;
- optionally a burst guard (see BurstGuard).

A request of cost ``n`` (1 for the requests bucket; for the tokens bucket its prompt tokens
plus the tokens of the deterministic completion, i.e. the ``total_tokens`` its answer reports)
needs ``min(n, capacity)`` in the bucket and then takes ``n``. So a request larger than one
second's worth (a limit below 60 RPM, or one prompt above TPS tokens) is admitted only when the
bucket is full and leaves it in debt, instead of never being admitted. The checks run in the
order burst, requests, tokens; nothing is taken unless all pass, and a rejected request takes
nothing. The first failing check names the rejection: "burst" (Throttling.BurstRate), "rpm"
(Throttling.RateQuota) or "tpm" (Throttling.AllocationQuota).

Limits can move at run time (a real account shares its quota with every other job on it): a
schedule scales every limit at set times after the first request (see schedule.py), and
``set_limits`` replaces the global rpm/tpm or scales them (``POST /_emulator/limits``). Every
model's buckets follow at once: each is refilled at the old rate up to the change, then keeps its
level (capped at the new capacity) and refills at the new rate.

Time comes from an injected ``clock`` (seconds, monotonic), so tests can drive it.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .frozen import FrozenPairs
from .schedule import Schedule, check_schedule, factor_at

Limit = tuple[float | None, float | None]  # (rpm, tpm); None: no limit (or inherit, in overrides)

# Float refills (e.g. 1/300 s steps) land a hair below whole numbers; do not reject for that.
_EPSILON = 1e-9


def parse_limit_spec(text: str) -> tuple[str, Limit]:
    """Parse ``"qwen-plus=600:1000000"`` into ``("qwen-plus", (600.0, 1000000.0))``.

    Either side may be empty (``"qwen-max=120:"``, ``"qwen-max=:100000"``): None, which
    inherits the global rpm/tpm. ``inf`` means no limit for that model."""
    model, sep, rest = text.partition("=")
    model = model.strip()
    rpm_text, colon, tpm_text = rest.partition(":")
    if not sep or not model or not colon:
        raise ValueError(
            f"bad limit spec {text!r}: expected MODEL=RPM:TPM (either side may be empty)"
        )
    return model, (_parse_rate(text, rpm_text), _parse_rate(text, tpm_text))


def _parse_rate(label: str, text: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"bad limit spec {label!r}: {text!r} is not a number") from None
    check_rate(f"limit {label!r}", value)
    return value


def check_rate(name: str, value: Any) -> None:
    """A per-minute limit must be a number > 0 (``inf`` allowed: no limit)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


class LimitTable(FrozenPairs):
    """A read-only, hashable mapping model -> (rpm, tpm) of per-model overrides.

    Accepts a mapping, an iterable of (model, (rpm, tpm)) pairs, or of "MODEL=RPM:TPM" strings.
    """

    __slots__ = ()

    def __init__(self, limits: Mapping[str, Limit] | Iterable[Any] = ()) -> None:
        items = limits.items() if isinstance(limits, Mapping) else limits
        merged: dict[str, Limit] = {}
        for item in items:
            model, pair = parse_limit_spec(item) if isinstance(item, str) else item
            rpm, tpm = pair
            for name, value in (("rpm", rpm), ("tpm", tpm)):
                if value is not None:
                    check_rate(f"limits[{model!r}] {name}", value)
            merged[str(model)] = (
                None if rpm is None else float(rpm),
                None if tpm is None else float(tpm),
            )
        self._pairs = tuple(sorted(merged.items()))



class Bucket:
    """A token bucket of capacity `per_second` (one second's worth), refilled continuously."""

    __slots__ = ("per_second", "level", "stamp")

    def __init__(self, per_second: float, now: float) -> None:
        self.per_second = per_second
        self.level = per_second  # starts full: an idle client has a second's worth
        self.stamp = now

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.per_second, self.level + (now - self.stamp) * self.per_second)
            self.stamp = now

    def has(self, cost: float) -> bool:
        return self.level + _EPSILON >= min(cost, self.per_second)

    def take(self, cost: float) -> None:
        self.level -= cost

    def retarget(self, per_second: float, now: float) -> None:
        """A new rate: what accrued at the old rate is kept, capped at the new capacity."""
        self.refill(now)
        self.per_second = per_second
        if self.level > per_second:
            self.level = per_second


class BurstGuard:
    """Throttling.BurstRate: reject a request when admitted traffic jumps too fast.

    Rule: with window ``w`` (burst_window_s) and factor ``f`` (burst_factor), let ``cur`` be the
    number of requests admitted in the sliding window ``(now - w, now]`` and ``prev`` the number
    admitted in ``(now - 2w, now - w]``. A new request is rejected when
    ``cur + 1 > f * max(prev, floor)``, with ``floor = max(1, RPS * w / 10)`` (RPS = RPM/60, 0
    without an RPM limit). Only admitted requests are counted, so a rejected client still ramps:
    each window may carry up to ``f`` times the previous one.

    Consequences: a client that starts at no more than ``f * floor`` requests per window and
    whose rate then grows by a factor ``g < f`` per window always passes (``g == f`` is
    borderline: sliding windows count +-1 request, so doubling per second wants ``f >= 2.5``);
    one that jumps from idle to full concurrency at once gets only ``f * floor`` requests
    through in its first window and BurstRate for the rest.
    """

    __slots__ = ("factor", "window", "floor", "_recent", "_older")

    def __init__(self, factor: float, window: float, floor: float) -> None:
        self.factor = factor
        self.window = window
        self.floor = max(1.0, floor)
        self._recent: deque[float] = deque()  # admitted in (now - w, now]
        self._older: deque[float] = deque()  # admitted in (now - 2w, now - w]

    def _advance(self, now: float) -> None:
        edge = now - self.window
        recent, older = self._recent, self._older
        while recent and recent[0] <= edge:
            older.append(recent.popleft())
        edge -= self.window
        while older and older[0] <= edge:
            older.popleft()

    def allows(self, now: float) -> bool:
        self._advance(now)
        return len(self._recent) + 1 <= self.factor * max(len(self._older), self.floor)

    def admitted(self, now: float) -> None:
        self._recent.append(now)


class ModelGate:
    """The limits of one model: requests bucket, tokens bucket, burst guard (each optional)."""

    __slots__ = ("requests", "tokens", "burst")

    def __init__(
        self,
        rpm: float | None,
        tpm: float | None,
        burst_factor: float | None,
        burst_window: float,
        now: float,
    ) -> None:
        rps = rpm / 60.0 if rpm is not None and math.isfinite(rpm) else None
        tps = tpm / 60.0 if tpm is not None and math.isfinite(tpm) else None
        self.requests = Bucket(rps, now) if rps is not None else None
        self.tokens = Bucket(tps, now) if tps is not None else None
        self.burst = (
            BurstGuard(burst_factor, burst_window, (rps or 0.0) * burst_window / 10.0)
            if burst_factor is not None
            else None
        )

    def retarget(self, rpm: float | None, tpm: float | None, now: float) -> None:
        """Follow a changed limit (None: no limit on that side)."""
        rps = rpm / 60.0 if rpm is not None and math.isfinite(rpm) else None
        tps = tpm / 60.0 if tpm is not None and math.isfinite(tpm) else None
        self.requests = _retargeted(self.requests, rps, now)
        self.tokens = _retargeted(self.tokens, tps, now)
        if self.burst is not None:
            self.burst.floor = max(1.0, (rps or 0.0) * self.burst.window / 10.0)

    def check(self, now: float, tokens: int) -> str | None:
        """Admit (None, and take from the buckets) or name the rejection."""
        burst, requests, bucket = self.burst, self.requests, self.tokens
        if burst is not None and not burst.allows(now):
            return "burst"
        if requests is not None:
            requests.refill(now)
            if not requests.has(1):
                return "rpm"
        if bucket is not None:
            bucket.refill(now)
            if not bucket.has(tokens):
                return "tpm"
        if requests is not None:
            requests.take(1)
        if bucket is not None:
            bucket.take(tokens)
        if burst is not None:
            burst.admitted(now)
        return None


def _retargeted(bucket: Bucket | None, per_second: float | None, now: float) -> Bucket | None:
    if per_second is None:
        return None
    if bucket is None:
        return Bucket(per_second, now)  # a limit where there was none starts full
    bucket.retarget(per_second, now)
    return bucket


class _Unchanged:
    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Any = _Unchanged()  # set_limits: leave this one as it is ("not given" is not None)


class RateLimits:
    """Every model's gate, made on first use from the config (global rpm/tpm, overrides), scaled
    by the schedule's factor and by the factor set at run time."""

    def __init__(
        self,
        rpm: float | None = None,
        tpm: float | None = None,
        limits: Mapping[str, Limit] | None = None,
        burst_factor: float | None = None,
        burst_window_s: float = 1.0,
        clock: Callable[[], float] | None = None,
        schedule: Schedule | Iterable[Any] = (),
    ) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self.limits = dict(limits or {})
        self.burst_factor = burst_factor
        self.burst_window_s = burst_window_s
        self.clock = clock or time.monotonic
        self.schedule = check_schedule(schedule)
        self.scale = 1.0  # set at run time (set_limits)
        self.schedule_factor = 1.0
        # Every change applied, oldest first: {"at", "t", "source", "scale", "rpm", "tpm"}.
        self.changes: list[dict[str, Any]] = []
        self._origin: float | None = None
        self._next_change = math.inf
        self._gates: dict[str, ModelGate | None] = {}
        self._update_active()

    def _update_active(self) -> None:
        # No limit anywhere: skip the clock and the dict on the hot path.
        self.active = bool(
            self.rpm is not None or self.tpm is not None or self.burst_factor is not None
            or any(r is not None or t is not None for r, t in self.limits.values())
        )

    @property
    def factor(self) -> float:
        """What every configured limit is multiplied by now."""
        return self.scale * self.schedule_factor

    def limit_for(self, model: str) -> Limit:
        """(rpm, tpm) in force for `model`: its override where given, else the global value, times
        the current factor."""
        rpm, tpm = self.limits.get(model, (None, None))
        rpm = self.rpm if rpm is None else rpm
        tpm = self.tpm if tpm is None else tpm
        factor = self.factor
        if factor != 1.0:
            rpm = None if rpm is None else rpm * factor
            tpm = None if tpm is None else tpm * factor
        return rpm, tpm

    def check(self, model: str, tokens: int, now: float | None = None) -> str | None:
        """Admit one request of `tokens` tokens for `model` (None) or return "burst"/"rpm"/"tpm"."""
        if not self.active:
            return None
        if now is None:
            now = self.clock()
        if now >= self._next_change or self._origin is None:
            self.start_schedule(now)
            self._follow_schedule(now)
        gates = self._gates
        try:
            gate = gates[model]
        except KeyError:
            rpm, tpm = self.limit_for(model)
            gate = None
            if rpm is not None or tpm is not None or self.burst_factor is not None:
                gate = ModelGate(rpm, tpm, self.burst_factor, self.burst_window_s, now)
            gates[model] = gate
        if gate is None:
            return None
        return gate.check(now, tokens)

    # -- limits that move ------------------------------------------------------------------

    def start_schedule(self, now: float) -> None:
        """Start the schedule's clock at `now` unless it runs already (the first request after
        start or reset_schedule starts it; check() does too)."""
        if self._origin is None:
            self._origin = now
            self._next_change = now if self.schedule else math.inf

    def reset_schedule(self) -> None:
        """Back to the schedule's start: factor 1 until the next first request, no changes listed."""
        self._origin = None
        self._next_change = math.inf
        if self.schedule_factor != 1.0:
            self.schedule_factor = 1.0
            self._retarget(self.clock())
        self.changes.clear()

    def _follow_schedule(self, now: float) -> None:
        if self._origin is None:
            return
        factor, next_at = factor_at(self.schedule, now - self._origin)
        self._next_change = self._origin + next_at
        if factor != self.schedule_factor:
            self.schedule_factor = factor
            self._retarget(now)
            self._record(now, "schedule")

    def set_limits(
        self,
        *,
        rpm: float | None = UNCHANGED,
        tpm: float | None = UNCHANGED,
        scale: float = UNCHANGED,
        now: float | None = None,
    ) -> None:
        """Change the global rpm/tpm (None: no limit) or the run-time scale at once; what is not
        given stays. Per-model overrides stay, scaled like everything else."""
        for name, value in (("rpm", rpm), ("tpm", tpm)):
            if value is not UNCHANGED and value is not None:
                check_rate(name, value)
        if scale is not UNCHANGED and (
            isinstance(scale, bool) or not isinstance(scale, (int, float))
            or not (math.isfinite(scale) and scale > 0)
        ):
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        if now is None:
            now = self.clock()
        if rpm is not UNCHANGED:
            self.rpm = None if rpm is None else float(rpm)
        if tpm is not UNCHANGED:
            self.tpm = None if tpm is None else float(tpm)
        if scale is not UNCHANGED:
            self.scale = float(scale)
        self._update_active()
        if self._origin is not None and self.schedule:
            self.schedule_factor, next_at = factor_at(self.schedule, now - self._origin)
            self._next_change = self._origin + next_at
        self._retarget(now)
        self._record(now, "set")

    def _retarget(self, now: float) -> None:
        gates = self._gates
        for model in list(gates):
            gate = gates[model]
            if gate is None:
                del gates[model]  # had no limit: made afresh on its next request
            else:
                gate.retarget(*self.limit_for(model), now)

    def _record(self, now: float, source: str) -> None:
        rpm, tpm = self.rpm, self.tpm
        factor = self.factor
        self.changes.append({
            "at": now,
            "t": None if self._origin is None else now - self._origin,
            "source": source,
            "scale": factor,
            "rpm": None if rpm is None else rpm * factor,
            "tpm": None if tpm is None else tpm * factor,
        })

    def view(self) -> dict[str, Any]:
        """The limits now, JSON-ready (stats and GET /_emulator/limits)."""
        factor = self.factor
        return {
            "rpm": self.rpm,
            "tpm": self.tpm,
            "scale": self.scale,
            "schedule_factor": self.schedule_factor,
            "effective": {
                "rpm": None if self.rpm is None else self.rpm * factor,
                "tpm": None if self.tpm is None else self.tpm * factor,
            },
            "overrides": {m: list(v) for m, v in sorted(self.limits.items())},
            "schedule": [list(p) for p in self.schedule],
            "origin": self._origin,
            "changes": [dict(c) for c in self.changes],
        }


__all__ = [
    "BurstGuard",
    "Bucket",
    "LimitTable",
    "ModelGate",
    "RateLimits",
    "UNCHANGED",
    "check_rate",
    "parse_limit_spec",
]
