"""Memory of fan-out: the same 10,000-row input with and without 3 models x 3 samples.

    python -m tests.bench.bench_fanout [--rows 10000] [--concurrency 64] [--same-output]

Two measurements, each printed with its ratio (fan-out / plain); the target (issue 16) is within 20%:
- the whole run: `runner run JOB --quiet` in a child process against the emulator (in this process, over
  loopback, 0 ms latency); the child's peak RSS from os.wait4, imports, Parquet parts and the merge included.
  The fan-out job makes 90,000 output rows from the same input (qwen-plus answers its 3 samples with one
  request, qwen-max and qwen-flash with one request per sample: 70,000 requests).
- the source alone: tracemalloc's peak while every request of the input is made (the expansion itself),
  which shows that the product is never held in memory.

It asserts nothing (it is not part of the unit suite). Measured on the shared 2-core machine (noisy: other
test suites ran at the same time), --same-output:
    plain    10,000 rows  10,000 requests  peak RSS 127.4 MB  source peak 1.01 MB
    fanout   90,000 rows  70,000 requests  peak RSS 152.1 MB  source peak 1.02 MB
    plain9x  90,000 rows  90,000 requests  peak RSS 158.9 MB  source peak 1.01 MB
    ratio fan-out / plain: RSS 1.194 (1.231 in a second run), source 1.011; fan-out / plain9x: RSS 0.957.
The whole run's difference is the output's size, not the fan-out: the final merge read up to 16,384 rows
a window (sink.MERGE_WINDOW_ROWS), which a 10,000-row output never fills and a 90,000-row one does; the
same 90,000 rows without fan-out take more. A later run on the same busy machine gave 1.317; with the
window cut to 4,096 rows: plain 125.1 MB, fan-out 140.0 MB, ratio 1.119.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from runner.emulator import Emulator, EmulatorConfig
from runner.fanout import provider_n_rule
from runner.sources import open_source
from runner.spec import load_job
from tests.helpers import ROOT, to_toml

FANOUT = {"names": ["qwen-plus", "qwen-max", "qwen-flash"], "samples": 3}


def write_input(path: Path, rows: int) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            fh.write(json.dumps({"id": f"row-{i:06d}", "prompt": f"Question number {i}: what is {i} squared?"}) + "\n")


def write_job(folder: Path, name: str, base_url: str, model: dict, concurrency: int) -> Path:
    job = folder / f"{name}.toml"
    job.write_text(to_toml({
        "input": {"path": "prompts.jsonl", "id_column": "id", "prompt_column": "prompt"},
        "endpoint": {"dialect": "openai", "base_url": base_url},
        "model": model,
        "run": {"concurrency": concurrency, "adaptive_rate": False, "cooldown_seconds": 0.0},
        "output": {"path": f"out/{name}.parquet"},
    }), encoding="utf-8")
    return job


def run_peak_rss(job: Path) -> tuple[float, float, int]:
    """(peak RSS in MB, wall seconds, exit code) of `runner run JOB --quiet` in a child process."""
    env = {**os.environ, "DASHSCOPE_API_KEY": "sk-bench"}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "runner", "run", str(job), "--quiet"], cwd=ROOT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 1024, time.perf_counter() - started, proc.returncode


def source_peak(job: Path) -> tuple[float, int, int]:
    """(tracemalloc peak in MB, requests, output rows) while every request of the job's input is made."""
    spec = load_job(job)
    tracemalloc.start()
    requests = rows = 0
    for request in open_source(spec.input, spec.model, provider_n=provider_n_rule(spec)):
        requests += 1
        rows += len(request.rows)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20, requests, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--same-output", action="store_true",
                        help="also run a 9x larger input without fan-out (as many output rows as the fan-out job)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Emulator(EmulatorConfig()) as emu:
        folder = Path(tmp)
        write_input(folder / "prompts.jsonl", args.rows)
        plain = write_job(folder, "plain", emu.openai_base_url, {"name": "qwen-plus"}, args.concurrency)
        fanned = write_job(folder, "fanout", emu.openai_base_url, FANOUT, args.concurrency)
        jobs = [("plain", plain), ("fanout", fanned)]
        if args.same_output:  # as many output rows as the fan-out job, from a 9x larger input without fan-out
            (folder / "big").mkdir()
            write_input(folder / "big" / "prompts.jsonl", args.rows * 9)
            jobs.append(("plain9x", write_job(folder / "big", "plain9x", emu.openai_base_url, {"name": "qwen-plus"},
                                              args.concurrency)))
        results = {}
        for name, job in jobs:
            before = emu.stats(keys=False)["requests"]
            rss, wall, code = run_peak_rss(job)
            sent = emu.stats(keys=False)["requests"] - before
            peak, requests, rows = source_peak(job)
            results[name] = (rss, wall, code, sent, peak, requests, rows)
            print(f"{name:7} rows {rows:>7,}  requests {sent:>7,}  exit {code}  run peak RSS {rss:7.1f} MB  "
                  f"wall {wall:5.1f} s  source peak (tracemalloc) {peak:6.2f} MB")
    rss_ratio = results["fanout"][0] / results["plain"][0]
    source_ratio = results["fanout"][4] / results["plain"][4]
    print(f"ratio   run peak RSS {rss_ratio:.3f}  source peak {source_ratio:.3f}  (target: within 1.2)")
    if "plain9x" in results:
        print(f"ratio   fan-out / plain9x (the same 90,000 output rows without fan-out): run peak RSS "
              f"{results['fanout'][0] / results['plain9x'][0]:.3f}")


if __name__ == "__main__":
    main()
