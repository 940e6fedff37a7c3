"""The adaptive rate in a deterministic simulation (tests/ratesim.py: a per-second limit, background
throttling, answers after a latency; no real time): what it converges on, and that it tells the
throttling its own rate causes from background throttling."""

from __future__ import annotations

from runner.adaptive import AdaptiveRate
from tests.ratesim import SimClient, SimClock, SimServer, accepted_rate, simulate


def _run(limit, *, background=0.0, latency=0.05, concurrency=128, seconds=60.0, clients=1, seed=1):
    clock = SimClock()
    server = SimServer(limit, background, seed=seed)
    sims = [SimClient(AdaptiveRate(clock), concurrency, latency) for _ in range(clients)]
    simulate(server, sims, clock, seconds=seconds)
    return sims


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
