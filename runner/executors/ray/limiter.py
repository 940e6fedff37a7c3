"""One account-wide rate limit and budget for every actor of a Ray run.

    SharedLimiter (one named async actor)           LeasedRateLimiter (one per row actor)
      LocalRateLimiter, handing slots out      <-   lease(model, tokens, want, reports): send times
        up to LEAD s before their turn
      CostBudget (when [run] max_cost is set)  <-   reserve_cost(amount, reports)
      the gate closes -> pause() to every actor ->  pause: hold, move leased send times back

The limiter actor runs the same LocalRateLimiter as a local run (token buckets, cool-down gate,
adaptive rate); its `acquire(lookahead=LEAD)` returns up to LEAD seconds before a slot's turn, so a
lease hands an actor the slots due over the next fraction of a second in one call, never one call a
request, and each request still goes out at its own turn (the actor waits for it).

Every answer is reported back (an actor batches its reports, at most one call per REPORT_SECONDS), so
the adaptive rate and the gate see every actor's throttling. When a report closes the gate, the
limiter tells every row actor at once (`pause`): requests already leased wait for the gate too, and
their send times move back by the pause, as a local run's pacing deadlines do.

Cross-process times are sent as delays ("in 0.3 s"), never as clock readings: machines' monotonic
clocks are not comparable.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from typing import Any

import anyio
from ray.exceptions import RayActorError

from ...cost import BudgetReached, CostBudget
from ...errors import RunnerError
from ...ratelimit import Limits, LocalRateLimiter, Sent, limits_table
from ...spec import RunSpec
from .. import Stopping

# How far ahead of its turn a slot may be handed out: covers a lease's round trip, with room to spare on a
# loaded machine. A lease collects slots for up to 3/4 of it, so its first slot is handed out LEAD/4 early.
LEAD = 0.4
class LimiterLost(RunnerError):
    """The shared limiter actor is gone: no actor may send without it (the account's limit would be overrun)."""

    exit_code = 1


def _lost(exc: RayActorError) -> LimiterLost:
    return LimiterLost(f"the Ray actor holding the shared rate limit was lost ({type(exc).__name__})",
                       hint="committed rows are kept; check the cluster (ray status) and run the same command again "
                            "to resume")


MAX_LEASE = 64  # slots one lease may carry
REPORT_SECONDS = 0.1  # an actor sends its buffered reports at most this often


class SharedLimiter:
    """The body of the limiter actor (made a Ray actor with `ray.remote` by the executor)."""

    def __init__(self, run: RunSpec, max_cost: float | None, currency: str, spent: float) -> None:
        self.limiter = LocalRateLimiter(
            limits_table(Limits(run.rpm, run.tpm), {m: Limits(*v) for m, v in run.limits.items()}),
            adaptive=run.adaptive_rate, cooldown_seconds=run.cooldown_seconds, cooldown_max=run.retry_after_max,
            concurrency=run.concurrency)
        self.spend: CostBudget | None = None
        if max_cost is not None:
            self.spend = CostBudget(max_cost, currency)
            self.spend.spent = spent
        self.stopping = False
        self._waits: set[anyio.CancelScope] = set()
        self._senders: list[Any] = []
        self.leases = 0
        self.slots = 0

    def set_senders(self, senders: list[Any]) -> None:
        """The row actors, told at once when the gate closes."""
        self._senders = list(senders)

    def stop(self) -> None:
        """The run is stopping: no slot and no budget is handed out any more (waiting leases end empty)."""
        self.stopping = True
        for scope in list(self._waits):
            scope.cancel()

    async def lease(self, model: str, tokens: int, want: int, reports: list) -> list[tuple[float, Sent]]:
        """Up to `want` slots for requests of about `tokens` tokens, as (seconds from now until it may be
        sent, what its report takes); empty once the run is stopping."""
        self.report(reports)
        limiter = self.limiter
        slots: list[Sent] = []
        with anyio.CancelScope() as scope:
            self._waits.add(scope)
            try:
                slots.append(await limiter.acquire(model, tokens, lookahead=LEAD))
                # More slots while the first can still wait: the acquire that would make it late is cancelled
                # (which gives its slot back). A startup window that is full ends the lease the same way.
                with anyio.move_on_after(slots[0].at - LEAD / 4 - time.monotonic()):
                    while len(slots) < min(want, MAX_LEASE):
                        slots.append(await limiter.acquire(model, tokens, lookahead=LEAD))
            finally:
                self._waits.discard(scope)
        if self.stopping:  # slots taken and not handed out: answered as unsent, so the counters stay right
            for sent in slots:
                self.limiter.settle(model, -tokens)
                self.limiter.report_failure(model, sent)
            return []
        self.leases += 1
        self.slots += len(slots)
        now = time.monotonic()
        return [(sent.at - now, sent) for sent in slots]

    def report(self, reports: list) -> None:
        """An actor's buffered reports, in the order they happened: settle, answers, the budget."""
        paused = self.limiter.gate.paused_seconds
        limiter = self.limiter
        for kind, *args in reports:
            if kind == "settle":
                limiter.settle(*args)
            elif kind == "success":
                limiter.report_success(*args)
            elif kind == "throttled":
                limiter.report_throttled(*args)
            elif kind == "failure":
                limiter.report_failure(*args)
            elif kind == "cost" and self.spend is not None:
                self.spend.settle(*args)
        if limiter.gate.paused_seconds > paused:
            for sender in self._senders:  # every actor holds its leased requests for the gate too
                sender.pause.remote(limiter.gate.wait_seconds(), limiter.gate.paused_seconds)

    async def reserve_cost(self, amount: float, reports: list) -> tuple[str, str | None] | None:
        """Reserve a request's worst-case cost; None when it fits, else BudgetReached's message and hint
        (or ("stopping", None) once the run is stopping)."""
        self.report(reports)
        if self.spend is None:
            return None
        with anyio.CancelScope() as scope:
            self._waits.add(scope)
            try:
                await self.spend.reserve(amount)
                return None
            except BudgetReached as error:
                return error.message, error.hint
            finally:
                self._waits.discard(scope)
        return "stopping", None

    def counters(self) -> dict:
        """What a progress display shows: throttled answers by code, seconds paused, the pace."""
        return {"throttled_by_code": dict(self.limiter.throttled_by_code),
                "paused_seconds": self.limiter.gate.paused_seconds, "rate_label": self.limiter.rate_label(),
                "spent": self.spend.spent if self.spend is not None else None}

    def describe(self) -> dict:
        """The summary's rate_control, and the lease counts (how many calls the slots took)."""
        return {"rate_control": self.limiter.describe(), "leases": self.leases, "slots": self.slots,
                **self.counters()}


class LeasedRateLimiter:
    """A row actor's side of the shared limit, with the same five calls as LocalRateLimiter (acquire,
    settle, report_success/throttled/failure), so RowSender runs unchanged on it. It also serves
    RowSender's budget (`reserve`, `settle_cost`) through the same actor."""

    def __init__(self, shared: Any) -> None:
        self._shared = shared
        self._slots: dict[str, deque[tuple[float, float, int, Sent]]] = {}  # model -> (send at, paused then, tokens, sent)
        self._waiting: Counter = Counter()
        self._leasing: dict[str, anyio.Event] = {}
        self._reports: list = []
        self._report_due = asyncio.Event()
        self._flusher: asyncio.Task | None = None
        self._gate_until = float("-inf")
        self._paused = 0.0  # the shared gate's paused_seconds, as last heard: leased send times move by its growth
        self.stopped = False

    # -- the RateLimiter protocol --------------------------------------------------------------
    async def acquire(self, model: str, tokens: int) -> Sent:
        self._start_flusher()
        self._waiting[model] += 1
        try:
            while True:
                queue = self._slots.setdefault(model, deque())
                if queue:
                    slot = queue.popleft()
                    break
                if self.stopped:
                    raise Stopping
                leasing = self._leasing.get(model)
                if leasing is not None:
                    await leasing.wait()
                    continue
                await self._lease(model, tokens)
        finally:
            self._waiting[model] -= 1
        send_at, paused_then, leased_tokens, sent = slot
        try:
            while (wait := max(send_at + (self._paused - paused_then), self._gate_until) - time.monotonic()) > 0:
                await anyio.sleep(wait)
        except BaseException:
            self._slots[model].appendleft(slot)  # not used: the next request takes it
            raise
        if tokens != leased_tokens:
            self.settle(model, tokens - leased_tokens)
        return sent

    def settle(self, model: str, delta_tokens: int) -> None:
        if delta_tokens:
            self._report(("settle", model, delta_tokens))

    def report_success(self, model: str, sent: Sent) -> None:
        self._report(("success", model, sent))

    def report_throttled(self, model: str, code: str | None, retry_after: float | None, sent: Sent) -> None:
        self._report(("throttled", model, code, retry_after, sent))

    def report_failure(self, model: str, sent: Sent, retry_after: float | None = None) -> None:
        self._report(("failure", model, sent, retry_after))

    # -- the budget (RowSender's `spend`) -----------------------------------------------------
    async def reserve(self, amount: float) -> None:
        self._start_flusher()
        reports, self._reports = self._reports, []
        try:
            refused = await self._shared.reserve_cost.remote(amount, reports)
        except RayActorError as exc:
            raise _lost(exc) from exc
        if refused is None:
            return
        message, hint = refused
        if message == "stopping":
            raise Stopping
        raise BudgetReached(message, hint=hint)

    def settle_cost(self, reserved: float, actual: float | None) -> None:
        self._report(("cost", reserved, actual))

    # -- what the limiter actor and the row actor tell it ---------------------------------------
    def pause(self, open_in: float, paused_seconds: float) -> None:
        """The shared gate closed: hold everything for `open_in` seconds, and move leased send times back."""
        self._gate_until = max(self._gate_until, time.monotonic() + open_in)
        self._paused = max(self._paused, paused_seconds)

    def stop(self) -> None:
        self.stopped = True

    async def flush(self) -> None:
        """Send the buffered reports now (and wait until the limiter has them)."""
        reports, self._reports = self._reports, []
        if reports:
            try:
                await self._shared.report.remote(reports)
            except RayActorError:
                pass  # only counts for the summary were lost

    # -- inside ----------------------------------------------------------------------------
    async def _lease(self, model: str, tokens: int) -> None:
        event = self._leasing[model] = anyio.Event()
        try:
            reports, self._reports = self._reports, []
            try:
                granted = await self._shared.lease.remote(model, tokens, self._waiting[model], reports)
            except RayActorError as exc:
                raise _lost(exc) from exc
        finally:
            del self._leasing[model]
            event.set()
        if not granted:
            self.stopped = True
            return
        now = time.monotonic()
        queue = self._slots.setdefault(model, deque())
        queue.extend((now + delay, self._paused, tokens, sent) for delay, sent in granted)

    def _report(self, report: tuple) -> None:
        self._reports.append(report)
        self._report_due.set()

    def _start_flusher(self) -> None:
        # One task for the actor's life, in the actor's own event loop (started on first use: an actor's
        # constructor runs outside it). Ray ends it with the actor.
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        while True:
            await self._report_due.wait()
            await asyncio.sleep(REPORT_SECONDS)  # collect what else happens meanwhile into the same call
            self._report_due.clear()
            reports, self._reports = self._reports, []
            if reports:
                self._shared.report.remote(reports)  # ordered after this actor's earlier calls; no need to wait
