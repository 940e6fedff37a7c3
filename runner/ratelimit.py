"""Rate limiting: use the account's RPM/TPM to the limit, never flood it.

DashScope limits each model per account by requests and tokens per minute, enforced per second
(RPS = RPM/60, TPS = TPM/60), and rejects sudden ramps (Throttling.BurstRate). So:
- known limits: per-model token buckets refilled per second with a small burst cap, paced a little
  under the limit; a request reserves its estimated tokens before it is sent, and the reservation
  is settled with the real usage afterwards;
- unknown limits: an adaptive rate per model (runner/adaptive.py) that tells the throttling our
  rate causes from background throttling, and only slows down for the first;
- a cool-down gate holds every request, those already waiting in the pacer too, for the server's
  Retry-After (429 or 503) or for `cooldown_seconds` after a rate cut;
- retries may not outnumber the endpoint's answers over a sliding window (a broken endpoint is not
  hammered).
The online executor talks to `RateLimiter` only (acquire, settle, report_*), so a cluster-wide limiter can
replace this one.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Awaitable, Callable, Mapping, NamedTuple, Protocol

import anyio

from .adaptive import AdaptiveRate, burst_capacity, start_window_for
from .errors import RunnerError

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


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
        if now > self._updated:  # paused until a moment still ahead: nothing accrues yet
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

    def pause_until(self, until: float) -> None:
        """Nothing accrues before `until` (the cool-down gate is closed until then)."""
        self._refill()
        self._updated = max(self._updated, until)

    def set_rate(self, rate: float, capacity: float) -> None:
        self._refill()
        self.rate, self.capacity = rate, capacity
        self.tokens = min(self.tokens, capacity)


class CooldownGate:
    """Closed for everyone for Retry-After, or `default_seconds` after a rate cut. A Retry-After for a
    request sent while the gate was closed, or a close within `min_interval` of the last one without
    a Retry-After (the server counts per second: the same overload), does not close it again, unless
    its Retry-After reaches further."""

    def __init__(self, clock: Clock, *, default_seconds: float, max_seconds: float,
                 min_interval: float = 1.0) -> None:
        self._clock = clock
        self.default_seconds = default_seconds
        self.max_seconds = max_seconds
        self.min_interval = min_interval
        self.closed_until = float("-inf")
        self._closed_at = float("-inf")
        self.paused_seconds = 0.0

    def close(self, sent_at: float, retry_after: float | None) -> float:
        """Close the gate; returns the seconds of pause this close added (0: it changed nothing)."""
        now = self._clock()
        if sent_at < self.closed_until or (now - self._closed_at < self.min_interval and retry_after is None):
            return 0.0
        seconds = min(retry_after if retry_after is not None else self.default_seconds, self.max_seconds)
        until = now + seconds
        if until <= self.closed_until:
            return 0.0
        added = until - max(now, self.closed_until)
        self.paused_seconds += added
        self.closed_until = until
        self._closed_at = now
        return added

    def wait_seconds(self) -> float:
        return max(0.0, self.closed_until - self._clock())


class RetryBudget:
    """Retries may be at most `ratio` times the answers the endpoint gave over the last `window` seconds,
    judged once `min_retries` retries are in the window. A failing endpoint (almost no answers) stops
    the run after a few dozen retries; a healthy one with a share of faults never does, not even at
    the end of a job when every row still open is a retry."""

    def __init__(self, ratio: float, clock: Clock, *, window: float = 60.0, min_retries: int = 50) -> None:
        self.ratio = ratio
        self.window = window
        self.min_retries = min_retries
        self._clock = clock
        self._answers: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _trim(self, now: float) -> None:
        for times in (self._answers, self._retries):
            while times and times[0] < now - self.window:
                times.popleft()

    def answered(self) -> None:
        """The endpoint answered a request (a success, or an error that is not retried)."""
        now = self._clock()
        self._answers.append(now)
        if self._answers[0] < now - self.window:  # else a run without retries keeps every answer forever
            self._trim(now)

    def __len__(self) -> int:
        """Answers and retries held: those of the last `window` seconds, and a few older ones."""
        return len(self._answers) + len(self._retries)

    def retry(self, last_error: str) -> None:
        """Count a retry about to be sent; RetryBudgetExhausted if it would overspend."""
        now = self._clock()
        self._trim(now)
        retries = len(self._retries) + 1
        if retries > self.min_retries and retries > self.ratio * len(self._answers):
            raise RetryBudgetExhausted(
                f"{retries - 1:,} retries against {len(self._answers):,} answers in the last {self.window:g} s, "
                f"over the retry budget of {self.ratio:g} retries per answer (last error: {last_error})",
                hint="the endpoint is failing or throttling hard; check it, lower --concurrency or set [run] rpm, "
                     "then run the same command again to resume")
        self._retries.append(now)


class Sent(NamedTuple):
    """What `acquire` hands back and every report takes: when the request went, and its place in line."""

    at: float
    seq: int


class RateLimiter(Protocol):
    async def acquire(self, model: str, tokens: int) -> Sent: ...
    def settle(self, model: str, delta_tokens: int) -> None: ...
    def report_success(self, model: str, sent: Sent) -> None: ...
    def report_throttled(self, model: str, code: str | None, retry_after: float | None, sent: Sent) -> None: ...
    def report_failure(self, model: str, sent: Sent, retry_after: float | None = None) -> None: ...


class LocalRateLimiter:
    """Per-model buckets (known limits) or adaptive rates (unknown), the shared gate, and counters.

    Every `acquire` is answered by exactly one report_* (success, throttled, or failure for anything
    else, a timeout or a cancelled attempt included), which keeps the count of requests in flight."""

    def __init__(self, limits_for: Callable[[str], Limits], *, adaptive: bool = True, utilization: float = 0.97,
                 cooldown_seconds: float = 0.25, cooldown_max: float = 120.0, clock: Clock = time.monotonic,
                 sleep: Sleep = anyio.sleep, concurrency: int | None = None) -> None:
        self._limits_for = limits_for
        self.adaptive = adaptive
        self.utilization = utilization
        self._clock = clock
        self._sleep = sleep
        self._start_window = start_window_for(concurrency)
        self.gate = CooldownGate(clock, default_seconds=cooldown_seconds, max_seconds=cooldown_max)
        self._shift = 0.0  # seconds the gate has been closed in all: pacing deadlines move by as much
        self._requests: dict[str, TokenBucket | None] = {}
        self._tokens: dict[str, TokenBucket | None] = {}
        self._adaptive: dict[str, AdaptiveRate] = {}
        self.throttled_by_code: Counter = Counter()
        # Requests sent and not answered yet -> when they were sent; insertion order is send order, so the
        # first entry is the oldest (what a progress display shows during a tail of hung requests).
        self._unanswered: dict[tuple[str, int], float] = {}

    def _buckets(self, model: str) -> tuple[TokenBucket | None, TokenBucket | None, AdaptiveRate]:
        if model not in self._requests:
            limits = self._limits_for(model)
            clock = self._clock
            rps = limits.rpm / 60 * self.utilization if limits.rpm else None
            tps = limits.tpm / 60 * self.utilization if limits.tpm else None
            self._requests[model] = TokenBucket(rps, burst_capacity(rps), clock, tokens=1.0) if rps else None
            # One second's worth (the server's window): a reservation settled after the fact (max_tokens
            # reserved, fewer used) must be able to give its unused tokens back.
            self._tokens[model] = TokenBucket(tps, tps, clock, tokens=0.0) if tps else None
            # Every model gets the throttling test (it decides when the gate closes); only a model without
            # known limits, with adaptive_rate on, is paced by it.
            self._adaptive[model] = AdaptiveRate(clock, adjust=self.adaptive and not rps,
                                                 start_window=self._start_window)
        return self._requests[model], self._tokens[model], self._adaptive[model]

    async def acquire(self, model: str, tokens: int, *, lookahead: float = 0.0) -> Sent:
        """Wait until a request of `tokens` estimated tokens may be sent; returns what its report takes.

        The gate is checked on every wake-up, so a request that was waiting in the pacer when the gate
        closed waits for it too; a caller may cancel the wait (a run that is stopping), which gives its
        reservation back. With `lookahead`, it returns up to that many seconds before the request's turn,
        and `Sent.at` is the turn (the Ray executor's limiter actor hands slots out ahead of their time)."""
        requests, token_bucket, adaptive = self._buckets(model)
        while (closed := self.gate.wait_seconds()) > lookahead:
            await self._sleep(closed - lookahead)
        await adaptive.wait_for_room()
        now = self._clock()
        deadline, shift = now, self._shift
        try:
            if requests is not None:
                deadline = max(deadline, now + requests.reserve(1))
            if token_bucket is not None:
                deadline = max(deadline, now + token_bucket.reserve(tokens))
            ticket = None
            while True:
                if ticket is None and adaptive.rate is not None:
                    ticket = adaptive.take_ticket()
                wait = max(deadline + (self._shift - shift) - self._clock(), self.gate.wait_seconds())
                paced = adaptive.wait_for(ticket) if ticket is not None else 0.0
                if wait <= lookahead + 1e-9 and paced <= lookahead:
                    break
                await self._sleep(max(wait - lookahead, min(paced - lookahead, adaptive.recheck)))
        except BaseException:  # cancelled before its turn: the slot goes to the next request
            if requests is not None:
                requests.refund(1)
            if token_bucket is not None:
                token_bucket.refund(tokens)
            raise
        sent = Sent(self._clock() + max(wait, paced, 0.0), adaptive.sent())
        self._unanswered[(model, sent.seq)] = sent.at
        return sent

    def settle(self, model: str, delta_tokens: int) -> None:
        """The request used `delta_tokens` more (or, negative, fewer) than it reserved."""
        token_bucket = self._buckets(model)[1]
        if token_bucket is not None and delta_tokens:
            token_bucket.refund(-delta_tokens)

    def report_success(self, model: str, sent: Sent) -> None:
        self._answered(model, sent, None, accepted=True)

    def report_throttled(self, model: str, code: str | None, retry_after: float | None, sent: Sent) -> None:
        self.throttled_by_code[code or "429"] += 1
        self._answered(model, sent, retry_after, throttled=True, code=code)

    def report_failure(self, model: str, sent: Sent, retry_after: float | None = None) -> None:
        """Any other end of an attempt: an error answer (a 503 may carry Retry-After), a timeout, a cancel."""
        self._answered(model, sent, retry_after)

    def _answered(self, model: str, sent: Sent, retry_after: float | None, **how) -> None:
        """The one path every report takes: no longer in flight, judged, and the gate closed on a cut or a
        Retry-After."""
        self._unanswered.pop((model, sent.seq), None)
        cut = self._buckets(model)[2].answered(sent.seq, **how)
        if cut or retry_after is not None:
            added = self.gate.close(sent.at, retry_after)
            if added > 0:
                self._shift += added
                until = self.gate.closed_until
                for bucket in (*self._requests.values(), *self._tokens.values()):
                    if bucket is not None:
                        bucket.pause_until(until)
                for adaptive in self._adaptive.values():
                    adaptive.pause_until(until)

    def current_rate(self, model: str) -> float | None:
        """Requests per second the model is paced at (None: not paced by rate: startup, or no limits)."""
        requests, _, adaptive = self._buckets(model)
        if requests is not None:
            return requests.rate
        return adaptive.rate if adaptive.adjust else None

    def in_flight(self) -> tuple[int, float | None]:
        """Requests sent and not answered yet, and the oldest one's age in seconds (None when there is none)."""
        oldest = next(iter(self._unanswered.values()), None)
        return len(self._unanswered), (self._clock() - oldest if oldest is not None else None)

    def rate_label(self) -> str:
        """The current rate limit for a progress bar: requests/s summed over paced models, or "none"."""
        rates = [r for r in (self.current_rate(m) for m in list(self._adaptive)) if r is not None]
        return f"{sum(rates):,.0f}/s" if rates else "none"

    def describe(self) -> dict[str, dict]:
        """Per model: how it was paced, the rate it converged on, cuts, and 429s split by cause."""
        described = {}
        for model, adaptive in self._adaptive.items():
            requests, tokens = self._requests[model], self._tokens[model]
            info = adaptive.describe()
            info["pacing"] = ("configured" if requests is not None or tokens is not None
                              else "adaptive" if adaptive.adjust else "off")
            if requests is not None:
                info["rate_per_second"] = round(requests.rate, 2)
            if not adaptive.adjust:
                info.pop("startup")
            described[model] = info
        return described


def limits_table(default: Limits, per_model: Mapping[str, Limits]) -> Callable[[str], Limits]:
    return lambda model: per_model.get(model, default)
