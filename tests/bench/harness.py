"""Shared by the benchmarks: the emulator in a subprocess (`runner emulator --port 0`), on a free loopback port."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
READY = re.compile(r"listening on (http://\S+)")


def start_emulator(latency_ms: float = 0.0, faults: list[str] | tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """Start the emulator; returns the process and its base URL once it listens."""
    cmd = [sys.executable, "-m", "runner", "emulator", "--port", "0", "--latency-ms", str(latency_ms)]
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


def write_job(folder: Path, url: str, name: str, *, transport: str = "aiohttp", **run: object) -> Path:
    """A benchmark job over `folder/prompts.jsonl` against the emulator at `url`; `run` fills [run]."""
    run_lines = "\n".join(f"{key} = {value}" for key, value in run.items())
    job = folder / f"{name}.toml"
    job.write_text(f"""
[input]
path = "prompts.jsonl"
id_column = "id"
prompt_column = "prompt"
[endpoint]
base_url = "{url}/compatible-mode/v1"
transport = "{transport}"
[model]
name = "qwen-plus"
max_tokens = 64
[run]
{run_lines}
[output]
path = "{name}.parquet"
""")
    return job
