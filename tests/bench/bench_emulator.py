"""Throughput of the emulator alone: requests/s and latency at a given concurrency.

    python tests/bench/bench_emulator.py [--requests 20000] [--concurrency 256] [--stream]

Starts `runner emulator --port 0` in a subprocess, drives it with a lean aiohttp
client loop for each dialect (OpenAI-compatible, then native), prints requests/s, mean and
p99 latency and the emulator's own stats, and stops the subprocess. Bounded by --requests
per dialect and by --max-seconds overall.

With --stream every request streams (compat: stream + include_usage; native: X-DashScope-SSE
with incremental_output); the client counts the SSE frames and the complete streams (compat:
ending in [DONE]; native: a last frame with a real finish_reason) and reports frames/s.
--stream-chunks and --chunk-delay-ms are passed to the emulator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
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
SSE_HEADERS = {"X-DashScope-SSE": "enable"}


def start_emulator_for(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    """The harness's emulator with this benchmark's stream flags."""
    return start_emulator(args.latency_ms, args.fault, "--stream-chunks", str(args.stream_chunks),
                          "--chunk-delay-ms", str(args.chunk_delay_ms))


def bodies(dialect: str, count: int, tag: str = "", stream: bool = False) -> list[bytes]:
    """Distinct prompts, so every request is its own row key."""
    out = []
    for i in range(count):
        messages = [
            {"role": "system", "content": "You are concise."},
            {"role": "user", "content": f"Summarise {tag or dialect} ticket {i}: printer jams."},
        ]
        if dialect == "openai":
            body = {"model": "qwen-plus", "messages": messages, "max_tokens": 64}
            if stream:
                body.update(stream=True, stream_options={"include_usage": True})
        else:
            body = {"model": "qwen-plus", "input": {"messages": messages},
                    "parameters": {"result_format": "message", "max_tokens": 64}}
            if stream:
                body["parameters"]["incremental_output"] = True
        out.append(json.dumps(body).encode())
    return out


def stream_complete(dialect: str, body: bytes) -> bool:
    """The stream reached its final frame (compat [DONE]; native a real finish_reason)."""
    if dialect == "openai":
        return body.endswith(b"data: [DONE]\n\n")
    last = body[body.rfind(b"\nid:") + 1:]
    return b"event:result" in last and b'"finish_reason":"null"' not in last


async def drive(url: str, payloads: list[bytes], concurrency: int, deadline: float,
                dialect: str = "openai", stream: bool = False) -> dict:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    frames = 0
    complete = 0
    next_index = 0
    extra = SSE_HEADERS if stream and dialect == "dashscope" else None
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=HEADERS) as session:

        async def worker() -> None:
            nonlocal next_index, errors, frames, complete
            while next_index < len(payloads) and time.monotonic() < deadline:
                payload = payloads[next_index]
                next_index += 1
                started = time.perf_counter()
                try:
                    async with session.post(url, data=payload, headers=extra) as response:
                        body = await response.read()
                        statuses[response.status] = statuses.get(response.status, 0) + 1
                except aiohttp.ClientError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)
                if stream:
                    frames += body.count(b"\n\n")
                    complete += stream_complete(dialect, body)

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
        "frames": frames,
        "complete": complete,
        "fps": frames / elapsed if elapsed else 0.0,
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
    await drive(paths["openai"],
                bodies("openai", min(1000, args.requests // 10), "warm-up", args.stream),
                args.concurrency, deadline, "openai", args.stream)
    mode = (f"streaming ({args.stream_chunks} chunks, {args.chunk_delay_ms} ms apart)"
            if args.stream else "plain")
    print(f"{mode}, concurrency {args.concurrency}, latency {args.latency_ms} ms, "
          f"{args.requests} requests per dialect")
    for dialect, url in paths.items():
        payloads = bodies(dialect, args.requests, stream=args.stream)
        cpu_before = cpu_seconds(pid)
        r = await drive(url, payloads, args.concurrency, deadline, dialect, args.stream)
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
        if args.stream:
            print(f"{'':>9}  {r['frames']} frames = {r['fps']:,.0f} frames/s "
                  f"({r['frames'] / max(r['requests'], 1):.1f} per stream); "
                  f"{r['complete']} complete streams")
    stats = await fetch_stats(base)
    print("emulator stats:", json.dumps(stats, sort_keys=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000, help="per dialect")
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--fault", action="append", default=[], metavar="NAME=RATE")
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--stream", action="store_true", help="stream every request (SSE)")
    parser.add_argument("--stream-chunks", type=int, default=8)
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    proc, base = start_emulator_for(args)
    try:
        asyncio.run(bench(args, base, proc.pid))
    finally:
        stop_emulator(proc)


if __name__ == "__main__":
    main()
