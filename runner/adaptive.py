"""The adaptive rate for unknown limits, and the test that tells throttling we cause from throttling we do not.

On a real account two kinds of 429 arrive mixed, often with the same code:
- rate-caused: our requests pass the model's per-second RPM/TPM (or a share of it another job has
  taken). Their share of the answers grows with our rate, and accepted answers per second stop
  growing. Slowing down is the fix.
- background: capacity throttling at peak time, or a neighbour's burst. A steady share of answers
  whatever our rate. Slowing down only makes the job slower; retrying the rows is the fix.

So every answer is counted in windows (only answers to requests sent inside the window, so a
window reflects the rate it was sent at), and a window is *excess* when its throttled share is
significantly above the background share seen so far (3.5 standard deviations, at least 1 point); a
window still being answered is judged at once when it already holds more 429s than the background
could give. An excess window cuts the rate to 95% of what the endpoint accepts (the share it accepted
of the requests sent after the window's first 429, when the server's allowance was spent; never below
half, x0.9 at most, x0.7 for BurstRate), and the window after the cut is the test: if the share did
not fall and its 429s were not bunched in time (as a competitor's burst on the same limit bunches
them), the throttling was background, the cut is undone and the background share learned. Between
cuts the rate grows while it is what holds requests back, slowly just after a cut and faster the
longer no cut was needed (so a limit that is raised again is found within seconds).

Before the first cut the job is in startup: no rate at all, only a window of requests in flight,
from an eighth of the concurrency, growing per round trip by what reaches the demand in about half a
second (x1.25 per 50 ms round trip, x8 per 500 ms one), so a quiet endpoint is at full concurrency
within about a second whatever its latency, and the window that crosses an unknown limit (all of it
refused once the server's allowance is spent) stays small where round trips are short. Six 429s in a
row, a high throttled share, or `Throttling.BurstRate` end startup at once.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable

import anyio

Clock = Callable[[], float]

BURST_CODES = frozenset({"Throttling.BurstRate", "limit_burst_rate"})
# Capacity throttling the API facts name as such (a dynamic concurrency cap at peak time): never a
# reason to slow down, whatever its share.
CAPACITY_CODES = frozenset({"Throttling.Concurrency"})
# A throttled share above this is never taken for background: at such shares the cut that did not
# help was too small (a rate still far above the limit), not the wrong remedy.
MAX_BACKGROUND_SHARE = 0.15
# A cut that cured the throttling proves a limit; for this long after one, a cut that seems not to help is
# a competitor on the same account taking the room we gave up (it looks the same from here), not
# background, and is not undone.
CONFIRMED_SECONDS = 60.0
# In startup only a share this high (over the last ~256 answers, or twice it in one window of 32) ends the
# ramp: crossing a limit throttles most of the window sent after it, while background
# throttling this heavy is rare (and is then told apart by the test after the cut).
STARTUP_EXIT_SHARE = 0.2
# Throttled answers in a row that end startup at once: past an unknown limit's burst allowance nearly every
# request is refused, while background throttling (at most MAX_BACKGROUND_SHARE) gives such a run about
# once in 60,000 answers.
STARTUP_EXIT_RUN = 6
# In startup the window grows per round trip by a factor that reaches the demand (requests waiting to go)
# in about STARTUP_SECONDS whatever the latency, within STARTUP_GROWTH: at a short round trip many gentle
# steps (a limit crossed floods only a small window), at a long one a few steep ones.
STARTUP_SECONDS = 0.5
STARTUP_GROWTH = (1.25, 8.0)
# The plateau (requests per second) at which CUBIC grows by `cubic` of it per second cubed; see _cubic.
CUBIC_SCALE = 75.0
CUBIC_EXPONENT = 0.5
# A cut's size comes from the share accepted after its first 429, shrunk towards a 10% overshoot as if this
# many answers had shown one: a handful of answers says little.
DRAINED_PRIOR = 16
# A window is excess when its throttled share exceeds the background share by this much (at least).
MARGIN_FLOOR = 0.01
# A window still being answered is judged at once from this many throttled answers, if background cannot
# explain them (see _clearly_excess).
EARLY_MIN = 4


@dataclass
class _Window:
    """The requests sent from `start` on (until the next window starts) and their answers so far."""

    start: float
    first: int = 0  # the sequence number of its first request
    sent: int = 0
    sealed_at: float | None = None  # no more requests join once sealed
    answers: int = 0
    throttled: int = 0
    burst: bool = False
    # From the first throttled answer on, the server's allowance is spent: what it accepts of the requests
    # sent since is its rate.
    drained_from: float | None = None  # when the first throttled request was sent
    drained_answers: int = 0
    drained_accepted: int = 0
    # When its throttled requests were sent (the first and last): background throttling spreads them over
    # the window, a spent allowance (ours, or a competitor's burst on the same limit) bunches them.
    throttled_first: float | None = None
    throttled_last: float | None = None


@dataclass
class _PendingTest:
    rate_before: float | None  # None: the cut ended startup
    share_before: float
    answers_before: int
    rate_caused: int           # throttles the cut counted as rate-caused, moved to background if undone


class AdaptiveRate:
    """One model's discovered rate. Not thread-safe; one event loop."""

    def __init__(self, clock: Clock, *, start_window: float = 32, startup_gain: float | None = None,
                 cubic: float = 0.0008, headroom: float = 0.95,
                 decrease: float = 0.9, burst_decrease: float = 0.7, floor: float = 0.2,
                 ceiling: float = 100_000.0, recheck: float = 0.1, adjust: bool = True) -> None:
        self._clock = clock
        self.adjust = adjust  # False: only classify (the gate still closes on excess), never pace
        self.startup = adjust
        self.start_window = self.window = float(start_window)
        self.startup_gain = startup_gain
        self.rate: float | None = None
        self.cubic = cubic
        self.headroom = headroom  # the cut lands this fraction of what the endpoint accepted
        self.decrease = decrease
        self.burst_decrease = burst_decrease
        self.floor = floor
        self.ceiling = ceiling
        self.recheck = recheck
        self.background = 0.0
        self._startup_share = 0.0
        self.in_flight = 0
        self.cuts = 0
        self.undone = 0
        self.rate_caused = 0
        self.background_throttled = 0
        self._unclassified = 0          # throttles since the last window closed
        self._unclassified_answers = 0  # answers since the last window closed
        now = clock()
        self._confirmed_at = float("-inf")  # when a cut last proved to be the cure
        self._peak = 0.0          # the rate the last cut came down from (CUBIC's W_max)
        self._since_cut = 0.0     # seconds the rate has bound since the last cut
        self._plateau = 0.0       # seconds from the cut to the plateau at _peak (CUBIC's K)
        self._grown_at = now
        self._limited = False
        self._seq = 0
        self._sent_at: dict[int, float] = {}  # requests in flight: sequence number -> when sent
        self._rtt: float | None = None
        self._run = 0  # throttled answers in a row
        # Since startup began: when its first request went, and the answers that accepted its requests.
        self._startup_began: float | None = None
        self._startup_accepted = 0
        self._latest_answered = float("-inf")  # the send time of the latest-sent request answered so far
        self._windows: deque[_Window] = deque([_Window(now)])  # oldest first; the last one takes new requests
        self._test: _PendingTest | None = None
        self._accepted: deque[float] = deque()
        self._sent: deque[float] = deque()
        self._next_ticket = 0
        self._allowance = 1.0
        self._advanced_at = now
        # Startup waiters, first come first served; each answer wakes only as many as it freed slots
        # (waking all of them for every answer cost O(concurrency) per answer at 1,024 in flight).
        self._room_waiters: deque[anyio.Event] = deque()
        self.waiting = 0  # requests held back by the startup window (the demand beyond what is in flight)
        self._demand = 0

    # --- sending -----------------------------------------------------------------------------

    def has_room(self) -> bool:
        return not self.startup or self.in_flight < self.window

    async def wait_for_room(self) -> None:
        """In startup, wait until fewer than `window` requests are in flight."""
        while not self.has_room():
            event = anyio.Event()
            self._room_waiters.append(event)
            self.waiting += 1
            try:
                await event.wait()
            finally:
                self.waiting -= 1

    def _wake(self, everyone: bool = False) -> None:
        free = len(self._room_waiters) if everyone or not self.startup else int(self.window) - self.in_flight
        while free > 0 and self._room_waiters:
            self._room_waiters.popleft().set()
            free -= 1

    def take_ticket(self) -> int:
        ticket, self._next_ticket = self._next_ticket, self._next_ticket + 1
        return ticket

    def wait_for(self, ticket: int) -> float:
        """Seconds until `ticket` may go at the current rate (0: now; always 0 in startup)."""
        if self.rate is None:
            return 0.0
        now = self._clock()
        self._advance(now)
        wait = (ticket + 1 - self._allowance) / self.rate
        waiting = wait > 1e-6  # float residue must not keep a waiter spinning
        self.grow(limited=waiting)
        return wait if waiting else 0.0

    def sent(self) -> int:
        """A request goes now; returns its sequence number, for `answered`."""
        now = self._clock()
        self.in_flight += 1
        self._sent.append(now)
        _trim(self._sent, now)
        seq, self._seq = self._seq, self._seq + 1
        self._sent_at[seq] = now
        if self.startup and self._startup_began is None:
            self._startup_began = now
        current = self._windows[-1]
        current.sent += 1
        if self._full(current, now):
            current.sealed_at = now
            self._windows.append(_Window(now, first=self._seq))
        return seq

    def pause_until(self, until: float) -> None:
        """The gate is closed until `until`: no allowance accrues meanwhile, so the waiters do not all go
        at once when it opens."""
        self._advance(self._clock())
        self._advanced_at = max(self._advanced_at, until)

    def _advance(self, now: float) -> None:
        if self.rate is None or now <= self._advanced_at:
            return
        horizon = self._next_ticket + burst_capacity(self.rate)
        self._allowance = min(self._allowance + (now - self._advanced_at) * self.rate, max(horizon, self._allowance))
        self._advanced_at = now

    def _set_rate(self, rate: float | None) -> None:
        now = self._clock()
        self._advance(now)  # what was allowed so far accrued at the old rate
        if self.rate is None and rate is not None:
            self._allowance = float(self._next_ticket)  # pacing starts now, with no stored burst
            self._advanced_at = max(now, self._advanced_at)
        self.rate = rate

    def grow(self, limited: bool) -> None:
        """Grow the rate for the time since the last call, while the rate is what holds requests back
        (otherwise concurrency is the limit, and growing would only store up a burst)."""
        now = self._clock()
        elapsed, self._grown_at = now - self._grown_at, now
        was_limited, self._limited = self._limited, limited
        if self.rate is None or not (limited or was_limited) or elapsed <= 0:
            return
        self._since_cut += elapsed
        peak = self._peak if self._peak > 0 else self.rate
        # CUBIC (RFC 9438) on a rate: back to the rate of the last cut in `_plateau` seconds, flat around
        # it, then faster and faster (a limit that was raised is found within seconds).
        target = peak * (1 + self._cubic(peak) * (self._since_cut - self._plateau) ** 3)
        # At most x1.5 a second, so an overshoot is caught by the next window before it floods.
        ceiling = min(self.ceiling, self.rate * (1 + 0.5 * min(elapsed, 1.0)))
        self._set_rate(min(max(target, self.rate + 0.1 * elapsed, self.floor), ceiling))

    def _cubic(self, peak: float) -> float:
        """CUBIC's growth, relative to the plateau: slower the higher the plateau (as the square root), so
        of two runners on one limit the smaller grows back faster and their shares converge (growth
        proportional to the rate would keep any split for ever)."""
        return self.cubic * (CUBIC_SCALE / max(peak, self.floor)) ** CUBIC_EXPONENT

    # --- answers -----------------------------------------------------------------------------

    def answered(self, seq: int, *, throttled: bool = False, code: str | None = None,
                 accepted: bool = False) -> bool:
        """One answer to request `seq` (from `sent`). Returns True when it ended a window with a cut."""
        now = self._clock()
        if self.in_flight > 0:
            self.in_flight -= 1
        sent_at = self._sent_at.pop(seq, None)
        if sent_at is not None:
            self._latest_answered = max(self._latest_answered, sent_at)
            latency = now - sent_at
            self._rtt = latency if self._rtt is None else self._rtt + 0.125 * (latency - self._rtt)
        self._unclassified_answers += 1
        if throttled and code in CAPACITY_CODES:
            self.background_throttled += 1
            throttled = False  # counted as an answer the endpoint gave, not as a rate signal
        window = self._window_of(seq)
        if throttled and window is None:
            # Sent before the last cut, at the rate it cut: rate-caused with it (moved to background if the cut
            # is undone), not counted against the windows that follow.
            self.rate_caused += 1
            if self._test is not None:
                self._test.rate_caused += 1
        elif throttled:
            self._unclassified += 1
        if self.startup:
            if accepted:
                self._startup_accepted += 1
                self.window += self._startup_gain()
            elif throttled:  # a throttled answer gives back its slot, not a new one: a flood shrinks itself
                self.window = max(8.0, self.window - 1)
            self._wake()
        if accepted:
            self._accepted.append(now)
            _trim(self._accepted, now)
        if window is not None:  # (answers to requests sent before the last cut say nothing of its rate)
            self._run = self._run + 1 if throttled else 0
            window.answers += 1
            if throttled:
                window.throttled += 1
                window.burst = window.burst or code in BURST_CODES
                if sent_at is not None:
                    if window.throttled_first is None or window.throttled_last is None:
                        window.throttled_first = window.throttled_last = sent_at
                    else:
                        window.throttled_first = min(window.throttled_first, sent_at)
                        window.throttled_last = max(window.throttled_last, sent_at)
            if window.drained_from is not None and sent_at is not None and sent_at > window.drained_from:
                window.drained_answers += 1
                window.drained_accepted += accepted
            if throttled and window.drained_from is None and sent_at is not None:
                window.drained_from = sent_at  # counted from the next one: this one would bias it down
            if self._clearly_excess(window):
                self._windows.remove(window)  # already excess, whatever its other answers: act now
                return self._judge_window(now, window, force=True)
        return self._evaluate(now)

    def _clearly_excess(self, window: _Window) -> bool:
        """Whether a window still being answered is already excess beyond doubt: in startup a run of
        throttled answers or a high share; after it, more throttled answers than the background share
        would give once in thousands of windows."""
        if self.startup:
            return self._run >= STARTUP_EXIT_RUN or window.throttled >= 2 * STARTUP_EXIT_SHARE * max(window.sent, 32)
        base = max(self.background, 0.005)
        if self._test is not None and self._test.share_before <= MAX_BACKGROUND_SHARE:
            # The window after a cut is its test, judged whole against the share before the cut (which may
            # be background) unless its share clearly rose above that.
            base = max(base, self._test.share_before)
        expected = window.answers * base
        return window.throttled >= EARLY_MIN and \
            window.throttled >= expected + 3.5 * math.sqrt(expected * (1 - base)) + 2

    def _startup_gain(self) -> float:
        """What one accepted answer adds to the startup window: growth per round trip, less the one slot the
        answer gives back."""
        if self.startup_gain is not None:
            return self.startup_gain
        low, high = STARTUP_GROWTH
        self._demand = demand = max(self._demand, self.in_flight + self.waiting)  # the most that wanted to go
        if demand <= self.start_window:
            return low - 1
        growth = (demand / self.start_window) ** ((self._rtt or 0.0) / STARTUP_SECONDS)
        return min(high, max(low, growth)) - 1

    def _window_of(self, seq: int) -> _Window | None:
        """The window request `seq` belongs to (None: sent before the last cut)."""
        for window in reversed(self._windows):
            if seq >= window.first:
                return window
        return None

    def _full(self, window: _Window, now: float) -> bool:
        """Enough requests to judge: 32 in startup (a limit is found within a window's worth of 429s),
        else a second's worth (the server counts per second) of at least 50, or 5 s of at least 3."""
        if self.startup:
            return window.sent >= 32
        span = now - window.start
        return (window.sent >= 50 and span >= 1.0) or (window.sent >= 3 and span >= 5.0)

    def _margin(self, answers: int) -> float:
        base = max(self.background, 0.001)
        return max(MARGIN_FLOOR, 3.5 * math.sqrt(base * (1 - base) / answers))

    def _evaluate(self, now: float) -> bool:
        """Judge the oldest sealed windows whose requests are all answered (or most, after a long wait);
        BurstRate in startup is judged at once."""
        cut = False
        while len(self._windows) > 1 or (self.startup and self._windows[0].burst):
            window = self._windows[0]
            complete = window.answers >= window.sent or (
                window.sealed_at is not None and now - window.sealed_at > 30 and window.answers * 2 >= window.sent)
            if not (complete or (self.startup and window.burst)):
                break
            self._windows.popleft()
            if window.answers and self._judge_window(now, window):
                cut = True
                break
        return cut

    def _judge_window(self, now: float, window: _Window, force: bool = False) -> bool:
        """Judge a window taken out of the queue. After a cut only requests sent from now on are counted
        (what is in flight was sent at the old rate); the queue never runs empty."""
        cut = self._judge(now, window, force)
        if cut:
            self._windows = deque([_Window(now, first=self._seq)])
            self._run = 0
        elif not self._windows:
            self._windows.append(_Window(now, first=self._seq))
        return cut

    def _judge(self, now: float, window: _Window, force: bool = False) -> bool:
        share = window.throttled / window.answers
        if self.startup:  # a ramp that crosses a limit shows it at once; a lower share is background
            self._startup_share += 0.125 * (share - self._startup_share)  # over the last ~256 answers
            excess = force or window.burst or share >= 2 * STARTUP_EXIT_SHARE or self._startup_share >= STARTUP_EXIT_SHARE
        else:
            excess = force or window.burst or share > self.background + self._margin(window.answers)
        test, self._test = self._test, None
        if test is not None and not (force or window.burst) and excess and self._unchanged(test, share, window.answers) \
                and now - self._confirmed_at > CONFIRMED_SECONDS and not _bunched(window, now):
            self._undo(test, share)
            self._classify(False)
            return False
        if test is not None and not excess:
            self._confirmed_at = now  # the cut cured it: a limit, not background
        if not excess and share < self.background:  # learned upwards only by an undone cut
            self.background += (0.5 if test is not None else 0.05) * (share - self.background)
        if not excess:
            self._classify(False)
            return False
        rate_caused = self._classify(True)
        self._cut(now, share, window, rate_caused)
        return True

    def _unchanged(self, test: _PendingTest, share: float, answers: int) -> bool:
        """Whether the share after a cut is the share before it: no significant fall (2 sigma of the
        difference, and not below 70% of it) and no rise (a share that rose after a cut is a limit that
        moved down, or whose server-side burst allowance ran out: not background)."""
        if test.share_before > MAX_BACKGROUND_SHARE or share < 0.7 * test.share_before:
            return False
        p = max(test.share_before, 0.01)
        sigma = math.sqrt(p * (1 - p) * (1 / max(test.answers_before, 1) + 1 / max(answers, 1)))
        return test.share_before - max(0.01, 2 * sigma) <= share <= test.share_before + max(0.01, sigma)

    def _classify(self, excess: bool) -> int:
        """Split the throttles counted since the last window into rate-caused and background."""
        count, self._unclassified = self._unclassified, 0
        answers, self._unclassified_answers = self._unclassified_answers, 0
        rate_caused = max(0, count - round(self.background * answers)) if excess else 0
        self.rate_caused += rate_caused
        self.background_throttled += count - rate_caused
        return rate_caused

    def _cut(self, now: float, share: float, window: _Window, rate_caused: int) -> None:
        # What the endpoint accepted: in the last second of answers, and while this window was sent.
        span = (window.sealed_at or now) - window.start
        accepted = float(len(self._accepted))
        if span >= 0.5:
            accepted = min(accepted, (window.answers - window.throttled) / span)
        if window.drained_answers and self.rate is not None:
            sending = min(self.rate, max(float(len(self._sent)), 1.0))
            # Few answers say little: shrunk towards a 10% overshoot, as if DRAINED_PRIOR answers had shown it.
            kept = (window.drained_accepted + DRAINED_PRIOR * 0.9) / (window.drained_answers + DRAINED_PRIOR)
            accepted = min(accepted, sending * kept)
        if self.startup and self._startup_began is not None:
            # A server that counts per second lets a second's worth through at once, then its rate: what
            # startup got accepted came in 1 s more than it took.
            accepted = min(accepted, self._startup_accepted / (1 + max(0.0, self._latest_answered - self._startup_began)))
        self._test = _PendingTest(self.rate, share, window.answers, rate_caused)
        self.cuts += 1
        if not self.adjust:
            return
        factor = self.burst_decrease if window.burst else self.decrease
        current = self.rate if self.rate is not None else float(len(self._sent))
        target = self.headroom * (accepted / (1 - self.background) if self.background < 1 else accepted)
        new_rate = max(self.floor, current * 0.5, min(current * factor, target))
        self.startup = False
        self._wake(everyone=True)  # startup waiters go on to the pacer
        self._set_rate(new_rate)
        # The plateau is what the endpoint accepted (not the rate that overshot it), and never more than
        # a tenth above the new rate (a cut from a startup flood must not climb straight back to it).
        self._peak = max(new_rate, min(current, accepted, new_rate / 0.9))
        self._since_cut = 0.0
        self._plateau = ((self._peak - new_rate) / (self._cubic(self._peak) * self._peak)) ** (1 / 3)

    def _undo(self, test: _PendingTest, share: float) -> None:
        """The share did not fall after the cut: that throttling was background. Restore the rate."""
        self.undone += 1
        self.background = share
        self.rate_caused -= test.rate_caused
        self.background_throttled += test.rate_caused
        if not self.adjust:
            return
        if test.rate_before is None:
            self.startup = True
            self.rate = None
            self._startup_began, self._startup_accepted = None, 0
        else:
            self._set_rate(test.rate_before)

    # --- what the summary shows ---------------------------------------------------------------

    def describe(self) -> dict:
        return {"rate_per_second": round(self.rate, 2) if self.rate is not None else None,
                "startup": self.startup, "cuts": self.cuts, "undone_cuts": self.undone,
                "background_share": round(self.background, 4),
                "throttled_rate_caused": self.rate_caused, "throttled_background": self.background_throttled}


def _bunched(window: _Window, now: float) -> bool:
    """Whether a window's throttled requests were sent within so short a part of it that throttling
    independent of time would do so less than once in a hundred windows (k throttles all inside a fraction f
    of the window: about k * f^(k-1)): a spent allowance, not background."""
    if window.throttled < 3 or window.throttled_first is None or window.throttled_last is None:
        return False
    span = (window.sealed_at or now) - window.start
    if span <= 0:
        return False
    fraction = min(1.0, (window.throttled_last - window.throttled_first) / span)
    return window.throttled * fraction ** (window.throttled - 1) < 0.01


def start_window_for(concurrency: int | None) -> float:
    """The requests startup sends before any answer: an eighth of the concurrency (8 to 128). Sent blind, so
    it is what an unknown limit floods first; a job asking for more concurrency expects a higher rate."""
    return 32.0 if concurrency is None else float(min(128, max(8, concurrency // 8)))


def _trim(times: deque[float], now: float) -> None:
    while times and times[0] < now - 1.0:
        times.popleft()


def burst_capacity(rate: float) -> float:
    # A twentieth of a second's worth (at least one request): a bucket refilled after an idle spell may
    # not release more than ~5% over the per-second limit at once.
    return max(1.0, rate * 0.05)
