"""Rate limiting: use the account's RPM/TPM to the limit, never flood it.

DashScope limits each model per account by requests and tokens per minute, enforced per second
(RPS = RPM/60, TPS = TPM/60), and rejects sudden ramps (Throttling.BurstRate). So:
- known limits: per-model token buckets refilled per second with a small burst cap, paced a little
  under the limit; a request reserves its estimated tokens before it is sent, and the reservation
  is settled with the real usage afterwards;
- unknown limits: an adaptive rate per model, slow start (doubling per second) until the first
  throttle, then additive increase and multiplicative decrease (AIMD), one decrease per throttling
  event;
- one 429 closes a cool-down gate for every worker for Retry-After (or `cooldown_seconds`);
- retries may not exceed a fraction of requests over a sliding window (a broken endpoint is not
  hammered).
The engine talks to `RateLimiter` only (acquire, settle, report_throttled), so a cluster-wide
limiter can replace this one.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Awaitable, Callable, Mapping, Protocol

import anyio

from .errors import RunnerError

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

BURST_CODES = frozenset({"Throttling.BurstRate", "limit_burst_rate"})


class RetryBudgetExhausted(RunnerError):
    """Retries outgrew their share of requests: the endpoint is failing; stop instead of hammering it."""

    exit_code = 1


@dataclass(frozen=True)
class Limits:
    rpm: float | None = None
    tpm: float | None = None


class TokenBucket:
    """Refills continuously at `rate` per second up to `capacity`. A reservation is taken at once and
    may leave the bucket in debt; its caller waits until the debt would be repaid, so concurrent
    callers are paced in order without polling."""

    __slots__ = ("rate", "capacity", "tokens", "_clock", "_updated")

    def __init__(self, rate: float, capacity: float, clock: Clock, *, tokens: float = 0.0) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = tokens
        self._clock = clock
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.tokens = min(self.capacity, self.tokens + (now - self._updated) * self.rate)
        self._updated = now

    def reserve(self, amount: float) -> float:
        """Take `amount` now; the seconds to wait before using it (0 if the bucket covered it)."""
        self._refill()
        self.tokens -= amount
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def refund(self, amount: float) -> None:
        """Give back (or, negative, take more of) a reservation once the real amount is known."""
        self._refill()
        self.tokens = min(self.capacity, self.tokens + amount)

    def set_rate(self, rate: float, capacity: float) -> None:
        self._refill()
        self.rate, self.capacity = rate, capacity
        self.tokens = min(self.tokens, capacity)


class AdaptiveRate:
    """A request rate discovered from throttling: slow start, then AIMD (design: TCP congestion control,
    on a rate rather than a window, since the server limits per second).

    Requests are paced by tickets: ticket n may go once the allowance, which advances at the current
    rate (and after an idle spell holds at most a twentieth of a second's worth), passes n. Waiters
    re-check at least every `recheck` seconds, so a rate that grows while they wait lets them go sooner."""

    def __init__(self, clock: Clock, *, start: float = 10.0, ceiling: float = 10_000.0, increase: float = 0.01,
                 decrease: float = 0.9, burst_decrease: float = 0.7, floor: float = 0.2,
                 min_cut_interval: float = 1.0, recheck: float = 0.1) -> None:
        self._clock = clock
        self.rate = start
        self.ceiling = ceiling
        self.increase = increase
        self.decrease = decrease
        self.burst_decrease = burst_decrease
        self.floor = floor
        self.min_cut_interval = min_cut_interval
        self.recheck = recheck
        self.slow_start = True
        now = clock()
        self._grown_at = now
        self._limited = False
        self._decreased_at = float("-inf")
        self._answers: deque[float] = deque()
        self._next_ticket = 0
        self._allowance = 1.0
        self._advanced_at = now

    def _advance(self, now: float) -> None:
        horizon = self._next_ticket + _burst_capacity(self.rate)
        self._allowance = min(self._allowance + (now - self._advanced_at) * self.rate, max(horizon, self._allowance))
        self._advanced_at = now

    def take_ticket(self) -> int:
        ticket, self._next_ticket = self._next_ticket, self._next_ticket + 1
        return ticket

    def wait_for(self, ticket: int) -> float:
        """Seconds until `ticket` may go at the current rate (0: now). Grows the rate while requests wait."""
        now = self._clock()
        self._advance(now)
        wait = (ticket + 1 - self._allowance) / self.rate
        waiting = wait > 1e-6  # float residue must not keep a waiter spinning
        self.grow(limited=waiting)
        return wait if waiting else 0.0

    def _set_rate(self, rate: float) -> None:
        self._advance(self._clock())  # what was allowed so far accrued at the old rate
        self.rate = rate

    def grow(self, limited: bool) -> None:
        """Grow the rate for the time since the last call, but only while the rate is what holds requests
        back (otherwise concurrency is the limit, and growing would only store up a burst)."""
        now = self._clock()
        elapsed, self._grown_at = now - self._grown_at, now
        was_limited, self._limited = self._limited, limited
        if not (limited or was_limited) or elapsed <= 0:  # an interval that began waiting counts too
            return
        if self.slow_start:
            rate = self.rate * 2 ** min(elapsed, 1.0)
        else:
            rate = self.rate + max(0.5, self.rate * self.increase) * elapsed
        self._set_rate(min(rate, self.ceiling))

    def succeeded(self) -> None:
        """An answer came back: the server admitted it. Answers in the last second estimate the real limit."""
        now = self._clock()
        self._answers.append(now)
        while self._answers[0] < now - 1.0:
            self._answers.popleft()

    def throttled(self, sent_at: float, code: str | None) -> bool:
        """Slow down once per throttling event: answers to requests sent before the last cut, or within a
        second of it (the server counts per second), are echoes of the same event. The cut is x0.9
        (x0.7 for BurstRate; x0.5 when leaving slow start, whose last doubling overshot), but never
        above what the server admitted in the last second nor below half the current rate. Returns
        whether the rate was cut. (Slow start begins at 10 requests/s: 600 RPM, the lowest documented
        default.)"""
        now = self._clock()
        if sent_at < self._decreased_at or now - self._decreased_at < self.min_cut_interval:
            return False
        factor = self.burst_decrease if code in BURST_CODES else self.decrease
        target = self.rate * (0.5 if self.slow_start else factor)
        while self._answers and self._answers[0] < now - 1.0:
            self._answers.popleft()
        if len(self._answers) >= 5:
            target = max(min(self.rate * factor, float(len(self._answers))), self.rate * 0.5)
        self.slow_start = False
        self._set_rate(max(self.floor, target))
        self._decreased_at = now
        return True


def _burst_capacity(rate: float) -> float:
    # A twentieth of a second's worth (at least one request): a bucket refilled after an idle spell may
    # not release more than ~5% over the per-second limit at once.
    return max(1.0, rate * 0.05)


class CooldownGate:
    """Closed for everyone after a 429, for Retry-After or `default_seconds`. A 429 for a request sent
    while the gate was closed, or within `min_interval` of its last closing (the server counts per
    second: the same overload), does not close it again, unless its Retry-After reaches further."""

    def __init__(self, clock: Clock, *, default_seconds: float, max_seconds: float,
                 min_interval: float = 1.0) -> None:
        self._clock = clock
        self.default_seconds = default_seconds
        self.max_seconds = max_seconds
        self.min_interval = min_interval
        self.closed_until = float("-inf")
        self._closed_at = float("-inf")
        self.paused_seconds = 0.0

    def close(self, sent_at: float, retry_after: float | None) -> None:
        now = self._clock()
        if sent_at < self.closed_until or (now - self._closed_at < self.min_interval and retry_after is None):
            return
        seconds = min(retry_after if retry_after is not None else self.default_seconds, self.max_seconds)
        until = now + seconds
        if until > self.closed_until:
            self.paused_seconds += until - max(now, self.closed_until)
            self.closed_until = until
            self._closed_at = now

    def wait_seconds(self) -> float:
        return max(0.0, self.closed_until - self._clock())


class RetryBudget:
    """Retries may be at most `fraction` of first attempts over the last `window` seconds (counted once
    at least `min_requests` first attempts are in the window, so a run's first errors are not judged
    on a handful of requests)."""

    def __init__(self, fraction: float, clock: Clock, *, window: float = 60.0, min_requests: int = 50) -> None:
        self.fraction = fraction
        self.window = window
        self.min_requests = min_requests
        self._clock = clock
        self._firsts: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _trim(self, now: float) -> None:
        for times in (self._firsts, self._retries):
            while times and times[0] < now - self.window:
                times.popleft()

    def first_attempt(self) -> None:
        now = self._clock()
        self._firsts.append(now)
        if self._firsts[0] < now - self.window:  # else a run without retries keeps every first attempt forever
            self._trim(now)

    def __len__(self) -> int:
        """First attempts and retries held: those of the last `window` seconds, and a few older ones."""
        return len(self._firsts) + len(self._retries)

    def retry(self, last_error: str) -> None:
        """Count a retry about to be sent; RetryBudgetExhausted if it would overspend."""
        now = self._clock()
        self._trim(now)
        allowed = self.fraction * max(len(self._firsts), self.min_requests)
        if len(self._retries) + 1 > allowed:
            raise RetryBudgetExhausted(
                f"retries reached {len(self._retries):,} against {len(self._firsts):,} requests in the last "
                f"{self.window:g} s, over the retry budget of {self.fraction:.0%} (last error: {last_error})",
                hint="the endpoint is failing or throttling hard; check it, lower --concurrency or set [run] rpm, "
                     "then run the same command again to resume")
        self._retries.append(now)


class RateLimiter(Protocol):
    async def acquire(self, model: str, tokens: int) -> float: ...
    def settle(self, model: str, delta_tokens: int) -> None: ...
    def report_success(self, model: str) -> None: ...
    def report_throttled(self, model: str, code: str | None, retry_after: float | None, sent_at: float) -> None: ...


class LocalRateLimiter:
    """Per-model buckets (known limits) or adaptive rates (unknown), the shared gate, and counters."""

    def __init__(self, limits_for: Callable[[str], Limits], *, adaptive: bool = True, utilization: float = 0.97,
                 cooldown_seconds: float = 0.25, cooldown_max: float = 120.0, clock: Clock = time.monotonic,
                 sleep: Sleep = anyio.sleep) -> None:
        self._limits_for = limits_for
        self.adaptive = adaptive
        self.utilization = utilization
        self._clock = clock
        self._sleep = sleep
        self.gate = CooldownGate(clock, default_seconds=cooldown_seconds, max_seconds=cooldown_max)
        self._requests: dict[str, TokenBucket | None] = {}
        self._tokens: dict[str, TokenBucket | None] = {}
        self._adaptive: dict[str, AdaptiveRate | None] = {}
        self.throttled_by_code: Counter = Counter()
        self.rate_cuts = 0

    def _buckets(self, model: str) -> tuple[TokenBucket | None, TokenBucket | None, AdaptiveRate | None]:
        if model not in self._requests:
            limits = self._limits_for(model)
            clock = self._clock
            rps = limits.rpm / 60 * self.utilization if limits.rpm else None
            tps = limits.tpm / 60 * self.utilization if limits.tpm else None
            self._requests[model] = TokenBucket(rps, _burst_capacity(rps), clock, tokens=1.0) if rps else None
            # One second's worth (the server's window): a reservation settled after the fact (max_tokens
            # reserved, fewer used) must be able to give its unused tokens back.
            self._tokens[model] = TokenBucket(tps, tps, clock, tokens=0.0) if tps else None
            self._adaptive[model] = AdaptiveRate(clock) if self.adaptive and not rps else None
        return self._requests[model], self._tokens[model], self._adaptive[model]

    async def acquire(self, model: str, tokens: int) -> float:
        """Wait until a request of `tokens` estimated tokens may be sent; returns the send time for report_throttled."""
        while (closed := self.gate.wait_seconds()) > 0:
            await self._sleep(closed)
        requests, token_bucket, adaptive = self._buckets(model)
        wait = 0.0
        if requests is not None:
            wait = requests.reserve(1)
        if token_bucket is not None:
            wait = max(wait, token_bucket.reserve(tokens))
        if wait > 0:
            await self._sleep(wait)
        if adaptive is not None:
            ticket = adaptive.take_ticket()
            while (adaptive_wait := adaptive.wait_for(ticket)) > 0:
                await self._sleep(min(adaptive_wait, adaptive.recheck))
        return self._clock()

    def settle(self, model: str, delta_tokens: int) -> None:
        """The request used `delta_tokens` more (or, negative, fewer) than it reserved."""
        token_bucket = self._buckets(model)[1]
        if token_bucket is not None and delta_tokens:
            token_bucket.refund(-delta_tokens)

    def report_success(self, model: str) -> None:
        adaptive = self._buckets(model)[2]
        if adaptive is not None:
            adaptive.succeeded()

    def report_throttled(self, model: str, code: str | None, retry_after: float | None, sent_at: float) -> None:
        self.throttled_by_code[code or "429"] += 1
        adaptive = self._buckets(model)[2]
        if adaptive is not None and adaptive.throttled(sent_at, code):
            self.rate_cuts += 1
        self.gate.close(sent_at, retry_after)

    def current_rate(self, model: str) -> float | None:
        requests, _, adaptive = self._buckets(model)
        if adaptive is not None:
            return adaptive.rate
        return requests.rate if requests is not None else None


def limits_table(default: Limits, per_model: Mapping[str, Limits]) -> Callable[[str], Limits]:
    return lambda model: per_model.get(model, default)
