"""Executors: the ways a job's rows are sent, behind one small protocol.

    rows in   `JobRun.source` (the rows not in `JobRun.sink.done` are still to send)
    Results   `JobRun.write` / `JobRun.commit`: committed to the job's parts, counted, shown
    stop      `Stop`: the job's signal watcher asks it; what stopping means is the executor's

`runner.job` opens what every mode shares (source, key, sink, prices, summary), hands it to an
executor and finalizes what comes back. Executors are peers: they never import `runner.job` or each
other; what one cannot finish itself (batch mode's online finish) it hands back in its `Finish`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Iterator, Protocol

import anyio

from ..errors import Interrupted, RunnerError

if TYPE_CHECKING:
    import httpx
    from anyio.abc import ObjectReceiveStream

    from ..cost import PriceBook
    from ..endpoints import ApiKey
    from ..records import Result
    from ..report import RunSummary
    from ..sink import ParquetSink
    from ..sources import RequestSource
    from ..spec import JobSpec

ResultCallback = Callable[["Result"], None]
# total rows, rows already done, live counters (the rate limiter, or None), what the rows already done cost
StartCallback = Callable[[int | None, int, Any, float], None]
NoticeCallback = Callable[[str], None]


@dataclass
class JobRun:
    """What the job opened for an executor, and where the executor's Results go."""

    spec: JobSpec
    source: RequestSource
    sink: ParquetSink
    summary: RunSummary
    prices: PriceBook
    api_key: ApiKey
    transport: httpx.AsyncBaseTransport | None
    sleep: Callable[[float], Awaitable[None]]
    notice: NoticeCallback
    on_result: ResultCallback | None = None
    on_start: StartCallback | None = None

    def write(self, result: Result) -> None:
        """One Result: journaled into the job's parts, counted in the summary, shown to the caller."""
        self.sink.write(result)
        self._record(result)

    def commit(self, results: Iterable[Result]) -> None:
        """Many Results committed as one part (a joined batch), then counted and shown."""
        results = list(results)
        self.sink.commit(results)
        for result in results:
            self._record(result)

    def _record(self, result: Result) -> None:
        self.summary.add(result)
        if self.on_result is not None:
            self.on_result(result)

    def started(self, counters: Any = None) -> None:
        """Tell the caller the run starts: rows in total, rows already done, live counters (the rate limiter),
        and what the rows already done cost (so a progress display can project the whole job)."""
        if self.on_start is not None:
            self.on_start(self.source.total, len(self.sink.done), counters, self.sink.done_cost)

    def announce_resume(self) -> None:
        """Say how much an earlier run left done, if anything."""
        sink = self.sink
        if not sink.done:
            return
        recovered = f" ({sink.recovered_from_journal:,} recovered from the journal)" if sink.recovered_from_journal \
            else ""
        self.notice(f"{'reopened the finished output' if sink.reopened else 'resuming'}: {len(sink.done):,} rows "
                    f"already done{recovered}")


@dataclass
class Finish:
    """What an executor hands back when it ran to its end."""

    rows_seen: int  # rows the source yielded, so the output can be checked to hold them all
    finish_online: bool = False  # rows it did not answer are left for the online executor, run by the job


class Executor(Protocol):
    """A way to send a job's rows. `run` sends what is not done, writes every Result through `job`, and
    raises RunnerError for a run-level failure, Interrupted once `stop` was requested."""

    default_retry_failed: str  # which failed rows of an earlier run are sent again unless asked
    batch_prices: bool  # rows are charged at batch prices
    drains: bool  # a stop lets requests in flight finish (then `Stop.now`); otherwise it ends the run at once

    async def run(self, job: JobRun, stop: Stop) -> Finish: ...


class Stopping(Exception):
    """Raised in a wait before sending once the run is stopping: the row is left for the rerun."""


class Stop:
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
    def cancelled_on_request(self) -> Iterator[anyio.CancelScope]:
        """Work that simply ends once the run is stopping (the caller checks `requested` afterwards)."""
        with anyio.CancelScope() as scope:
            if self.requested:
                scope.cancel()
            self._waits.add(scope)
            try:
                yield scope
            finally:
                self._waits.discard(scope)

    @contextmanager
    def abortable(self) -> Iterator[None]:
        """A wait before sending (the limiter, the budget, a backoff) that ends in Stopping once the run stops."""
        if self.requested:
            raise Stopping
        with anyio.CancelScope() as scope:  # cancelled_on_request, inlined: this is on every request's path
            self._waits.add(scope)
            try:
                yield
            finally:
                self._waits.discard(scope)
        if scope.cancel_called:
            raise Stopping

    def raise_if_stopped(self, committed: int, parts_dir: Any) -> None:
        """At an executor's end: the run-level error that stopped it, or Interrupted when a signal did
        (`committed` rows are in `parts_dir`); nothing when it ran to the end."""
        if self.error is not None:
            raise self.error
        if self.requested:
            raise Interrupted(f"stopped by {self.signal_name}: {committed:,} rows are committed in {parts_dir}",
                              hint="run the same command again to finish the job")

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


def first_runner_error(group: BaseExceptionGroup) -> BaseException:
    """The RunnerError a task group's exceptions carry (what the caller should see), else the group."""
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            found = first_runner_error(error)
            if isinstance(found, RunnerError):
                return found
        elif isinstance(error, RunnerError):
            return error
    return group


async def commit_as_they_come(results: "ObjectReceiveStream[Result]", job: JobRun,
                              keep: Callable[["Result"], bool] | None = None) -> None:
    """An executor's writer: commit each result as it arrives (those `keep` accepts), and flush a part when
    one is due even if no result arrives (a slow tail of retries)."""
    sink = job.sink
    async with results:
        while True:
            with anyio.move_on_after(max(sink.seconds_until_due(), 0.05)):
                try:
                    result = await results.receive()
                except anyio.EndOfStream:
                    return
                if keep is None or keep(result):
                    job.write(result)
                continue
            sink.flush()
