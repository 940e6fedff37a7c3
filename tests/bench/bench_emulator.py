"""Throughput of the emulator alone: requests/s and latency at a given concurrency.

    python tests/bench/bench_emulator.py [--requests 20000] [--concurrency 256]

Starts `runner emulator --port 0` in a subprocess, drives it with a lean aiohttp
client loop for each dialect (OpenAI-compatible, then native), prints requests/s, mean and
p99 latency and the emulator's own stats, and stops the subprocess. Bounded by --requests
per dialect and by --max-seconds overall.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import aiohttp

try:
    from tests.bench.harness import start_emulator, stop_emulator
except ImportError:  # run as a script: python tests/bench/bench_emulator.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.bench.harness import start_emulator, stop_emulator

HEADERS = {"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}


def bodies(dialect: str, count: int, tag: str = "") -> list[bytes]:
    """Distinct prompts, so every request is its own row key."""
    out = []
    for i in range(count):
        messages = [
            {"role": "system", "content": "You are concise."},
            {"role": "user", "content": f"Summarise {tag or dialect} ticket {i}: printer jams."},
        ]
        if dialect == "openai":
            body = {"model": "qwen-plus", "messages": messages, "max_tokens": 64}
        else:
            body = {"model": "qwen-plus", "input": {"messages": messages},
                    "parameters": {"result_format": "message", "max_tokens": 64}}
        out.append(json.dumps(body).encode())
    return out


async def drive(url: str, payloads: list[bytes], concurrency: int, deadline: float) -> dict:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    next_index = 0
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=HEADERS) as session:

        async def worker() -> None:
            nonlocal next_index, errors
            while next_index < len(payloads) and time.monotonic() < deadline:
                payload = payloads[next_index]
                next_index += 1
                started = time.perf_counter()
                try:
                    async with session.post(url, data=payload) as response:
                        await response.read()
                        statuses[response.status] = statuses.get(response.status, 0) + 1
                except aiohttp.ClientError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    done = len(latencies)
    return {
        "requests": done,
        "errors": errors,
        "statuses": statuses,
        "seconds": elapsed,
        "rps": done / elapsed if elapsed else 0.0,
        "mean_ms": statistics.fmean(latencies) * 1000 if done else 0.0,
        "p50_ms": latencies[done // 2] * 1000 if done else 0.0,
        "p99_ms": latencies[min(done - 1, int(done * 0.99))] * 1000 if done else 0.0,
    }


def cpu_seconds(pid: int) -> float | None:
    """User+system CPU time of a process (Linux /proc), or None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def fetch_stats(base: str) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/_emulator/stats?keys=0") as response:
            return await response.json()


async def bench(args: argparse.Namespace, base: str, pid: int) -> None:
    deadline = time.monotonic() + args.max_seconds
    paths = {
        "openai": base + "/compatible-mode/v1/chat/completions",
        "dashscope": base + "/api/v1/services/aigc/text-generation/generation",
    }
    # Warm up connections and code paths; not measured.
    await drive(paths["openai"], bodies("openai", min(1000, args.requests // 10), "warm-up"),
                args.concurrency, deadline)
    print(f"concurrency {args.concurrency}, latency {args.latency_ms} ms, "
          f"{args.requests} requests per dialect")
    for dialect, url in paths.items():
        payloads = bodies(dialect, args.requests)
        cpu_before = cpu_seconds(pid)
        r = await drive(url, payloads, args.concurrency, deadline)
        cpu_after = cpu_seconds(pid)
        cpu = ""
        if cpu_before is not None and cpu_after is not None and r["requests"]:
            used = cpu_after - cpu_before
            cpu = (f"; emulator CPU {used / r['requests'] * 1e6:.0f} us/request "
                   f"(~{r['requests'] / used:,.0f} req/s per core)" if used else "")
        print(f"{dialect:>9}: {r['requests']} answered in {r['seconds']:.2f}s = "
              f"{r['rps']:,.0f} req/s; latency mean {r['mean_ms']:.1f} ms, "
              f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms; "
              f"statuses {r['statuses']}, errors {r['errors']}{cpu}")
    stats = await fetch_stats(base)
    print("emulator stats:", json.dumps(stats, sort_keys=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000, help="per dialect")
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--fault", action="append", default=[], metavar="NAME=RATE")
    parser.add_argument("--max-seconds", type=float, default=120.0)
    args = parser.parse_args()
    proc, base = start_emulator(args.latency_ms, args.fault)
    try:
        asyncio.run(bench(args, base, proc.pid))
    finally:
        stop_emulator(proc)


if __name__ == "__main__":
    main()
