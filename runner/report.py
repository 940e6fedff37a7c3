"""RunSummary: what a run did, from live results or from an output file; text and JSON renderings."""

from __future__ import annotations

import math
from array import array
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from .errors import SourceError
from .records import Result
from .sink import CURRENCY_KEY, MANIFEST

# Sees each row summarize_file counts, as a dict of SUMMARY_COLUMNS and the OPTIONAL_COLUMNS the file has.
RowObserver = Callable[[dict[str, Any]], None]


def _sorted(values: array):
    import pyarrow as pa

    # Sorted by Arrow over the array's own buffer: sorted() would make a float object per row
    # (40 MB at 1M rows, on top of the merge's peak).
    return pa.Array.from_buffers(pa.float64(), len(values), [None, pa.py_buffer(values)]).sort()


def _percentiles(values: array) -> dict[str, float | None]:
    ordered = _sorted(values)
    return {name: _percentile(ordered, q) for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}


@dataclass
class ModelSummary:
    """One model's (or one prompt variant's) share of a run: [model] names or a model_column send to
    several models, [[input.variants]] prompt each row several ways."""

    rows: int = 0
    ok: int = 0
    failed: int = 0
    total_tokens: int = 0
    cost: float = 0.0
    _latencies: array = field(default_factory=lambda: array("d"), repr=False)

    @property
    def error_rate(self) -> float:
        return self.failed / self.rows if self.rows else 0.0

    def add(self, result: Result) -> None:
        self.rows += 1
        if result.ok:
            self.ok += 1
            if result.latency_ms is not None:
                self._latencies.append(result.latency_ms)
        else:
            self.failed += 1
        self.total_tokens += result.usage.total_tokens or 0
        self.cost += result.cost or 0.0

    def to_dict(self) -> dict[str, Any]:
        latency = _percentiles(self._latencies)
        return {"rows": self.rows, "ok": self.ok, "failed": self.failed, "error_rate": round(self.error_rate, 6),
                "total_tokens": self.total_tokens, "cost": round(self.cost, 6),
                "latency_ms": {k: (round(v, 1) if v is not None else None) for k, v in latency.items()}}


@dataclass
class RunSummary:
    rows: int = 0
    ok: int = 0
    failed: int = 0
    skipped_done: int = 0          # rows already done by an earlier run (resume)
    changed_rows: int = 0          # rows done earlier whose request changed since: sent again
    throttled: Counter = field(default_factory=Counter)     # 429 answers (attempts, not rows) by code
    paused_seconds: float = 0.0    # time the cool-down gate held every send
    rate_control: dict = field(default_factory=dict)         # model -> how it was paced (ratelimit.describe)
    cost: float = 0.0              # estimated from usage and the price table
    currency: str | None = None
    total_rows: int | None = None  # the job's rows, for the cost projection
    attempts: int = 0              # requests sent, retries included
    errors: Counter = field(default_factory=Counter)        # (error_type, error_code, http_status) -> rows
    models: dict = field(default_factory=dict)               # model -> ModelSummary
    variants: dict = field(default_factory=dict)             # [[input.variants]] name -> ModelSummary
    finish_reasons: Counter = field(default_factory=Counter)
    modes: Counter = field(default_factory=Counter)          # "online" / "batch" -> rows
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    wall_seconds: float | None = None
    output: str | None = None
    unfinished_parts: int | None = None  # summarised from the parts of a run that has not finished
    this_run: dict | None = None   # a resumed run's own rows, requests and wall time (the summary JSON's)
    _durations: array = field(default_factory=lambda: array("d"), repr=False)
    _first_start: datetime | None = field(default=None, repr=False)
    _last_finish: datetime | None = field(default=None, repr=False)

    def add(self, result: Result) -> None:
        self.rows += 1
        self.modes[result.mode] += 1
        self.attempts += result.attempts
        model = self.models.get(result.model)
        if model is None:
            model = self.models[result.model] = ModelSummary()
        model.add(result)  # latencies are kept once, per model (8 bytes a row); the run's are their union
        if result.variant is not None:
            variant = self.variants.get(result.variant)
            if variant is None:
                variant = self.variants[result.variant] = ModelSummary()
            variant.add(result)
        if result.ok:
            self.ok += 1
            self.finish_reasons[result.finish_reason or "unknown"] += 1
        else:
            self.failed += 1
            # The HTTP status tells codeless errors apart (a 502 from a 504); with a code it adds nothing.
            status = result.http_status if not result.error_code else None
            self.errors[(result.error_type or "Error", result.error_code or "", status)] += 1
        if result.duration_ms is not None:  # every row that was sent, failed ones too: they are the slow ones
            self._durations.append(result.duration_ms)
        self.cost += result.cost or 0.0
        usage = result.usage
        self.input_tokens += usage.input_tokens or 0
        self.output_tokens += usage.output_tokens or 0
        self.total_tokens += usage.total_tokens or 0
        self.cached_tokens += usage.cached_tokens or 0
        self.reasoning_tokens += usage.reasoning_tokens or 0
        if result.started_at and (self._first_start is None or result.started_at < self._first_start):
            self._first_start = result.started_at
        if result.finished_at and (self._last_finish is None or result.finished_at > self._last_finish):
            self._last_finish = result.finished_at

    @property
    def error_rate(self) -> float:
        return self.failed / self.rows if self.rows else 0.0

    def error_rate_breaches(self, limit: float) -> list[tuple[str, ModelSummary]]:
        """The models whose own share of failed rows is above `limit` (--max-error-rate applies to each model,
        so one failing model is not hidden by the clean ones), worst first; for one model, the run's rate."""
        crossed = [(name, m) for name, m in self.models.items() if m.rows and m.error_rate > limit]
        if not self.models and self.rows and self.error_rate > limit:  # rows without a model (an old output)
            crossed.append(("", ModelSummary(rows=self.rows, ok=self.ok, failed=self.failed)))
        return sorted(crossed, key=lambda item: -item[1].error_rate)

    def latency_percentiles(self) -> dict[str, float | None]:
        """Of the successful rows' last attempts."""
        per_model = [m._latencies for m in self.models.values()]
        if len(per_model) == 1:
            return _percentiles(per_model[0])
        every = array("d")
        for latencies in per_model:
            every.extend(latencies)
        return _percentiles(every)

    def duration_percentiles(self) -> dict[str, float | None]:
        """Of every sent row's whole time: first send to end, retries and waits included."""
        return _percentiles(self._durations)

    @property
    def span_seconds(self) -> float | None:
        """The time the throughput is over: the run's wall time, or the rows' first start to last finish
        (but not for a resumed output: that span holds every run and the gaps between them)."""
        if self.wall_seconds is not None:
            return self.wall_seconds
        if self.this_run is not None:
            return None
        if self._first_start and self._last_finish:
            return max((self._last_finish - self._first_start).total_seconds(), 1e-9)
        return None

    def to_dict(self) -> dict[str, Any]:
        span = self.span_seconds
        return {
            "output": self.output,
            "rows": self.rows,
            "ok": self.ok,
            "failed": self.failed,
            "skipped_already_done": self.skipped_done,
            "error_rate": round(self.error_rate, 6),
            "requests_sent": self.attempts,
            "rows_by_mode": dict(self.modes.most_common()),
            "errors": [{"error_type": t, "error_code": c or None, "http_status": status, "rows": n}
                       for (t, c, status), n in self.errors.most_common()],
            "finish_reasons": dict(self.finish_reasons.most_common()),
            "tokens": {"input": self.input_tokens, "output": self.output_tokens, "total": self.total_tokens,
                       "cached": self.cached_tokens, "reasoning": self.reasoning_tokens},
            "latency_ms": {k: (round(v, 1) if v is not None else None) for k, v in self.latency_percentiles().items()},
            "duration_ms": {k: (round(v, 1) if v is not None else None) for k, v in self.duration_percentiles().items()},
            "models": {m: s.to_dict() for m, s in sorted(self.models.items(), key=lambda kv: -kv[1].rows)},
            **({"variants": {v: s.to_dict() for v, s in self.variants.items()}} if self.variants else {}),
            "cost": {"spent": round(self.cost, 6), "currency": self.currency,
                     "projected_total": (round(self.cost / self.rows * self.total_rows, 6)
                                         if self.rows and self.total_rows else None)},
            "throttled": dict(self.throttled.most_common()),
            "paused_seconds": round(self.paused_seconds, 2),
            "rate_control": self.rate_control,
            "wall_seconds": round(span, 3) if span else None,
            "requests_per_second": round(self.attempts / span, 2) if span else None,
            "rows_per_second": round(self.rows / span, 2) if span else None,
            "tokens_per_second": round(self.total_tokens / span, 1) if span else None,
            **({"unfinished_parts": self.unfinished_parts} if self.unfinished_parts is not None else {}),
            **({"this_run": self.this_run} if self.this_run is not None else {}),
        }

    def render(self) -> str:
        d = self.to_dict()
        lat = d["latency_ms"]
        lines = [f"unfinished run: {d['rows']:,} rows committed in {self.unfinished_parts:,} parts"
                 + (f" of {self.total_rows:,}" if self.total_rows else "")] if self.unfinished_parts is not None else []
        lines += [
            f"rows       {d['rows']:,}  ok {d['ok']:,}  failed {d['failed']:,}"
            + (f"  (skipped {d['skipped_already_done']:,} already done)" if d["skipped_already_done"] else ""),
            f"requests   {d['requests_sent']:,} sent (retries included)"
            + ("; rows by mode: " + ", ".join(f"{m} {n:,}" for m, n in self.modes.most_common())
               if self.modes.get("batch") else ""),
            f"tokens     input {self.input_tokens:,}  output {self.output_tokens:,}  total {self.total_tokens:,}"
            + (f"  cached {self.cached_tokens:,}" if self.cached_tokens else "")
            + (f"  reasoning {self.reasoning_tokens:,}" if self.reasoning_tokens else ""),
            "latency    " + "  ".join(f"{k} {_ms(v)}" for k, v in lat.items()) + "  (ok rows, last attempt)",
            "duration   " + "  ".join(f"{k} {_ms(v)}" for k, v in d["duration_ms"].items())
            + "  (sent rows, first send to end, retries included)",
        ]
        if self.this_run:
            run = self.this_run
            lines.append(f"this run   {run.get('rows') or 0:,} rows  {run.get('requests_sent') or 0:,} requests"
                         + (f"  over {run['wall_seconds']:,} s  {run['rows_per_second']:,} rows/s"
                            if run.get("wall_seconds") and run.get("rows_per_second") is not None else "")
                         + f"  (the output's other {self.skipped_done:,} rows came from earlier runs)")
        if d["wall_seconds"]:
            lines.append(f"throughput {d['rows_per_second']:,} rows/s  {d['requests_per_second']:,} requests/s  "
                         f"{d['tokens_per_second']:,} tokens/s  over {d['wall_seconds']:,} s")
        if self.cost:
            projected = d["cost"]["projected_total"]
            lines.append(f"cost       {self.cost:,.4f} {self.currency or ''}"
                         + (f"  (projected for all {self.total_rows:,} rows: {projected:,.4f})"
                            if projected and self.total_rows and self.total_rows > self.rows else ""))
        if self.throttled:
            lines.append("throttled  " + "  ".join(f"{code} {n:,}" for code, n in self.throttled.most_common())
                         + f"  (paused {self.paused_seconds:,.1f} s)")
        for model, rc in self.rate_control.items():
            lines.append("rate       " + _describe_rate(model, rc))
        if len(self.models) > 1:
            lines.extend(self._share_line("model", model, m) for model, m in d["models"].items())
        if self.variants:
            lines.extend(self._share_line("variant", variant, v) for variant, v in d["variants"].items())
        for err in d["errors"][:10]:
            lines.append(f"error      {err['rows']:,} x {err['error_type']}"
                         + (f" {err['error_code']}" if err["error_code"] else "")
                         + (f" (HTTP {err['http_status']})" if err["http_status"] else ""))
        if len(d["errors"]) > 10:
            lines.append(f"error      ... {len(d['errors']) - 10} more classes")
        if self.output:
            lines.append(f"output     {self.output}")
        return "\n".join(lines)


    def _share_line(self, kind: str, name: str, m: dict) -> str:
        """One model's or variant's line: rows, ok, failed, tokens, cost, latency percentiles."""
        return (f"{kind:<10} {name}: {m['rows']:,} rows  ok {m['ok']:,}  failed {m['failed']:,}  "
                f"tokens {m['total_tokens']:,}"
                + (f"  cost {m['cost']:,.4f} {self.currency or ''}".rstrip() if m["cost"] else "")
                + f"  latency p50 {_ms(m['latency_ms']['p50'])}  p90 {_ms(m['latency_ms']['p90'])}"
                  f"  p99 {_ms(m['latency_ms']['p99'])}")


def _describe_rate(model: str, rc: dict) -> str:
    """One model's pacing: the rate it ended at, its cuts, and its 429s by cause."""
    rate = rc.get("rate_per_second")
    pacing = rc.get("pacing")
    if pacing == "configured":
        text = f"{model}: paced at {rate:,.1f} requests/s (configured)" if rate else f"{model}: tokens paced (configured)"
    elif pacing == "adaptive":
        text = (f"{model}: no limit met (never throttled for rate)" if rc.get("startup")
                else f"{model}: converged on {rate:,.1f} requests/s")
    else:
        text = f"{model}: not paced (adaptive_rate = false)"
    if rc.get("cuts"):
        text += f", {rc['cuts']:,} cuts ({rc.get('undone_cuts', 0):,} undone as background)"
    rate_caused, background = rc.get("throttled_rate_caused", 0), rc.get("throttled_background", 0)
    if rate_caused or background:
        text += f"; 429s {rate_caused:,} rate-caused, {background:,} background"
    return text


def _percentile(sorted_values, q: float) -> float | None:
    """Nearest rank, from a sorted Arrow array."""
    if not len(sorted_values):
        return None
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index].as_py()


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms"


SUMMARY_COLUMNS = ["status", "error_type", "error_code", "finish_reason", "attempts", "latency_ms", "cost", "input_tokens",
                   "output_tokens", "total_tokens", "cached_tokens", "reasoning_tokens", "started_at", "finished_at"]
# Not in every output: mode came with batch mode, duration_ms with issue 17, variant with fan-out (issue 16).
OPTIONAL_COLUMNS = ["mode", "model", "http_status", "duration_ms", "variant"]


def summarize_file(path: str | Path, *, observe: RowObserver | None = None) -> RunSummary:
    """A summary from an output Parquet file, read batch by batch; for a run that has not finished (no
    output yet), from the parts it committed, the newest row per row_id winning as in the merge.
    `observe`, if given, sees every row the summary counts (the HTML report's charts read them so)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    parts_dir = path.with_name(path.name + ".parts")
    if not path.exists() and parts_dir.is_dir():
        return _summarize_parts(path, parts_dir, observe)
    try:
        parquet = pq.ParquetFile(path)
    except FileNotFoundError:
        raise SourceError(f"{path}: file not found (and no {parts_dir.name}/ of an unfinished run beside it)") from None
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"{path}: not a readable Parquet file ({exc})") from None
    with parquet:
        summary = RunSummary(output=str(path))
        metadata = parquet.schema_arrow.metadata or {}
        if CURRENCY_KEY in metadata:
            summary.currency = metadata[CURRENCY_KEY].decode()
        _add_rows(summary, parquet, path, observe=observe)
    _read_summary_json(summary, path)
    return summary


def _columns(parquet, path: Path) -> list[str]:
    names = parquet.schema_arrow.names
    missing = [c for c in SUMMARY_COLUMNS if c not in names]
    if missing:
        raise SourceError(f"{path}: not a runner output (no column {', '.join(missing)})")
    return SUMMARY_COLUMNS + [c for c in OPTIONAL_COLUMNS if c in names]


def _add_rows(summary: RunSummary, parquet, path: Path, seen: bytearray | None = None,
              observe: RowObserver | None = None) -> None:
    """Add every row of `parquet` to `summary`; with `seen` (a row_id bitmap), only rows not seen yet."""
    columns = _columns(parquet, path) + (["row_id"] if seen is not None else [])
    for batch in parquet.iter_batches(columns=columns, batch_size=65_536):
        for row in batch.to_pylist():
            if seen is not None:
                row_id = row["row_id"]
                if row_id >= len(seen):
                    seen.extend(bytes(max(row_id + 1 - len(seen), len(seen))))
                if seen[row_id]:
                    continue
                seen[row_id] = 1
            summary.add(_result(row))
            if observe is not None:
                observe(row)


def _result(row: dict[str, Any]) -> Result:
    from .records import Usage

    return Result(
        row_id=0, key="", model=row.get("model") or "", status=row["status"], mode=row.get("mode") or "online",
        finish_reason=row["finish_reason"],
        usage=Usage(row["input_tokens"], row["output_tokens"], row["total_tokens"], row["cached_tokens"],
                    row["reasoning_tokens"]),
        cost=row["cost"], error_type=row["error_type"], error_code=row["error_code"],
        http_status=row.get("http_status"), attempts=row["attempts"] or 0, latency_ms=row["latency_ms"],
        duration_ms=row.get("duration_ms"), started_at=row["started_at"], finished_at=row["finished_at"],
        variant=row.get("variant"))


def _summarize_parts(path: Path, parts_dir: Path, observe: RowObserver | None = None) -> RunSummary:
    """The rows an unfinished run committed: newest part first, so a row sent again counts once, as its
    latest result (the merge's rule). Rows only in a journal are not committed yet and not counted."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = sorted(parts_dir.glob("part-*.parquet"), key=lambda p: int(p.stem.split("-")[1]), reverse=True)
    summary = RunSummary(output=str(path), unfinished_parts=len(parts))
    try:
        summary.currency = json.loads((parts_dir / MANIFEST).read_text(encoding="utf-8")).get("currency")
    except (OSError, ValueError, AttributeError):
        pass
    seen = bytearray()
    for part in parts:
        try:
            with pq.ParquetFile(part) as parquet:
                _add_rows(summary, parquet, part, seen, observe)
        except (OSError, pa.ArrowException) as exc:
            raise SourceError(f"{part}: cannot read a committed part ({exc})") from None
    if summary.currency is None:
        _read_summary_json(summary, path, currency_only=True)
    return summary


def _read_summary_json(summary: RunSummary, path: Path, *, currency_only: bool = False) -> None:
    """Take the currency, and a resumed run's own numbers, from the summary JSON the run wrote beside its
    output (`<stem>.summary.json`), when it is there and describes this output."""
    import json

    try:
        data = json.loads(path.with_name(path.stem + ".summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(data, dict):
        return
    currency = (data.get("cost") or {}).get("currency") if isinstance(data.get("cost"), dict) else None
    if summary.currency is None and isinstance(currency, str):
        summary.currency = currency
    if currency_only or data.get("rows") != summary.rows:  # an older summary of another state of the file
        return
    this_run = data.get("this_run")
    skipped = data.get("skipped_already_done") or 0
    if isinstance(this_run, dict) and skipped:
        summary.this_run = this_run
        summary.skipped_done = skipped
