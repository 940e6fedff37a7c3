"""Runner throughput and client CPU per request: httpx-aiohttp transport vs plain httpx.

    python tests/bench/bench_transport.py [--rows 5000] [--latency-ms 100] [--concurrency 256 1024]

Starts `runner emulator` in a subprocess on a free loopback port, then runs the real
`runner run` CLI (a subprocess) for each transport and concurrency, and prints requests/s, the
ratio to the ideal (concurrency / latency, capped by what the emulator was asked to serve), and
the runner process's CPU ms per request (user + sys, from the OS). A 0 ms scenario gives the
runner's ceiling on this machine, to compare with the emulator's own capacity
(tests/bench/bench_emulator.py). Bounded in rows and time; stops the emulator at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    from tests.bench.harness import ROOT, start_emulator, stop_emulator, write_job
except ImportError:  # run as a script: python tests/bench/bench_transport.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.bench.harness import ROOT, start_emulator, stop_emulator, write_job



def write_input(folder: Path, rows: int) -> Path:
    path = folder / "prompts.jsonl"
    with open(path, "w") as fh:
        for i in range(rows):
            fh.write(json.dumps({"id": f"r{i}", "prompt": f"Benchmark prompt number {i}, please answer briefly."}) + "\n")
    return path


def run_once(folder: Path, url: str, transport: str, concurrency: int, rows: int) -> dict:
    name = f"out-{transport}-{concurrency}"
    job = write_job(folder, url, name, transport=transport, concurrency=concurrency, adaptive_rate=False)
    out = folder / f"{name}.parquet"
    env = {**os.environ, "DASHSCOPE_API_KEY": "sk-bench"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "runner", "run", str(job), "--quiet", "--overwrite"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"runner failed: {proc.stderr}")
    summary = json.loads(out.with_name(out.stem + ".summary.json").read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"transport": transport, "concurrency": concurrency, "rows": rows, "wall_s": round(wall, 2),
            "run_s": summary["this_run"]["wall_seconds"], "req_per_s": summary["this_run"]["rows_per_second"],
            "cpu_ms_per_req": round(cpu * 1000 / rows, 3), "ok": summary["ok"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--transports", nargs="+", default=["aiohttp", "httpx"])
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_input(folder, args.rows)
        for latency in (args.latency_ms, 0.0):
            emulator, url = start_emulator(latency)
            try:
                for concurrency in args.concurrency if latency else args.concurrency[:1]:
                    for transport in args.transports:
                        row = run_once(folder, url, transport, concurrency, args.rows)
                        ideal = concurrency / (latency / 1000) if latency else None
                        row["latency_ms"] = latency
                        row["ideal_req_per_s"] = round(ideal, 1) if ideal else None
                        row["ratio_to_ideal"] = round(row["req_per_s"] / ideal, 3) if ideal else None
                        results.append(row)
                        print(json.dumps(row), flush=True)
            finally:
                stop_emulator(emulator)
    print()
    header = f"{'latency':>8} {'conc':>5} {'transport':>9} {'req/s':>9} {'ideal':>9} {'ratio':>6} {'cpu ms/req':>10}"
    print(header)
    for r in results:
        print(f"{r['latency_ms']:>8g} {r['concurrency']:>5} {r['transport']:>9} {r['req_per_s']:>9,.0f} "
              f"{(r['ideal_req_per_s'] or 0):>9,.0f} {(r['ratio_to_ideal'] or 0):>6.2f} {r['cpu_ms_per_req']:>10.3f}")
    for latency in sorted({r["latency_ms"] for r in results}):
        for concurrency in sorted({r["concurrency"] for r in results}):
            pair = {r["transport"]: r for r in results if r["latency_ms"] == latency and r["concurrency"] == concurrency}
            if {"aiohttp", "httpx"} <= pair.keys():
                a, h = pair["aiohttp"], pair["httpx"]
                print(f"latency {latency:g} ms, concurrency {concurrency}: aiohttp/httpx throughput "
                      f"{a['req_per_s'] / h['req_per_s']:.2f}x, CPU per request {h['cpu_ms_per_req'] / a['cpu_ms_per_req']:.2f}x lower")


if __name__ == "__main__":
    main()
