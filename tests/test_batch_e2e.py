"""Batch mode end to end: the real CLI against the emulator's files and batches API over loopback.

Equal to an online run, every row once; a kill after the batches exist never creates a second one;
status and cancel; expiry and the deadline with the hybrid online finish.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from runner.emulator import Emulator, EmulatorConfig
from tests.helpers import make_job, run_cli, start_cli, wait_until, write_prompts

# What differs between two runs of the same job by design: ids, times, how the row was sent, its price.
IGNORED = {"request_id", "started_at", "finished_at", "latency_ms", "duration_ms", "time_to_first_token_ms", "mode", "cost"}
FAST_BATCHES = dict(batch_time_scale=100.0, batch_phase_seconds=50.0)  # half a second a phase
BATCH_RUN = {"mode": "batch", "batch_poll_seconds": 0.1}


class ManualClock:
    """The emulator's clock, moved by the test: batches stay where they are until it moves."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        with self.lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds


def write_two_model_input(path: Path, rows: int) -> None:
    """Rows alternate between two models; every 97th asks for JSON output without saying "json" in the
    prompt, which the API refuses (400) online and in a batch alike."""
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            row = {"id": f"row-{i:05d}", "prompt": f"Question number {i}: what is {i} squared?",
                   "model": "qwen-plus" if i % 2 else "qwen-turbo", "n": i}
            if i % 97 == 5:
                row["params"] = {"response_format": {"type": "json_object"}}
            fh.write(json.dumps(row) + "\n")


TWO_MODELS = {"path": "prompts.jsonl", "id_column": "id", "prompt_column": "prompt", "model_column": "model",
              "params_column": "params", "keep_columns": ["n"]}


def rows_of(path: Path) -> list[dict]:
    table = pq.read_table(path)
    return table.drop_columns([c for c in table.schema.names if c in IGNORED]).to_pylist()


def batches(emu: Emulator) -> dict:
    return emu.stats(keys=False)["batches"]


def state_of(job_out: Path) -> dict:
    path = job_out.with_name(job_out.name + ".parts") / "batch-state.json"
    return json.loads(path.read_text()) if path.exists() else {"batches": []}


def test_batch_run_equals_online_run_every_row_once(tmp_path, make_emulator):
    rows = 5000
    write_two_model_input(tmp_path / "prompts.jsonl", rows)
    online_emu = make_emulator()
    online_job = make_job(tmp_path, online_emu, name="online", input=TWO_MODELS, run={"concurrency": 64},
                          output={"path": "out/online.parquet"})
    assert run_cli("run", str(online_job), "--quiet", "--max-error-rate", "0.1").code == 0

    emu = make_emulator(batch_line_fault_rate=0.03, **FAST_BATCHES)
    job = make_job(tmp_path, emu, name="batch", input=TWO_MODELS,
                   run={**BATCH_RUN, "batch_max_lines": 1500, "max_error_rate": 0.1},
                   output={"path": "out/batch.parquet"})
    out = tmp_path / "out" / "batch.parquet"
    first = run_cli("run", str(job))
    assert first.code == 0, first.stderr
    # Two models, 2,500 rows each, at most 1,500 lines a file: four batches, one model each.
    assert batches(emu)["created"] == 4 and batches(emu)["lines"] == rows
    table = pq.read_table(out)
    assert table.column("row_id").to_pylist() == list(range(rows))
    assert set(table.column("mode").to_pylist()) == {"batch"}
    failed = [r for r in table.to_pylist() if r["status"] == "error"]
    transient = [r for r in failed if r["error_type"] == "TransientCallError"]
    assert {r["error_code"] for r in transient} == {"internal_error"} and 50 < len(transient) < 300
    assert emu.stats(keys=False)["requests"] == 0  # nothing was sent online

    # Asked for by name: the failed lines go into a new batch (the emulator draws them afresh) ...
    again = run_cli("run", str(job), "--retry-failed", "transient")
    assert again.code == 0, again.stderr
    assert batches(emu)["created"] == 6  # one new batch per model, for the failed rows only
    assert batches(emu)["lines"] == rows + len(transient)
    # ... and what is still failing is sent online.
    online_finish = run_cli("run", str(job), "--retry-failed", "transient", "--mode", "online")
    assert online_finish.code == 0, online_finish.stderr
    assert batches(emu)["created"] == 6

    batch_rows, online_rows = rows_of(out), rows_of(tmp_path / "out" / "online.parquet")
    assert len(batch_rows) == len(online_rows) == rows
    assert batch_rows == online_rows
    assert sum(r["status"] == "error" for r in batch_rows) == sum(1 for i in range(rows) if i % 97 == 5)
    # Batch answers cost half of the same answers online.
    final, online = pq.read_table(out).to_pylist(), pq.read_table(tmp_path / "out" / "online.parquet").to_pylist()
    for mine, theirs in zip(final, online):
        if mine["status"] == "ok" and mine["mode"] == "batch":
            assert mine["cost"] == pytest.approx(theirs["cost"] / 2)


def test_kill_after_creation_never_creates_a_second_batch(tmp_path):
    clock = ManualClock()
    config = EmulatorConfig(batch_time_scale=1.0, batch_phase_seconds=100.0)
    with Emulator(config, clock=clock) as emu:
        write_prompts(tmp_path / "prompts.jsonl", 600)
        job = make_job(tmp_path, emu, run={**BATCH_RUN, "batch_max_lines": 250})
        out = tmp_path / "out" / "result.parquet"
        proc = start_cli("run", str(job), "--quiet")
        try:
            wait_until(lambda: sum(1 for b in state_of(out)["batches"] if b["batch_id"]) == 3, 60,
                       "three batches created and recorded")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        assert batches(emu)["created"] == 3

        # While nothing runs: status shows each batch from the server, without waiting.
        status = run_cli("status", str(job))
        assert status.code == 0, status.stderr
        assert status.stdout.count("validating") == 3 and "3 batch(es), 3 running" in status.stdout
        listed = json.loads(run_cli("status", str(job), "--json").stdout)
        assert [b["rows"] for b in listed["batches"]] == [250, 250, 100] and listed["from_server"]
        keyless = run_cli("status", str(job), key=None)
        assert keyless.code == 0 and "is not set: showing what the last run recorded" in keyless.stderr
        assert keyless.stdout.count("validating") == 3
        # --restart would orphan them, an online run would pay for their rows twice: both refused.
        restart = run_cli("run", str(job), "--restart", "--quiet")
        assert restart.code == 2 and "still running" in restart.stderr
        online = run_cli("run", str(job), "--mode", "online", "--quiet")
        assert online.code == 2 and "pay for them twice" in online.stderr
        assert emu.stats(keys=False)["requests"] == 0

        clock.advance(1000)  # every batch completes
        rerun = run_cli("run", str(job), "--quiet")
        assert rerun.code == 0, rerun.stderr
        assert batches(emu)["created"] == 3
        assert emu.stats(keys=False)["requests"] == 0
        table = pq.read_table(out)
        assert table.column("row_id").to_pylist() == list(range(600))
        assert set(table.column("status").to_pylist()) == {"ok"}
        assert set(table.column("mode").to_pylist()) == {"batch"}
        assert run_cli("status", str(job)).stdout.startswith("finished: ")


def test_cancel_then_rerun_records_cancelled_rows_and_sends_them_on_request(tmp_path):
    clock = ManualClock()
    config = EmulatorConfig(batch_time_scale=1.0, batch_phase_seconds=100.0)
    with Emulator(config, clock=clock) as emu:
        write_prompts(tmp_path / "prompts.jsonl", 200)
        job = make_job(tmp_path, emu, run=BATCH_RUN)
        out = tmp_path / "out" / "result.parquet"
        proc = start_cli("run", str(job), "--quiet")
        try:
            wait_until(lambda: any(b["batch_id"] for b in state_of(out)["batches"]), 60, "the batch created")
            clock.advance(150)  # half way through in_progress: 100 of 200 lines done
            cancelled = run_cli("cancel", str(job))
            assert cancelled.code == 0, cancelled.stderr
            assert "cancelling" in cancelled.stdout
            clock.advance(100)  # cancelled at the next phase boundary
            assert proc.wait(60) == 3  # the running run joins the finished half and records the rest
        finally:
            if proc.poll() is None:
                proc.kill()
        table = pq.read_table(out).to_pylist()
        assert [r["row_id"] for r in table] == list(range(200))
        codes = [r["error_code"] for r in table if r["status"] == "error"]
        assert len(codes) == 100 and set(codes) == {"batch_cancelled"}
        assert all(r["attempts"] == 0 for r in table if r["status"] == "error")

        online = run_cli("run", str(job), "--retry-failed", "transient", "--mode", "online", "--quiet")
        assert online.code == 0, online.stderr
        table = pq.read_table(out).to_pylist()
        assert [r["status"] for r in table] == ["ok"] * 200
        assert sum(r["mode"] == "online" for r in table) == 100 == emu.stats(keys=False)["requests"]
        assert batches(emu)["created"] == 1


def test_expiry_with_partial_output_finishes_online(tmp_path, make_emulator):
    emu = make_emulator(batch_expire_after_fraction=0.4, **FAST_BATCHES)
    write_prompts(tmp_path / "prompts.jsonl", 1000)
    job = make_job(tmp_path, emu, run={**BATCH_RUN, "batch_fallback_after": "1d"})
    result = run_cli("run", str(job))
    assert result.code == 0, result.stderr
    assert "finishing online" in result.stderr
    table = pq.read_table(tmp_path / "out" / "result.parquet").to_pylist()
    assert [r["row_id"] for r in table] == list(range(1000))
    assert {r["status"] for r in table} == {"ok"}
    by_mode = {m: sum(r["mode"] == m for r in table) for m in ("batch", "online")}
    assert by_mode == {"batch": 400, "online": 600}
    # A batch reports no per-row time: its rows' duration_ms is null; the online finish's rows have theirs.
    assert all((r["duration_ms"] is None) == (r["mode"] == "batch") for r in table)
    stats = emu.stats(keys=False)
    assert stats["requests"] == 600 and stats["batches"]["by_status"] == {"expired": 1}
    summary = json.loads((tmp_path / "out" / "result.summary.json").read_text())
    assert summary["rows_by_mode"] == {"online": 600, "batch": 400} and summary["ok"] == 1000


def test_deadline_cancels_running_batches_and_finishes_online(tmp_path, make_emulator):
    # Real time: each phase lasts 2 s, so the batch is still validating at the 0.5 s deadline.
    emu = make_emulator(batch_time_scale=1.0, batch_phase_seconds=2.0)
    write_prompts(tmp_path / "prompts.jsonl", 300)
    job = make_job(tmp_path, emu, run={**BATCH_RUN, "batch_fallback_after": "0.5s"})
    result = run_cli("run", str(job))
    assert result.code == 0, result.stderr
    assert "past batch_fallback_after" in result.stderr
    table = pq.read_table(tmp_path / "out" / "result.parquet").to_pylist()
    assert [(r["row_id"], r["status"], r["mode"]) for r in table] == [(i, "ok", "online") for i in range(300)]
    stats = emu.stats(keys=False)
    assert stats["batches"]["by_status"] == {"cancelled": 1} and stats["requests"] == 300
