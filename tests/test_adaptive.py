"""The adaptive rate in a deterministic simulation (tests/ratesim.py: a per-second limit, background
throttling, answers after a latency; no real time): what it converges on, and that it tells the
throttling its own rate causes from background throttling."""

from __future__ import annotations

import pytest

from runner.adaptive import AdaptiveRate, _bunched, _Window, start_window_for
from tests.ratesim import SimClient, SimClock, SimServer, accepted_rate, simulate


def _run(limit, *, background=0.0, latency=0.05, concurrency=128, seconds=60.0, clients=1, seed=1, jitter=0.0,
         start_window=32):
    clock = SimClock()
    server = SimServer(limit, background, seed=seed)
    sims = [SimClient(AdaptiveRate(clock, start_window=start_window), concurrency, latency, jitter)
            for _ in range(clients)]
    simulate(server, sims, clock, seconds=seconds)
    return sims


def _as_benched(limit, *, concurrency=128, seconds=40.0, clients=1, seed=1):
    """The bench's set-up: 50 ms answers that vary by +-20% (so answers and sends interleave, as on a real
    connection pool), the startup window the runner derives from the concurrency."""
    return _run(limit, concurrency=concurrency, seconds=seconds, clients=clients, seed=seed, jitter=0.2,
                start_window=start_window_for(concurrency))


def _share_429(clients) -> float:
    return sum(c.throttled for c in clients) / sum(c.sent for c in clients)


def _throttled_between(client, start, end) -> int:
    return sum(1 for t in client.throttled_at if start <= t < end)


def test_background_throttling_does_not_slow_the_job():
    """10% of answers throttled whatever the rate, no limit: the job keeps its full speed (concurrency /
    latency), and the 429s are counted as background."""
    (client,) = _run(lambda now: None, background=0.10, latency=0.1, concurrency=256, seconds=20)
    assert accepted_rate(client, 10, 20) > 0.85 * 2560 * 0.9
    assert client.rate.rate_caused < 0.05 * client.throttled


def test_a_hard_limit_is_found_and_held():
    """An unknown limit of 75/s: after the ramp the accepted rate is the limit, and few requests are throttled."""
    (client,) = _run(lambda now: 75, seconds=60)
    assert accepted_rate(client, 15, 60) > 0.95 * 75
    late = client.throttled / max(client.sent, 1)
    assert late < 0.08 and client.rate.background < 0.02
    assert not client.rate.startup and client.rate.cuts - client.rate.undone > 0


def test_a_limit_that_moves_is_followed_both_ways():
    """The limit halves at 30 s and is restored at 60 s: within 15 s of each change the accepted rate is
    within 10% of the new limit."""
    (client,) = _run(lambda now: 100 if now < 30 or now >= 60 else 50, seconds=90)
    assert abs(accepted_rate(client, 40, 60) - 50) < 5
    assert abs(accepted_rate(client, 75, 90) - 100) < 10


def test_two_clients_share_one_limit_fairly():
    """Two runners on one account limit of 100/s: together they use it, and neither starves."""
    first, second = _run(lambda now: 100, clients=2, seconds=60)
    together = accepted_rate(first, 20, 60) + accepted_rate(second, 20, 60)
    assert together > 0.9 * 100
    assert min(accepted_rate(first, 20, 60), accepted_rate(second, 20, 60)) > 0.35 * 100


def test_startup_reaches_full_concurrency_within_a_few_round_trips():
    """No limit, 500 ms latency, concurrency 1,024: the startup window is at full concurrency after three
    round trips (x4 per round trip from 32), and answers at the full rate in the fourth, not after
    seconds of doubling per second."""
    (client,) = _run(lambda now: None, latency=0.5, concurrency=1024, seconds=2.5)
    assert client.rate.startup and client.rate.window >= 1024
    assert accepted_rate(client, 2.0, 2.5) > 0.9 * 2048


def test_burst_rate_ends_startup_at_once():
    """A Throttling.BurstRate answer in startup cuts at once (x0.7) without waiting for a window to fill."""
    clock = SimClock()
    rate = AdaptiveRate(clock)
    seqs = [rate.sent() for _ in range(10)]
    clock.now += 0.05
    for seq in seqs[:9]:
        rate.answered(seq, accepted=True)
    assert rate.startup
    assert rate.answered(seqs[9], throttled=True, code="Throttling.BurstRate")
    assert not rate.startup and rate.rate is not None


def test_capacity_throttling_is_never_a_reason_to_slow_down():
    """Throttling.Concurrency (a capacity cap at peak time) is background by its code, whatever its share."""
    clock = SimClock()
    rate = AdaptiveRate(clock)
    for _ in range(20):
        seqs = [rate.sent() for _ in range(32)]
        clock.now += 0.05
        for seq in seqs:
            rate.answered(seq, throttled=True, code="Throttling.Concurrency")
    assert rate.startup and rate.cuts == 0 and rate.background_throttled == 640


def test_the_startup_flood_at_an_unknown_limit_is_a_fraction_of_it():
    """An unknown 75/s limit, concurrency 128: the window that crosses it is small (growth x1.25 per 50 ms
    round trip from 16, a run of throttled answers ends startup), so finding the limit costs under half a
    second's worth of 429s (82 before), the first cut lands under the limit, not above it, and the summary
    counts most of them as rate-caused."""
    for seed in (1, 2, 3):
        (client,) = _as_benched(lambda now: 75, seconds=3, seed=seed)
        assert _throttled_between(client, 0, 1) < 0.5 * 75
        assert not client.rate.startup and client.rate.rate < 75
        assert _throttled_between(client, 1, 3) <= 2
        # Those answered after the cut (sent before it) count as rate-caused too, not as background (a
        # quarter of them were before).
        assert client.rate.rate_caused >= 0.6 * client.throttled


def test_a_hard_limit_costs_few_429s_over_a_run():
    """Unknown 75/s for 40 s (the bench's 3,000 requests): under 2% of requests throttled in all (3.4%
    before, most of it the startup), under 0.7% after the first 15 s, and the limit used to >= 95%; over
    133 s (10,000 requests) under 1% in all."""
    for seed in (1, 2, 3):
        (client,) = _as_benched(lambda now: 75, seconds=40, seed=seed)
        assert _share_429([client]) < 0.02
        late_sent = sum(1 for t in client.accepted_at + client.throttled_at if t >= 15)
        assert _throttled_between(client, 15, 40) < 0.007 * late_sent
        assert accepted_rate(client, 15, 40) >= 0.95 * 75
    (long,) = _as_benched(lambda now: 75, seconds=133)
    assert _share_429([long]) < 0.01 and accepted_rate(long, 15, 133) >= 0.95 * 75


def test_a_moving_limit_costs_few_429s():
    """100/s halved at 30 s and restored at 60 s: each change followed within 15 s, and under 1.8% of
    requests throttled over the run (3.0% before): the halving is seen within a few answers, not after a
    second's window, and the cut is sized by what the server accepted once its allowance was spent."""
    for seed in (1, 2, 3):
        (client,) = _as_benched(lambda now: 100 if now < 30 or now >= 60 else 50, seconds=90, seed=seed)
        assert _share_429([client]) < 0.018
        assert abs(accepted_rate(client, 45, 60) - 50) < 5
        assert abs(accepted_rate(client, 75, 90) - 100) < 10
        assert _throttled_between(client, 30, 32) < 25


def test_two_runners_on_one_limit_share_it_with_few_429s():
    """Two runners (concurrency 64 each) on one 100/s limit, as the bench runs them: together >= 90% of
    it, each >= 40% from 10 s on (cut sizes measured, not guessed from a handful of answers, keep the
    split even), under 2% of requests throttled (2.7% before)."""
    for seed in (1, 2, 3, 4):
        first, second = _as_benched(lambda now: 100, concurrency=64, seconds=60, clients=2, seed=seed)
        shares = [accepted_rate(c, 10, 60) / 100 for c in (first, second)]
        assert sum(shares) > 0.9 and min(shares) > 0.4
        assert _share_429([first, second]) < 0.02


def test_a_limit_under_background_throttling_is_found_and_the_background_learned():
    """A 75/s limit and 5% or 10% of answers throttled whatever the rate: the runner neither collapses
    (each cut's test sees the share stay at the background and undoes the cut) nor floods: it accepts
    the limit's worth (the background 429s come before the limit here) and its rate-caused 429s are few."""
    for background in (0.05, 0.10):
        (client,) = _run(lambda now: 75, background=background, seconds=60, jitter=0.2, start_window=16)
        assert accepted_rate(client, 20, 60) >= 0.95 * 75 * (1 - background)
        assert client.rate.undone >= 1 and abs(client.rate.background - background) < 0.05
        assert client.throttled / client.sent < background + 0.04


def test_startup_grows_by_round_trips_steeply_only_when_they_are_long():
    """No limit: at 50 ms round trips the window grows x1.25 per round trip (many cheap steps), at 500 ms
    x8 (from an eighth of concurrency 1,024 to all of it in one round trip)."""
    (short,) = _run(lambda now: None, latency=0.05, concurrency=128, seconds=0.06, start_window=16)
    assert 16 * 1.2 < short.rate.window < 16 * 1.3
    (long,) = _run(lambda now: None, latency=0.5, concurrency=1024, seconds=0.51, start_window=128)
    assert long.rate.window >= 0.95 * 1024
    assert start_window_for(128) == 16 and start_window_for(1024) == 128 and start_window_for(16) == 8


def _staggered(limit, delay, *, seed, seconds=60.0):
    """Two runners (concurrency 64 each, as benched) on one limit, the second started `delay` seconds after
    the first (a second job on the account); runs `seconds` after the second starts."""
    clock = SimClock()
    server = SimServer(lambda now: limit, 0.0, seed=seed)
    first = SimClient(AdaptiveRate(clock, start_window=start_window_for(64)), 64, 0.05, 0.2)
    second = SimClient(AdaptiveRate(clock, start_window=start_window_for(64)), 0, 0.05, 0.2)
    simulate(server, [first, second], clock, seconds=delay)
    second.rate, second.concurrency = AdaptiveRate(clock, start_window=start_window_for(64)), 64
    simulate(server, [first, second], clock, seconds=seconds)
    return first, second


@pytest.mark.xfail(strict=True, reason="known gap: a latecomer on a 500/s limit already in use gets 16-35% of it "
                   "over its first minute, not its half (both cut in proportion when the shared limit runs out, "
                   "and growth ~sqrt(rate) favours the larger)")
def test_a_latecomer_on_a_shared_limit_gets_its_share():
    """A second runner started 2 s after the first, which already uses the whole limit (100/s or 500/s):
    over seconds 20-60 after its start each gets >= 35% of the limit, together >= 90%, under 2% of
    requests throttled. Measured on the current controller: the latecomer gets 0.33-0.49 at 100/s and
    0.16-0.35 at 500/s (0.03-0.33 before its start-up burst stopped undoing the first runner's cut)."""
    for limit in (100, 500):
        for seed in (1, 2, 3, 4):
            first, second = _staggered(limit, 2.0, seed=seed)
            shares = [accepted_rate(c, 22, 62) / limit for c in (first, second)]
            assert min(shares) >= 0.35 and sum(shares) >= 0.9
            assert _share_429([first, second]) < 0.02


def test_a_latecomers_burst_does_not_pass_for_background():
    """A second runner starting on a 500/s limit the first already uses: its start-up burst throttles the
    first runner's cut-test window, but those 429s are bunched in time, so the cut is not undone (before,
    the first runner took them for 3% background, stayed above the limit and the latecomer starved at
    0.00-0.16 of the limit for minutes). The latecomer gets >= 15% over seconds 20-60 after its start and
    >= 25% over seconds 60-120, and the first runner learns no background."""
    for seed in (1, 2, 3, 4):
        first, second = _staggered(500, 2.0, seed=seed, seconds=120)
        assert accepted_rate(second, 22, 62) >= 0.15 * 500
        assert accepted_rate(second, 62, 122) >= 0.25 * 500
        assert first.rate.background == 0 and first.rate.undone == 0
        assert _share_429([first, second]) < 0.01


def test_bunched_429s_are_told_from_spread_ones():
    """The statistic behind it: k throttled requests sent inside a fraction f of a window are bunched when
    k * f^(k-1) < 1%; fewer than three say nothing."""
    def window(times):
        w = _Window(start=0.0, sent=500, sealed_at=1.0, answers=500, throttled=len(times))
        w.throttled_first, w.throttled_last = min(times), max(times)
        return w
    assert _bunched(window([0.40 + 0.01 * i for i in range(12)]), now=1.0)  # 12 within 0.11 s
    assert not _bunched(window([0.08 * i for i in range(12)]), now=1.0)     # 12 over 0.88 s
    assert _bunched(window([0.5, 0.52, 0.55, 0.56, 0.58]), now=1.0)         # 5 within 0.08 s: 5 * 0.08^4
    assert not _bunched(window([0.1, 0.5, 0.9]), now=1.0)
    assert not _bunched(window([0.5, 0.5]), now=1.0)
