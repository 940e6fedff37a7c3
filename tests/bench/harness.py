"""Shared by the benchmarks: the emulator in a subprocess (`runner emulator --port 0`), on a free loopback port."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
READY = re.compile(r"listening on (http://\S+)")


def start_emulator(latency_ms: float = 0.0, faults: list[str] | tuple[str, ...] = (),
                   *flags: str) -> tuple[subprocess.Popen, str]:
    """Start the emulator (extra `runner emulator` flags as given); returns the process and its base URL."""
    cmd = [sys.executable, "-m", "runner", "emulator", "--port", "0", "--latency-ms", str(latency_ms), *flags]
    for spec in faults:
        cmd += ["--fault", spec]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()  # the emulator prints one line once it listens
    match = READY.search(line)
    if not match:
        proc.kill()
        raise SystemExit(f"emulator did not start: {line!r}{proc.stderr.read()}")
    return proc, match.group(1)


def stop_emulator(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else str(value)


def write_job(folder: Path, url: str, name: str, *, transport: str = "aiohttp", dialect: str = "openai",
              model: dict | None = None, **run: object) -> Path:
    """A benchmark job over `folder/prompts.jsonl` against the emulator at `url`; `model` and `run` fill their sections.
    Throughput benchmarks pass adaptive_rate=False: against an unlimited emulator the default slow start
    (from 10 requests/s) would be measured instead of the client."""
    root = "/compatible-mode/v1" if dialect == "openai" else "/api/v1"
    model_lines = "\n".join(f"{key} = {_toml(value)}" for key, value in {"max_tokens": 64, **(model or {})}.items())
    run_lines = "\n".join(f"{key} = {_toml(value)}" for key, value in run.items())
    job = folder / f"{name}.toml"
    job.write_text(f"""
[input]
path = "prompts.jsonl"
id_column = "id"
prompt_column = "prompt"
[endpoint]
dialect = "{dialect}"
base_url = "{url}{root}"
transport = "{transport}"
[model]
name = "qwen-plus"
{model_lines}
[run]
{run_lines}
[output]
path = "{name}.parquet"
""")
    return job
