"""The online executor: every row its own request, through a fixed pool of workers.

    source -> bounded stream -> `concurrency` workers (limiter -> client -> retries) -> writer -> parts

Memory is proportional to the rows in flight, never to the input. The writer commits results as
they arrive. Row failures become rows; a RunnerError from any worker (bad key, no money) stops the
whole run, keeps every committed row, and is raised once the requests in flight are committed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Awaitable, Callable

import anyio
import anyio.lowlevel
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from ..clients import ChatClient
from ..clients.stream_rules import StreamPolicy
from ..cost import CostBudget, NoPrice, PriceBook
from ..endpoint_check import EndpointGuard
from ..errors import CallError, Interrupted, RunnerError, Throttled
from ..limits import Outcome, RetryPolicy, call_with_retries
from ..ratelimit import Limits, LocalRateLimiter, RetryBudget, Sent, limits_table
from ..records import STATUS_ERROR, STATUS_OK, Completion, Request, Result, unsent_result
from ..sink import DoneRows
from ..sources import RequestSource
from ..tokens import estimate_prompt_tokens, output_reserve
from . import Finish, JobRun, Stop, Stopping, first_runner_error


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _duration_ms(first_sent: float | None) -> float | None:
    """The row's time from its first send (a time.perf_counter reading) to now; None if it was never sent."""
    return None if first_sent is None else (time.perf_counter() - first_sent) * 1000


def _ok_result(request: Request, outcome, started_at: datetime, cost: float | None,
               first_sent: float | None = None) -> Result:
    completion = outcome.completion
    return Result(row_id=request.row_id, key=request.key, model=request.model, status=STATUS_OK, kept=request.kept,
                  response=completion.content, reasoning=completion.reasoning,
                  finish_reason=completion.finish_reason, usage=completion.usage, cost=cost,
                  request_id=completion.request_id, http_status=completion.http_status,
                  attempts=outcome.attempts, latency_ms=outcome.last_latency_ms,
                  duration_ms=_duration_ms(first_sent), time_to_first_token_ms=completion.first_token_ms,
                  started_at=started_at, finished_at=_now(), request_hash=request.digest())


def _error_result(request: Request, outcome, started_at: datetime, cost: None = None,
                  first_sent: float | None = None) -> Result:
    error = outcome.error
    return Result(row_id=request.row_id, key=request.key, model=request.model, status=STATUS_ERROR,
                  kept=request.kept, request_id=error.request_id, error_type=error.error_type,
                  error_code=error.code, error_message=error.message, http_status=error.http_status,
                  attempts=outcome.attempts, latency_ms=outcome.last_latency_ms,
                  duration_ms=_duration_ms(first_sent), started_at=started_at, finished_at=_now(), request_hash=request.digest())


def invalid_row_result(request: Request) -> Result:
    return unsent_result(request, "invalid_row", request.problem)


@dataclass
class _Counts:
    rows_seen: int = 0
    changed: int = 0  # rows done by an earlier run whose request is different now: sent again


class OnlineExecutor:
    """Sends each row as its own request (see the module docstring)."""

    default_retry_failed = "transient"
    batch_prices = False
    drains = True

    async def run(self, job: JobRun, stop: Stop) -> Finish:
        spec, sink, summary, prices = job.spec, job.sink, job.summary, job.prices
        spend = None
        if spec.run.max_cost is not None:
            if prices.price(spec.model.name) is None:
                raise NoPrice(f"no price for model {spec.model.name!r} in {prices.region}, so [run] max_cost cannot "
                              "be guaranteed", hint="set [model] price_input and price_output (per 1M tokens)")
            spend = CostBudget(spec.run.max_cost, prices.currency)
            spend.spent = sink.done_cost
        job.announce_resume()
        policy = RetryPolicy.from_spec(spec)
        concurrency = spec.run.concurrency
        counts = _Counts()
        limiter = LocalRateLimiter(
            limits_table(Limits(spec.run.rpm, spec.run.tpm), {m: Limits(*v) for m, v in spec.run.limits.items()}),
            adaptive=spec.run.adaptive_rate, cooldown_seconds=spec.run.cooldown_seconds,
            cooldown_max=spec.run.retry_after_max)
        job.started(limiter)
        # Judged only past four rounds of requests in flight: a ramp that meets an unknown limit may be
        # answered by a round of 429s before the first successes.
        retry_budget = RetryBudget(spec.run.retry_budget, time.monotonic, min_retries=max(100, 4 * concurrency))
        streaming = StreamPolicy(spec.model.stream, spec.model.stream_only_models)
        async with ChatClient(spec.endpoint, job.api_key, max_connections=concurrency, transport=job.transport,
                              streaming=streaming) as client:
            req_send, req_recv = anyio.create_memory_object_stream[Request](concurrency)
            # No buffer: a worker hands its result straight to the writer, which journals it before taking the
            # next, so a kill can lose at most one paid answer per worker (the rows in flight).
            res_send, res_recv = anyio.create_memory_object_stream[Result](0)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_produce, job.source, sink.done, counts, stop, req_send, res_send.clone())
                    # A 404 before anything worked stops the run, not every row; keys quoted back are removed.
                    guarded = EndpointGuard(client, dialect=spec.endpoint.dialect, job_model=spec.model.name,
                                            api_key=job.api_key)
                    lane = _Lane(guarded, policy, job.sleep, stop, limiter, retry_budget,
                                 spec.run.expected_output_tokens, prices, spend)
                    tg.start_soon(_run_workers, concurrency, lane, req_recv, res_send)
                    await _write_results(res_recv, job)
            except BaseExceptionGroup as group:
                raise first_runner_error(group) from None
        summary.changed_rows = counts.changed
        summary.throttled = limiter.throttled_by_code
        summary.paused_seconds = limiter.gate.paused_seconds
        summary.rate_control = limiter.describe()
        if stop.error is not None:
            raise stop.error
        if stop.requested:
            raise Interrupted(f"stopped by {stop.signal_name}: {len(sink.done) + summary.rows:,} rows are committed "
                              f"in {sink.parts_dir}", hint="run the same command again to finish the job")
        return Finish(rows_seen=counts.rows_seen)


async def _produce(source: RequestSource, done: DoneRows, counts: _Counts, stop: Stop,
                   requests: ObjectSendStream[Request], results: ObjectSendStream[Result]) -> None:
    async with requests, results:
        with stop.produce_scope:
            for request in source:
                counts.rows_seen += 1
                if request.row_id in done:
                    if done.matches(request.row_id, request.digest()):
                        if counts.rows_seen % 1024 == 0:
                            await anyio.lowlevel.checkpoint()  # a long done prefix must not starve the loop
                        continue
                    counts.changed += 1
                if request.problem is not None:
                    await results.send(invalid_row_result(request))
                else:
                    await requests.send(request)


@dataclass
class _Lane:
    """What every worker shares: the client, retry policy and budget, rate limiter, prices and cost budget
    (`spend`, when [run] max_cost is set), and the stop control."""

    client: ChatClient
    policy: RetryPolicy
    sleep: Callable[[float], Awaitable[None]]
    stop: Stop
    limiter: LocalRateLimiter
    retry_budget: RetryBudget
    expected_output_tokens: int | None
    prices: PriceBook
    spend: CostBudget | None
async def _send(lane: _Lane, request: Request) -> tuple[Outcome, float | None, float | None]:
    """One row through the limiter and the retry loop; the token reservation is settled with the real usage.
    Returns the outcome, the successful answer's cost and when the first attempt was sent (time.perf_counter:
    the start of the row's duration_ms, so waiting for the first rate-limit slot is queueing, not the row). Raises Stopping, before anything more is sent,
    once the run is stopping."""
    model = request.model
    limiter = lane.limiter
    reserve = estimate_prompt_tokens(request.messages) + output_reserve(request.params, lane.expected_output_tokens)
    worst_cost = lane.prices.worst_case(request) if lane.spend is not None else 0.0
    last_error = ""
    sent_at = Sent(0.0, 0)
    answer_cost: float | None = None
    first_sent: float | None = None

    async def before_attempt(number: int) -> None:
        nonlocal sent_at, first_sent
        if number > 1:
            lane.retry_budget.retry(last_error)
        with lane.stop.abortable():
            sent_at = await limiter.acquire(model, reserve)
        try:
            if lane.stop.requested:  # stopped while this row waited its turn: it is left for the rerun
                raise Stopping
            if lane.spend is not None:
                with lane.stop.abortable():
                    await lane.spend.reserve(worst_cost)  # released or replaced by the real cost in attempt()
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
            completion = await lane.client.complete(req)
            cost = answer_cost = lane.prices.row_cost(req, completion.usage)
        except CallError as error:
            limiter.settle(model, -reserve)
            if isinstance(error, Throttled):
                limiter.report_throttled(model, error.code, error.retry_after, sent_at)
            else:
                limiter.report_failure(model, sent_at, getattr(error, "retry_after", None))
            if not error.retryable:
                lane.retry_budget.answered()
            last_error = f"{error.error_type} {error.code or ''}: {error.message}"[:300]
            raise
        except BaseException:
            limiter.settle(model, -reserve)
            limiter.report_failure(model, sent_at)
            raise
        finally:
            if lane.spend is not None:
                lane.spend.settle(worst_cost, cost)
        used = completion.usage.total_tokens
        limiter.settle(model, used - reserve if used is not None else 0)
        limiter.report_success(model, sent_at)
        lane.retry_budget.answered()
        return completion

    async def retry_sleep(seconds: float) -> None:
        with lane.stop.abortable():
            await lane.sleep(seconds)

    outcome = await call_with_retries(attempt, request, lane.policy, sleep=retry_sleep, before_attempt=before_attempt)
    return outcome, answer_cost, first_sent


async def _work(lane: _Lane, requests: ObjectReceiveStream[Request], results: ObjectSendStream[Result]) -> None:
    async with requests, results:
        async for request in requests:
            if lane.stop.requested:
                return  # queued rows are not started once the run is stopping
            started_at = _now()
            try:
                outcome, cost, first_sent = await _send(lane, request)
            except Stopping:
                continue
            except RunnerError as error:
                lane.stop.fail(error)  # this row is not written: the rerun sends it
                continue
            if outcome.completion is not None:
                result = _ok_result(request, outcome, started_at, cost, first_sent)
            else:
                result = _error_result(request, outcome, started_at, first_sent=first_sent)
            await results.send(result)


async def _run_workers(count: int, lane: _Lane, requests: ObjectReceiveStream[Request],
                       results: ObjectSendStream[Result]) -> None:
    async with requests, results:
        async with anyio.create_task_group() as workers:
            lane.stop.work_scope = workers.cancel_scope
            for _ in range(count):
                workers.start_soon(_work, lane, requests.clone(), results.clone())


async def _write_results(results: ObjectReceiveStream[Result], job: JobRun) -> None:
    sink = job.sink
    async with results:
        while True:
            # Wake up when a part is due even if no result arrives (a slow tail of retries).
            with anyio.move_on_after(max(sink.seconds_until_due(), 0.05)):
                try:
                    result = await results.receive()
                except anyio.EndOfStream:
                    return
                job.write(result)
                continue
            sink.flush()
