"""The Ray executor against the online executor on this machine, and a shared RPM limit under Ray.

    python tests/bench/bench_ray.py [--rows 2000,6000] [--concurrency 64] [--rpm-rows 2000] [--skip-rpm]

Needs the runner[ray] extra. Starts one local Ray (num_cpus=2, as the tests) that every `runner run
--executor ray` joins, and one emulator (no latency, no faults, no limits).

1. Per-row overhead: each executor runs the same job at two sizes; the difference in wall time over the
   difference in rows is the time a row costs once the run is going (start-up, joining Ray and starting
   the actors, cancels out), and the ratio ray/online is printed, with each run's wall time.
2. Shared limit: a second emulator enforcing RPM 3,000 (50/s) per second, a job with [run] rpm = 3000 run
   by two row actors; prints the accepted rate over the middle 80% of the run (the emulator's request log)
   against the limit, and the share of 429s.
Bounded in rows and time; stops Ray and the emulators at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

try:
    from tests.bench.harness import ROOT, start_emulator, stop_emulator, write_job
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.bench.harness import ROOT, start_emulator, stop_emulator, write_job

# The local Ray's workers import this checkout's runner: nothing to ship (an inline TOML table).
NO_RUNTIME_ENV = type("InlineTable", (), {"__str__": lambda self: "{}"})()


def write_prompts(path: Path, rows: int) -> None:
    path.write_text("".join(json.dumps({"id": f"row-{i:06d}", "prompt": f"Question {i}: what is {i} squared?"}) + "\n"
                            for i in range(rows)))


def timed_run(job: Path, *extra: str, env: dict) -> float:
    """`runner run` in a subprocess; its wall time. `env` is read after ray.init, which puts the local Ray's
    auth settings in the environment for the drivers that join it."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "runner", "run", str(job), "--quiet", "--overwrite", *extra],
                          cwd=ROOT, env={**env, "DASHSCOPE_API_KEY": "sk-bench"}, capture_output=True, text=True,
                          timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"runner run failed ({done.returncode}):\n{done.stderr}")
    return time.perf_counter() - started


def stats(url: str, log: bool = False) -> dict:
    with urllib.request.urlopen(url + "/_emulator/stats" + ("?log=1" if log else "")) as response:
        return json.load(response)


def overhead(folder: Path, url: str, address: str, sizes: list[int], concurrency: int) -> None:
    print(f"per-row cost, concurrency {concurrency}, emulator without latency (wall seconds)")
    slopes = {}
    for executor in ("online", "ray"):
        walls = []
        for rows in sizes:
            sub = folder / f"{executor}-{rows}"
            sub.mkdir()
            write_prompts(sub / "prompts.jsonl", rows)
            job = write_job(sub, url, "job", concurrency=concurrency, adaptive_rate=False, executor=executor,
                            ray_runtime_env=NO_RUNTIME_ENV)
            walls.append(timed_run(job, "--ray-address", address, env=dict(os.environ)))
            print(f"  {executor:6} {rows:>7,} rows  {walls[-1]:7.2f} s  ({rows / walls[-1]:,.0f} rows/s with start-up)")
        slopes[executor] = (walls[-1] - walls[0]) / (sizes[-1] - sizes[0])
        print(f"  {executor:6} {slopes[executor] * 1000:.3f} ms a row once running ({1 / slopes[executor]:,.0f} rows/s); "
              f"fixed cost {walls[0] - slopes[executor] * sizes[0]:.1f} s")
    print(f"ratio ray/online per row: {slopes['ray'] / slopes['online']:.2f}")


def shared_limit(folder: Path, address: str, rows: int) -> None:
    proc, url = start_emulator(0.0, (), "--rpm", "3000", "--request-log", "--latency-ms", "20")
    try:
        sub = folder / "rpm"
        sub.mkdir()
        write_prompts(sub / "prompts.jsonl", rows)
        job = write_job(sub, url, "job", concurrency=64, rpm=3000, adaptive_rate=True, cooldown_seconds=0.25,
                        executor="ray", ray_runtime_env=NO_RUNTIME_ENV)
        timed_run(job, "--ray-address", address, env=dict(os.environ))
        data = stats(url, log=True)
    finally:
        stop_emulator(proc)
    arrivals = sorted(entry["arrived"] for entry in data["log"] if entry["status"] == 200)
    cut = len(arrivals) // 10
    middle = arrivals[cut:len(arrivals) - cut]
    rate = (len(middle) - 1) / (middle[-1] - middle[0])
    rejected = data["rejected"]["rpm"]
    print(f"shared RPM 3,000 (50/s), two row actors, {rows:,} rows: accepted {rate:.2f}/s over the middle 80% "
          f"= {rate / 50:.1%} of the limit; 429s {rejected} of {data['requests']:,} requests "
          f"({rejected / data['requests']:.2%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="2000,6000", help="two job sizes, comma-separated")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rpm-rows", type=int, default=2000)
    parser.add_argument("--skip-rpm", action="store_true")
    args = parser.parse_args()
    sizes = [int(n) for n in args.rows.split(",")]
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray on loopback only, like the emulator
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    proc, url = start_emulator(0.0)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            overhead(Path(tmp), url, address, sizes, args.concurrency)
            if not args.skip_rpm:
                shared_limit(Path(tmp), address, args.rpm_rows)
    finally:
        stop_emulator(proc)
        ray.shutdown()


if __name__ == "__main__":
    main()
