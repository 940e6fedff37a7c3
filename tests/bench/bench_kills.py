"""Crash safety under repeated kill -9, and what checkpointing costs.

    python tests/bench/bench_kills.py [--kills 20] [--rows 5000] [--concurrency 64] [--latency-ms 20]

1. Runs `runner run` against the emulator (a subprocess) and kills it with SIGKILL at random moments,
   rerunning until the job completes, `--kills` times over (a finished job starts a fresh output).
   Reports rows lost (input rows missing from a final output: must be 0) and paid requests
   answered twice, per kill (at most the concurrency by design).
2. Runs the same job clean with the default commit interval and with the largest one (one part at
   the end), and prints the throughput ratio: the overhead of committing parts as it goes.
Bounded in kills, rows and time; stops the emulator at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq

try:
    from tests.bench.harness import ROOT, start_emulator, stop_emulator, write_job
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.bench.harness import ROOT, start_emulator, stop_emulator, write_job

ENV = {**os.environ, "DASHSCOPE_API_KEY": "sk-bench"}


def stats(url: str) -> dict:
    with urllib.request.urlopen(url + "/_emulator/stats") as response:
        return json.load(response)


def reset(url: str) -> None:
    urllib.request.urlopen(urllib.request.Request(url + "/_emulator/reset", method="POST")).close()


def run(job: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner", "run", str(job), "--quiet", *extra], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=900)


def kill_loop(folder: Path, url: str, args, rng: random.Random) -> dict:
    job = write_job(folder, url, "killed", concurrency=args.concurrency, adaptive_rate=False)
    output = folder / "killed.parquet"
    kills = jobs = lost = duplicates = 0
    while kills < args.kills:
        jobs += 1
        output.unlink(missing_ok=True)
        reset(url)
        while True:
            proc = subprocess.Popen([sys.executable, "-m", "runner", "run", str(job), "--quiet"], cwd=ROOT, env=ENV,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                _, stderr = proc.communicate(timeout=rng.uniform(1.0, 4.0))  # startup ~0.5 s; kill in the run
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.communicate()
                kills += 1
                if output.exists():
                    break  # killed after the final rename: the job is complete
                continue
            if proc.returncode != 0:
                raise SystemExit(f"run failed with exit {proc.returncode}: {stderr}")
            break
        keys = stats(url)["keys"]
        paid_twice = sum(max(0, v["succeeded"] - 1) for v in keys.values())
        table = pq.read_table(output, columns=["row_id", "status"])
        lost += args.rows - table.num_rows
        duplicates += paid_twice
    return {"jobs": jobs, "kills": kills, "rows_lost": lost, "paid_twice": duplicates,
            "paid_twice_per_kill": round(duplicates / kills, 2), "concurrency": args.concurrency}


def checkpoint_overhead(folder: Path, url: str, args) -> dict:
    """Best of `repeats` clean runs for each commit interval, alternating so drift hits both alike."""
    variants = {"default_commits": (1000, 5.0), "one_commit": (10**9, 10**6)}
    jobs = {name: write_job(folder, url, name, concurrency=args.concurrency, part_rows=rows, part_seconds=seconds,
                            adaptive_rate=False)
            for name, (rows, seconds) in variants.items()}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, job in jobs.items():
            proc = run(job, "--overwrite")
            if proc.returncode != 0:
                raise SystemExit(proc.stderr)
            summary = json.loads((folder / f"{name}.summary.json").read_text())
            rates[name].append(summary["this_run"]["rows_per_second"])
    results = {name: max(values) for name, values in rates.items()}
    results["overhead"] = round(1 - results["default_commits"] / results["one_commit"], 3)
    results["all_runs"] = rates
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--skip-kills", action="store_true", help="only measure the checkpointing overhead")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    emulator, url = start_emulator(args.latency_ms)
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            with open(folder / "prompts.jsonl", "w") as fh:
                for i in range(args.rows):
                    fh.write(json.dumps({"id": f"r{i}", "prompt": f"Kill test prompt {i}."}) + "\n")
            kills = None if args.skip_kills else kill_loop(folder, url, args, rng)
            print(json.dumps({"kill_loop": kills}))
            overhead = checkpoint_overhead(folder, url, args)
            print(json.dumps({"checkpointing": overhead}))
    finally:
        stop_emulator(emulator)
    if kills:
        print(f"\n{kills['kills']} kills over {kills['jobs']} jobs of {args.rows} rows (concurrency {args.concurrency}): "
              f"{kills['rows_lost']} rows lost, {kills['paid_twice']} requests paid twice "
              f"({kills['paid_twice_per_kill']} per kill; bound {args.concurrency})")
    print(f"checkpointing: {overhead['default_commits']:,.0f} rows/s with default commits vs "
          f"{overhead['one_commit']:,.0f} rows/s with one commit at the end: overhead {overhead['overhead']:.1%}")
    print(f"wall {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
