"""Rate limiting with an injected clock: bucket arithmetic, reservations, per-model limits, AIMD, the gate,
the retry budget, token estimates. No real time passes."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from runner.ratelimit import (CooldownGate, Limits, LocalRateLimiter, RetryBudget,
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
    """After a 429 with Retry-After, acquire waits for the gate; the limiter counts 429s by code."""
    clock = FakeClock()
    limiter = LocalRateLimiter(limits_table(Limits(), {}), adaptive=False, cooldown_seconds=2, clock=clock,
                               sleep=clock.sleep)
    sent = anyio.run(limiter.acquire, "m", 1)
    limiter.report_throttled("m", "limit_requests", 2.0, sent)
    start = clock.now
    anyio.run(limiter.acquire, "m", 1)
    assert clock.now - start == pytest.approx(2) and limiter.throttled_by_code == {"limit_requests": 1}


def test_token_estimates():
    """About 4 characters per English token, one per CJK character, plus per-message overhead."""
    assert estimate_text_tokens("a" * 400) == 100
    assert estimate_text_tokens("你好世界") == 4
    assert estimate_prompt_tokens([{"role": "user", "content": "a" * 40}, {"role": "system", "content": "b"}]) == 19
    assert output_reserve({"max_tokens": 64}, None) == 64 and output_reserve({}, None) == 512
    assert output_reserve({"max_tokens": 64}, 20) == 20


def test_retry_budget_stops_a_failing_endpoint():
    """Retries past the budget's ratio to the endpoint's answers in the window raise, naming the last error."""
    clock = FakeClock()
    budget = RetryBudget(0.5, clock, window=60, min_retries=10)
    for _ in range(20):
        budget.answered()
    for _ in range(10):
        budget.retry("TransientCallError 503")
    with pytest.raises(RetryBudgetExhausted, match="503"):
        budget.retry("TransientCallError 503")
    clock.now += 61  # the window moved on: answers and retries alike
    budget.answered()
    budget.retry("x")


def test_retry_budget_spares_the_tail_of_a_healthy_job():
    """The last rows of a faulty but healthy job are all retries: judged against the answers of the window,
    not against first attempts (of which there are none left), they never stop the run."""
    clock = FakeClock()
    budget = RetryBudget(1.0, clock, window=60, min_retries=50)
    for _ in range(1000):  # the body of the job: 30% of attempts fail and are retried
        clock.now += 0.01
        budget.answered()
    for _ in range(300):
        budget.retry("x")
    for _ in range(200):  # the tail: nothing but retries
        clock.now += 0.01
        budget.retry("x")


def test_retry_budget_forgets_answers_outside_the_window():
    """A long run without retries holds only the window's answers, not every answer since the start."""
    clock = FakeClock()
    budget = RetryBudget(0.5, clock, window=60, min_retries=10)
    for _ in range(10_000):
        clock.now += 0.1
        budget.answered()
    assert len(budget) <= 601
    for _ in range(300):
        budget.retry("x")  # half of the 600 answers still in the window: allowed
    with pytest.raises(RetryBudgetExhausted):
        budget.retry("x")


def test_gate_holds_requests_already_waiting_in_the_pacer():
    """Requests paced at 2/s when a Retry-After of 5 s arrives wait for the gate, not for their old slots,
    and keep their spacing after it opens (no burst)."""
    clock = FakeClock()
    limiter = LocalRateLimiter(limits_table(Limits(rpm=60 * 2), {}), utilization=1.0, clock=clock, sleep=clock.sleep)
    closed_at = clock.now
    sent_times: list[float] = []

    async def main() -> None:
        async def one() -> None:
            sent = await limiter.acquire("m", 1)
            sent_times.append(sent.at)

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(one)

    limiter_sent = anyio.run(limiter.acquire, "m", 1)  # the first request, sent at once
    limiter.report_throttled("m", "limit_requests", 5.0, limiter_sent)
    anyio.run(main)
    assert all(t >= closed_at + 5.0 for t in sent_times)
    gaps = [b - a for a, b in zip(sorted(sent_times), sorted(sent_times)[1:])]
    assert all(g >= 0.49 for g in gaps)


def test_retry_after_on_a_503_closes_the_gate():
    """A failure that carries Retry-After (a 503) closes the gate like a 429 does."""
    clock = FakeClock()
    limiter = LocalRateLimiter(limits_table(Limits(), {}), clock=clock, sleep=clock.sleep)
    sent = anyio.run(limiter.acquire, "m", 1)
    limiter.report_failure("m", sent, 3.0)
    start = clock.now
    anyio.run(limiter.acquire, "m", 1)
    assert clock.now - start == pytest.approx(3.0) and limiter.gate.paused_seconds == pytest.approx(3.0)


def test_acquire_with_lookahead_returns_early_with_the_turn_it_paced():
    """acquire(lookahead=L) returns up to L s before a request's turn, and Sent.at is that turn: the slots are
    paced exactly as without lookahead (how the Ray executor's limiter hands slots out ahead)."""
    clock = FakeClock()
    limiter = LocalRateLimiter(limits_table(Limits(rpm=600), {}), adaptive=False, clock=clock, sleep=clock.sleep)
    start = clock.now

    async def lease(count: int) -> list[tuple[float, float]]:
        slots = []
        for _ in range(count):
            sent = await limiter.acquire("qwen-plus", 10, lookahead=0.4)
            slots.append((round(sent.at - start, 4), round(clock.now - start, 4)))
        return slots

    slots = anyio.run(lease, 8)
    turns = [at for at, _ in slots]
    step = 1 / (10 * 0.97)  # 600 RPM at 97%
    assert turns == pytest.approx([0.0] + [i * step for i in range(1, 8)], abs=1e-3)
    assert all(turn - 0.4 - 1e-6 <= returned <= turn for turn, returned in slots)
    assert slots[4][1] < slots[4][0]  # handed out before its turn


def test_a_cancelled_acquire_gives_its_slot_to_the_next_request():
    """An acquire cancelled while it waits for its turn gives the reservation back: the next request gets that
    turn instead of the one after it."""
    clock = FakeClock()

    async def sleep(seconds: float) -> None:
        await anyio.lowlevel.checkpoint()  # where a cancellation is delivered, as in a real sleep
        await clock.sleep(seconds)

    limiter = LocalRateLimiter(limits_table(Limits(rpm=600), {}), adaptive=False, clock=clock, sleep=sleep)

    async def run() -> float:
        await limiter.acquire("qwen-plus", 10)  # the bucket's one request of burst
        with anyio.CancelScope() as scope:
            scope.cancel()
            await limiter.acquire("qwen-plus", 10)  # would wait ~0.1 s: cancelled at its first sleep
        start = clock.now
        await limiter.acquire("qwen-plus", 10)
        return clock.now - start

    assert anyio.run(run) == pytest.approx(1 / (10 * 0.97), rel=0.01)
