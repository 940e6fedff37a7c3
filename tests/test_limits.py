"""The retry loop: what is retried, how long it waits, when it stops. A fake sleep records the waits."""

from __future__ import annotations

import anyio
import pytest

from runner.errors import AuthError, PermanentCallError, Throttled, TransientCallError
from runner.limits import RetryPolicy, call_with_retries
from runner.records import Completion, Request, Usage

REQUEST = Request(row_id=0, key="k", model="qwen-plus", messages=({"role": "user", "content": "hi"},))
DONE = Completion(content="ok", reasoning=None, finish_reason="stop", usage=Usage(1, 1, 2), request_id="r")


def _run(failures: list[BaseException], policy: RetryPolicy):
    calls, waits = [], []

    async def call(request):
        calls.append(request)
        if failures:
            raise failures.pop(0)
        return DONE

    async def sleep(seconds):
        waits.append(seconds)

    outcome = anyio.run(lambda: call_with_retries(call, REQUEST, policy, sleep=sleep))
    return outcome, calls, waits


def test_transient_errors_are_retried_until_success():
    """Transient errors and throttling are retried; attempts counts every try."""
    outcome, calls, waits = _run([TransientCallError("500"), Throttled("429")], RetryPolicy(backoff_initial=0.5))
    assert outcome.completion is DONE and outcome.attempts == 3 and len(calls) == 3
    assert len(waits) == 2 and all(0 <= w <= 60 for w in waits)


def test_permanent_error_is_not_retried():
    """A permanent error ends the row at once."""
    outcome, calls, waits = _run([PermanentCallError("bad", code="InvalidParameter")], RetryPolicy())
    assert outcome.error.code == "InvalidParameter" and outcome.attempts == 1 and waits == []


def test_attempts_are_capped():
    """After max_attempts failures the last error is the row's error."""
    errors = [TransientCallError(f"fail {i}") for i in range(10)]
    outcome, calls, _ = _run(errors, RetryPolicy(max_attempts=4))
    assert outcome.error.message == "fail 3" and outcome.attempts == 4 and len(calls) == 4


def test_retry_after_is_honoured_with_a_cap():
    """A server's Retry-After sets the wait (plus a little jitter), never beyond retry_after_max."""
    policy = RetryPolicy(backoff_initial=0.1, retry_after_max=30)
    _, _, waits = _run([Throttled("429", retry_after=7), Throttled("429", retry_after=500)], policy)
    assert 7 <= waits[0] <= 7.1 and 30 <= waits[1] <= 30.1


def test_backoff_grows_and_is_bounded():
    """Without Retry-After, waits are full-jitter exponential under backoff_max."""
    policy = RetryPolicy(max_attempts=12, backoff_initial=1, backoff_max=4)
    _, _, waits = _run([TransientCallError("x") for _ in range(11)], policy)
    assert len(waits) == 11 and all(0 <= w <= 4 for w in waits)


def test_run_level_errors_pass_through():
    """AuthError is not a row failure: it leaves the retry loop untouched to stop the run."""
    with pytest.raises(AuthError):
        _run([AuthError("bad key")], RetryPolicy())


def test_attempt_timeout_is_a_transient_error():
    """An attempt that takes longer than the timeout becomes a retryable timeout error."""
    async def never(request):
        await anyio.sleep(3600)

    async def no_wait(seconds):
        pass

    policy = RetryPolicy(max_attempts=2, attempt_timeout=0.01)
    outcome = anyio.run(lambda: call_with_retries(never, REQUEST, policy, sleep=no_wait))
    assert outcome.error.code == "timeout" and outcome.attempts == 2


def test_backoff_is_full_jitter_up_to_an_exponential_cap():
    """Without Retry-After, the wait after attempt n is uniform in [0, initial * 2^(n-1)], never above backoff_max,
    even for attempt numbers far past any real budget."""
    policy = RetryPolicy(backoff_initial=0.5, backoff_max=10)
    error = TransientCallError("x")
    for attempt, cap in ((1, 0.5), (2, 1.0), (3, 2.0), (5, 8.0), (6, 10.0), (5000, 10.0)):
        waits = [policy.wait_seconds(attempt, error) for _ in range(200)]
        assert all(0 <= w <= cap for w in waits) and max(waits) > cap / 2
