"""The online executor: every row its own request, through a fixed pool of workers.

    source -> bounded stream -> `concurrency` workers (limiter -> client -> retries) -> writer -> parts

Memory is proportional to the rows in flight, never to the input. The writer commits results as
they arrive. Row failures become rows; a RunnerError from any worker (bad key, no money) stops the
whole run, keeps every committed row, and is raised once the requests in flight are committed.
"""

from __future__ import annotations

import time

import anyio
import anyio.lowlevel
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from ..clients import ChatClient
from ..clients.stream_rules import StreamPolicy
from ..cost import CostBudget, NoPrice
from ..endpoint_check import EndpointGuard
from ..errors import RunnerError
from ..limits import RetryPolicy
from ..ratelimit import Limits, LocalRateLimiter, RetryBudget, limits_table
from ..records import Request, Result
from ..row_sender import RowSender, SourceCounts, feed
from .. import structured
from . import Finish, JobRun, Stop, Stopping, commit_as_they_come, first_runner_error


class OnlineExecutor:
    """Sends each row as its own request (see the module docstring)."""

    default_retry_failed = "transient"
    batch_prices = False
    drains = True

    async def run(self, job: JobRun, stop: Stop) -> Finish:
        spec, sink, summary, prices = job.spec, job.sink, job.summary, job.prices
        spend = None
        if spec.run.max_cost is not None:
            for model in spec.model.all_names:
                if prices.price(model) is None:
                    raise NoPrice(f"no price for model {model!r} in {prices.region}, so [run] max_cost cannot "
                                  "be guaranteed", hint="set [model] price_input and price_output (per 1M tokens)")
            spend = CostBudget(spec.run.max_cost, prices.currency)
            spend.spent = sink.done_cost
        job.announce_resume()
        policy = RetryPolicy.from_spec(spec)
        concurrency = spec.run.concurrency
        counts = SourceCounts()
        limiter = LocalRateLimiter(
            limits_table(Limits(spec.run.rpm, spec.run.tpm), {m: Limits(*v) for m, v in spec.run.limits.items()}),
            adaptive=spec.run.adaptive_rate, cooldown_seconds=spec.run.cooldown_seconds,
            cooldown_max=spec.run.retry_after_max, concurrency=concurrency)
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
                    tg.start_soon(feed, job.source, sink.done, counts, stop, req_send, res_send.clone())
                    # A 404 before anything worked stops the run, not every row; keys quoted back are removed.
                    guarded = EndpointGuard(client, dialect=spec.endpoint.dialect, job_models=spec.model.all_names,
                                            api_key=job.api_key)
                    sender = RowSender(guarded, policy, job.sleep, stop, limiter, retry_budget,
                               spec.run.expected_output_tokens, prices, spend, structured.for_job(spec))
                    tg.start_soon(_run_workers, concurrency, sender, req_recv, res_send)
                    await commit_as_they_come(res_recv, job)
            except BaseExceptionGroup as group:
                raise first_runner_error(group) from None
        summary.changed_rows = counts.changed
        summary.throttled = limiter.throttled_by_code
        summary.paused_seconds = limiter.gate.paused_seconds
        summary.rate_control = limiter.describe()
        stop.raise_if_stopped(len(sink.done) + summary.rows, sink.parts_dir)
        return Finish(rows_seen=counts.rows_seen)


async def _work(sender: RowSender, requests: ObjectReceiveStream[Request], results: ObjectSendStream[Result]) -> None:
    async with requests, results:
        async for request in requests:
            if sender.stop.requested:
                return  # queued rows are not started once the run is stopping
            try:
                answered = await sender.results_of(request)
            except Stopping:
                continue
            except RunnerError as error:
                sender.stop.fail(error)  # this row is not written: the rerun sends it
                continue
            for result in answered:
                await results.send(result)


async def _run_workers(count: int, sender: RowSender, requests: ObjectReceiveStream[Request],
                       results: ObjectSendStream[Result]) -> None:
    async with requests, results:
        async with anyio.create_task_group() as workers:
            sender.stop.work_scope = workers.cancel_scope
            for _ in range(count):
                workers.start_soon(_work, sender, requests.clone(), results.clone())
