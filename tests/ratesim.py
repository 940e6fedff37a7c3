"""A discrete-time simulation of clients paced by AdaptiveRate against a server with a per-second limit
and background throttling: deterministic (seeded), no real time, no event loop. Used by
tests/test_adaptive.py to pin what the controller converges on."""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from typing import Callable

from runner.adaptive import AdaptiveRate


class SimClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class SimServer:
    """Admits up to `limit(now)` requests per second (a bucket of one second's worth, full at the start)
    and throttles a `background` share of the rest whatever the rate."""

    limit: Callable[[float], float | None]
    background: float = 0.0
    seed: int = 1
    level: float | None = None
    stamp: float = 0.0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.pending: list[tuple[float, int, int, float, bool]] = []  # (due, order, client, request seq, admitted)
        self.seq = 0

    def admit(self, now: float) -> bool:
        if self.rng.random() < self.background:
            return False
        rate = self.limit(now)
        if rate is None:
            return True
        if self.level is None:
            self.level = rate
        self.level = min(rate, self.level + (now - self.stamp) * rate)
        self.stamp = now
        if self.level >= 1:
            self.level -= 1
            return True
        return False


@dataclass
class SimClient:
    rate: AdaptiveRate
    concurrency: int
    latency: float
    jitter: float = 0.0  # each answer takes latency x (1 +- up to jitter), drawn from the server's generator
    in_flight: int = 0
    ticket: int | None = None
    sent: int = 0
    accepted: int = 0
    throttled: int = 0
    accepted_at: list[float] = field(default_factory=list)
    throttled_at: list[float] = field(default_factory=list)


def simulate(server: SimServer, clients: list[SimClient], clock: SimClock, *, seconds: float,
             step: float = 0.001) -> None:
    """Advance time in `step`s: each client sends what its pacer lets through (up to its concurrency),
    answers come back after its latency and are reported to its AdaptiveRate."""
    answers = server.pending
    end = clock.now + seconds
    while clock.now < end:
        for client in clients:  # every idle worker waits for the pacer, as the runner's do
            client.rate.waiting = client.concurrency - client.in_flight
        while answers and answers[0][0] <= clock.now:
            _, _, index, seq, admitted = heapq.heappop(answers)
            client = clients[index]
            client.in_flight -= 1
            if admitted:
                client.accepted += 1
                client.accepted_at.append(clock.now)
                client.rate.answered(seq, accepted=True)
            else:
                client.throttled += 1
                client.throttled_at.append(clock.now)
                client.rate.answered(seq, throttled=True, code="Throttling.RateQuota")
        order = list(enumerate(clients))
        server.rng.shuffle(order)  # two processes interleave; neither always asks first
        for index, client in order:
            while client.in_flight < client.concurrency and client.rate.has_room():
                if client.rate.rate is not None:
                    if client.ticket is None:
                        client.ticket = client.rate.take_ticket()
                    if client.rate.wait_for(client.ticket) > 0:
                        break
                client.ticket = None
                seq = client.rate.sent()
                client.in_flight += 1
                client.sent += 1
                latency = client.latency * (1 + client.jitter * (2 * server.rng.random() - 1)) if client.jitter else client.latency
                heapq.heappush(answers, (clock.now + latency, server.seq, index, seq, server.admit(clock.now)))
                server.seq += 1
        clock.now += step


def accepted_rate(client: SimClient, start: float, end: float) -> float:
    return sum(1 for t in client.accepted_at if start <= t < end) / (end - start)
