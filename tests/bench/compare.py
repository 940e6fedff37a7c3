"""One hand-written client against the emulator, for the comparative benchmark (`python -m tests.bench`).

    python -m tests.bench.compare --contender floor|openai|httpx --url http://127.0.0.1:PORT \\
        [--requests 20000] [--concurrency 64] [--max-seconds 300]

Sends --requests chat completions (`POST {url}/compatible-mode/v1/chat/completions`, bearer
`sk-bench`), at most --concurrency in flight, and prints one JSON line: requests answered, errors,
loop seconds, requests/s, and this process's own CPU ms per request over the loop and peak RSS.
The parent (tests/bench/__main__.py) also measures the whole process (imports included) with
os.wait4, so each contender runs in its own process and its CPU and memory are its own.

Contenders:
  floor   the simplest asyncio + aiohttp loop: C workers pulling request numbers, read the body,
          count the status; no JSON parsing, no output. What the machine allows at all.
  openai  the pattern users write by hand: `AsyncOpenAI(base_url=..., api_key=...)` with the SDK's
          default settings (its own httpx pool: 1,000 connections, 100 kept alive; 2 retries;
          600 s timeout), one task per request via `asyncio.gather`, an `asyncio.Semaphore(C)`.
  httpx   the same gather + semaphore pattern over plain `httpx.AsyncClient` with the pool sized to
          C (max_connections = max_keepalive_connections = C) and `response.json()`, to show what
          the transport alone costs.

Bounded: no request starts after --max-seconds; the figures then cover the requests that ran
(the JSON says `complete: false`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time

PATH = "/compatible-mode/v1/chat/completions"
MODEL = "qwen-plus"


def messages(i: int) -> list[dict]:
    """The same prompt text the runner sends for row i (tests/bench/__main__.py writes it to the input)."""
    return [{"role": "user", "content": f"Benchmark prompt number {i}, please answer briefly."}]


async def floor(url: str, requests: int, concurrency: int, deadline: float) -> tuple[int, int]:
    import aiohttp

    ok = errors = 0
    next_index = 0
    headers = {"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def worker() -> None:
            nonlocal ok, errors, next_index
            while next_index < requests and time.monotonic() < deadline:
                i = next_index
                next_index += 1
                body = json.dumps({"model": MODEL, "messages": messages(i), "max_tokens": 64}).encode()
                try:
                    async with session.post(url + PATH, data=body) as response:
                        await response.read()
                        if response.status == 200:
                            ok += 1
                        else:
                            errors += 1
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok, errors


async def openai_sdk(url: str, requests: int, concurrency: int, deadline: float) -> tuple[int, int]:
    from openai import AsyncOpenAI

    # Default settings on purpose: this is what a user writes, retries and pool included.
    client = AsyncOpenAI(base_url=url + "/compatible-mode/v1", api_key="sk-bench")
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int) -> str | None:
        async with semaphore:
            if time.monotonic() >= deadline:
                return None
            completion = await client.chat.completions.create(model=MODEL, messages=messages(i), max_tokens=64)
            return completion.choices[0].message.content

    try:
        results = await asyncio.gather(*(one(i) for i in range(requests)), return_exceptions=True)
    finally:
        await client.close()
    return count(results)


async def httpx_plain(url: str, requests: int, concurrency: int, deadline: float) -> tuple[int, int]:
    import httpx

    # The pool sized to the concurrency, as the runner sizes its own: httpx's default (100) would cap it.
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": "Bearer sk-bench"}
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=600) as client:

        async def one(i: int) -> str | None:
            async with semaphore:
                if time.monotonic() >= deadline:
                    return None
                response = await client.post(PATH, json={"model": MODEL, "messages": messages(i), "max_tokens": 64})
                response.raise_for_status()
                return response.json()["choices"][0]["message"]["content"]

        results = await asyncio.gather(*(one(i) for i in range(requests)), return_exceptions=True)
    return count(results)


def count(results: list) -> tuple[int, int]:
    """(answered, failed); None means skipped after the deadline."""
    ok = sum(1 for r in results if isinstance(r, str))
    errors = sum(1 for r in results if isinstance(r, BaseException))
    return ok, errors


CONTENDERS = {"floor": floor, "openai": openai_sdk, "httpx": httpx_plain}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--contender", choices=sorted(CONTENDERS), required=True)
    parser.add_argument("--url", required=True, help="the emulator's base URL, http://127.0.0.1:PORT")
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-seconds", type=float, default=300.0, help="start no request after this long")
    args = parser.parse_args()
    run = CONTENDERS[args.contender]
    # Import the client library before the clock starts: the loop is what is timed here,
    # the parent's wait4 figures include the imports.
    __import__({"floor": "aiohttp", "openai": "openai", "httpx": "httpx"}[args.contender])
    cpu_before = cpu_seconds()
    started = time.perf_counter()
    ok, errors = asyncio.run(run(args.url.rstrip("/"), args.requests, args.concurrency,
                                 time.monotonic() + args.max_seconds))
    seconds = time.perf_counter() - started
    cpu = cpu_seconds() - cpu_before
    print(json.dumps({
        "contender": args.contender, "requests": args.requests, "concurrency": args.concurrency,
        "ok": ok, "errors": errors, "complete": ok + errors == args.requests,
        "seconds": round(seconds, 3), "req_per_s": round(ok / seconds, 1) if seconds else 0.0,
        "cpu_ms_per_req_loop": round(cpu * 1000 / max(ok, 1), 3),
        "maxrss_mb_self": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }), flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
