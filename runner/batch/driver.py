"""run_batch_job(): the same job through the Batch API, into the same parts and output as online mode.

    plan (rows -> batch files) -> upload -> create -> poll -> download -> join (-> parts) -> finalize

Every step is recorded in the batch state before the next one starts, so a rerun after a kill or
Ctrl-C picks up where the last run was: it never plans a row that is in a pending batch, never
creates a batch whose create may have been carried out without looking for it first, and joins
what the last run downloaded. With `[run] batch_fallback_after`, batches still running at the
deadline are cancelled and every row a batch did not answer (expired, cancelled, a transient
error) is sent online by the online engine, once.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping

import anyio
import httpx

from ..cost import BudgetReached, PriceBook
from ..endpoints import ApiKey, resolve_api_key
from ..errors import Interrupted, RunnerError
from ..records import Result
from ..report import RunSummary
from ..sink import ParquetSink
from ..sources import open_source
from ..spec import JobSpec
from .api import BatchApi, BatchApiError
from .join import join_batch
from .render import covered_rows, plan_batches
from .state import BatchRecord, BatchState

FIRST_POLL_SECONDS = 2.0
POLL_GROWTH = 1.5
DS_NAME_CHARS = 100


def parts_dir_of(spec: JobSpec) -> Path:
    return spec.output.path.with_name(spec.output.path.name + ".parts")


def load_state(spec: JobSpec) -> BatchState:
    return BatchState.load(parts_dir_of(spec))


def guard_pending_batches(spec: JobSpec, *, restart: bool, online: bool) -> None:
    """Refuse what would pay for rows twice or lose batches: --restart while batches run, and an online
    run while batches of this job have answers not joined yet."""
    state = load_state(spec)
    job = spec.source or "JOB"
    if restart and state.live:
        live = state.live
        raise RunnerError(f"{spec.output.path}: {len(live)} batch(es) of this job are still running "
                          f"({', '.join(r.batch_id or '' for r in live)}); --restart would lose them",
                          hint=f"cancel them first with `runner cancel {job}`, or let them finish")
    if online and not restart and state.pending:
        raise RunnerError(f"{spec.output.path}: {len(state.pending)} batch(es) of this job are not joined yet; "
                          "sending their rows online would pay for them twice",
                          hint=f"run `runner run {job} --mode batch` to pick them up (or `runner cancel {job}` first), "
                               "then --mode online with --retry-failed for what they did not answer")


def batch_metadata(spec: JobSpec, record: BatchRecord) -> dict[str, str]:
    description = spec.run.batch_description or f"runner job {spec.name}: {record.name}, {record.rows} rows"
    return {"ds_name": spec.name[:DS_NAME_CHARS], "ds_description": description[:200]}


async def run_batch_job(spec: JobSpec, *, api_key: ApiKey | None = None,
                        transport: httpx.AsyncBaseTransport | None = None,
                        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
                        on_result: Callable[[Result], None] | None = None, on_start=None,
                        on_notice: Callable[[str], None] | None = None, overwrite: bool = False,
                        restart: bool = False, retry_failed: str = "none", reopen: bool = False,
                        handle_signals: bool = False,
                        environ: Mapping[str, str] | None = None,
                        clock: Callable[[], float] = time.time) -> RunSummary:
    """Run (or pick up) a job in batch mode; returns the output table's summary. `reopen`: a finished output
    may be taken back to send its failed rows again (see engine.run_job)."""
    from ..engine import _final_summary, open_sink, resume_notice, run_job

    notice = on_notice or (lambda message: None)
    source = open_source(spec.input, spec.model, limit=spec.run.limit)
    if api_key is None:
        api_key = resolve_api_key(spec.endpoint, environ)
    guard_pending_batches(spec, restart=restart, online=False)
    sink = open_sink(spec, source, overwrite=overwrite, restart=restart, retry_failed=retry_failed, reopen=reopen)
    prices = PriceBook(spec.endpoint.region, job_model=spec.model.name, overrides=spec.model.prices, batch=True)
    summary = RunSummary(output=str(spec.output.path), skipped_done=len(sink.done), currency=prices.currency,
                         total_rows=source.total)
    started = time.perf_counter()
    finished = False

    def record_result(result: Result) -> None:
        summary.add(result)
        if on_result is not None:
            on_result(result)

    def write_unsent(result: Result) -> None:
        sink.write(result)
        record_result(result)

    try:
        state = BatchState.load(sink.parts_dir)
        if sink.done and not state.records:
            notice(resume_notice(sink))
        if on_start is not None:
            on_start(source.total, len(sink.done), None)
        budget_left = None
        if spec.run.max_cost is not None:
            budget_left = spec.run.max_cost - sink.done_cost - sum(r.reserved_cost for r in state.pending)
        plan = plan_batches(source, done=sink.done, covered=covered_rows(state), state=state, run=spec.run,
                            kept_fields=source.kept_fields, write_unsent=write_unsent, prices=prices,
                            budget_left=budget_left)
        summary.changed_rows = plan.changed
        sink.flush()
        if plan.planned:
            notice(f"planned {plan.planned:,} rows into {len(state.pending)} batch file(s)")
        async with BatchApi(spec.endpoint, api_key, transport=transport, sleep=sleep) as api:
            tracker = _Tracker(spec, state, api, sink, prices, notice, record_result, sleep, clock)
            if handle_signals:
                await _until_signal(tracker.run, spec)
            else:
                await tracker.run()
        if plan.over_budget:
            raise BudgetReached(f"[run] max_cost {spec.run.max_cost:g} {prices.currency}: {plan.over_budget:,} rows "
                                "were not sent, their worst-case cost would cross it",
                                hint="raise --max-cost and run the same command again to send them")
        summary.wall_seconds = time.perf_counter() - started
        if spec.run.batch_fallback_after is not None:
            # The online engine skips every answered row and sends the rest (transient errors, rows a batch
            # did not run); with nothing to send it only writes the output.
            sink.close()
            finished = True
            notice("finishing online: sending the rows the batches did not answer")
            online = spec.override(mode="online")
            return await run_job(online, api_key=api_key, transport=transport, sleep=sleep, on_result=on_result,
                                 on_notice=on_notice, retry_failed="transient", handle_signals=handle_signals,
                                 environ=environ)
        sink.finalize(plan.rows_seen)
        finished = True
    finally:
        if not finished:
            sink.close()
    return _final_summary(spec, summary)


async def _until_signal(work: Callable[[], Awaitable[None]], spec: JobSpec) -> None:
    """Run `work`; on SIGINT/SIGTERM stop it and raise Interrupted (the batches keep running on the server)."""
    stopped_by: list[str] = []

    async def watch(scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                stopped_by.append(signal.Signals(signum).name)
                scope.cancel()
                return

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch, tg.cancel_scope)
        await work()
        tg.cancel_scope.cancel()
    if stopped_by:
        job = spec.source or "JOB"
        raise Interrupted(f"stopped by {stopped_by[0]}: the batches of this job keep running on the server and "
                          "everything received so far is committed",
                          hint=f"run the same command again to pick them up; `runner status {job}` shows them, "
                               f"`runner cancel {job}` cancels them")


class _Tracker:
    """Sends the planned batch files and follows every pending batch until its rows are joined."""

    def __init__(self, spec: JobSpec, state: BatchState, api: BatchApi, sink: ParquetSink, prices: PriceBook,
                 notice: Callable[[str], None], record_result: Callable[[Result], None],
                 sleep: Callable[[float], Awaitable[None]], clock: Callable[[], float]) -> None:
        self.spec, self.state, self.api, self.sink, self.prices = spec, state, api, sink, prices
        self.notice, self.record_result, self.sleep, self.clock = notice, record_result, sleep, clock

    async def run(self) -> None:
        interval = min(FIRST_POLL_SECONDS, self.spec.run.batch_poll_seconds)
        while self.state.pending:
            changed = False
            for record in self.state.pending:
                changed |= await self.advance(record)
            await self.fall_back_if_due()
            if not self.state.pending:
                break
            interval = min(FIRST_POLL_SECONDS, self.spec.run.batch_poll_seconds) if changed else \
                min(interval * POLL_GROWTH, self.spec.run.batch_poll_seconds)
            await self.sleep(interval)

    async def submit(self, record: BatchRecord) -> None:
        folder, state, api = self.state.folder, self.state, self.api
        if record.input_file_id is None:
            uploaded = await api.upload(record.input_path(folder))
            record.input_file_id = uploaded["id"]
            state.save()
        ds_name = batch_metadata(self.spec, record)["ds_name"]
        batch = await api.find(record.input_file_id, ds_name) if record.creating else None
        if batch is None:
            record.creating = True
            state.save()
            try:
                batch = await api.create(record.input_file_id, self.spec.run.completion_window,
                                         batch_metadata(self.spec, record))
            except BatchApiError as error:
                if error.transient:
                    batch = await api.find(record.input_file_id, ds_name)
                    if batch is None:
                        raise
                else:
                    record.creating = False
                    record.status = "rejected"
                    record.errors = [{"code": "batch_rejected", "message": error.message}]
                    state.save()
                    self.notice(f"{record.name}: the Batch API refused it ({error.message}); its rows are recorded "
                                "as failed (send them online with --mode online --retry-failed all)")
                    return
        record.batch_id = batch["id"]
        record.created_at = self.clock()
        record.creating = False
        record.update(batch)
        if state.first_created_at is None:
            state.first_created_at = record.created_at
        state.save()
        record.input_path(folder).unlink(missing_ok=True)
        self.notice(f"{record.name}: created {record.batch_id} ({record.model}, {record.rows:,} rows)")

    async def advance(self, record: BatchRecord) -> bool:
        """One step for one batch: create it, check it, download its files or join them. True if it moved."""
        changed = False
        if record.batch_id is None and record.status != "rejected":
            await self.submit(record)  # creates it, or records that the API refused it
            changed = True
        if record.status == "rejected":
            return self.join(record)
        if not record.terminal:
            changed |= record.update(await self.api.retrieve(record.batch_id))
            if changed:
                self.state.save()
                self.notice(record.describe())
        if record.terminal and not record.downloaded:
            folder = self.state.folder
            if record.output_file_id:
                await self.api.download(record.output_file_id, record.output_path(folder))
            if record.error_file_id:
                await self.api.download(record.error_file_id, record.errors_path(folder))
            record.downloaded = True
            self.state.save()
            changed = True
        if record.downloaded and not record.joined:
            changed |= self.join(record)
        return changed

    def join(self, record: BatchRecord) -> bool:
        folder = self.state.folder
        results = join_batch(record, folder, self.prices)
        self.sink.commit(results)
        for result in results:
            self.record_result(result)
        record.joined = True
        self.state.save()
        for path in (record.input_path(folder), record.output_path(folder), record.errors_path(folder)):
            path.unlink(missing_ok=True)
        ok = sum(r.ok for r in results)
        self.notice(f"{record.name}: joined {len(results):,} rows ({ok:,} answered, {len(results) - ok:,} failed)")
        return True

    async def fall_back_if_due(self) -> None:
        """Past [run] batch_fallback_after: cancel the batches still running (their rows go online)."""
        after = self.spec.run.batch_fallback_after
        first = self.state.first_created_at
        if after is None or first is None or self.clock() - first < after:
            return
        for record in self.state.live:
            if record.cancel_requested:
                continue
            try:
                record.update(await self.api.cancel(record.batch_id))
            except BatchApiError as error:
                if error.transient:
                    raise
                # It ended meanwhile (cancel is refused once a batch is finalizing or done).
            record.cancel_requested = True
            self.state.save()
            self.notice(f"{record.name}: past batch_fallback_after, cancelled {record.batch_id}; "
                        "its unanswered rows will be sent online")


def describe_batches(state: BatchState) -> list[dict[str, Any]]:
    return [{"name": r.name, "batch_id": r.batch_id, "model": r.model, "rows": r.rows, "status": r.status,
             "request_counts": r.request_counts, "joined": r.joined} for r in state.records]
