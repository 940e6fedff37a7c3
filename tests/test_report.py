"""RunSummary: latency percentiles by nearest rank."""

from __future__ import annotations

import math
import random

from runner.records import Result, Usage
from runner.report import RunSummary


def _ok(latency_ms: float) -> Result:
    return Result(row_id=0, key="k", model="qwen-plus", status="ok", usage=Usage(1, 1, 2), latency_ms=latency_ms)


def test_latency_percentiles_are_nearest_rank():
    """p50/p90/p99 are the nearest-rank values of every latency seen, whatever the count; none without any."""
    assert RunSummary().latency_percentiles() == {"p50": None, "p90": None, "p99": None}
    rng = random.Random(7)
    for count in (1, 2, 13, 100, 1001):
        summary = RunSummary()
        latencies = [rng.uniform(1, 5000) for _ in range(count)]
        for latency in latencies:
            summary.add(_ok(latency))
        ranked = sorted(latencies)
        expected = {name: ranked[max(0, math.ceil(q * count) - 1)] for name, q in (("p50", 0.5), ("p90", 0.9),
                                                                                   ("p99", 0.99))}
        assert summary.latency_percentiles() == expected
        summary.add(_ok(1.0))  # still counting after a report
        assert summary.to_dict()["latency_ms"]["p50"] is not None
