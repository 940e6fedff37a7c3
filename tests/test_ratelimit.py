"""Rate limiting with an injected clock: bucket arithmetic, reservations, per-model limits, AIMD, the gate,
the retry budget, token estimates. No real time passes."""

from __future__ import annotations

import anyio
import pytest

from runner.ratelimit import (AdaptiveRate, CooldownGate, Limits, LocalRateLimiter, RetryBudget,
                              RetryBudgetExhausted, TokenBucket, limits_table)
from runner.tokens import estimate_prompt_tokens, estimate_text_tokens, output_reserve


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_bucket_paces_reservations_in_order():
    """An empty bucket at 10/s makes the n-th reservation wait n/10 s; refill is capped at capacity."""
    clock = FakeClock()
    bucket = TokenBucket(10, 2, clock)
    assert [round(bucket.reserve(1), 3) for _ in range(3)] == [0.1, 0.2, 0.3]
    clock.now += 10
    assert bucket.reserve(1) == 0 and bucket.reserve(1) == 0 and bucket.reserve(1) == pytest.approx(0.1)


def test_token_reservation_is_settled_with_real_usage():
    """Reserving more tokens than used and refunding the difference frees them for the next request."""
    clock = FakeClock()
    bucket = TokenBucket(100, 100, clock, tokens=100)
    assert bucket.reserve(100) == 0
    assert bucket.reserve(50) == pytest.approx(0.5)
    bucket.refund(100 - 30)  # the first request used 30, not 100
    assert bucket.tokens == pytest.approx(20)


def test_known_limits_are_paced_per_model_at_97_percent():
    """With rpm set, each model gets its own buckets: 6,000 RPM admits ~97 requests per second per model."""
    clock = FakeClock()
    limiter = LocalRateLimiter(limits_table(Limits(rpm=6000), {"qwen-max": Limits(rpm=600)}), clock=clock,
                               sleep=clock.sleep)

    async def send(model: str, count: int) -> float:
        start = clock.now
        for _ in range(count):
            await limiter.acquire(model, 10)
        return clock.now - start

    assert anyio.run(send, "qwen-plus", 970) == pytest.approx(10.0, rel=0.01)
    assert anyio.run(send, "qwen-max", 97) == pytest.approx(10.0, rel=0.02)
    assert limiter.current_rate("qwen-plus") == pytest.approx(97.0)


def test_tpm_binds_for_long_prompts_and_settles():
    """With tpm set, long requests are paced by tokens; a refund after real usage lets more through."""
    clock = FakeClock()
    limiter = LocalRateLimiter(limits_table(Limits(rpm=60_000, tpm=60_000), {}), clock=clock, sleep=clock.sleep)

    async def run() -> float:
        for _ in range(10):
            await limiter.acquire("m", 970)  # 970 tokens at 970 tokens/s: one per second, from an empty bucket
        return clock.now

    start = clock.now
    assert anyio.run(run) - start == pytest.approx(10.0, abs=0.1)
    limiter.settle("m", -900)  # the last request used only 70 of its 970
    before = clock.now
    anyio.run(limiter.acquire, "m", 900)
    assert clock.now - before < 0.1


def test_adaptive_rate_slow_start_then_aimd():
    """Slow start doubles per second while the rate binds; a throttle ends it and cuts 10%; echoes do not cut again."""
    clock = FakeClock()
    rate = AdaptiveRate(clock, start=10)
    for _ in range(3):
        clock.now += 1
        rate.grow(limited=True)
    assert rate.rate == pytest.approx(80)
    rate.grow(limited=False)  # from here on concurrency, not the rate, holds requests back: no growth
    clock.now += 1
    rate.grow(limited=False)
    assert rate.rate == pytest.approx(80)
    sent = clock.now - 0.5
    assert rate.throttled(sent, "Throttling.RateQuota") and rate.rate == pytest.approx(40)  # slow start overshot
    assert not rate.throttled(sent, "Throttling.RateQuota")          # sent before the cut
    assert not rate.throttled(clock.now + 0.1, "limit_requests")     # within a second of it
    clock.now += 1
    rate.grow(limited=True)
    assert rate.rate == pytest.approx(40.5)                         # additive increase now, not doubling
    clock.now += 1
    assert rate.throttled(clock.now, "limit_burst_rate") and rate.rate == pytest.approx(40.5 * 0.7)


def test_adaptive_cut_lands_on_what_the_server_admitted():
    """With answers flowing, a cut goes to the number admitted in the last second (not below half the rate)."""
    clock = FakeClock()
    rate = AdaptiveRate(clock, start=10)
    for _ in range(3):
        clock.now += 1
        rate.grow(limited=True)
    for i in range(50):  # the server admitted 50 in the last second while we sent 80
        clock.now += 0.02
        rate.succeeded()
    assert rate.throttled(clock.now, "limit_requests") and rate.rate == pytest.approx(50)
    clock.now += 2
    for i in range(20):
        clock.now += 0.01
        rate.succeeded()
    assert rate.throttled(clock.now, "limit_requests") and rate.rate == pytest.approx(25)  # half, not 20


def test_gate_pauses_everyone_once_per_event():
    """One 429 closes the gate for Retry-After (capped) or the default; 429s of requests sent while closed do not extend it."""
    clock = FakeClock()
    gate = CooldownGate(clock, default_seconds=0.5, max_seconds=5)
    gate.close(sent_at=clock.now, retry_after=None)
    assert gate.wait_seconds() == pytest.approx(0.5)
    gate.close(sent_at=clock.now - 0.1, retry_after=None)  # sent before: same event
    assert gate.wait_seconds() == pytest.approx(0.5)
    clock.now += 0.6
    gate.close(sent_at=clock.now, retry_after=None)  # within a second of the last closing: same overload
    assert gate.wait_seconds() == 0
    clock.now += 0.4
    gate.close(sent_at=clock.now, retry_after=60)
    assert gate.wait_seconds() == pytest.approx(5) and gate.paused_seconds == pytest.approx(5.5)


def test_limiter_waits_at_the_gate_and_counts_throttles():
    """After a 429, acquire waits for the gate; the limiter counts 429s by code."""
    clock = FakeClock()
    limiter = LocalRateLimiter(limits_table(Limits(), {}), adaptive=False, cooldown_seconds=2, clock=clock,
                               sleep=clock.sleep)
    sent = anyio.run(limiter.acquire, "m", 1)
    limiter.report_throttled("m", "limit_requests", None, sent)
    start = clock.now
    anyio.run(limiter.acquire, "m", 1)
    assert clock.now - start == pytest.approx(2) and limiter.throttled_by_code == {"limit_requests": 1}


def test_retry_budget_stops_a_failing_endpoint():
    """Retries beyond the budget's share of requests in the window raise, naming the last error."""
    clock = FakeClock()
    budget = RetryBudget(0.5, clock, window=60, min_requests=10)
    for _ in range(20):
        budget.first_attempt()
    for _ in range(10):
        budget.retry("TransientCallError 503")
    with pytest.raises(RetryBudgetExhausted, match="503"):
        budget.retry("TransientCallError 503")
    clock.now += 61  # the window moved on
    budget.first_attempt()
    budget.retry("x")


def test_retry_budget_forgets_first_attempts_outside_the_window():
    """A long run without retries holds only the window's first attempts (it used to hold every one)."""
    clock = FakeClock()
    budget = RetryBudget(0.5, clock, window=60, min_requests=10)
    for _ in range(10_000):
        clock.now += 0.1
        budget.first_attempt()
    assert len(budget) <= 601
    for _ in range(300):
        budget.retry("x")  # half of the 600 first attempts still in the window: allowed
    with pytest.raises(RetryBudgetExhausted):
        budget.retry("x")


def test_token_estimates():
    """About 4 characters per English token, one per CJK character, plus per-message overhead."""
    assert estimate_text_tokens("a" * 400) == 100
    assert estimate_text_tokens("你好世界") == 4
    assert estimate_prompt_tokens([{"role": "user", "content": "a" * 40}, {"role": "system", "content": "b"}]) == 19
    assert output_reserve({"max_tokens": 64}, None) == 64 and output_reserve({}, None) == 512
    assert output_reserve({"max_tokens": 64}, 20) == 20


def test_waiters_go_sooner_when_the_rate_grows_while_they_wait():
    """64 requests queued at 10/s: as slow start doubles the rate each second, the last one's wait
    shrinks faster than time passes (a fixed sleep computed at 10/s would take 6.4 s)."""
    clock = FakeClock()
    rate = AdaptiveRate(clock, start=10)
    tickets = [rate.take_ticket() for _ in range(64)]
    first_wait = rate.wait_for(tickets[-1])
    assert first_wait == pytest.approx(6.3, abs=0.05)
    elapsed = 0.0
    while rate.wait_for(tickets[-1]) > 0:
        clock.now += 0.1
        elapsed += 0.1
    assert elapsed < 3.5 and rate.rate > 40


def test_limiter_acquire_under_adaptive_rate_does_not_stall():
    """Through the limiter, 200 back-to-back requests at a starting rate of 10/s finish in a few
    (fake) seconds because the rate doubles while they wait."""
    clock = FakeClock()
    limiter = LocalRateLimiter(limits_table(Limits(), {}), clock=clock, sleep=clock.sleep)

    async def send() -> float:
        start = clock.now
        for _ in range(200):
            await limiter.acquire("m", 1)
        return clock.now - start

    assert anyio.run(send) < 6 and limiter.current_rate("m") > 40
