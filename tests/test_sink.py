"""ParquetSink: atomic parts, resume ledger derived from parts, ordered merge, refusals."""

from __future__ import annotations

from datetime import datetime, timezone

import pyarrow.parquet as pq
import pytest

from runner.errors import SinkError
from runner.records import Result, Usage, result_schema
from runner.sink import ParquetSink, RowSet

FP = {"model": "qwen-plus", "input": "a"}


def _result(row_id: int, status: str = "ok", error_type: str | None = None, response: str | None = None) -> Result:
    now = datetime.now(timezone.utc)
    return Result(row_id=row_id, key=f"k{row_id}", model="qwen-plus", status=status, error_type=error_type,
                  response=response or f"answer {row_id}", usage=Usage(1, 2, 3), attempts=1, latency_ms=1.0,
                  started_at=now, finished_at=now)


def _sink(tmp_path, **kwargs) -> ParquetSink:
    return ParquetSink(tmp_path / "out.parquet", result_schema(), fingerprint=kwargs.pop("fingerprint", FP),
                       part_rows=kwargs.pop("part_rows", 3), **kwargs)


def test_rowset_is_a_set():
    """RowSet adds, discards and counts row ids like a set."""
    rows = RowSet()
    for r in (0, 7, 8, 1000, 7):
        rows.add(r)
    rows.discard(8)
    rows.discard(9)
    assert len(rows) == 3 and 7 in rows and 8 not in rows and 1000 in rows and 5000 not in rows


def test_results_out_of_order_are_merged_in_input_order(tmp_path):
    """Parts hold rows in completion order; the final file is in row_id order and the parts are removed."""
    sink = _sink(tmp_path)
    for row_id in [5, 2, 9, 0, 1, 8, 3, 7, 4, 6]:
        sink.write(_result(row_id))
    assert len(list(sink.parts_dir.glob("part-*.parquet"))) == 3
    assert sink.finalize(10) == 10
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column("row_id").to_pylist() == list(range(10))
    assert not sink.parts_dir.exists()


def test_merge_refuses_missing_rows(tmp_path):
    """A merge that would not hold every input row fails and keeps the parts."""
    sink = _sink(tmp_path)
    for row_id in (0, 1, 3):
        sink.write(_result(row_id))
    with pytest.raises(SinkError, match="hold 3 rows"):
        sink.finalize(4)
    assert sink.parts_dir.exists() and not (tmp_path / "out.parquet").exists()


def test_resume_skips_done_rows_and_retries_transient_failures(tmp_path):
    """A reopened sink knows successes and permanent failures as done; throttled/transient rows are redone."""
    sink = _sink(tmp_path)
    sink.write(_result(0))
    sink.write(_result(1, "error", "PermanentCallError"))
    sink.write(_result(2, "error", "Throttled"))
    sink.write(_result(3, "error", "TransientCallError"))
    sink.close()
    again = _sink(tmp_path)
    assert 0 in again.done and 1 in again.done and 2 not in again.done and 3 not in again.done
    again.write(_result(2, response="second try"))
    again.write(_result(3, response="second try"))
    again.finalize(4)
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["row_id"] for r in rows] == [0, 1, 2, 3]
    assert [r["status"] for r in rows] == ["ok", "error", "ok", "ok"]
    assert rows[2]["response"] == "second try"


def test_corrupt_part_is_ignored_and_its_rows_redone(tmp_path):
    """A truncated part file is set aside, not trusted: its rows are not counted as done."""
    sink = _sink(tmp_path)
    for row_id in range(6):
        sink.write(_result(row_id))
    parts = sorted(sink.parts_dir.glob("part-*.parquet"))
    data = parts[1].read_bytes()
    parts[1].write_bytes(data[: len(data) // 2])
    again = _sink(tmp_path)
    assert [r for r in range(6) if r in again.done] == [0, 1, 2]
    assert list(again.parts_dir.glob("*.corrupt"))


def test_changed_job_is_refused_and_restart_starts_over(tmp_path):
    """Parts of a different job are never mixed in: refused with what changed; restart discards them."""
    sink = _sink(tmp_path)
    sink.write(_result(0))
    sink.close()
    with pytest.raises(SinkError, match=r"changed: model") as info:
        _sink(tmp_path, fingerprint={**FP, "model": "qwen-max"})
    assert "--restart" in info.value.hint
    fresh = _sink(tmp_path, fingerprint={**FP, "model": "qwen-max"}, restart=True)
    assert len(fresh.done) == 0


def test_finished_output_is_not_overwritten(tmp_path):
    """A finished output is refused without overwrite and replaced with it."""
    sink = _sink(tmp_path)
    sink.write(_result(0))
    sink.finalize(1)
    with pytest.raises(SinkError, match="already exists") as info:
        _sink(tmp_path)
    assert "--overwrite" in info.value.hint
    again = _sink(tmp_path, overwrite=True)
    again.finalize(0)
    assert pq.read_table(tmp_path / "out.parquet").num_rows == 0


def test_parts_are_committed_by_time(tmp_path):
    """A part is committed when part_seconds have passed, even with fewer than part_rows rows."""
    now = [0.0]
    sink = _sink(tmp_path, part_rows=1000, part_seconds=5.0, clock=lambda: now[0])
    sink.write(_result(0))
    assert not list(sink.parts_dir.glob("part-*.parquet"))
    assert sink.seconds_until_due() == 5.0
    now[0] = 5.0
    sink.write(_result(1))
    assert len(list(sink.parts_dir.glob("part-*.parquet"))) == 1
