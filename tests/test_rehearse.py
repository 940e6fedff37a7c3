"""`runner run --emulator` rehearsals resume like real runs: the emulator's new port each run is not a new job."""

from __future__ import annotations

import json
import signal

from tests.helpers import make_job, read_output, run_cli, start_cli, wait_until, write_prompts


def _committed_parts(tmp_path) -> list:
    return list((tmp_path / "out/result.parquet.parts").glob("part-*.parquet"))


def test_sigint_under_emulator_resumes_with_the_same_command(tmp_path):
    """A `--emulator` run stopped by SIGINT resumes with the same command and ends with every row exactly once."""
    records = write_prompts(tmp_path / "prompts.jsonl", 400)
    job = make_job(tmp_path, run={"concurrency": 1, "part_rows": 5})
    # --rpm paces the rehearsal (about 20 rows a second), so the signal lands mid-run.
    command = ("run", str(job), "--emulator", "--rpm", "1200", "--concurrency", "1")
    proc = start_cli(*command, key=None)
    wait_until(lambda: _committed_parts(tmp_path) or proc.poll() is not None, what="a committed part")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert not (tmp_path / "out/result.parquet").exists()

    result = run_cli(*command, key=None)
    assert result.code == 0, result.stderr
    assert "resuming:" in result.stderr and "different job" not in result.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    assert [r["key"] for r in rows] == [r["id"] for r in records]
    assert all(r["status"] == "ok" for r in rows)


def test_retry_failed_reopens_a_finished_emulator_output(tmp_path):
    """`--retry-failed all` after a finished `--emulator` run reopens its output instead of calling it another job."""
    write_prompts(tmp_path / "prompts.jsonl", 20)
    job = make_job(tmp_path)
    first = run_cli("run", str(job), "--emulator", key=None)
    assert first.code == 0, first.stderr
    again = run_cli("run", str(job), "--emulator", "--retry-failed", "all", key=None)
    assert again.code == 0, again.stderr
    assert len(read_output(tmp_path / "out/result.parquet")) == 20


def test_a_real_endpoint_run_does_not_resume_an_emulator_rehearsal(tmp_path, emulator):
    """An unfinished `--emulator` rehearsal is still a different job for a run against a real endpoint."""
    write_prompts(tmp_path / "prompts.jsonl", 400)
    job = make_job(tmp_path, emulator, run={"concurrency": 1, "part_rows": 5})
    proc = start_cli("run", str(job), "--emulator", "--rpm", "1200", key=None)
    wait_until(lambda: _committed_parts(tmp_path) or proc.poll() is not None, what="a committed part")
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    real = run_cli("run", str(job))
    assert real.code == 2, real.stderr
    assert "different job" in real.stderr and "the built-in emulator" in real.stderr


def test_batch_mode_rehearsal_resumes_after_sigint(tmp_path):
    """A batch-mode `--emulator` run stopped by SIGINT after creating a batch resumes with the same command: the
    batches that died with the first emulator are planned again, every row ends up exactly once; status shows
    what was recorded, without asking a server that is gone."""
    records = write_prompts(tmp_path / "prompts.jsonl", 400)
    job = make_job(tmp_path, run={"mode": "batch", "batch_max_lines": 250})
    out = tmp_path / "out/result.parquet"
    state = out.with_name(out.name + ".parts") / "batch-state.json"
    proc = start_cli("run", str(job), "--emulator", key=None)
    wait_until(lambda: (state.exists() and '"batch_id": "batch' in state.read_text()) or proc.poll() is not None,
               60, "a batch created")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "end with this rehearsal's emulator" in stderr and "--offline" in stderr

    shown = run_cli("status", str(job), "--json", key=None)
    assert shown.code == 0, shown.stderr
    listed = json.loads(shown.stdout)
    assert listed["endpoint"] == "emulator" and not listed["from_server"] and listed["running"] >= 1
    assert run_cli("cancel", str(job), key=None).code == 1

    result = run_cli("run", str(job), "--emulator", key=None)
    assert result.code == 0, result.stderr
    assert "gone with it: sending them again" in result.stderr
    rows = read_output(out)
    assert [r["key"] for r in rows] == [r["id"] for r in records]
    assert {(r["status"], r["mode"]) for r in rows} == {("ok", "batch")}
