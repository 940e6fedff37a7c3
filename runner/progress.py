"""Progress of a run on stderr: a bar on a terminal, log lines in a cron/CI log, or nothing.

    run_job callbacks (start, result, notice) -> Progress <- heartbeat (a task next to run_job)

Every figure is computed here from one Snapshot, so the bar, the text log line and the JSON log line
agree. Rows done and the cost are cumulative over resumed runs (the output's rows); ok/failed count this
run's rows, and say so. The heartbeat ticks twice a second even when no result arrives, so a tail of
hung requests shows its in-flight count and oldest age and log lines keep coming.

JSON log lines (`--log-format json`), one object a line, with these keys (stable; null when unknown):

    ts                        UTC time, ISO 8601
    event                     "start", "progress" (every --log-every seconds) or "end"
    rows_done, rows_total     rows in the output so far (earlier runs' included) / in the input
    rows_this_run             rows this run answered or failed
    ok_this_run, failed_this_run
    rows_per_second, requests_per_second, tokens_per_second   this run's averages
    throttled                 429s this run
    in_flight                 requests sent and not answered yet
    oldest_in_flight_seconds  the age of the oldest of them
    cost                      spent so far, earlier runs' rows included
    projected_cost            the whole job at the average cost per row so far
    elapsed_seconds, eta_seconds
    limit                     the rate the limiter paces at ("none": not paced)
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, TextIO, TypeVar

import anyio

T = TypeVar("T")

MODES = ("auto", "bar", "log", "off")
LOG_FORMATS = ("text", "json")
TICK_SECONDS = 0.5
MIN_BAR = 6  # columns: the bar is the first thing to shrink
SHOW_OLDEST_AFTER = 10.0  # seconds: requests younger than this are normal, not worth the bar's room


@dataclass
class Snapshot:
    """Everything a progress line shows, at one moment."""

    event: str
    rows_done: int
    rows_total: int | None
    rows_this_run: int
    ok_this_run: int
    failed_this_run: int
    rows_per_second: float
    requests_per_second: float
    tokens_per_second: float
    throttled: int | None
    in_flight: int | None
    oldest_in_flight_seconds: float | None
    cost: float | None
    projected_cost: float | None
    elapsed_seconds: float
    eta_seconds: float | None
    limit: str | None
    paused_seconds: float | None
    currency: str | None = None  # of cost and projected_cost (the region's price table, or the job's prices)

    def to_json(self, now: datetime) -> str:
        data: dict[str, Any] = {"ts": now.strftime("%Y-%m-%dT%H:%M:%SZ")}
        data.update(asdict(self))
        data.pop("paused_seconds")
        for key in ("rows_per_second", "requests_per_second", "tokens_per_second", "elapsed_seconds"):
            data[key] = round(data[key], 2)
        for key in ("oldest_in_flight_seconds", "eta_seconds"):
            data[key] = None if data[key] is None else round(data[key], 1)
        for key in ("cost", "projected_cost"):
            data[key] = None if data[key] is None else round(data[key], 6)
        return json.dumps(data, separators=(", ", ": "))

    def to_text(self, now: datetime) -> str:
        total = f"{self.rows_total:,}" if self.rows_total is not None else "?"
        parts = [f"{now:%Y-%m-%dT%H:%M:%SZ} {self.event:<8} rows {self.rows_done:,}/{total}",
                 f"this run {self.rows_this_run:,} (ok {self.ok_this_run:,}, failed {self.failed_this_run:,})",
                 f"{self.rows_per_second:,.1f} rows/s, {self.requests_per_second:,.1f} req/s, "
                 f"{self.tokens_per_second:,.0f} tok/s"]
        if self.throttled is not None:
            parts.append(f"429s {self.throttled:,}")
        if self.in_flight is not None:
            oldest = (f" (oldest {_duration(self.oldest_in_flight_seconds)})"
                      if self.oldest_in_flight_seconds is not None else "")
            parts.append(f"in flight {self.in_flight:,}{oldest}")
        if self.cost is not None:
            unit = f" {self.currency}" if self.currency else ""
            parts.append(f"cost {self.cost:,.4f}{unit}" + (f" (job ~{self.projected_cost:,.4f}{unit})"
                                                           if self.projected_cost is not None else ""))
        parts.append(f"elapsed {_duration(self.elapsed_seconds)}")
        parts.append(f"eta {_duration(self.eta_seconds) if self.eta_seconds is not None else '?'}")
        return " | ".join(parts)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def resolve_mode(mode: str, *, quiet: bool, stream: TextIO) -> str:
    """auto: a bar on a terminal, log lines otherwise; --quiet: nothing."""
    if quiet:
        return "off"
    if mode == "auto":
        try:
            return "bar" if stream.isatty() else "log"
        except (AttributeError, ValueError):
            return "log"
    return mode


class Progress:
    """Fed by run_job's callbacks and ticked by `heartbeat`; shows a bar, writes log lines, or nothing."""

    def __init__(self, mode: str, *, log_every: float = 30.0, log_format: str = "text",
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
                 currency: str | None = None) -> None:
        self.mode = mode
        self.currency = currency
        self.log_every = max(log_every, 0.1)
        self.log_format = log_format
        self.stream = stream or sys.stderr
        self._clock = clock
        self.bar = None
        self.limiter = None
        self.total: int | None = None
        self.done_before = 0
        self.done_cost = 0.0
        self.ok = self.failed = self.tokens = self.requests = 0
        self.cost = 0.0
        self.priced = False  # some row had a cost: the cost is known
        self._started = clock()
        self._last_log = self._started
        self._last_refresh = 0.0
        self._running = False

    @property
    def active(self) -> bool:
        return self.mode != "off"

    # -- run_job callbacks -----------------------------------------------------------------------
    def start(self, total: int | None, done: int, limiter: Any = None, done_cost: float = 0.0) -> None:
        """A run starts (batch mode's online finish starts a second one: counts carry on)."""
        self.limiter = limiter
        if self._running:
            return
        self._running = True
        self.total, self.done_before, self.done_cost = total, done, done_cost or 0.0
        self.priced = self.priced or bool(done_cost)
        self._started = self._last_log = self._clock()
        if self.mode == "bar":
            self._open_bar()
        elif self.mode == "log":
            self._log("start")

    def update(self, result: Any) -> None:
        if result.ok:
            self.ok += 1
        else:
            self.failed += 1
        self.requests += result.attempts or 0
        self.tokens += result.usage.total_tokens or 0
        if result.cost is not None:
            self.cost += result.cost
            self.priced = True
        if self.bar is not None:
            self.bar.update(1)
            now = self._clock()
            if now - self._last_refresh >= TICK_SECONDS:
                self._refresh_bar(now)

    def notice(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def tick(self) -> None:
        """Called by the heartbeat: the bar's clock and in-flight ages move, a log line is written when due."""
        if not self._running:
            return
        now = self._clock()
        if self.bar is not None:
            self._refresh_bar(now)
        elif self.mode == "log" and now - self._last_log >= self.log_every:
            self._log("progress")

    async def heartbeat(self) -> None:
        """Tick until cancelled (run next to run_job by `run_with_progress`)."""
        interval = min(TICK_SECONDS, self.log_every)
        while True:
            await anyio.sleep(interval)
            self.tick()

    def close(self) -> None:
        """The final figures: the bar is redrawn with them before it closes; the log gets an `end` line."""
        if not self._running:
            return
        self._running = False
        if self.bar is not None:
            self._refresh_bar(self._clock(), final=True)
            self.bar.close()
            self.bar = None
        elif self.mode == "log":
            self._log("end")

    # -- figures -----------------------------------------------------------------------------------
    def snapshot(self, event: str = "progress") -> Snapshot:
        now = self._clock()
        elapsed = max(now - self._started, 1e-6)
        this_run = self.ok + self.failed
        done = self.done_before + this_run
        rows_rate = this_run / elapsed
        eta = None
        if self.total is not None:
            remaining = max(self.total - done, 0)
            eta = 0.0 if not remaining else (remaining / rows_rate if rows_rate > 0 else None)
        limiter = self.limiter
        in_flight = oldest = throttled = paused = limit = None
        if limiter is not None:
            in_flight, oldest = limiter.in_flight()
            throttled = sum(limiter.throttled_by_code.values())
            paused = limiter.gate.paused_seconds
            limit = limiter.rate_label()
        cost = projected = None
        if self.priced:
            cost = self.done_cost + self.cost
            if done and self.total:
                projected = cost / done * self.total
        return Snapshot(event=event, rows_done=done, rows_total=self.total, rows_this_run=this_run,
                        ok_this_run=self.ok, failed_this_run=self.failed, rows_per_second=rows_rate,
                        requests_per_second=self.requests / elapsed, tokens_per_second=self.tokens / elapsed,
                        throttled=throttled, in_flight=in_flight, oldest_in_flight_seconds=oldest, cost=cost,
                        projected_cost=projected, elapsed_seconds=elapsed, eta_seconds=eta, limit=limit,
                        paused_seconds=paused, currency=self.currency if self.priced else None)

    def _log(self, event: str) -> None:
        self._last_log = self._clock()
        snap = self.snapshot(event)
        now = datetime.now(timezone.utc)
        line = snap.to_json(now) if self.log_format == "json" else snap.to_text(now)
        print(line, file=self.stream, flush=True)

    # -- the bar -----------------------------------------------------------------------------------
    def _width(self) -> int:
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, AttributeError, ValueError):
            columns = 0
        # A terminal that reports no width (some CI consoles, a bare pty) gets a sensible one.
        return columns if columns > 0 else 120

    def _open_bar(self) -> None:
        from tqdm import tqdm

        # The whole line but the counter and the bar is ours (the postfix), fitted to the width, so at 80
        # columns the cost and the ETA stay visible; tqdm's own rate and remaining time are not used (they
        # freeze when no row finishes).
        # tqdm draws only when asked (`_refresh_bar`), so a line never shows a new count with old figures.
        fmt = "{n_fmt}/{total_fmt} |{bar}| {desc}" if self.total is not None else "{n_fmt} rows {desc}"
        # nrows: tqdm takes a terminal that reports 0 rows (a bare pty) as having no room for any bar.
        self.bar = tqdm(total=self.total, initial=self.done_before, unit="row", file=self.stream,
                        dynamic_ncols=False, ncols=self._width(), nrows=24, bar_format=fmt, mininterval=3600)

    def _refresh_bar(self, now: float, *, final: bool = False) -> None:
        self._last_refresh = now
        width = self._width()
        self.bar.ncols = width
        total = self.total if self.total is not None else 0
        counter = len(f"{self.bar.n}/{total} ||") if self.total is not None else len(f"{self.bar.n} rows")
        room = width - counter - 2 - (MIN_BAR if self.total is not None else 0)  # spaces and the shortest bar
        self.bar.set_description_str(bar_fields(self.snapshot("end" if final else "progress"), room,
                                                resumed=self.done_before > 0), refresh=False)
        self.bar.refresh()


def bar_fields(snap: Snapshot, room: int, *, resumed: bool) -> str:
    """The bar's postfix in at most `room` columns: the least important fields are dropped first."""
    fields: list[tuple[int, str]] = []  # (importance: 0 most, text), in display order
    run = "run " if resumed else ""
    fields.append((1, f"{run}ok={snap.ok_this_run} failed={snap.failed_this_run}"))  # no commas: room is short
    fields.append((2, f"{snap.rows_per_second:,.1f} row/s"))
    fields.append((4, f"{snap.tokens_per_second:,.0f} tok/s"))
    if snap.throttled is not None:
        fields.append((3, f"429s={snap.throttled:,}"))
    if snap.paused_seconds:
        fields.append((6, f"paused={snap.paused_seconds:.0f}s"))
    if snap.in_flight is not None and (snap.oldest_in_flight_seconds or 0) >= SHOW_OLDEST_AFTER:
        # A tail of hung requests: worth more than ok/failed, which stand still meanwhile.
        fields.append((0, f"inflight={snap.in_flight:,} oldest={_duration(snap.oldest_in_flight_seconds)}"))
    if snap.cost is not None:
        projected = f" (job ~{snap.projected_cost:,.4f})" if snap.projected_cost is not None else ""
        fields.append((0, f"cost={snap.cost:,.4f}{projected}"))
    fields.append((5, f"elapsed={_duration(snap.elapsed_seconds)}"))
    fields.append((0, f"eta={_duration(snap.eta_seconds)}"))
    if snap.limit is not None:
        fields.append((7, f"limit={snap.limit}"))
    for drop in range(8, 0, -1):  # keep the fields less important than `drop`; lower it until they fit
        line = " ".join(text for importance, text in fields if importance < drop)
        if len(line) <= room:
            return line
    return line[:max(room, 0)]


async def run_with_progress(progress: Progress, run: Callable[[], Awaitable[T]]) -> T:
    """`run()` (run_job) with the progress heartbeat beside it; its result or its exception, unwrapped."""
    if not progress.active:
        return await run()
    outcome: list[T] = []
    error: list[Exception] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(progress.heartbeat)
        try:
            outcome.append(await run())
        except Exception as exc:  # re-raised as is below, not wrapped in an exception group
            error.append(exc)
        finally:
            tg.cancel_scope.cancel()
    if error:
        raise error[0]
    return outcome[0]
