"""Row time (duration_ms beside latency_ms) and reading results with `runner summary` (issue 17)."""

from __future__ import annotations

import json
import signal
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq

from runner.records import Result, Usage, result_schema
from runner.report import RunSummary
from runner.sink import ParquetSink
from tests.helpers import make_job, read_output, run_cli, start_cli, wait_until, write_prompts

TIMEOUT_S = 0.5  # the attempt timeout that cuts the emulator's hangs short


def test_hang_then_retry_shows_in_duration_not_latency(tmp_path, make_emulator):
    """Rows whose first attempt hangs until the timeout: duration_ms covers the hang and the retry, latency_ms
    only the last attempt; the summary's duration p99 reflects the hang."""
    emu = make_emulator(fail_first=8, fail_first_fault="hang", hang_seconds=60)
    write_prompts(tmp_path / "prompts.jsonl", 40)
    job = make_job(tmp_path, emu, endpoint={"timeout": TIMEOUT_S}, run={"concurrency": 8})
    result = run_cli("run", str(job))
    assert result.code == 0, result.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    assert all(r["status"] == "ok" and r["duration_ms"] is not None for r in rows)
    assert all(r["duration_ms"] >= r["latency_ms"] for r in rows)
    retried = [r for r in rows if r["attempts"] > 1]
    assert len(retried) == 8
    # A hung attempt is only given up at its deadline, so a retried row took at least the timeout.
    assert all(r["duration_ms"] >= 0.95 * TIMEOUT_S * 1000 for r in retried)
    summary = json.loads((tmp_path / "out/result.summary.json").read_text())
    assert summary["duration_ms"]["p99"] >= 0.95 * TIMEOUT_S * 1000
    assert summary["duration_ms"]["p99"] > summary["latency_ms"]["p99"]
    shown = run_cli("summary", str(tmp_path / "out/result.parquet"))
    assert shown.code == 0, shown.stderr
    assert "duration   p50" in shown.stdout and "latency    p50" in shown.stdout


def _result(row_id: int, *, status: str = "ok", model: str = "qwen-plus", cost: float = 0.5,
            error_type: str | None = None, http_status: int | None = 200) -> Result:
    now = datetime.now(timezone.utc)
    return Result(row_id=row_id, key=f"k{row_id}", model=model, status=status, usage=Usage(1, 2, 3),
                  cost=cost if status == "ok" else None, error_type=error_type, http_status=http_status,
                  attempts=1, latency_ms=10.0 + row_id, duration_ms=20.0 + row_id, started_at=now, finished_at=now,
                  request_hash=row_id + 1)


def test_summary_of_an_unfinished_run_reads_its_parts(tmp_path):
    """`runner summary` on an output whose run has not finished reads the committed parts, counts a row sent
    again once (its newest result), says it is unfinished, and keeps the currency."""
    output = tmp_path / "out.parquet"
    sink = ParquetSink(output, result_schema(), fingerprint={"job": "x"}, currency="CNY")
    for row_id in range(5):
        sink.write(_result(row_id) if row_id != 3 else
                   _result(3, status="error", error_type="TransientCallError", http_status=502))
    sink.flush()
    sink.write(_result(3))  # the failed row, sent again by a rerun: the newer part wins
    sink.write(_result(5))
    sink.close()
    assert not output.exists()
    shown = run_cli("summary", str(output))
    assert shown.code == 0, shown.stderr
    assert "unfinished run: 6 rows committed in 2 parts" in shown.stdout
    assert "ok 6  failed 0" in shown.stdout and "CNY" in shown.stdout
    data = json.loads(run_cli("summary", "--json", str(output)).stdout)
    assert data["rows"] == 6 and data["ok"] == 6 and data["unfinished_parts"] == 2
    assert data["cost"]["currency"] == "CNY" and data["cost"]["spent"] == 3.0


def test_summary_without_output_or_parts_names_both(tmp_path):
    """A path with neither an output nor parts is a one-line error that mentions the parts folder."""
    shown = run_cli("summary", str(tmp_path / "missing.parquet"))
    assert shown.code == 2
    assert "file not found" in shown.stderr and "missing.parquet.parts/" in shown.stderr


def test_per_model_lines_with_a_model_column(tmp_path, emulator):
    """A job whose rows name their model gets one summary line per model, with its rows and latency."""
    records = [{"id": f"r{i}", "prompt": f"question {i}", "model": "qwen-turbo" if i % 3 == 0 else "qwen-plus"}
               for i in range(30)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    job = make_job(tmp_path, emulator, input={"path": "prompts.jsonl", "id_column": "id", "prompt_column": "prompt",
                                              "model_column": "model"})
    result = run_cli("run", str(job))
    assert result.code == 0, result.stderr
    assert "model      qwen-plus: 20 rows  ok 20  failed 0" in result.stderr
    shown = run_cli("summary", str(tmp_path / "out/result.parquet"))
    assert "model      qwen-plus: 20 rows  ok 20  failed 0" in shown.stdout
    assert "model      qwen-turbo: 10 rows  ok 10  failed 0" in shown.stdout
    data = json.loads(run_cli("summary", "--json", str(tmp_path / "out/result.parquet")).stdout)
    turbo = data["models"]["qwen-turbo"]
    assert turbo["rows"] == 10 and turbo["latency_ms"]["p99"] is not None and turbo["total_tokens"] > 0


def test_codeless_errors_show_their_http_status(tmp_path, make_emulator):
    """An error without an error code (a gateway's HTML 502) is shown with its HTTP status."""
    emu = make_emulator(fail_first=3, fail_first_fault="502")
    write_prompts(tmp_path / "prompts.jsonl", 10)
    job = make_job(tmp_path, emu, run={"concurrency": 1, "max_attempts": 1, "max_error_rate": 1.0})
    result = run_cli("run", str(job))
    assert result.code == 0, result.stderr
    assert "error      3 x TransientCallError (HTTP 502)" in result.stderr
    data = json.loads(run_cli("summary", "--json", str(tmp_path / "out/result.parquet")).stdout)
    assert data["errors"] == [{"error_type": "TransientCallError", "error_code": None, "http_status": 502, "rows": 3}]


def test_summary_of_a_resumed_run_separates_this_run(tmp_path, make_emulator):
    """After a rerun that sent only the missing rows, `runner summary` shows this run's own rows and requests,
    and no throughput over the whole output's time span (it holds both runs and the gap between)."""
    emu = make_emulator(fail_first=4, fail_first_fault="500")
    write_prompts(tmp_path / "prompts.jsonl", 20)
    job = make_job(tmp_path, emu, run={"concurrency": 1, "max_attempts": 1, "max_error_rate": 1.0})
    assert run_cli("run", str(job)).code == 0
    result = run_cli("run", str(job), "--retry-failed", "transient")
    assert result.code == 0, result.stderr
    shown = run_cli("summary", str(tmp_path / "out/result.parquet"))
    assert "this run   4 rows  4 requests" in shown.stdout, shown.stdout
    assert "throughput" not in shown.stdout
    assert "ok 20  failed 0" in shown.stdout


def _drop_duration(path: Path) -> None:
    """Rewrite a Parquet file as the runner wrote it before duration_ms existed (metadata kept)."""
    table = pq.read_table(path)
    pq.write_table(table.drop_columns(["duration_ms"]), path)


def test_old_schema_unfinished_run_summarises_and_resumes(tmp_path, make_emulator):
    """Parts written before duration_ms existed: `runner summary` reads them and a rerun finishes the job, the
    old rows with a null duration_ms and the new ones with theirs."""
    emu = make_emulator(latency_ms=200)
    write_prompts(tmp_path / "prompts.jsonl", 120)
    job = make_job(tmp_path, emu, run={"concurrency": 8, "part_rows": 8})
    proc = start_cli("run", str(job))
    parts = tmp_path / "out/result.parquet.parts"
    wait_until(lambda: len(list(parts.glob("part-*.parquet"))) >= 2, what="two committed parts")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    old_parts = sorted(parts.glob("part-*.parquet"))
    for part in old_parts:
        _drop_duration(part)
    committed = sum(pq.ParquetFile(p).metadata.num_rows for p in old_parts)
    shown = run_cli("summary", str(tmp_path / "out/result.parquet"))
    assert shown.code == 0, shown.stderr
    assert f"unfinished run: {committed} rows committed in {len(old_parts)} parts" in shown.stdout
    result = run_cli("run", str(job))
    assert result.code == 0, result.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    assert len(rows) == 120 and all(r["status"] == "ok" for r in rows)
    old = [r for r in rows if r["duration_ms"] is None]
    assert len(old) == committed and committed < 120
    assert all(r["duration_ms"] >= r["latency_ms"] for r in rows if r["duration_ms"] is not None)


def test_old_schema_finished_output_summarises_and_reopens(tmp_path, make_emulator):
    """A finished output without duration_ms still summarises, and --retry-failed sends its failed rows again."""
    emu = make_emulator(fail_first=3, fail_first_fault="500")
    write_prompts(tmp_path / "prompts.jsonl", 12)
    job = make_job(tmp_path, emu, run={"concurrency": 1, "max_attempts": 1, "max_error_rate": 1.0})
    assert run_cli("run", str(job)).code == 0
    output = tmp_path / "out/result.parquet"
    _drop_duration(output)
    (tmp_path / "out/result.summary.json").unlink()
    shown = run_cli("summary", str(output))
    assert shown.code == 0, shown.stderr
    assert "ok 9  failed 3" in shown.stdout and "duration   p50 -" in shown.stdout
    result = run_cli("run", str(job), "--retry-failed", "transient")
    assert result.code == 0, result.stderr
    rows = read_output(output)
    assert [r["status"] for r in rows] == ["ok"] * 12
    assert sum(r["duration_ms"] is not None for r in rows) == 3


def test_duration_percentiles_count_failed_rows_and_skip_unsent():
    """duration percentiles cover every sent row (failed ones too); latency only ok rows; unsent rows neither."""
    summary = RunSummary()
    summary.add(Result(row_id=0, key="a", model="m", status="ok", latency_ms=10.0, duration_ms=10.0))
    summary.add(Result(row_id=1, key="b", model="m", status="error", error_type="TransientCallError",
                       latency_ms=5.0, duration_ms=9000.0))
    summary.add(Result(row_id=2, key="c", model="m", status="error", error_type="InvalidRow"))
    assert summary.latency_percentiles()["p99"] == 10.0
    assert summary.duration_percentiles() == {"p50": 10.0, "p90": 9000.0, "p99": 9000.0}
