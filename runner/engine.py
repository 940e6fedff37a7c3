"""run_job(): source -> bounded stream -> worker pool -> bounded stream -> sink -> summary.

A fixed pool of `concurrency` workers reads requests from a small bounded stream, so memory is
proportional to the rows in flight, never to the input. The writer (this task) commits results as
they arrive. Row failures become rows; a RunnerError from any worker (bad key, no money) stops
the whole run, keeps every committed row, and propagates to the caller.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Awaitable, Callable, Mapping

import anyio
import anyio.lowlevel
import httpx
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from .clients import ChatClient
from .endpoints import ApiKey, base_url, resolve_api_key
from .errors import RunnerError
from .limits import RetryPolicy, call_with_retries
from .records import STATUS_ERROR, STATUS_OK, Request, Result, result_schema
from .report import RunSummary, summarize_file
from .sink import ParquetSink, RowSet
from .sources import RequestSource, open_source
from .spec import JobSpec

ResultCallback = Callable[[Result], None]
StartCallback = Callable[[int | None, int], None]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def job_fingerprint(spec: JobSpec) -> dict[str, str]:
    """Everything that shapes a request, so a rerun only resumes the same job."""
    inp = spec.input
    try:
        stat = inp.path.stat()
        with open(inp.path, "rb") as fh:
            head = hashlib.sha256(fh.read(1 << 20)).hexdigest()[:16]
        identity = f"{inp.path.name}:{stat.st_size}:{head}"
    except OSError:
        identity = inp.path.name
    return {
        "input": identity,
        "rows": f"{inp.id_column}|{inp.prompt_column}|{inp.messages_column}|{inp.template}|{inp.system_prompt}",
        "overrides": f"{inp.model_column}|{inp.params_column}",
        "keep_columns": ",".join(inp.keep_columns),
        "endpoint": f"{spec.endpoint.dialect} {base_url(spec.endpoint)}",
        "model": spec.model.name,
        "params": json.dumps(dict(spec.model.params), sort_keys=True, default=str),
        "limit": str(spec.run.limit),
    }


def _ok_result(request: Request, outcome, started_at: datetime) -> Result:
    completion = outcome.completion
    return Result(row_id=request.row_id, key=request.key, model=request.model, status=STATUS_OK, kept=request.kept,
                  response=completion.content, reasoning=completion.reasoning,
                  finish_reason=completion.finish_reason, usage=completion.usage,
                  request_id=completion.request_id, http_status=completion.http_status,
                  attempts=outcome.attempts, latency_ms=outcome.last_latency_ms,
                  started_at=started_at, finished_at=_now())


def _error_result(request: Request, outcome, started_at: datetime) -> Result:
    error = outcome.error
    return Result(row_id=request.row_id, key=request.key, model=request.model, status=STATUS_ERROR,
                  kept=request.kept, request_id=error.request_id, error_type=error.error_type,
                  error_code=error.code, error_message=error.message, http_status=error.http_status,
                  attempts=outcome.attempts, latency_ms=outcome.last_latency_ms,
                  started_at=started_at, finished_at=_now())


def invalid_row_result(request: Request) -> Result:
    now = _now()
    return Result(row_id=request.row_id, key=request.key, model=request.model, status=STATUS_ERROR,
                  kept=request.kept, error_type="InvalidRow", error_code="invalid_row",
                  error_message=request.problem, attempts=0, started_at=now, finished_at=now)


@dataclass
class _Counts:
    rows_seen: int = 0


async def _produce(source: RequestSource, done: RowSet, counts: _Counts, requests: ObjectSendStream[Request],
                   results: ObjectSendStream[Result]) -> None:
    async with requests, results:
        for request in source:
            counts.rows_seen += 1
            if request.row_id in done:
                if counts.rows_seen % 1024 == 0:
                    await anyio.lowlevel.checkpoint()  # skipping a long done prefix must not starve the loop
                continue
            if request.problem is not None:
                await results.send(invalid_row_result(request))
            else:
                await requests.send(request)


async def _work(client: ChatClient, policy: RetryPolicy, sleep, requests: ObjectReceiveStream[Request],
                results: ObjectSendStream[Result]) -> None:
    async with requests, results:
        async for request in requests:
            started_at = _now()
            outcome = await call_with_retries(client.complete, request, policy, sleep=sleep)
            result = (_ok_result if outcome.completion is not None else _error_result)(request, outcome, started_at)
            await results.send(result)


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
                  on_start: StartCallback | None = None, overwrite: bool = False, restart: bool = False,
                  environ: Mapping[str, str] | None = None) -> RunSummary:
    """Run a job to completion; returns its summary. Raises RunnerError for run-level failures."""
    source = open_source(spec.input, spec.model, limit=spec.run.limit)
    if api_key is None:
        api_key = resolve_api_key(spec.endpoint, environ)
    sink = ParquetSink(spec.output.path, result_schema(source.kept_fields), fingerprint=job_fingerprint(spec),
                       part_rows=spec.run.part_rows, part_seconds=spec.run.part_seconds,
                       overwrite=overwrite, restart=restart)
    summary = RunSummary(output=str(spec.output.path), skipped_done=len(sink.done))
    if on_start is not None:
        on_start(source.total, len(sink.done))
    policy = RetryPolicy.from_spec(spec)
    concurrency = spec.run.concurrency
    counts = _Counts()
    started = time.perf_counter()
    finished = False
    try:
        async with ChatClient(spec.endpoint, api_key, max_connections=concurrency, transport=transport) as client:
            req_send, req_recv = anyio.create_memory_object_stream[Request](concurrency)
            res_send, res_recv = anyio.create_memory_object_stream[Result](concurrency)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_produce, source, sink.done, counts, req_send, res_send.clone())
                    async with req_recv, res_send:
                        for _ in range(concurrency):
                            tg.start_soon(_work, client, policy, sleep, req_recv.clone(), res_send.clone())
                    await _write_results(res_recv, sink, summary, on_result)
            except BaseExceptionGroup as group:
                raise _first_runner_error(group) from None
        summary.wall_seconds = time.perf_counter() - started
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
    table.output = str(spec.output.path)
    data = table.to_dict()
    data["this_run"] = {"rows": run.rows, "requests_sent": run.attempts,
                        "wall_seconds": round(run.wall_seconds or 0, 3),
                        "rows_per_second": round(run.rows / run.wall_seconds, 2) if run.wall_seconds else None}
    path = spec.output.summary_path
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return table
