"""The batch executor: a job's rows through DashScope's Batch API (API facts 7), at batch prices, into the
same parts and output as online mode.

    plan (rows -> batch files) -> upload -> create -> poll -> download -> join (-> parts)

Every step is recorded in the batch state before the next one starts, so a rerun after a kill or
Ctrl-C picks up where the last run was: it never plans a row that is in a pending batch, never
creates a batch whose create may have been carried out without looking for it first, and joins
what the last run downloaded. With `[run] batch_fallback_after`, batches still running at the
deadline are cancelled, and the Finish says the rows a batch did not answer (expired, cancelled, a
transient error) are left for the online executor, which the job then runs once.
The Batch API pieces (render, api, state, join) live in `runner.batch`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Awaitable, Callable

from ..batch.api import BatchApi, BatchApiError
from ..batch.join import join_batch
from ..batch.render import covered_rows, plan_batches
from ..batch.pending import forget_emulator_batches, recorded_endpoint, status_and_cancel_hint
from ..batch.state import BatchRecord, BatchState
from ..cost import BudgetReached, PriceBook
from ..errors import Interrupted
from .. import structured
from . import Finish, JobRun, Stop

if TYPE_CHECKING:
    from ..spec import JobSpec

FIRST_POLL_SECONDS = 2.0
POLL_GROWTH = 1.5
DS_NAME_CHARS = 100


def batch_metadata(spec: JobSpec, record: BatchRecord) -> dict[str, str]:
    description = spec.run.batch_description or f"runner job {spec.name}: {record.name}, {record.rows} rows"
    return {"ds_name": spec.name[:DS_NAME_CHARS], "ds_description": description[:200]}


class BatchExecutor:
    """Plans the rows not done into batch files and follows every pending batch until it is joined.
    A stop ends it at once: the batches keep running on the server and a rerun picks them up."""

    default_retry_failed = "none"  # a failed row is sent again only on request
    batch_prices = True
    drains = False

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock

    async def run(self, job: JobRun, stop: Stop) -> Finish:
        spec, source, sink = job.spec, job.source, job.sink
        state = BatchState.load(sink.parts_dir)
        freed = forget_emulator_batches(spec, state)
        if freed:
            job.notice(f"{freed:,} rows were in batches of an earlier rehearsal's emulator, gone with it: "
                       "sending them again")
        state.endpoint = recorded_endpoint(spec)  # saved with the next change, before any batch is created
        if not state.records:
            job.announce_resume()
        job.started(None)
        budget_left = None
        if spec.run.max_cost is not None:
            budget_left = spec.run.max_cost - sink.done_cost - sum(r.reserved_cost for r in state.pending)
        plan = plan_batches(source, done=sink.done, covered=covered_rows(state), state=state, run=spec.run,
                            kept_fields=source.kept_fields, write_unsent=job.write, prices=job.prices,
                            budget_left=budget_left)
        job.summary.changed_rows = plan.changed
        sink.flush()
        if plan.planned:
            job.notice(f"planned {plan.planned:,} rows into {len(state.pending)} batch file(s)")
        async with BatchApi(spec.endpoint, job.api_key, transport=job.transport, sleep=job.sleep) as api:
            tracker = _Tracker(spec, state, api, job, self.clock)
            with stop.cancelled_on_request():
                await tracker.run()
        if stop.requested:
            where = "end with this rehearsal's emulator (a rerun sends their rows again)" if spec.endpoint.emulator \
                else "keep running on the server"
            raise Interrupted(f"stopped by {stop.signal_name}: the batches of this job {where} "
                              "and everything received so far is committed",
                              hint=f"run the same command again to pick them up; {status_and_cancel_hint(spec)}")
        if plan.over_budget:
            raise BudgetReached(f"[run] max_cost {spec.run.max_cost:g} {job.prices.currency}: {plan.over_budget:,} "
                                "rows were not sent, their worst-case cost would cross it",
                                hint="raise --max-cost and run the same command again to send them")
        return Finish(rows_seen=plan.rows_seen, finish_online=spec.run.batch_fallback_after is not None)


class _Tracker:
    """Sends the planned batch files and follows every pending batch until its rows are joined."""

    def __init__(self, spec: JobSpec, state: BatchState, api: BatchApi, job: JobRun,
                 clock: Callable[[], float]) -> None:
        self.spec, self.state, self.api, self.job, self.clock = spec, state, api, job, clock
        self.prices: PriceBook = job.prices
        self.notice: Callable[[str], None] = job.notice
        self.sleep: Callable[[float], Awaitable[None]] = job.sleep
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
        checker = structured.for_job(self.spec)
        if checker is not None:  # answers that do not validate are InvalidOutput (no re-ask inside a batch)
            results = structured.check_batch_results(results, checker)
        self.job.commit(results)
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
