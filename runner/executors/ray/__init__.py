"""The Ray executor: the job's rows sent by actors on a Ray cluster, committed by the driver.

    driver: source -> rows not done -> dispatchers (one per batch slot of each actor)
                                          | actor.send(batch): a streaming call
    row actors (async, SPREAD over nodes): RowSender.results_of per row, as online
                                          | rows answered, as they finish
    driver: writer -> JobRun.write (journal, parts) -> the same output, summary and exit codes
    limiter actor (named, async): the account's RPM/TPM buckets, gate, adaptive rate and budget,
                                  leased to the row actors in chunks (see limiter.py)

Where the rows come from. The driver reads the input with the job's own RequestSource and ships
rows in small batches, instead of reading it with Ray Data: row identity (row_id is the position in
the file), keys, templates, invalid rows, every input format (CSV, JSON arrays, gzip) and resume's
done rows (skipped by position and request digest) are the source's semantics, and a Ray Data read
has none of them (blocks come back in any order, without positions). Measured on this 2-core machine
with 200,000 rows of Parquet: RequestSource builds 70,900 requests/s on the driver; Ray Data's
read_parquet + iter_batches moved 14,400 rows/s (23,900 with a map_batches stage) before any
request was built, after a ray.init of 6-12 s. The fastest DashScope account allows 30,000 RPM
(500 requests/s), so the driver's reader has ~140 times the headroom the endpoint can use, and the
actors, not the reader, are what fans out. The cost: the input must be readable by the driver (a
local path, or a shared mount on a cluster).

Exactly once. The driver is the only writer: every answer goes through JobRun.write, keyed by row,
into the same journal and parts as online, so a killed driver loses at most the rows in flight
(never more than [run] concurrency; a rerun sends only what is missing), and a row answered twice
in one run (an actor lost after answering it) is committed once. A lost actor is restarted by Ray;
the rows it had not answered are sent again.

Stopping: the first signal stops the producer and the dispatchers, and tells the limiter and every
actor, so no new request is sent; requests in flight finish and are committed (the drain); the
second signal, or the drain deadline, drops what is still in flight.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

import anyio
import anyio.lowlevel
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from .cluster import ray_session  # first: it sets how Ray binds before Ray is imported
import ray  # noqa: E402, I001
from ray.exceptions import RayActorError  # noqa: E402

from ...cost import NoPrice  # noqa: E402
from ...errors import RunnerError  # noqa: E402
from ...records import Request, Result  # noqa: E402
from ...row_sender import SourceCounts, feed  # noqa: E402
from .. import Finish, JobRun, Stop, commit_as_they_come, first_runner_error  # noqa: E402
from .limiter import SharedLimiter
from .sender import RowActor, SealedKey, rebuild

MAX_BATCH = 16  # rows per call to an actor; smaller when an actor's share of the concurrency is small
ACTOR_LOSSES = 5  # times one batch may lose its actor before the run stops
ROWS_PER_ACTOR = 8  # by default an actor per this many rows in flight, up to the cluster's CPUs


class ActorsLost(RunnerError):
    """Row actors keep dying: the cluster cannot run the job."""

    exit_code = 1


@dataclass
class _Counts(SourceCounts):
    resent_after_loss: int = 0
    duplicates: int = 0
    sent: dict[int, float] = field(default_factory=dict)  # row_id -> when handed to an actor (oldest first)


class ClusterCounters:
    """What a progress display reads from a limiter (in_flight, throttled_by_code, gate.paused_seconds,
    rate_label), for a run whose limiter lives in an actor: rows in flight are the driver's own count,
    the rest is polled from the limiter actor about once a second."""

    def __init__(self, counts: _Counts) -> None:
        self._counts = counts
        self.throttled_by_code: Counter = Counter()
        self.gate = SimpleNamespace(paused_seconds=0.0)
        self._rate = "none"

    def update(self, counters: dict) -> None:
        self.throttled_by_code = Counter(counters["throttled_by_code"])
        self.gate.paused_seconds = counters["paused_seconds"]
        self._rate = counters["rate_label"]

    def in_flight(self) -> tuple[int, float | None]:
        sent = self._counts.sent
        oldest = next(iter(sent.values()), None)
        return len(sent), (time.monotonic() - oldest if oldest is not None else None)

    def rate_label(self) -> str:
        return self._rate


class RayExecutor:
    """Sends each row as its own request, from actors on a Ray cluster (see the module docstring)."""

    default_retry_failed = "transient"
    batch_prices = False
    drains = True

    def __init__(self, address: str | None = None) -> None:
        self.address = address

    async def run(self, job: JobRun, stop: Stop) -> Finish:
        spec, prices = job.spec, job.prices
        if spec.run.max_cost is not None:
            for model in spec.model.all_names:
                if prices.price(model) is None:
                    raise NoPrice(f"no price for model {model!r} in {prices.region}, so [run] max_cost cannot "
                                  "be guaranteed", hint="set [model] price_input and price_output (per 1M tokens)")
        job.announce_resume()
        with ray_session(self.address, spec.run.ray_runtime_env):
            return await self._run(job, stop)

    async def _run(self, job: JobRun, stop: Stop) -> Finish:
        spec, sink, summary = job.spec, job.sink, job.summary
        concurrency = spec.run.concurrency
        actors = _default_actors(concurrency)
        shares = [concurrency // actors + (i < concurrency % actors) for i in range(actors)]
        key = _key_for_actors(job)
        limiter_name = f"limiter-{spec.name}-{time.time_ns()}"
        shared = ray.remote(SharedLimiter).options(name=limiter_name, max_concurrency=10_000, num_cpus=0
                                                   ).remote(spec.run, spec.run.max_cost, job.prices.currency,
                                                            sink.done_cost)
        row_actor = ray.remote(RowActor)
        handles = [row_actor.options(max_concurrency=10_000, num_cpus=0, max_restarts=-1, max_task_retries=0,
                                     scheduling_strategy="SPREAD").remote(spec, limiter_name, key, share)
                   for share in shares]
        counts = _Counts()
        counters = ClusterCounters(counts)
        try:
            await shared.set_senders.remote(handles)
            job.started(counters)
            requests_send, requests_recv = anyio.create_memory_object_stream[Request](concurrency)
            results_send, results_recv = anyio.create_memory_object_stream[Result](0)
            try:
                async with anyio.create_task_group() as background:
                    background.start_soon(_tell_actors_on_stop, stop, shared, handles)
                    background.start_soon(_poll_counters, shared, counters)
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(feed, job.source, sink.done, counts, stop, requests_send,
                                      results_send.clone())
                        tg.start_soon(_dispatch_all, handles, shares, stop, counts, job.notice, requests_recv,
                                      results_send)
                        await commit_as_they_come(results_recv, job, _once_per_row(counts))
                    background.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                raise first_runner_error(group) from None
            with anyio.move_on_after(10):  # the summary's counts; a lost actor must not hold the run
                for handle in handles:
                    try:
                        await handle.finish.remote()
                    except RayActorError:
                        pass
                try:
                    described = await shared.describe.remote()
                except RayActorError:  # the run's error says so
                    described = None
                if described is not None:
                    counters.update(described)
                    summary.rate_control = described["rate_control"]
                    job.notice(f"ray: {actors} row actors; {described['slots']:,} requests took "
                               f"{described['leases']:,} leases from the shared limiter")
        finally:
            for handle in handles:  # the run's actors end with it, also on a cluster that outlives it
                ray.kill(handle)
            ray.kill(shared)
        summary.changed_rows = counts.changed
        summary.throttled = counters.throttled_by_code
        summary.paused_seconds = counters.gate.paused_seconds
        if counts.resent_after_loss:
            job.notice(f"{counts.resent_after_loss:,} rows were sent again after their Ray actor was lost"
                       + (f"; {counts.duplicates:,} answers came twice and were committed once"
                          if counts.duplicates else ""))
        stop.raise_if_stopped(len(sink.done) + summary.rows, sink.parts_dir)
        return Finish(rows_seen=counts.rows_seen)


def _default_actors(concurrency: int) -> int:
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(cpus, math.ceil(concurrency / ROWS_PER_ACTOR)))


def _key_for_actors(job: JobRun) -> SealedKey:
    """The key the driver resolved, for the actors: a cluster's workers do not have the driver's environment
    or files. It travels as an actor argument (in the cluster's memory for the run's life), never printed."""
    return SealedKey(job.api_key.reveal())


async def _dispatch_all(handles: list[Any], shares: list[int], stop: Stop, counts: _Counts, notice,
                        requests: ObjectReceiveStream[Request], results: ObjectSendStream[Result]) -> None:
    """Per actor, enough batch slots to keep its share of the concurrency busy; no more rows in flight in
    all than [run] concurrency."""
    async with requests, results:
        async with anyio.create_task_group() as tg:
            stop.work_scope = tg.cancel_scope
            for handle, share in zip(handles, shares):
                batch = max(1, min(MAX_BATCH, share // 2))
                for start in range(0, share, batch):
                    tg.start_soon(_dispatch, handle, min(batch, share - start), stop, counts, notice,
                                  requests.clone(), results.clone())


async def _dispatch(handle: Any, size: int, stop: Stop, counts: _Counts, notice,
                    requests: ObjectReceiveStream[Request], results: ObjectSendStream[Result]) -> None:
    async with requests, results:
        while not stop.requested:
            try:
                batch = [await requests.receive()]
            except anyio.EndOfStream:
                return
            while len(batch) < size:  # what is already waiting; a batch is never held back to fill up
                try:
                    batch.append(requests.receive_nowait())
                except (anyio.WouldBlock, anyio.EndOfStream):
                    break
            if stop.requested:
                return  # taken after the stop: left for the rerun
            await _send_batch(handle, batch, stop, counts, notice, results)


async def _send_batch(handle: Any, batch: list[Request], stop: Stop, counts: _Counts, notice,
                      results: ObjectSendStream[Result]) -> None:
    """One batch through one actor. Rows answered go to the writer as they come; if the actor is lost, the
    rows it had not answered are sent again (to it, restarted by Ray) unless the run is stopping."""
    pending = {request.row_id: request for request in batch}
    now = time.monotonic()
    for row_id in pending:
        counts.sent[row_id] = now
    losses = 0
    try:
        while pending:
            try:
                async for ref in handle.send.remote(list(pending.values())):
                    answered, error = await ref
                    for row_id, rows in answered:
                        pending.pop(row_id, None)
                        counts.sent.pop(row_id, None)
                        for row in rows:
                            await results.send(row)
                    if error is not None:
                        failure = rebuild(error)
                        if not isinstance(failure, RunnerError):
                            raise failure
                        stop.fail(failure)
                return  # the call ended: rows it did not answer were left by a stopping run
            except RayActorError as exc:
                losses += 1
                if stop.requested:
                    return
                if losses > ACTOR_LOSSES:
                    stop.fail(ActorsLost(f"a Ray row actor was lost {losses} times running the same rows "
                                         f"({type(exc).__name__})",
                                         hint="check the cluster (ray status); committed rows are kept, run the "
                                              "same command again to resume"))
                    return
                counts.resent_after_loss += len(pending)
                notice(f"a Ray row actor was lost ({type(exc).__name__}); sending its {len(pending)} unanswered "
                       "rows again")
                with stop.cancelled_on_request():
                    await anyio.sleep(min(2.0 ** losses * 0.25, 10.0))  # while Ray restarts it
    finally:
        for row_id in pending:
            counts.sent.pop(row_id, None)


def _once_per_row(counts: _Counts) -> Callable[[Result], bool]:
    """Whether a result is the first this run has for its row: a re-executed row (an actor lost after
    answering) is committed once."""
    written = bytearray()

    def first(result: Result) -> bool:
        row = result.row_id
        if row < len(written) and written[row]:
            counts.duplicates += 1
            return False
        if row >= len(written):
            written.extend(bytes(max(row + 1 - len(written), len(written))))
        written[row] = 1
        return True

    return first


async def _tell_actors_on_stop(stop: Stop, shared: Any, handles: list[Any]) -> None:
    await stop.event.wait()
    shared.stop.remote()
    for handle in handles:
        handle.stop.remote()


async def _poll_counters(shared: Any, counters: ClusterCounters) -> None:
    while True:
        try:
            counters.update(await shared.counters.remote())
        except RayActorError:
            return
        await anyio.sleep(1.0)
