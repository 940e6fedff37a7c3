"""run_job(): source -> bounded stream -> worker pool -> bounded stream -> sink -> summary.

A fixed pool of `concurrency` workers reads requests from a small bounded stream, so memory is
proportional to the rows in flight, never to the input. The writer (this task) commits results as
they arrive. Row failures become rows; a RunnerError from any worker (bad key, no money) stops
the whole run, keeps every committed row, and propagates to the caller.
"""

from __future__ import annotations

import json
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Awaitable, Callable, Iterator, Mapping

import anyio
import anyio.lowlevel
import httpx
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from .clients import ChatClient
from .clients.stream_rules import StreamPolicy
from .endpoint_check import EndpointGuard
from .endpoints import ApiKey, base_url, check_base_url, resolve_api_key
from .errors import CallError, Interrupted, RunnerError, Throttled
from .limits import Outcome, RetryPolicy, call_with_retries
from .cost import CostBudget, NoPrice, PriceBook
from .ratelimit import Limits, LocalRateLimiter, RetryBudget, Sent, limits_table
from .records import STATUS_ERROR, STATUS_OK, Completion, Request, Result, result_schema, unsent_result
from .report import RunSummary, summarize_file
from .files import write_file_atomic
from .sink import DoneRows, ParquetSink
from .sources import RequestSource, open_source
from .spec import JobSpec
from .tokens import estimate_prompt_tokens, output_reserve

ResultCallback = Callable[[Result], None]
StartCallback = Callable[[int | None, int, LocalRateLimiter], None]  # total rows, rows already done, live counters
NoticeCallback = Callable[[str], None]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def job_fingerprint(spec: JobSpec) -> dict[str, str]:
    """Everything that shapes every request, so a rerun only resumes the same job. Changes to single
    input rows are caught row by row (Request.digest), so an edited or grown input resumes."""
    inp = spec.input
    return {
        "input": inp.path.name,
        "rows": f"{inp.id_column}|{inp.prompt_column}|{inp.messages_column}|{inp.template}|{inp.system_prompt}",
        "overrides": f"{inp.model_column}|{inp.params_column}",
        "keep_columns": ",".join(inp.keep_columns),
        "endpoint": f"{spec.endpoint.dialect} {base_url(spec.endpoint)}",
        "model": spec.model.name,
        "params": json.dumps(dict(spec.model.params), sort_keys=True, default=str),
        "stream": f"{spec.model.stream} {','.join(spec.model.stream_only_models)}",
    }


def open_sink(spec: JobSpec, source: RequestSource, *, overwrite: bool, restart: bool, retry_failed: str,
              reopen: bool) -> ParquetSink:
    """The job's output, its committed rows read back (online and batch mode write the same parts)."""
    return ParquetSink(spec.output.path, result_schema(source.kept_fields), fingerprint=job_fingerprint(spec),
                       part_rows=spec.run.part_rows, part_seconds=spec.run.part_seconds, overwrite=overwrite,
                       restart=restart, retry_failed=retry_failed, reopen=reopen)


def resume_notice(sink: ParquetSink) -> str:
    recovered = f" ({sink.recovered_from_journal:,} recovered from the journal)" if sink.recovered_from_journal else ""
    return (f"{'reopened the finished output' if sink.reopened else 'resuming'}: {len(sink.done):,} rows already "
            f"done{recovered}")


def _ok_result(request: Request, outcome, started_at: datetime, cost: float | None) -> Result:
    completion = outcome.completion
    return Result(row_id=request.row_id, key=request.key, model=request.model, status=STATUS_OK, kept=request.kept,
                  response=completion.content, reasoning=completion.reasoning,
                  finish_reason=completion.finish_reason, usage=completion.usage, cost=cost,
                  request_id=completion.request_id, http_status=completion.http_status,
                  attempts=outcome.attempts, latency_ms=outcome.last_latency_ms,
                  time_to_first_token_ms=completion.first_token_ms,
                  started_at=started_at, finished_at=_now(), request_hash=request.digest())


def _error_result(request: Request, outcome, started_at: datetime, cost: None = None) -> Result:
    error = outcome.error
    return Result(row_id=request.row_id, key=request.key, model=request.model, status=STATUS_ERROR,
                  kept=request.kept, request_id=error.request_id, error_type=error.error_type,
                  error_code=error.code, error_message=error.message, http_status=error.http_status,
                  attempts=outcome.attempts, latency_ms=outcome.last_latency_ms,
                  started_at=started_at, finished_at=_now(), request_hash=request.digest())


def invalid_row_result(request: Request) -> Result:
    return unsent_result(request, "invalid_row", request.problem)


@dataclass
class _Counts:
    rows_seen: int = 0
    changed: int = 0  # rows done by an earlier run whose request is different now: sent again


class _Stopping(Exception):
    """Raised in a worker's retry wait once the run is stopping: the row is left for the rerun."""


class _Stop:
    """How a run winds down on a signal: first stop taking rows and drain, then (or on a second
    signal, or at the drain deadline) cancel what is still in flight. Draining sends nothing new:
    rows waiting for the rate limiter, the gate or a retry's backoff are left for the rerun."""

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.signal_name: str | None = None
        self.error: RunnerError | None = None
        self.produce_scope = anyio.CancelScope()
        self.work_scope: anyio.CancelScope | None = None
        self._waits: set[anyio.CancelScope] = set()

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def request(self, signal_name: str) -> None:
        self.signal_name = signal_name
        self.event.set()
        self.produce_scope.cancel()
        for scope in self._waits:
            scope.cancel()

    @contextmanager
    def abortable(self) -> Iterator[None]:
        """A wait before sending (the limiter, the budget, a backoff) that ends in _Stopping once the run stops."""
        if self.requested:
            raise _Stopping
        with anyio.CancelScope() as scope:
            self._waits.add(scope)
            try:
                yield
            finally:
                self._waits.discard(scope)
        if scope.cancel_called:
            raise _Stopping

    def fail(self, error: RunnerError) -> None:
        """A run-level error (bad key, no money, retry budget): stop taking rows, let requests in flight
        finish and be committed, then raise it."""
        if self.error is None:
            self.error = error
        if not self.requested:
            self.request(type(error).__name__)

    def now(self) -> None:
        if self.work_scope is not None:
            self.work_scope.cancel()


async def _produce(source: RequestSource, done: DoneRows, counts: _Counts, stop: _Stop,
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
    stop: _Stop
    limiter: LocalRateLimiter
    retry_budget: RetryBudget
    expected_output_tokens: int | None
    prices: PriceBook
    spend: CostBudget | None


async def _send(lane: _Lane, request: Request) -> tuple[Outcome, float | None]:
    """One row through the limiter and the retry loop; the token reservation is settled with the real usage.
    Returns the outcome and the successful answer's cost. Raises _Stopping, before anything more is sent,
    once the run is stopping."""
    model = request.model
    limiter = lane.limiter
    reserve = estimate_prompt_tokens(request.messages) + output_reserve(request.params, lane.expected_output_tokens)
    worst_cost = lane.prices.worst_case(request) if lane.spend is not None else 0.0
    last_error = ""
    sent_at = Sent(0.0, 0)
    answer_cost: float | None = None

    async def before_attempt(number: int) -> None:
        nonlocal sent_at
        if number > 1:
            lane.retry_budget.retry(last_error)
        with lane.stop.abortable():
            sent_at = await limiter.acquire(model, reserve)
        try:
            if lane.stop.requested:  # stopped while this row waited its turn: it is left for the rerun
                raise _Stopping
            if lane.spend is not None:
                with lane.stop.abortable():
                    await lane.spend.reserve(worst_cost)  # released or replaced by the real cost in attempt()
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
    return outcome, answer_cost


async def _work(lane: _Lane, requests: ObjectReceiveStream[Request], results: ObjectSendStream[Result]) -> None:
    async with requests, results:
        async for request in requests:
            if lane.stop.requested:
                return  # queued rows are not started once the run is stopping
            started_at = _now()
            try:
                outcome, cost = await _send(lane, request)
            except _Stopping:
                continue
            except RunnerError as error:
                lane.stop.fail(error)  # this row is not written: the rerun sends it
                continue
            if outcome.completion is not None:
                result = _ok_result(request, outcome, started_at, cost)
            else:
                result = _error_result(request, outcome, started_at)
            await results.send(result)


async def _run_workers(count: int, lane: _Lane, requests: ObjectReceiveStream[Request],
                       results: ObjectSendStream[Result]) -> None:
    async with requests, results:
        async with anyio.create_task_group() as workers:
            lane.stop.work_scope = workers.cancel_scope
            for _ in range(count):
                workers.start_soon(_work, lane, requests.clone(), results.clone())


async def _watch_signals(stop: _Stop, drain_seconds: float, on_notice: NoticeCallback | None) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not stop.requested:
                stop.request(name)
                if on_notice:
                    on_notice(f"{name}: not starting new rows; finishing requests in flight for up to "
                              f"{drain_seconds:g} s (again to stop at once)")
                break
        with anyio.move_on_after(drain_seconds):
            async for signum in signals:
                if on_notice:
                    on_notice(f"{signal.Signals(signum).name}: stopping now")
                break
        stop.now()
        async for _ in signals:  # until the run ends, further signals change nothing
            pass


def _first_runner_error(group: BaseExceptionGroup) -> BaseException:
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            found = _first_runner_error(error)
            if isinstance(found, RunnerError):
                return found
        elif isinstance(error, RunnerError):
            return error
    return group


async def run_job(spec: JobSpec, *, api_key: ApiKey | None = None, transport: httpx.AsyncBaseTransport | None = None,
                  sleep: Callable[[float], Awaitable[None]] = anyio.sleep, on_result: ResultCallback | None = None,
                  on_start: StartCallback | None = None, on_notice: NoticeCallback | None = None,
                  overwrite: bool = False, restart: bool = False, retry_failed: str | None = None,
                  handle_signals: bool = False, environ: Mapping[str, str] | None = None) -> RunSummary:
    """Run a job to completion, or resume it; returns its summary.

    `retry_failed` (which failed rows of an earlier run are sent again) defaults to "transient" online
    and to "none" in batch mode, where a row is sent again only on request. Raises RunnerError for
    run-level failures, and Interrupted when `handle_signals` is set and a SIGINT/SIGTERM stopped the
    run (everything finished before it is committed).
    """
    reopen = retry_failed in ("transient", "all")  # asked for by name: a finished output may be reopened
    check_base_url(spec.endpoint)  # a base_url that is certainly wrong is refused before anything is sent
    if spec.run.mode == "batch":
        from .batch import run_batch_job

        return await run_batch_job(spec, api_key=api_key, transport=transport, sleep=sleep, on_result=on_result,
                                   on_start=on_start, on_notice=on_notice, overwrite=overwrite, restart=restart,
                                   retry_failed=retry_failed or "none", reopen=reopen,
                                   handle_signals=handle_signals, environ=environ)
    from .batch.driver import guard_pending_batches

    guard_pending_batches(spec, restart=restart, online=True)
    retry_failed = retry_failed or "transient"
    source = open_source(spec.input, spec.model, limit=spec.run.limit)
    if api_key is None:
        api_key = resolve_api_key(spec.endpoint, environ)
    sink = open_sink(spec, source, overwrite=overwrite, restart=restart, retry_failed=retry_failed, reopen=reopen)
    prices = PriceBook(spec.endpoint.region, job_model=spec.model.name, overrides=spec.model.prices)
    spend = None
    if spec.run.max_cost is not None:
        if prices.price(spec.model.name) is None:
            sink.close()
            raise NoPrice(f"no price for model {spec.model.name!r} in {prices.region}, so [run] max_cost cannot be "
                          "guaranteed", hint="set [model] price_input and price_output (per 1M tokens)")
        spend = CostBudget(spec.run.max_cost, prices.currency)
        spend.spent = sink.done_cost
    summary = RunSummary(output=str(spec.output.path), skipped_done=len(sink.done), currency=prices.currency,
                         total_rows=source.total)
    if sink.done and on_notice:
        on_notice(resume_notice(sink))
    policy = RetryPolicy.from_spec(spec)
    concurrency = spec.run.concurrency
    counts = _Counts()
    stop = _Stop()
    limiter = LocalRateLimiter(
        limits_table(Limits(spec.run.rpm, spec.run.tpm), {m: Limits(*v) for m, v in spec.run.limits.items()}),
        adaptive=spec.run.adaptive_rate, cooldown_seconds=spec.run.cooldown_seconds,
        cooldown_max=spec.run.retry_after_max)
    if on_start is not None:
        on_start(source.total, len(sink.done), limiter)
    # Judged only past four rounds of requests in flight: a ramp that meets an unknown limit may be
    # answered by a round of 429s before the first successes.
    retry_budget = RetryBudget(spec.run.retry_budget, time.monotonic, min_retries=max(100, 4 * concurrency))
    started = time.perf_counter()
    finished = False
    try:
        streaming = StreamPolicy(spec.model.stream, spec.model.stream_only_models)
        async with ChatClient(spec.endpoint, api_key, max_connections=concurrency, transport=transport,
                              streaming=streaming) as client:
            req_send, req_recv = anyio.create_memory_object_stream[Request](concurrency)
            # No buffer: a worker hands its result straight to the writer, which journals it before taking the
            # next, so a kill can lose at most one paid answer per worker (the rows in flight).
            res_send, res_recv = anyio.create_memory_object_stream[Result](0)
            try:
                async with anyio.create_task_group() as tg:
                    if handle_signals:
                        tg.start_soon(_watch_signals, stop, spec.run.drain_seconds, on_notice)
                    tg.start_soon(_produce, source, sink.done, counts, stop, req_send, res_send.clone())
                    # A 404 before anything worked stops the run, not every row; keys quoted back are removed.
                    guarded = EndpointGuard(client, dialect=spec.endpoint.dialect, job_model=spec.model.name,
                                            api_key=api_key)
                    lane = _Lane(guarded, policy, sleep, stop, limiter, retry_budget, spec.run.expected_output_tokens,
                                 prices, spend)
                    tg.start_soon(_run_workers, concurrency, lane, req_recv, res_send)
                    await _write_results(res_recv, sink, summary, on_result)
                    tg.cancel_scope.cancel()  # the signal watcher, which never ends by itself
            except BaseExceptionGroup as group:
                raise _first_runner_error(group) from None
        summary.wall_seconds = time.perf_counter() - started
        summary.changed_rows = counts.changed
        summary.throttled = limiter.throttled_by_code
        summary.paused_seconds = limiter.gate.paused_seconds
        summary.rate_control = limiter.describe()
        if stop.error is not None:
            sink.close()
            finished = True
            raise stop.error
        if stop.requested:
            sink.close()
            finished = True
            raise Interrupted(f"stopped by {stop.signal_name}: {len(sink.done) + summary.rows:,} rows are committed "
                              f"in {sink.parts_dir}", hint="run the same command again to finish the job")
        sink.finalize(counts.rows_seen)
        finished = True
    finally:
        if not finished:
            sink.close()
    return _final_summary(spec, summary)


async def _write_results(results: ObjectReceiveStream[Result], sink: ParquetSink, summary: RunSummary,
                         on_result: ResultCallback | None) -> None:
    async with results:
        while True:
            # Wake up when a part is due even if no result arrives (a slow tail of retries).
            with anyio.move_on_after(max(sink.seconds_until_due(), 0.05)):
                try:
                    result = await results.receive()
                except anyio.EndOfStream:
                    return
                sink.write(result)
                summary.add(result)
                if on_result is not None:
                    on_result(result)
                continue
            sink.flush()


def _final_summary(spec: JobSpec, run: RunSummary) -> RunSummary:
    """The output table's summary (every row, resumed ones too), with this run's wall time and requests."""
    table = summarize_file(spec.output.path) if run.skipped_done else run
    table.wall_seconds = run.wall_seconds if not run.skipped_done else None
    table.skipped_done = run.skipped_done
    table.throttled, table.paused_seconds, table.rate_control = run.throttled, run.paused_seconds, run.rate_control
    table.currency, table.total_rows = run.currency, run.total_rows
    table.output = str(spec.output.path)
    data = table.to_dict()
    data["this_run"] = {"rows": run.rows, "requests_sent": run.attempts, "changed_rows_resent": run.changed_rows,
                        "wall_seconds": round(run.wall_seconds or 0, 3),
                        "rows_per_second": round(run.rows / run.wall_seconds, 2) if run.wall_seconds else None}
    write_file_atomic(spec.output.summary_path, json.dumps(data, indent=2) + "\n")  # OS errors: SinkError
    return table
