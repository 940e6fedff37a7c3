"""`runner report --html` at scale: its size, time and peak memory, and the 20,000-row acceptance run.

    python tests/bench/bench_report.py [--rows 20000 200000 1000000] [--run-rows 20000] [--skip-run]

Needs the `report` extra (matplotlib) and, for the browser check, chromium (apt-get install -y chromium).

1. Scale: for each --rows, an output table of that many rows (written directly in the runner's schema,
   over 6 hours, 12 models, 30 error codes, 9% failed) is summarised by `runner summary` and reported
   by `runner report --html`, each in its own process: wall time, peak RSS (os.wait4 on that child)
   and the report's size. The report keeps aggregates, not rows, so its memory should track the
   summary's (8 bytes a row for percentiles) and its size should not grow with the rows.
2. The acceptance run (--run-rows, default 20,000): `runner run` against the emulator with faults
   (429s, 5xx, 4xx, slow answers), its report, the report's size against 2 MB, and every chart checked
   as drawn in headless Chromium (the check of tests/test_html_report.py).
Prints what it measured; asserts only the acceptance (size under 2 MB, every chart drawn). Bounded:
fixed rows, timeouts on every child, the emulator always stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from runner.emulator import Emulator, EmulatorConfig  # noqa: E402
from runner.records import RESULT_SCHEMA  # noqa: E402
from tests.test_html_report import assert_every_chart_drawn, charts_as_drawn, find_chromium  # noqa: E402

FAULTS = {"429": 0.05, "429burst": 0.01, "500": 0.02, "502": 0.01, "503": 0.01, "400": 0.005, "moderation": 0.005,
          "slow": 0.01}
MAX_BYTES = 2 * 1024 * 1024


def write_output(path: Path, rows: int, *, batch: int = 65_536) -> None:
    """A `rows`-row output table, one row group per `batch` rows, made with numpy (never all rows at once)."""
    start = np.datetime64("2025-01-01T00:00:00", "us")
    span_us = 6 * 3600 * 1_000_000
    rng = np.random.default_rng(7)
    with pq.ParquetWriter(path, RESULT_SCHEMA) as writer:
        for first in range(0, rows, batch):
            n = min(batch, rows - first)
            ids = np.arange(first, first + n)
            failed = rng.random(n) < 0.09
            throttled = failed & (rng.random(n) < 0.4)
            duration = rng.lognormal(4.5, 1.0, n)
            finished = start + (ids * (span_us // max(rows, 1))).astype("timedelta64[us]")
            tokens_in, tokens_out = rng.integers(10, 200, n), rng.integers(5, 400, n)
            codes = np.where(throttled, "limit_requests", np.char.add("code_", (ids % 30).astype(str)))
            columns = {
                "row_id": ids, "key": np.char.add("k", ids.astype(str)), "model": np.char.add("model-", (ids % 12).astype(str)),
                "variant": [None] * n, "sample_index": [None] * n,
                "response": np.where(failed, None, "ok"), "reasoning": [None] * n,
                "finish_reason": np.where(failed, None, "stop"), "input_tokens": tokens_in,
                "output_tokens": tokens_out, "total_tokens": tokens_in + tokens_out, "cached_tokens": np.zeros(n, int),
                "reasoning_tokens": np.zeros(n, int), "cost": (tokens_in + tokens_out) * 1e-6,
                "request_id": [None] * n, "status": np.where(failed, "error", "ok"), "mode": ["online"] * n,
                "error_type": np.where(throttled, "Throttled", np.where(failed, "TransientCallError", None)),
                "error_code": np.where(failed, codes, None), "error_message": [None] * n,
                "http_status": np.where(throttled, 429, np.where(failed, 500, 0)),
                "attempts": 1 + (rng.random(n) < 0.1) + failed * 2, "latency_ms": duration / 2, "duration_ms": duration,
                "time_to_first_token_ms": [None] * n,
                "started_at": finished - (duration * 1000).astype("timedelta64[us]"), "finished_at": finished,
            }
            arrays = []
            for field in RESULT_SCHEMA:
                values = columns[field.name]
                mask = None
                if field.name == "http_status":
                    mask = ~failed
                if isinstance(values, np.ndarray) and values.dtype == object:
                    values = values.tolist()
                arrays.append(pa.array(values, type=field.type, mask=mask))
            writer.write_batch(pa.record_batch(arrays, schema=RESULT_SCHEMA))


def measured(args: list[str], timeout: float = 1800) -> tuple[float, int, int]:
    """(wall seconds, peak RSS in MB, exit code) of `python -m runner ARGS` in its own process."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "runner", *args], cwd=ROOT, stdout=subprocess.DEVNULL)
    deadline = started + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(" ".join(args))
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.monotonic() - started, usage.ru_maxrss // 1024, proc.returncode


def scale(rows_list: list[int], folder: Path) -> None:
    print(f"{'rows':>10} {'summary s':>10} {'summary MB':>11} {'report s':>9} {'report MB':>10} {'report KB':>10}")
    for rows in rows_list:
        output = folder / f"out-{rows}.parquet"
        write_output(output, rows)
        summary_s, summary_mb, code = measured(["summary", str(output)])
        assert code == 0
        report = folder / f"report-{rows}.html"
        report_s, report_mb, code = measured(["report", str(output), "--html", str(report)])
        assert code == 0
        print(f"{rows:>10,} {summary_s:>10.1f} {summary_mb:>11,} {report_s:>9.1f} {report_mb:>10,} "
              f"{report.stat().st_size / 1024:>10,.0f}", flush=True)
        output.unlink()


def faulty_run(folder: Path, rows: int, *, latency_ms: float = 5, jitter_ms: float = 20, slow_ms: float = 500,
               timeout: float = 1800) -> Path:
    """`rows` prompts over three models (a model column) run against the emulator with FAULTS (429s, 5xx,
    4xx, slow answers); returns the output. Used by the acceptance run and by docs/make_report_picture.py."""
    models = ["qwen-plus", "qwen-flash", "qwen-max"]
    with (folder / "prompts.jsonl").open("w", encoding="utf-8") as out:
        for i in range(rows):
            out.write(json.dumps({"id": f"row-{i:06d}", "prompt": f"Question {i}: what is {i} squared?",
                                  "model": models[i % 3]}) + "\n")
    config = EmulatorConfig(faults=FAULTS, latency_ms=latency_ms, latency_jitter_ms=jitter_ms, slow_ms=slow_ms)
    with Emulator(config) as emulator:
        job = folder / "job.toml"
        job.write_text(f"""[input]
path = "prompts.jsonl"
id_column = "id"
prompt_column = "prompt"
model_column = "model"
[endpoint]
dialect = "openai"
base_url = "{emulator.openai_base_url}"
[model]
name = "qwen-plus"
[run]
concurrency = 64
max_attempts = 4
max_error_rate = 1.0
# The emulator's 429s here are background faults, not a limit our rate meets: paced adaptively, the run
# would slow to ~15 rows/s and take 20 minutes; short back-offs keep the run near a minute.
adaptive_rate = false
backoff_initial = 0.05
backoff_max = 1.0
[output]
path = "out/run.parquet"
""", encoding="utf-8")
        started = time.monotonic()
        run = subprocess.run([sys.executable, "-m", "runner", "run", str(job), "--progress", "off", "--quiet",
                              "--overwrite"], cwd=ROOT, env={**os.environ, "DASHSCOPE_API_KEY": "sk-emulator-local"},
                             timeout=timeout)
        print(f"run: {rows:,} rows with faults, exit {run.returncode}, {time.monotonic() - started:.1f} s")
    return folder / "out" / "run.parquet"


def acceptance_run(rows: int, folder: Path) -> None:
    output = faulty_run(folder, rows)
    report = folder / "run.report.html"
    report_s, report_mb, code = measured(["report", str(output), "--html", str(report)])
    size = report.stat().st_size
    print(f"report: exit {code}, {size:,} bytes ({size / MAX_BYTES:.1%} of 2 MB), {report_s:.1f} s, {report_mb} MB peak")
    assert code == 0 and size < MAX_BYTES
    chromium = find_chromium()
    if chromium is None:
        print("chromium: not installed (apt-get install -y chromium): charts not checked in a browser")
        return
    found = charts_as_drawn(chromium, report, folder)
    assert_every_chart_drawn(found)
    print("chromium: every chart drawn: " + ", ".join(f"{k[6:]} {v['inked']:.0%} inked"
                                                     for k, v in found.items() if k.startswith("chart-")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000, 1_000_000])
    parser.add_argument("--run-rows", type=int, default=20_000)
    parser.add_argument("--skip-run", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-report-") as folder:
        scale(args.rows, Path(folder))
        if not args.skip_run:
            acceptance_run(args.run_rows, Path(folder))


if __name__ == "__main__":
    main()
