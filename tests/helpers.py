"""Test helpers and fixtures: an emulator on loopback, job files written from dicts, the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runner.emulator import Emulator, EmulatorConfig

ROOT = Path(__file__).resolve().parent.parent
TEST_KEY = "sk-test-0123456789abcdef"


@pytest.fixture
def emulator():
    with Emulator(EmulatorConfig()) as emu:
        yield emu


@pytest.fixture
def make_emulator():
    """A factory for emulators with their own config; all are stopped at teardown."""
    started: list[Emulator] = []

    def make(**config: Any) -> Emulator:
        emu = Emulator(EmulatorConfig(**config)).start()
        started.append(emu)
        return emu

    yield make
    for emu in started:
        emu.stop()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def to_toml(sections: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, body in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in body.items())
        lines.append("")
    return "\n".join(lines)


def make_job(tmp_path: Path, emu: Emulator | None = None, *, dialect: str = "openai", name: str = "job",
             input: dict | None = None, endpoint: dict | None = None, model: dict | None = None,
             run: dict | None = None, output: dict | None = None) -> Path:
    """Write a job file pointing at `emu`; fast retries so fault tests finish quickly."""
    endpoint_section = {"dialect": dialect}
    if emu is not None:
        endpoint_section["base_url"] = emu.openai_base_url if dialect == "openai" else emu.dashscope_base_url
    endpoint_section.update(endpoint or {})
    sections = {
        "input": input or {"path": "prompts.jsonl", "id_column": "id", "prompt_column": "prompt"},
        "endpoint": endpoint_section,
        # A job listing [model] names has no single name (the two together are refused).
        "model": {**({} if "names" in (model or {}) else {"name": "qwen-plus"}), **(model or {})},
        # Rate control is tested on its own (test_ratelimit.py); elsewhere the emulator's random faults
        # would read as a rate limit and slow the tests down.
        "run": {"concurrency": 32, "max_attempts": 10, "backoff_initial": 0.005, "backoff_max": 0.05,
                "part_rows": 500, "adaptive_rate": False, "cooldown_seconds": 0.0, **(run or {})},
        "output": output or {"path": "out/result.parquet"},
    }
    path = tmp_path / f"{name}.toml"
    path.write_text(to_toml(sections), encoding="utf-8")
    return path


def write_prompts(path: Path, rows: int, *, extra: dict | None = None) -> list[dict]:
    records = [{"id": f"row-{i:05d}", "prompt": f"Question number {i}: what is {i} squared?", "n": i,
                **(extra or {})} for i in range(rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return records


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


def _cli_env(key: str | None, env: dict[str, str] | None) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DASHSCOPE")}
    if key is not None:
        environ["DASHSCOPE_API_KEY"] = key
    environ.update(env or {})
    return environ


def run_cli(*args: str, env: dict[str, str] | None = None, key: str | None = TEST_KEY,
            timeout: float = 120) -> CliResult:
    """The real `runner` command in a subprocess (python -m runner), with a clean environment."""
    proc = subprocess.run([sys.executable, "-m", "runner", *args], capture_output=True, text=True,
                          env=_cli_env(key, env), timeout=timeout, cwd=ROOT)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def start_cli(*args: str, key: str | None = TEST_KEY) -> subprocess.Popen:
    """The real `runner` command started in the background (to be signalled or killed)."""
    return subprocess.Popen([sys.executable, "-m", "runner", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_cli_env(key, None), cwd=ROOT)


def wait_until(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    """Poll `predicate` (emulator stats, files) until it holds; fail the test after `timeout`."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def sent_inside_a_retry_after_gate(emu: Emulator, requests: int) -> list[dict]:
    """For a run whose first request was answered 429 with Retry-After: 2 (emulator fail_first=1,
    retry_after=2, request_log): checks that exactly one 429 and `requests` requests in all reached the
    emulator, and returns the requests that arrived while the gate should have held them back. Requests
    sent before the runner had read the 429 may land just after it was answered: half a second is far more
    than that takes, and far less than the 1.5 s a runner ignoring the gate would fill."""
    log = emu.stats(keys=False, log=True)["log"]
    throttled = [e for e in log if e["status"] == 429]
    assert len(throttled) == 1 and len(log) == requests
    closed = throttled[0]["answered"]
    return [e for e in log if closed + 0.5 < e["arrived"] < closed + 2.0]


def read_output(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def read_pty(master: int) -> bytes:
    """Everything a child wrote to its pseudo-terminal, until it closed it."""
    output = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    return output
