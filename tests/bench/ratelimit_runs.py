"""What bench_ratelimit.py's scenarios share: `runner run` subprocesses with a time cap, the emulator's
stats over HTTP, and the figures computed from its per-second series.

Every figure is measured at the server (the emulator's stats), so the runner under test cannot flatter
itself, and a run stopped at its time cap is measured like one that finished.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tests.bench.harness import ROOT

# How long a stopped runner may finish its requests in flight (the job's drain_seconds), and how long
# after that it is killed.
DRAIN_SECONDS = 5
KILL_AFTER = 60.0


# -- the emulator over HTTP -------------------------------------------------------------------------


def stats(url: str) -> dict:
    """GET /_emulator/stats without the per-row keys (a few lists of one number per second)."""
    with urllib.request.urlopen(url + "/_emulator/stats?keys=0", timeout=30) as response:
        return json.load(response)


def reset(url: str) -> None:
    """Zero the emulator's counters and restart its limit schedule."""
    urllib.request.urlopen(urllib.request.Request(url + "/_emulator/reset", method="POST"), timeout=30).close()


def wait_for_origin(url: str, runs: list[Run], timeout: float = 60.0) -> float | None:
    """The emulator-clock time of the first request after the last reset (None if every run ended first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        origin = stats(url)["clock"]["origin"]
        if origin is not None:
            return origin
        if all(run.proc.poll() is not None for run in runs):
            return None
        time.sleep(0.05)
    return None


# -- runner processes -------------------------------------------------------------------------------


def runner_command() -> list[str]:
    """The `runner` console script of this interpreter's environment, else `python -m runner`."""
    script = Path(sys.executable).with_name("runner")
    return [str(script)] if script.exists() else [sys.executable, "-m", "runner"]


def write_prompts(folder: Path, rows: int, prompt: str = "Benchmark prompt number {i}, please answer briefly.") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "prompts.jsonl", "w") as fh:
        for i in range(rows):
            fh.write(json.dumps({"id": f"r{i}", "prompt": prompt.format(i=i)}) + "\n")


@dataclass
class Run:
    """One `runner run` in the background."""

    name: str
    proc: subprocess.Popen
    summary_path: Path
    err: IO[bytes]
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    interrupted: bool = False

    def result(self) -> dict[str, Any]:
        self.err.seek(0)
        stderr = self.err.read().decode(errors="replace").strip()
        self.err.close()
        out: dict[str, Any] = {"name": self.name, "rc": self.proc.returncode, "interrupted": self.interrupted,
                               "wall_s": round((self.ended or time.monotonic()) - self.started, 2)}
        if self.summary_path.exists() and not self.interrupted:
            summary = json.loads(self.summary_path.read_text())
            out.update(rows=summary["rows"], ok=summary["ok"], errors=summary["rows"] - summary["ok"],
                       run_s=summary["this_run"]["wall_seconds"])
        if self.proc.returncode not in (0, None) and not self.interrupted:
            out["stderr"] = stderr[-300:]
        return out


def launch(job: Path, key: str = "sk-bench-0000") -> Run:
    """Start `runner run JOB --quiet --overwrite` with DASHSCOPE_API_KEY=key."""
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen([*runner_command(), "run", str(job), "--quiet", "--overwrite"], cwd=ROOT,
                            env={**os.environ, "DASHSCOPE_API_KEY": key}, stdout=subprocess.DEVNULL, stderr=err)
    return Run(job.stem, proc, job.with_name(job.stem + ".summary.json"), err)


def finish(runs: list[Run], deadline: float) -> list[dict[str, Any]]:
    """Wait for every run; at `deadline` (time.monotonic()) stop those still going with SIGINT, as a user
    would, and kill what has not exited KILL_AFTER seconds later. Returns each run's result."""
    signalled: float | None = None
    while True:
        now = time.monotonic()
        for run in runs:
            if run.ended is None and run.proc.poll() is not None:
                run.ended = now
        if all(run.ended is not None for run in runs):
            break
        if signalled is None and now >= deadline:
            signalled = now
            for run in runs:
                if run.ended is None:
                    run.interrupted = True
                    run.proc.send_signal(signal.SIGINT)
        if signalled is not None and now >= signalled + KILL_AFTER:
            for run in runs:
                if run.ended is None:
                    run.proc.kill()
                    run.proc.wait()
                    run.ended = time.monotonic()
            break
        time.sleep(0.05)
    return [run.result() for run in runs]


# -- figures from the emulator's per-second series --------------------------------------------------


def mean(values: list[int] | list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def window_rate(series: list[int], start: int, end: int) -> float | None:
    """Mean count per second over seconds [start, end) of a series (None for an empty window)."""
    start, end = max(0, start), min(end, len(series))
    return mean(series[start:end]) if end > start else None


def active_seconds(series: list[int]) -> tuple[int, int] | None:
    """The first second with a count and the last one (None when all are zero)."""
    busy = [i for i, n in enumerate(series) if n]
    return (busy[0], busy[-1]) if busy else None


def convergence(series: list[int], change: int, end: int, target: float, tolerance: float = 0.10,
                span: int = 3) -> int | None:
    """Seconds after `change` until the mean over `span` seconds is within `tolerance` of `target` (and
    stays so to `end`); None if it never settles."""
    end = min(end, len(series))
    for k in range(0, end - change - span + 1):
        if all(abs(window_rate(series, change + j, change + j + span) / target - 1) <= tolerance
               for j in range(k, end - change - span + 1)):
            return k
    return None


def throughput(snapshot: dict) -> float | None:
    """Full answers per second, from the first request to the last full answer (server side)."""
    clock = snapshot["clock"]
    ok = snapshot["by_status"].get("200", 0)
    if not ok or clock["origin"] is None or clock["last_ok"] is None or clock["last_ok"] <= clock["origin"]:
        return None
    return ok / (clock["last_ok"] - clock["origin"])


def rejected_share(snapshot: dict) -> float | None:
    """Requests the rate limits rejected (the caller's own 429s: rpm, tpm, burst) per request."""
    return sum(snapshot["rejected"].values()) / snapshot["requests"] if snapshot["requests"] else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)
