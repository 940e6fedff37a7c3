"""One row's way through the limiter, the retry loop and the client, into its output row.

Every executor that sends rows itself (online, and any executor whose workers run the same path) goes
through `RowSender.results_of`, so classification, retries, rate feedback, the cost budget and the
result columns are the same whichever way the rows are fanned out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Awaitable, Callable, Iterable, Iterator

import anyio.lowlevel
from anyio.abc import ObjectSendStream

from .clients import ChatClient
from .cost import CostBudget, PriceBook
from .errors import CallError, RunnerError, Throttled, TransientCallError
from .executors import Stop, Stopping
from .fanout import pending
from .limits import Outcome, RetryPolicy, call_with_retries
from .ratelimit import LocalRateLimiter, RetryBudget, Sent
from .records import STATUS_ERROR, STATUS_OK, Completion, Request, Result, Usage, unsent_result
from .structured import StructuredOutput
from .tokens import estimate_prompt_tokens, output_reserve


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _duration_ms(first_sent: float | None) -> float | None:
    """The row's time from its first send (a time.perf_counter reading) to now; None if it was never sent."""
    return None if first_sent is None else (time.perf_counter() - first_sent) * 1000


def ok_result(request: Request, outcome, started_at: datetime, cost: float | None,
              first_sent: float | None = None) -> Result:
    completion = outcome.completion
    return Result(row_id=request.row_id, key=request.key, model=request.model, status=STATUS_OK, kept=request.kept,
                  response=completion.content, reasoning=completion.reasoning,
                  finish_reason=completion.finish_reason, usage=completion.usage, cost=cost,
                  request_id=completion.request_id, http_status=completion.http_status,
                  attempts=outcome.attempts, latency_ms=outcome.last_latency_ms,
                  duration_ms=_duration_ms(first_sent), time_to_first_token_ms=completion.first_token_ms,
                  started_at=started_at, finished_at=_now(), request_hash=request.digest(), variant=request.variant,
                  sample_index=request.sample_index)


def error_result(request: Request, outcome, started_at: datetime, cost: None = None,
                 first_sent: float | None = None) -> Result:
    error = outcome.error
    return Result(row_id=request.row_id, key=request.key, model=request.model, status=STATUS_ERROR,
                  kept=request.kept, request_id=error.request_id, error_type=error.error_type,
                  error_code=error.code, error_message=error.message, http_status=error.http_status,
                  attempts=outcome.attempts, latency_ms=outcome.last_latency_ms,
                  duration_ms=_duration_ms(first_sent), started_at=started_at, finished_at=_now(), request_hash=request.digest(),
                  variant=request.variant, sample_index=request.sample_index)


def sample_results(request: Request, outcome, started_at: datetime, cost: float | None,
                   first_sent: float | None) -> list[Result]:
    """The rows of one request that asked for several answers (`n`): choice i answers member i.

    The request's usage, cost and attempts go on its first row only (the others have null tokens and cost and
    0 attempts, and share its request_id), so the table's sums are what was paid and sent. A failed request
    fails every member; an answer with fewer choices than members makes the missing ones BadResponse rows
    (retried by a rerun), never silently dropped."""
    if outcome.completion is None:
        first, *others = [error_result(row, outcome, started_at, first_sent=first_sent) for row in request.members]
        for result in others:
            result.attempts = 0
        return [first, *others]
    completion = outcome.completion
    choices = completion.all_choices
    results = []
    for index, row in enumerate(request.members):
        if index >= len(choices):
            result = error_result(row, outcome, started_at, first_sent=first_sent)
            result.error_type, result.error_code = "BadResponse", "missing_choice"
            result.error_message = f"the answer has {len(choices)} choices for {len(request.members)} samples"
            result.http_status, result.request_id = completion.http_status, completion.request_id
        else:
            choice = choices[index]
            result = ok_result(row, outcome, started_at, cost, first_sent)
            result.response, result.reasoning, result.finish_reason = \
                choice.content, choice.reasoning, choice.finish_reason
        if index:
            result.usage, result.cost, result.attempts = Usage(), None, 0
        results.append(result)
    return results


def invalid_row_result(request: Request) -> Result:
    return unsent_result(request, "invalid_row", request.problem)


@dataclass
class SourceCounts:
    rows_seen: int = 0
    changed: int = 0  # rows done by an earlier run whose request is different now: sent again


def still_to_send(requests: Iterable[Request], done, counts: SourceCounts) -> Iterator[Request | Result | None]:
    """What a run must still do with the source's requests, given the rows an earlier run committed (`done`,
    the sink's DoneRows): a Request to send (a request for several samples, less those already answered), a
    Result to write as it is (an invalid row), or None now and then while skipping done rows, for the caller
    to yield to its event loop (a long done prefix must not starve it)."""
    for request in requests:
        if request.members:  # one request for several sample rows (fan-out with `n`): send the missing ones
            counts.rows_seen += len(request.members)
            request, changed = pending(request, done)
            counts.changed += changed
            yield request
            continue
        counts.rows_seen += 1
        if request.row_id in done:
            if done.matches(request.row_id, request.digest()):
                if counts.rows_seen % 1024 == 0:
                    yield None
                continue
            counts.changed += 1
        yield invalid_row_result(request) if request.problem is not None else request


async def feed(source: Iterable[Request], done, counts: SourceCounts, stop: Stop,
               requests: ObjectSendStream[Request], results: ObjectSendStream[Result]) -> None:
    """An executor's producer: the requests still to send into `requests`, invalid rows straight into
    `results` (for the writer), in file order, until the source ends or the run stops producing."""
    async with requests, results:
        with stop.produce_scope:
            for item in still_to_send(source, done, counts):
                if item is None:
                    await anyio.lowlevel.checkpoint()
                elif isinstance(item, Result):
                    await results.send(item)
                else:
                    await requests.send(item)


@dataclass
class RowSender:
    """What every worker shares: the client, retry policy and budget, rate limiter, prices and cost budget
    (`spend`, when [run] max_cost is set), and the stop control. `results_of` is the one per-row path every
    executor that sends rows itself uses."""

    client: ChatClient
    policy: RetryPolicy
    sleep: Callable[[float], Awaitable[None]]
    stop: Stop
    limiter: LocalRateLimiter
    retry_budget: RetryBudget
    expected_output_tokens: int | None
    prices: PriceBook
    spend: CostBudget | None
    structured: StructuredOutput | None = None  # [output] json_schema: answers are checked and re-asked

    async def results_of(self, request: Request) -> list[Result]:
        """The request's output rows (one, or one per member of a request with `n`): its answer, or its failure as an error row.
        Raises Stopping once the run is stopping (the row is left for the rerun) and RunnerError for what
        stops the whole run."""
        started_at = _now()
        outcome, cost, first_sent = await _send(self, request)
        if request.members:  # samples sharing one request (`n`): never under [output] json_schema
            return sample_results(request, outcome, started_at, cost, first_sent)
        if outcome.completion is not None and self.structured is not None:
            return [await _checked_result(self, self.structured, request, outcome, cost, started_at, first_sent)]
        if outcome.completion is not None:
            return [ok_result(request, outcome, started_at, cost, first_sent)]
        return [error_result(request, outcome, started_at, first_sent=first_sent)]


def _add_usage(a: Usage, b: Usage) -> Usage:
    def plus(x: int | None, y: int | None) -> int | None:
        return None if x is None and y is None else (x or 0) + (y or 0)

    return Usage(*(plus(getattr(a, name), getattr(b, name)) for name in Usage.__slots__))


async def _checked_result(sender: RowSender, structured: StructuredOutput, request: Request, outcome: Outcome,
                          cost: float | None, started_at: datetime, first_sent: float | None) -> Result:
    """The row of an answered request under [output] json_schema. An answer that does not validate is re-asked
    (the original messages, the answer, what is wrong with it) up to `reask_attempts` times, each re-ask through
    `_send` like any request: the limiter, the retry policy and the cost budget's reservations. The row's
    attempts, tokens and cost are those of every request it took. It ends as:

    - ok, with `parsed`, once an answer validates;
    - InvalidOutput, with the last answer in `response` and its error in `parse_error`, when none did;
    - the re-ask's own error when a re-ask failed for good (a 400, retries used up);
    - TransientCallError `reask_stopped` when the run stopped (a signal, the budget, a run-level error)
      before a re-ask could be sent: the answers so far are paid, so the row is written with their tokens
      and cost (the budget of a rerun counts them), and a rerun sends it again."""
    completion = outcome.completion
    usage, attempts = completion.usage, outcome.attempts
    verdict = structured.check(completion.content)
    answers = 1
    while not verdict.ok and answers <= structured.reask_attempts:
        reask = structured.reask(request, completion.content, verdict.error, answers)
        try:
            outcome, reask_cost, _ = await _send(sender, reask)
        except (Stopping, RunnerError) as stopped:
            if isinstance(stopped, RunnerError):
                sender.stop.fail(stopped)  # what _work would do with it; this row is written all the same
            error = TransientCallError("the run stopped before this row's answer could be re-asked",
                                       code="reask_stopped")
            return _failed_row(request, Outcome(None, error, attempts, outcome.last_latency_ms), usage, cost,
                               completion.content, verdict.error, started_at, first_sent)
        attempts += outcome.attempts
        if outcome.completion is None:
            return _failed_row(request, Outcome(None, outcome.error, attempts, outcome.last_latency_ms), usage, cost,
                               completion.content, verdict.error, started_at, first_sent)
        completion = outcome.completion
        usage = _add_usage(usage, completion.usage)
        cost = None if cost is None or reask_cost is None else cost + reask_cost
        verdict = structured.check(completion.content)
        answers += 1
    last = Outcome(completion, None, attempts, outcome.last_latency_ms)
    if verdict.ok:
        result = ok_result(request, last, started_at, cost, first_sent)
        result.usage, result.parsed = usage, verdict.parsed
        return result
    error = structured.invalid_output(verdict, answers)
    result = _failed_row(request, Outcome(None, error, attempts, outcome.last_latency_ms), usage, cost,
                         completion.content, verdict.error, started_at, first_sent)
    result.finish_reason, result.request_id = completion.finish_reason, completion.request_id
    result.http_status = completion.http_status
    return result


def _failed_row(request: Request, outcome: Outcome, usage: Usage, cost: float | None, answer: str | None,
                parse_error: str | None, started_at: datetime, first_sent: float | None) -> Result:
    """An error row that keeps what was paid for: the tokens and cost of its answers, the last answer, and why
    it did not validate."""
    result = error_result(request, outcome, started_at, first_sent=first_sent)
    result.usage, result.cost, result.response, result.parse_error = usage, cost, answer, parse_error
    return result


async def _send(sender: RowSender, request: Request) -> tuple[Outcome, float | None, float | None]:
    """One row through the limiter and the retry loop; the token reservation is settled with the real usage.
    Returns the outcome, the successful answer's cost and when the first attempt was sent (time.perf_counter:
    the start of the row's duration_ms, so waiting for the first rate-limit slot is queueing, not the row).
    Raises Stopping, before anything more is sent, once the run is stopping."""
    model = request.model
    limiter = sender.limiter
    reserve = estimate_prompt_tokens(request.messages) + \
        output_reserve(request.params, sender.expected_output_tokens) * len(request.rows)  # `n` answers
    worst_cost = sender.prices.worst_case(request) if sender.spend is not None else 0.0
    last_error = ""
    sent_at = Sent(0.0, 0)
    answer_cost: float | None = None
    first_sent: float | None = None

    async def before_attempt(number: int) -> None:
        nonlocal sent_at, first_sent
        if number > 1:
            sender.retry_budget.retry(last_error)
        with sender.stop.abortable():
            sent_at = await limiter.acquire(model, reserve)
        try:
            if sender.stop.requested:  # stopped while this row waited its turn: it is left for the rerun
                raise Stopping
            if sender.spend is not None:
                with sender.stop.abortable():
                    await sender.spend.reserve(worst_cost)  # released or replaced by the real cost in attempt()
            if first_sent is None:
                first_sent = time.perf_counter()
        except BaseException:
            limiter.settle(model, -reserve)
            limiter.report_failure(model, sent_at)
            raise

    async def attempt(req: Request) -> Completion:
        nonlocal last_error, answer_cost
        cost = None
        try:
            completion = await sender.client.complete(req)
            cost = answer_cost = sender.prices.row_cost(req, completion.usage)
        except CallError as error:
            limiter.settle(model, -reserve)
            if isinstance(error, Throttled):
                limiter.report_throttled(model, error.code, error.retry_after, sent_at)
            else:
                limiter.report_failure(model, sent_at, getattr(error, "retry_after", None))
            if not error.retryable:
                sender.retry_budget.answered()
            last_error = f"{error.error_type} {error.code or ''}: {error.message}"[:300]
            raise
        except BaseException:
            limiter.settle(model, -reserve)
            limiter.report_failure(model, sent_at)
            raise
        finally:
            if sender.spend is not None:
                sender.spend.settle(worst_cost, cost)
        used = completion.usage.total_tokens
        limiter.settle(model, used - reserve if used is not None else 0)
        limiter.report_success(model, sent_at)
        sender.retry_budget.answered()
        return completion

    async def retry_sleep(seconds: float) -> None:
        with sender.stop.abortable():
            await sender.sleep(seconds)

    outcome = await call_with_retries(attempt, request, sender.policy, sleep=retry_sleep, before_attempt=before_attempt)
    return outcome, answer_cost, first_sent
