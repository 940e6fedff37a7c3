"""Whole runs through a proxy that resets, truncates, drops and corrupts the emulator's answers (issue 15).

Acceptance: 2,000 rows at 2% each fault finish in one run on both transports with every row once, and no
row is ok with damaged text. The emulator's answers are deterministic (runner.emulator.generate), so every
ok row's text is compared with what the emulator's generator says it sent.

What "damaged" can honestly cover: FaultProxy (tests/fault_proxy.py) drops 1 to 4 bytes anywhere, and
replaces framing bytes (a double quote, CR or LF) with a control character; it does not flip a letter inside
the answer's text, which plain HTTP/1.1 cannot detect (no checksum; over TLS, as the real endpoint is
reached, the record MAC turns such a flip into a connection error). Everything the proxy does is
detectable by the framing (Content-Length, chunk sizes, the SSE line rules, the stream's final frame), by
JSON parsing, or by the read deadlines, and the runner must detect all of it.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from runner.clients import ChatClient
from runner.clients.stream_rules import StreamPolicy
from runner.emulator.generate import ChatCall, complete
from runner.endpoints import ApiKey
from runner.job import run_job
from runner.errors import CallError, TransientCallError
from runner.records import Request
from runner.spec import EndpointSpec, load_job
from tests.fault_proxy import FAULTS, FaultProxy
from tests.helpers import TEST_KEY, make_job, read_output, write_prompts

TRANSPORTS = ["aiohttp", "httpx"]
# Short deadlines so a lost byte costs little: bytes lost inside the headers are waited for until `timeout`
# (nothing tells them from a model still generating), bytes lost in a body until read_timeout.
DEADLINES = {"timeout": 3, "read_timeout": 0.5, "stream_idle_timeout": 0.5}


def expected_text(prompt: str, model: str = "qwen-plus") -> str:
    """What the emulator answers to a one-message prompt (streamed or not, both dialects: the same text)."""
    return complete(ChatCall(model=model, messages=[{"role": "user", "content": prompt}])).content


def run_through_proxy(tmp_path: Path, emu, proxy: FaultProxy, *, rows: int, transport: str, dialect: str = "openai",
                      stream: bool = False, run: dict | None = None, deadlines: dict = DEADLINES) -> list[dict]:
    """Write `rows` prompts, run them through `proxy` with run_job, and return the output rows."""
    records = write_prompts(tmp_path / "prompts.jsonl", rows)
    root = emu.openai_base_url if dialect == "openai" else emu.dashscope_base_url
    base_url = root.replace(f":{emu.port}/", f":{proxy.port}/")
    job = make_job(tmp_path, None, dialect=dialect, endpoint={"base_url": base_url, "transport": transport, **deadlines},
                   model={"stream": stream},
                   run={"concurrency": 32, "max_attempts": 20, "retry_budget": 100.0, **(run or {})})
    anyio.run(lambda: run_job(load_job(job), api_key=ApiKey(TEST_KEY)))
    out = read_output(tmp_path / "out" / "result.parquet")
    assert sorted(r["key"] for r in out) == [r["id"] for r in records], "every row exactly once"
    prompts = {r["id"]: r["prompt"] for r in records}
    failed = [(r["key"], r["error_type"], r["error_code"], r["error_message"]) for r in out if r["status"] != "ok"]
    assert not failed, failed[:5]
    damaged = [(r["key"], r["response"]) for r in out if r["response"] != expected_text(prompts[r["key"]])]
    assert not damaged, damaged[:5]
    return out


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_2000_rows_finish_once_through_two_percent_of_each_fault(tmp_path: Path, make_emulator, transport: str) -> None:
    """2,000 rows through resets, truncations, drops and corruptions (2% of the emulator's writes each) finish in
    one run: every row exactly once, all ok with the emulator's exact text, the damaged attempts retried."""
    emu = make_emulator()
    with FaultProxy(emu.port, reset=0.02, truncate=0.02, drop=0.02, corrupt=0.02, seed=15) as proxy:
        out = run_through_proxy(tmp_path, emu, proxy, rows=2000, transport=transport)
    assert all(proxy.counts[fault] >= 10 for fault in FAULTS), proxy.counts
    assert sum(r["attempts"] for r in out) > len(out)


@pytest.mark.parametrize("transport, dialect", [("aiohttp", "openai"), ("aiohttp", "dashscope"),
                                                ("httpx", "openai"), ("httpx", "dashscope")])
def test_streamed_rows_finish_once_through_two_percent_of_each_fault(tmp_path: Path, make_emulator, transport: str,
                                                                     dialect: str) -> None:
    """Streamed answers (each frame its own write, so faults land between and inside frames) through the same
    faults finish in one run: every row once, all ok, no answer with a frame or a byte missing."""
    emu = make_emulator(stream_chunks=4, chunk_delay_ms=1)
    with FaultProxy(emu.port, reset=0.02, truncate=0.02, drop=0.02, corrupt=0.02, seed=16) as proxy:
        out = run_through_proxy(tmp_path, emu, proxy, rows=300, transport=transport, dialect=dialect, stream=True,
                                run={"max_attempts": 30})
    assert sum(proxy.counts.values()) >= 20, proxy.counts
    assert sum(r["attempts"] for r in out) > len(out)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_proxy_without_faults_is_transparent(tmp_path: Path, make_emulator, transport: str) -> None:
    """With every rate at 0 the proxy changes nothing: each row is ok at its first attempt."""
    emu = make_emulator()
    with FaultProxy(emu.port) as proxy:  # generous deadlines: a loaded machine must not cost a second attempt
        out = run_through_proxy(tmp_path, emu, proxy, rows=50, transport=transport,
                                deadlines={"timeout": 60, "read_timeout": 30, "stream_idle_timeout": 30})
    assert all(r["attempts"] == 1 for r in out) and not proxy.counts


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_each_proxy_fault_fails_the_attempt(make_emulator, fault: str, transport: str, stream: bool) -> None:
    """Every write damaged by one fault fails the attempt with a retryable CallError, never a success."""
    emu = make_emulator(stream_chunks=4, chunk_delay_ms=1)
    request = Request(row_id=0, key="r0", model="qwen-plus", messages=({"role": "user", "content": "hi"},), params={})

    async def attempt(port: int):
        spec = EndpointSpec(dialect="openai", base_url=f"http://127.0.0.1:{port}/compatible-mode/v1",
                            transport=transport, **DEADLINES)
        async with ChatClient(spec, ApiKey(TEST_KEY), max_connections=1,
                              streaming=StreamPolicy("always" if stream else "never")) as client:
            try:
                return await client.complete(request)
            except CallError as error:
                return error

    with FaultProxy(emu.port, **{fault: 1.0}) as proxy:
        outcome = anyio.run(attempt, proxy.port)
    assert isinstance(outcome, TransientCallError), outcome
    assert proxy.counts[fault] >= 1
