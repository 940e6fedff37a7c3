"""run_job(): one job, whatever sends its rows.

    check the endpoint -> guard pending batches -> source -> key -> sink -> prices, summary
        -> executor (online: the worker pool; batch: the Batch API; ray: actors on a Ray cluster) under the
           signal watcher
        -> finalize the output -> the summary file

What every mode shares lives here; how rows are sent lives in `runner.executors`, behind the small
protocol there (rows in, Results out, a way to stop). Batch mode's online finish comes back here: the
batch executor says its unanswered rows are left, and this module runs the job again online.
"""

from __future__ import annotations

import json
import signal
import time
from typing import Awaitable, Callable, Mapping

import anyio
import httpx

from .batch.pending import guard_pending_batches
from .cost import PriceBook
from .endpoints import ApiKey, base_url, check_base_url, resolve_api_key
from .executors import (Executor, Finish, JobRun, NoticeCallback, ResultCallback, StartCallback, Stop,
                        first_runner_error)
from .executors.batch import BatchExecutor
from .executors.online import OnlineExecutor
from .errors import SpecError
from .fanout import fans_out, provider_n_rule
from .files import write_file_atomic
from .records import result_schema
from .report import RunSummary, summarize_file
from .sink import ParquetSink
from .sources import RequestSource, open_source
from .spec import JobSpec
from . import structured

__all__ = ["run_job", "job_fingerprint", "open_sink", "executor_for", "ResultCallback", "StartCallback",
           "NoticeCallback"]


# What the fingerprint records for a `--emulator` rehearsal: the emulator takes a new port every run, and a
# rerun of the same rehearsal (after Ctrl-C, a budget stop, --retry-failed) must resume, not be refused.
EMULATOR_ENDPOINT = "the built-in emulator"


def job_fingerprint(spec: JobSpec) -> dict[str, str]:
    """Everything that shapes every request, so a rerun only resumes the same job. Changes to single
    input rows are caught row by row (Request.digest), so an edited or grown input resumes."""
    inp = spec.input
    fingerprint = {
        "input": inp.path.name,
        "rows": f"{inp.id_column}|{inp.prompt_column}|{inp.messages_column}|{inp.template}|{inp.system_prompt}",
        "overrides": f"{inp.model_column}|{inp.params_column}",
        "keep_columns": ",".join(inp.keep_columns),
        "endpoint": f"{spec.endpoint.dialect} "
                    f"{EMULATOR_ENDPOINT if spec.endpoint.emulator else base_url(spec.endpoint)}",
        "model": ",".join(spec.model.all_names),
        "params": json.dumps(dict(spec.model.params), sort_keys=True, default=str),
        "stream": f"{spec.model.stream} {','.join(spec.model.stream_only_models)}",
        **structured.fingerprint(spec),
    }
    if fans_out(inp, spec.model):  # only then: a job without fan-out keeps the fingerprint it always had
        fingerprint["fanout"] = json.dumps({"variants": [v.name for v in inp.variants], "samples": spec.model.samples,
                                            "model_params": {m: dict(p) for m, p in spec.model.model_params.items()}},
                                           sort_keys=True, default=str)
    return fingerprint


def open_sink(spec: JobSpec, source: RequestSource, *, overwrite: bool, restart: bool, retry_failed: str,
              reopen: bool) -> ParquetSink:
    """The job's output, its committed rows read back (every executor writes the same parts)."""
    schema = result_schema(source.kept_fields, structured.output_fields(spec))
    return ParquetSink(spec.output.path, schema, fingerprint=job_fingerprint(spec),
                       part_rows=spec.run.part_rows, part_seconds=spec.run.part_seconds, overwrite=overwrite,
                       restart=restart, retry_failed=retry_failed, reopen=reopen,
                       currency=PriceBook(spec.endpoint.region, job_model=spec.model.name, overrides={}).currency)


def executor_for(spec: JobSpec) -> Executor:
    """The executor of the job's [run] executor (or mode). Ray's is imported only when chosen: a run
    without it never pays for importing Ray, and works without the extra installed."""
    if spec.run.mode == "ray":
        try:
            from .executors.ray import RayExecutor
        except ImportError as exc:
            if (exc.name or "").split(".")[0] != "ray":
                raise  # a bug of ours, not a missing extra
            raise SpecError("[run] executor = \"ray\" needs Ray, which is not installed",
                            hint="pip install 'dashscope-batch-runner[ray]' (Ray 2.40 or newer)") from exc
        return RayExecutor(address=spec.run.ray_address)
    return BatchExecutor() if spec.run.mode == "batch" else OnlineExecutor()


def _quiet(message: str) -> None:
    pass


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
    executor = executor_for(spec)
    online = not isinstance(executor, BatchExecutor)
    if online:  # before the input is read: sending rows that pending batches hold would pay for them twice
        guard_pending_batches(spec, restart=restart, online=True)
    retry_failed = retry_failed or executor.default_retry_failed
    source = open_source(spec.input, spec.model, limit=spec.run.limit, provider_n=provider_n_rule(spec),
                         decorate=structured.decorator(spec))
    if api_key is None:
        api_key = resolve_api_key(spec.endpoint, environ)
    if not online:  # --restart must not lose the batches still running
        guard_pending_batches(spec, restart=restart, online=False)
    sink = open_sink(spec, source, overwrite=overwrite, restart=restart, retry_failed=retry_failed, reopen=reopen)
    finished = False
    try:
        prices = PriceBook(spec.endpoint.region, job_model=spec.model.name, overrides=spec.model.prices,
                           batch=executor.batch_prices)
        summary = RunSummary(output=str(spec.output.path), skipped_done=len(sink.done), currency=prices.currency,
                             total_rows=source.total)
        job = JobRun(spec, source, sink, summary, prices, api_key, transport, sleep, on_notice or _quiet,
                     on_result=on_result, on_start=on_start)
        started = time.perf_counter()
        finish = await _execute(executor, job, handle_signals)
        summary.wall_seconds = time.perf_counter() - started
        if finish.finish_online:
            # The online executor skips every answered row and sends the rest (transient errors, rows a batch
            # did not run); with nothing to send it only writes the output.
            sink.close()
            finished = True
            job.notice("finishing online: sending the rows the batches did not answer")
            return await run_job(spec.override(mode="online"), api_key=api_key, transport=transport, sleep=sleep,
                                 on_result=on_result, on_notice=on_notice, retry_failed="transient",
                                 handle_signals=handle_signals, environ=environ)
        sink.finalize(finish.rows_seen)
        finished = True
    finally:
        if not finished:
            sink.close()
    return _final_summary(spec, summary)


async def _execute(executor: Executor, job: JobRun, handle_signals: bool) -> Finish:
    stop = Stop()
    if not handle_signals:
        return await executor.run(job, stop)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch_signals, stop, executor.drains, job.spec.run.drain_seconds, job.notice)
            finish = await executor.run(job, stop)
            tg.cancel_scope.cancel()  # the signal watcher, which never ends by itself
    except BaseExceptionGroup as group:
        raise first_runner_error(group) from None
    return finish


async def _watch_signals(stop: Stop, drains: bool, drain_seconds: float, notice: NoticeCallback) -> None:
    """The first SIGINT/SIGTERM asks the executor to stop; one that drains gets `drain_seconds` (or until the
    next signal) before what is in flight is cancelled."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not stop.requested:
                stop.request(name)
                if drains:
                    notice(f"{name}: not starting new rows; finishing requests in flight for up to "
                           f"{drain_seconds:g} s (again to stop at once)")
                break
        if not drains:
            return
        with anyio.move_on_after(drain_seconds):
            async for signum in signals:
                notice(f"{signal.Signals(signum).name}: stopping now")
                break
        stop.now()
        async for _ in signals:  # until the run ends, further signals change nothing
            pass


def _final_summary(spec: JobSpec, run: RunSummary) -> RunSummary:
    """The output table's summary (every row, resumed ones too), with this run's wall time and requests."""
    table = summarize_file(spec.output.path) if run.skipped_done else run
    table.wall_seconds = run.wall_seconds if not run.skipped_done else None
    table.skipped_done = run.skipped_done
    table.throttled, table.paused_seconds, table.rate_control = run.throttled, run.paused_seconds, run.rate_control
    table.currency, table.total_rows = run.currency, run.total_rows
    table.output = str(spec.output.path)
    this_run = {"rows": run.rows, "requests_sent": run.attempts, "changed_rows_resent": run.changed_rows,
                "wall_seconds": round(run.wall_seconds or 0, 3),
                "rows_per_second": round(run.rows / run.wall_seconds, 2) if run.wall_seconds else None}
    if run.skipped_done:  # the table's time span holds every run and the gaps between: report this run's own
        table.this_run = this_run
    data = table.to_dict()
    data["this_run"] = this_run
    write_file_atomic(spec.output.summary_path, json.dumps(data, indent=2) + "\n")  # OS errors: SinkError
    return table
