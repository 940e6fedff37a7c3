"""Crash-safe resume with the real CLI: kill -9, SIGINT, changed jobs, a second writer, a corrupt part."""

from __future__ import annotations

import random
import signal

import pyarrow.parquet as pq

from runner.emulator import Emulator, EmulatorConfig
from tests.helpers import make_job, read_output, run_cli, start_cli, wait_until, write_prompts

IGNORED = {"started_at", "finished_at", "latency_ms", "duration_ms", "request_id"}


def _comparable(path) -> list[dict]:
    table = pq.read_table(path)
    return table.drop_columns([c for c in table.schema.names if c in IGNORED]).to_pylist()


def test_kill_9_at_random_points_then_rerun_equals_a_clean_run(tmp_path, make_emulator):
    """kill -9 the CLI at random points of a 3,000-row run; reruns finish it with every row once, in
    order, equal to a clean run, and at most `concurrency` rows paid twice per kill."""
    concurrency = 32
    records = write_prompts(tmp_path / "prompts.jsonl", 3000)
    clean_emu = make_emulator(latency_ms=5)
    clean_job = make_job(tmp_path, clean_emu, name="clean", output={"path": "out/clean.parquet"},
                         run={"concurrency": concurrency})
    assert run_cli("run", str(clean_job)).code == 0

    emu = make_emulator(latency_ms=20, latency_jitter_ms=20)
    job = make_job(tmp_path, emu, run={"concurrency": concurrency, "part_rows": 200, "part_seconds": 0.5})
    rng = random.Random(4)
    kills = 0
    for target in sorted(rng.sample(range(150, 2700), 3)):
        proc = start_cli("run", str(job))
        wait_until(lambda: emu.stats(keys=False)["requests"] >= target or proc.poll() is not None,
                   what=f"{target} requests")
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.wait(timeout=30)
    assert kills == 3
    assert (tmp_path / "out/result.parquet.parts").exists() and not (tmp_path / "out/result.parquet").exists()
    final = run_cli("run", str(job))
    assert final.code == 0, final.stderr
    assert "resuming:" in final.stderr

    rows = read_output(tmp_path / "out/result.parquet")
    assert [r["key"] for r in rows] == [r["id"] for r in records]
    assert _comparable(tmp_path / "out/result.parquet") == _comparable(tmp_path / "out/clean.parquet")
    stats = emu.stats()
    assert all(v["succeeded"] >= 1 for v in stats["keys"].values()) and len(stats["keys"]) == 3000
    assert stats["succeeded_more_than_once"] <= concurrency * kills


def test_sigint_once_drains_commits_and_resumes(tmp_path, make_emulator):
    """The first SIGINT stops taking rows, lets requests in flight finish, commits them, exits 130; a
    rerun finishes with nothing paid twice."""
    emu = make_emulator(latency_ms=300)
    write_prompts(tmp_path / "prompts.jsonl", 200)
    job = make_job(tmp_path, emu, run={"concurrency": 8})
    proc = start_cli("run", str(job))
    wait_until(lambda: emu.stats(keys=False)["requests"] >= 24, what="some requests")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "run the same command again" in stderr and "Traceback" not in stderr
    answered = emu.stats(keys=False)["by_status"]["200"]
    assert 24 <= answered < 200
    result = run_cli("run", str(job))
    assert result.code == 0, result.stderr
    assert f"resuming: {answered} rows already done" in result.stderr
    assert len(read_output(tmp_path / "out/result.parquet")) == 200
    assert emu.stats()["succeeded_more_than_once"] == 0


def test_sigint_twice_stops_at_once_and_resumes(tmp_path, make_emulator):
    """A second SIGINT cancels the requests in flight instead of waiting; the run is still resumable."""
    slow = make_emulator(latency_ms=60_000)
    write_prompts(tmp_path / "prompts.jsonl", 30)
    job = make_job(tmp_path, slow, run={"concurrency": 4, "drain_seconds": 600})
    proc = start_cli("run", str(job))
    wait_until(lambda: slow.stats(keys=False)["in_flight"] >= 4, what="requests in flight")
    proc.send_signal(signal.SIGINT)
    # Two SIGINTs sent before the first is handled merge into one, so wait for the run to say it drains.
    # Piped stderr also gets progress log lines (a start line first): skip them.
    notice = ""
    for _ in range(10):
        notice = proc.stderr.readline()
        if " rows " not in notice or " | " not in notice:
            break
    assert "not starting new rows" in notice
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)  # far less than the 600 s drain or the 60 s latency
    assert proc.returncode == 130, stderr
    assert "stopping now" in stderr
    port = slow.port
    slow.stop()
    with Emulator(EmulatorConfig(), port=port) as same_address:
        result = run_cli("run", str(job))
        assert result.code == 0, result.stderr
        assert same_address.stats(keys=False)["requests"] == 30
    assert len(read_output(tmp_path / "out/result.parquet")) == 30


def _interrupted_run(tmp_path, emu, job, requests: int = 20) -> None:
    proc = start_cli("run", str(job))
    wait_until(lambda: emu.stats(keys=False)["requests"] >= requests, what=f"{requests} requests")
    proc.kill()
    proc.wait(timeout=30)


def test_changed_job_is_refused_and_restart_starts_over(tmp_path, make_emulator):
    """Resuming with a changed model or template is refused, saying what changed; --restart starts over."""
    emu = make_emulator(latency_ms=50)
    write_prompts(tmp_path / "prompts.jsonl", 300)
    job = make_job(tmp_path, emu, run={"concurrency": 4, "part_seconds": 0.2})
    _interrupted_run(tmp_path, emu, job)
    changed_model = run_cli("run", str(job), "--model", "qwen-max")
    assert changed_model.code == 2
    assert "model: 'qwen-plus' -> 'qwen-max'" in changed_model.stderr and "--restart" in changed_model.stderr
    templated = make_job(tmp_path, emu, input={"path": "prompts.jsonl", "id_column": "id",
                                               "template": "Please answer: {prompt}"},
                         run={"concurrency": 4})
    changed_template = run_cli("run", str(templated))
    assert changed_template.code == 2 and "rows:" in changed_template.stderr
    restarted = run_cli("run", str(job), "--model", "qwen-max", "--restart", "--concurrency", "32")
    assert restarted.code == 0, restarted.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    assert len(rows) == 300 and {r["model"] for r in rows} == {"qwen-max"}


def test_edited_input_rows_are_sent_again(tmp_path, make_emulator):
    """A row whose prompt changed after an interrupted run is answered again; unchanged rows are not."""
    emu = make_emulator(latency_ms=20)
    write_prompts(tmp_path / "prompts.jsonl", 300)
    job = make_job(tmp_path, emu, run={"concurrency": 4, "part_seconds": 0.2})
    _interrupted_run(tmp_path, emu, job)
    lines = (tmp_path / "prompts.jsonl").read_text().splitlines()
    lines[0] = lines[0].replace("Question number 0", "Edited question zero")
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    result = run_cli("run", str(job), "--concurrency", "32")
    assert result.code == 0, result.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    assert rows[0]["response"].startswith("Echo: Edited question zero")
    summary = (tmp_path / "out/result.summary.json").read_text()
    assert '"changed_rows_resent": 1' in summary


def test_second_concurrent_run_is_refused(tmp_path, make_emulator):
    """While a run writes an output, a second run against it refuses to start."""
    emu = make_emulator(latency_ms=60_000)
    write_prompts(tmp_path / "prompts.jsonl", 10)
    job = make_job(tmp_path, emu, run={"concurrency": 2})
    first = start_cli("run", str(job))
    try:
        wait_until(lambda: emu.stats(keys=False)["in_flight"] >= 1, what="the first run")
        second = run_cli("run", str(job))
        assert second.code == 1
        assert f"another run (pid {first.pid}) is writing this output" in second.stderr
    finally:
        first.kill()
        first.wait(timeout=30)


def test_corrupt_part_rows_are_redone(tmp_path, make_emulator):
    """A truncated part file is detected on rerun; its rows are sent again and the output is complete."""
    emu = make_emulator(latency_ms=10)
    write_prompts(tmp_path / "prompts.jsonl", 400)
    job = make_job(tmp_path, emu, run={"concurrency": 4, "part_rows": 50})
    _interrupted_run(tmp_path, emu, job, requests=120)
    parts = sorted((tmp_path / "out/result.parquet.parts").glob("part-*.parquet"))
    assert parts
    data = parts[0].read_bytes()
    parts[0].write_bytes(data[: len(data) // 3])
    result = run_cli("run", str(job), "--concurrency", "32")
    assert result.code == 0, result.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    assert [r["row_id"] for r in rows] == list(range(400)) and all(r["status"] == "ok" for r in rows)


def test_retry_failed_by_name_reopens_a_finished_output(tmp_path, make_emulator):
    """A finished output with failed rows: `--retry-failed transient` sends only those rows again and rewrites
    it; a plain rerun still refuses to touch it, and a different job may not reopen it."""
    failing = make_emulator(faults={"500": 0.3})
    write_prompts(tmp_path / "prompts.jsonl", 200)
    job = make_job(tmp_path, failing, run={"max_attempts": 1, "max_error_rate": 1.0})
    assert run_cli("run", str(job), "--quiet").code == 0
    out = tmp_path / "out/result.parquet"
    failed = [r["row_id"] for r in read_output(out) if r["status"] == "error"]
    assert 20 < len(failed) < 120
    plain = run_cli("run", str(job), "--quiet")
    assert plain.code == 2 and "--retry-failed transient" in plain.stderr
    other_model = run_cli("run", str(job), "--retry-failed", "transient", "--model", "qwen-max", "--quiet")
    assert other_model.code == 2 and "different job (model changed)" in other_model.stderr

    healthy = make_emulator()
    again = run_cli("run", str(job), "--retry-failed", "transient", "--base-url", healthy.openai_base_url)
    assert again.code == 2 and "different job (endpoint changed)" in again.stderr
    failing.stop()
    with Emulator(EmulatorConfig(), port=failing.port) as same_address:
        again = run_cli("run", str(job), "--retry-failed", "transient")
        assert again.code == 0, again.stderr
        assert "reopened the finished output" in again.stderr
        assert same_address.stats(keys=False)["requests"] == len(failed)
    rows = read_output(out)
    assert [r["row_id"] for r in rows] == list(range(200)) and {r["status"] for r in rows} == {"ok"}
    assert not out.with_name(out.name + ".parts").exists()
