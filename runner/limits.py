"""Retry policy: which failures are tried again, how long to wait, when to stop.

One retry loop sees every failure (there are no SDK retries underneath). Transient errors and
throttling are retried with full-jitter exponential backoff; a server's Retry-After is honoured up
to a cap; each attempt has a hard deadline; permanent errors are not retried; run-level errors
(AuthError, QuotaExhausted) pass straight through to stop the run.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import anyio

from .errors import CallError, TransientCallError
from .records import Completion, Request
from .spec import JobSpec


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    retry_after_max: float = 120.0
    attempt_timeout: float = 300.0

    @classmethod
    def from_spec(cls, spec: JobSpec) -> "RetryPolicy":
        return cls(max_attempts=spec.run.max_attempts, backoff_initial=spec.run.backoff_initial,
                   backoff_max=spec.run.backoff_max, retry_after_max=spec.run.retry_after_max,
                   attempt_timeout=spec.endpoint.timeout)

    def wait_seconds(self, attempt: int, error: CallError) -> float:
        """The wait after failed attempt number `attempt`: Retry-After (capped, plus jitter) when the server
        gave one, else full-jitter exponential (uniform up to backoff_initial * 2^(attempt-1), capped)."""
        retry_after = getattr(error, "retry_after", None)  # a 429's, or a 503's
        if retry_after is not None:
            return min(retry_after, self.retry_after_max) + random.uniform(0, self.backoff_initial)
        return random.uniform(0, min(self.backoff_initial * 2.0 ** min(attempt - 1, 1000), self.backoff_max))


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the retry loop ends with: a completion or the last error, and how it got there."""

    completion: Completion | None
    error: CallError | None
    attempts: int
    last_latency_ms: float | None


async def call_with_retries(call: Callable[[Request], Awaitable[Completion]], request: Request,
                            policy: RetryPolicy, *, sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
                            clock: Callable[[], float] = time.perf_counter,
                            before_attempt: Callable[[int], Awaitable[None]] | None = None) -> Outcome:
    """Run `call(request)` until it succeeds, fails for good, or runs out of attempts.

    `before_attempt(n)` runs before attempt n outside its deadline (waiting for the rate limiter is not
    the endpoint being slow). RunnerErrors raised by either are not caught: they stop the run.
    """
    # A plain loop, not tenacity's AsyncRetrying: that left about 37 objects per row in reference
    # cycles, which only the cyclic GC frees, and the runner spent a large share of its CPU in the GC.
    latency_ms: float | None = None
    attempts = max(policy.max_attempts, 1)
    for number in range(1, attempts + 1):
        try:
            if before_attempt is not None:
                await before_attempt(number)
            started = clock()
            try:
                with anyio.fail_after(policy.attempt_timeout):
                    completion = await call(request)
            except TimeoutError:
                raise TransientCallError(f"no answer within {policy.attempt_timeout:g} s", code="timeout") from None
            finally:
                latency_ms = (clock() - started) * 1000
        except CallError as error:
            if not error.retryable or number == attempts:
                return Outcome(None, error, number, latency_ms)
            wait = policy.wait_seconds(number, error)
        else:
            return Outcome(completion, None, number, latency_ms)
        await sleep(wait)
    raise AssertionError("unreachable: the last attempt returns")
