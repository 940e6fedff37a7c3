"""What the HTML report draws, aggregated from an output table in one streamed pass: no rows are kept.

`collect_report(path)` reads the output (or an unfinished run's parts) through `summarize_file`, so the
numbers are the summary's own, and folds every counted row into aggregates of bounded size: a timeline
whose buckets widen as the run gets longer, log-scale histograms with fixed bins, and counters by model.
Memory is the summary's (8 bytes a row for percentiles) plus a few thousand numbers, whatever the rows.

What the table can tell about 429s: each row keeps its last attempt only. A row that gave up on a 429
says so (error_type Throttled or HTTP 429); a row that was throttled and then succeeded shows only
`attempts > 1`, which a 5xx or a timeout leaves too. The count of 429 answers by code comes from the
summary JSON the run wrote beside its output, and covers that run only (the last one, after a resume).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .report import RunSummary, summarize_file

# Timeline columns, one count per bucket each.
OK, FAILED, REQUESTS, RETRIES, THROTTLED = range(5)
TIMELINE_COLUMNS = ("ok", "failed", "requests", "retries", "throttled")


@dataclass
class Timeline:
    """Counts by the time rows finished, in buckets of `width` x `resolution` seconds (width 1, 2, 4, ...):
    when more than `max_buckets` hold rows, the width doubles and neighbours merge, so the size stays
    bounded however long the run (2,048 buckets: quarter seconds for 8 minutes, 64 s for 36 hours)."""

    resolution: float = 0.25
    max_buckets: int = 2048
    width: int = 1
    buckets: dict[int, list[int]] = field(default_factory=dict)   # floor(epoch s / resolution / width) -> counts

    def add(self, finished: datetime, counts: tuple[int, int, int, int, int]) -> None:
        tick = math.floor(finished.timestamp() / self.resolution)
        bucket = self.buckets.get(tick // self.width)
        if bucket is None:
            # Sparse buckets (runs days apart) may need several doublings before neighbours merge.
            while len(self.buckets) >= self.max_buckets and tick // self.width not in self.buckets:
                self._widen()
            bucket = self.buckets.setdefault(tick // self.width, [0] * len(TIMELINE_COLUMNS))
        for column, n in enumerate(counts):
            bucket[column] += n

    def _widen(self) -> None:
        # floor(floor(x) / 2) == floor(x / 2): merging neighbours is the same as binning again.
        self.width *= 2
        merged: dict[int, list[int]] = {}
        for index, counts in self.buckets.items():
            target = merged.setdefault(index // 2, [0] * len(TIMELINE_COLUMNS))
            for column, n in enumerate(counts):
                target[column] += n
        self.buckets = merged

    def dense(self, max_points: int = 240) -> tuple[list[datetime], list[list[int]], float]:
        """(bucket start times, one list of counts per column, bucket width in seconds) over the whole
        span, empty buckets as zeros, merged further so there are at most `max_points`, plus one closing
        time (the end of the last bucket) so a step drawing shows the last bucket whole."""
        if not self.buckets:
            return [], [[] for _ in TIMELINE_COLUMNS], self.width
        first, last = min(self.buckets), max(self.buckets)
        factor = max(1, math.ceil((last - first + 1) / max_points))
        width = self.width * factor * self.resolution
        start = first // factor
        points = last // factor - start + 1
        columns = [[0] * (points + 1) for _ in TIMELINE_COLUMNS]
        for index, counts in self.buckets.items():
            for column, n in enumerate(counts):
                columns[column][index // factor - start] += n
        for column in columns:  # the closing point repeats the last bucket
            column[-1] = column[-2]
        times = [datetime.fromtimestamp((start + i) * width, tz=timezone.utc) for i in range(points + 1)]
        return times, columns, width


@dataclass
class LogHistogram:
    """Counts of milliseconds in log-spaced bins, `per_decade` to a factor of ten, from `low` ms up;
    values at or below `low` fall in bin 0."""

    low: float = 0.1
    per_decade: int = 10
    counts: Counter = field(default_factory=Counter)

    def add(self, ms: float) -> None:
        index = 0 if ms <= self.low else math.floor(self.per_decade * math.log10(ms / self.low))
        self.counts[index] += 1

    def edge(self, index: int) -> float:
        return self.low * 10 ** (index / self.per_decade)

    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class ModelTotals:
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass
class ReportData:
    """Everything the report shows: the summary, and the aggregates behind each chart."""

    summary: RunSummary
    timeline: Timeline = field(default_factory=Timeline)
    latency_ok: LogHistogram = field(default_factory=LogHistogram)       # ok rows, last attempt
    duration_ok: LogHistogram = field(default_factory=LogHistogram)      # first send to end
    duration_failed: LogHistogram = field(default_factory=LogHistogram)
    model_tokens: dict[str, ModelTotals] = field(default_factory=dict)
    rows_without_time: int = 0       # never sent (an invalid row): not on the timeline
    retried_rows: int = 0            # rows that took more than one attempt
    throttled_rows: int = 0          # rows whose last answer was a 429
    throttled_answers: dict[str, int] | None = None   # 429 answers by code, from the summary JSON
    has_duration: bool = True        # outputs written before duration_ms have none

    def observe(self, row: dict[str, Any]) -> None:
        ok = row["status"] == "ok"
        attempts = row["attempts"] or 0
        throttled = not ok and (row.get("http_status") == 429 or row["error_type"] == "Throttled")
        self.retried_rows += attempts > 1
        self.throttled_rows += throttled
        if row["finished_at"] is not None:
            self.timeline.add(row["finished_at"], (int(ok), int(not ok), attempts, max(attempts - 1, 0),
                                                   int(throttled)))
        else:
            self.rows_without_time += 1
        if ok and row["latency_ms"] is not None:
            self.latency_ok.add(row["latency_ms"])
        duration = row.get("duration_ms")
        if duration is not None:
            (self.duration_ok if ok else self.duration_failed).add(duration)
        model = self.model_tokens.get(row.get("model") or "")
        if model is None:
            model = self.model_tokens[row.get("model") or ""] = ModelTotals()
        model.input_tokens += row["input_tokens"] or 0
        model.output_tokens += row["output_tokens"] or 0


def collect_report(path: str | Path) -> ReportData:
    """Read an output (or an unfinished run's parts) once, batch by batch, into a ReportData."""
    data = ReportData(summary=RunSummary())
    data.summary = summarize_file(path, observe=data.observe)
    data.throttled_answers = _throttled_answers(Path(path), data.summary)
    data.has_duration = bool(data.duration_ok.total() + data.duration_failed.total()) or not data.summary.rows
    return data


def _throttled_answers(path: Path, summary: RunSummary) -> dict[str, int] | None:
    """The run's 429 answers by code, from its summary JSON when that describes this output's rows."""
    try:
        data = json.loads(path.with_name(path.stem + ".summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("rows") != summary.rows or not isinstance(data.get("throttled"), dict):
        return None
    return {str(code): int(n) for code, n in data["throttled"].items() if isinstance(n, int)}
