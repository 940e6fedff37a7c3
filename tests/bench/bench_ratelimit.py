"""Rate limiting against an emulator that enforces DashScope-style limits.

    python tests/bench/bench_ratelimit.py [--requests 20000] [--quick]

The emulator (a subprocess) enforces RPM=6,000 (100 requests/s) and a TPM that binds before the
RPM for the long prompts used here, per second, with the real 429 bodies. Three contenders run
the same job through the real `runner run` CLI:
- configured: [run] rpm and tpm set to the emulator's limits;
- adaptive: no limits given; the runner discovers them;
- naive baseline: fixed concurrency, retry on 429 with exponential backoff (adaptive rate and
  cool-down off), what a hand-written loop does.
For each: successful requests/s as a share of the binding limit (over the whole run, and after a
warm-up of 15 s for adaptive), and 429s as a share of requests. Bounded in requests and time.
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

import pyarrow.parquet as pq

try:
    from tests.bench.harness import ROOT, start_emulator, stop_emulator, write_job
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.bench.harness import ROOT, start_emulator, stop_emulator, write_job

RPM = 6000
PROMPT = "Summarise this passage in one line. " + "The quick brown fox jumps over the lazy dog. " * 40
MAX_TOKENS = 64


def emulator_stats(url: str) -> dict:
    with urllib.request.urlopen(url + "/_emulator/stats?keys=0") as response:
        return json.load(response)


def reset(url: str) -> None:
    urllib.request.urlopen(urllib.request.Request(url + "/_emulator/reset", method="POST")).close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="3,000 requests")
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    args = parser.parse_args()
    rows = 3000 if args.quick else args.requests
    # Tokens per request as the emulator counts them (prompt + completion): measured once below, then
    # TPM is set so tokens bind at ~75 requests/s, under the 100/s of the RPM.
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with open(folder / "prompts.jsonl", "w") as fh:
            for i in range(rows):
                fh.write(json.dumps({"id": f"r{i}", "prompt": f"{i}. {PROMPT}"}) + "\n")
        probe, url = start_emulator(args.latency_ms)
        try:
            job = write_job(folder, url, "probe", concurrency=4, limit=20)
            subprocess.run([sys.executable, "-m", "runner", "run", str(job), "--quiet", "--overwrite"], cwd=ROOT,
                           env={**os.environ, "DASHSCOPE_API_KEY": "sk-bench"}, check=True, timeout=120)
            summary = json.loads((folder / "probe.summary.json").read_text())
            tokens_per_request = summary["tokens"]["total"] / summary["rows"]
        finally:
            stop_emulator(probe)
        tpm = int(tokens_per_request * 75 * 60)
        binding_rps = min(RPM / 60, tpm / 60 / tokens_per_request)
        print(f"{rows} requests of ~{tokens_per_request:.0f} tokens; emulator RPM {RPM}, TPM {tpm:,}: the binding "
              f"limit is {binding_rps:.1f} requests/s", flush=True)

        emulator, url = start_emulator(args.latency_ms, (), "--rpm", str(RPM), "--tpm", str(tpm))
        results = []
        try:
            contenders = {
                "configured": {"rpm": RPM, "tpm": tpm},
                "adaptive": {},
                "naive": {"adaptive_rate": False, "cooldown_seconds": 0, "backoff_initial": 0.5,
                          "backoff_max": 8, "max_attempts": 12, "retry_budget": 100},
            }
            for name, run_keys in contenders.items():
                reset(url)
                time.sleep(1.5)  # let the emulator's per-second buckets refill between contenders
                job = write_job(folder, url, name, concurrency=args.concurrency, **run_keys)
                started = time.perf_counter()
                proc = subprocess.run([sys.executable, "-m", "runner", "run", str(job), "--quiet", "--overwrite",
                                       "--max-error-rate", "1"], cwd=ROOT,
                                      env={**os.environ, "DASHSCOPE_API_KEY": "sk-bench"}, capture_output=True,
                                      text=True, timeout=3600)
                wall = time.perf_counter() - started
                if proc.returncode != 0:
                    raise SystemExit(proc.stderr)
                summary = json.loads((folder / f"{name}.summary.json").read_text())
                stats = emulator_stats(url)
                table = pq.read_table(folder / f"{name}.parquet", columns=["status", "finished_at"]).to_pylist()
                done = sorted(r["finished_at"] for r in table if r["status"] == "ok")
                run_seconds = summary["this_run"]["wall_seconds"]
                warm = [t for t in done if (t - done[0]).total_seconds() >= 15]
                warm_rate = (len(warm) / (warm[-1] - warm[0]).total_seconds()) if len(warm) > 100 else None
                rejected = sum(stats["rejected"].values())
                row = {"contender": name, "ok": summary["ok"], "wall_s": round(wall, 1),
                       "ok_per_s": round(summary["ok"] / run_seconds, 1),
                       "share_of_limit": round(summary["ok"] / run_seconds / binding_rps, 3),
                       "share_after_15s": round(warm_rate / binding_rps, 3) if warm_rate else None,
                       "requests": stats["requests"], "rejected": stats["rejected"],
                       "share_429": round(rejected / stats["requests"], 4)}
                results.append(row)
                print(json.dumps(row), flush=True)
        finally:
            stop_emulator(emulator)
    print(f"\n{'contender':>11} {'ok/s':>7} {'of limit':>9} {'after 15s':>10} {'429 share':>10}")
    for r in results:
        after = f"{r['share_after_15s']:.1%}" if r["share_after_15s"] else "-"
        print(f"{r['contender']:>11} {r['ok_per_s']:>7.1f} {r['share_of_limit']:>9.1%} {after:>10} {r['share_429']:>10.2%}")


if __name__ == "__main__":
    main()
