"""ParquetSink: atomic parts, resume ledger derived from parts, ordered merge, refusals."""

from __future__ import annotations

import errno
from datetime import datetime, timezone

import pyarrow.parquet as pq
import pytest

from runner.errors import OutputConflict, SinkError
from runner.records import Result, Usage, result_schema
from runner.journal import decode, encode
from runner.sink import DoneRows, ParquetSink

FP = {"model": "qwen-plus", "input": "a"}


def _result(row_id: int, status: str = "ok", error_type: str | None = None, response: str | None = None) -> Result:
    now = datetime.now(timezone.utc)
    return Result(row_id=row_id, key=f"k{row_id}", model="qwen-plus", status=status, error_type=error_type,
                  response=response or f"answer {row_id}", usage=Usage(1, 2, 3), attempts=1, latency_ms=1.0,
                  started_at=now, finished_at=now, request_hash=1000 + row_id)


def _sink(tmp_path, **kwargs) -> ParquetSink:
    return ParquetSink(tmp_path / "out.parquet", result_schema(), fingerprint=kwargs.pop("fingerprint", FP),
                       part_rows=kwargs.pop("part_rows", 3), **kwargs)


def test_done_rows_is_a_set_with_digests():
    """DoneRows adds, discards and counts row ids and remembers each row's request digest."""
    rows = DoneRows()
    for r in (0, 7, 8, 1000, 7):
        rows.add(r, 50 + r)
    rows.discard(8)
    rows.discard(9)
    assert len(rows) == 3 and 7 in rows and 8 not in rows and 1000 in rows and 5000 not in rows
    assert rows.digest(1000) == 1050 and rows.digest(8) == 0 and rows.digest(99999) == 0


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


def test_merge_across_windows_keeps_the_newest_answer_of_each_row(tmp_path, monkeypatch):
    """Windows smaller than the parts: parts straddling window edges, a part spanning every window and
    rows answered again in later parts (by a rerun) each come out once, in order, newest answer first."""
    monkeypatch.setattr("runner.sink.MERGE_WINDOW_ROWS", 4)
    sink = _sink(tmp_path, part_rows=5)
    for row_id in [3, 0, 4, 1, 2, 8, 5, 9, 6, 7, 13, 10, 11, 12, 14]:  # parts 0-4, 5-9, 10-14
        sink.write(_result(row_id, "error", "TransientCallError"))
    sink.close()
    again = _sink(tmp_path, part_rows=5)
    for row_id in [14, 0, 7, 3, 11, 6, 2, 9, 1, 12]:  # one part per five: each spans several windows
        again.write(_result(row_id, response=f"again {row_id}"))
    assert again.finalize(15) == 15
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column("row_id").to_pylist() == list(range(15))
    answered = {0, 1, 2, 3, 6, 7, 9, 11, 12, 14}
    assert table.column("response").to_pylist() == [f"again {r}" if r in answered else f"answer {r}" for r in range(15)]
    assert table.column("status").to_pylist() == ["ok" if r in answered else "error" for r in range(15)]


def test_merge_refuses_missing_rows(tmp_path):
    """A merge that would not hold every input row fails and keeps the parts."""
    sink = _sink(tmp_path)
    for row_id in (0, 1, 3):
        sink.write(_result(row_id))
    with pytest.raises(SinkError, match="hold 3 rows"):
        sink.finalize(4)
    assert sink.parts_dir.exists() and not (tmp_path / "out.parquet").exists()


def test_resume_skips_done_rows_and_retries_transient_failures(tmp_path):
    """A reopened sink knows successes and permanent failures as done; throttled/transient rows, and answers
    damaged on the way (BadResponse), are redone."""
    sink = _sink(tmp_path)
    sink.write(_result(0))
    sink.write(_result(1, "error", "PermanentCallError"))
    sink.write(_result(2, "error", "Throttled"))
    sink.write(_result(3, "error", "TransientCallError"))
    sink.write(_result(4, "error", "BadResponse"))
    sink.close()
    again = _sink(tmp_path)
    assert 0 in again.done and 1 in again.done and 2 not in again.done and 3 not in again.done
    assert 4 not in again.done
    again.write(_result(2, response="second try"))
    again.write(_result(3, response="second try"))
    again.write(_result(4, response="second try"))
    again.finalize(5)
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["row_id"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["status"] for r in rows] == ["ok", "error", "ok", "ok", "ok"]
    assert rows[2]["response"] == "second try"


def test_corrupt_part_is_ignored_and_its_rows_redone(tmp_path):
    """A truncated part file is set aside, not trusted: its rows are not counted as done."""
    sink = _sink(tmp_path)
    for row_id in range(6):
        sink.write(_result(row_id))
    sink.close()
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
    with pytest.raises(OutputConflict, match=r"model: 'qwen-plus' -> 'qwen-max'") as info:
        _sink(tmp_path, fingerprint={**FP, "model": "qwen-max"})
    assert "--restart" in info.value.hint
    fresh = _sink(tmp_path, fingerprint={**FP, "model": "qwen-max"}, restart=True)
    assert len(fresh.done) == 0


def test_finished_output_is_not_overwritten(tmp_path):
    """A finished output is refused without overwrite and replaced with it."""
    sink = _sink(tmp_path)
    sink.write(_result(0))
    sink.finalize(1)
    with pytest.raises(OutputConflict, match="already exists") as info:
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


def test_journal_lines_round_trip_and_torn_lines_are_rejected():
    """A journal line decodes to the same result, typed kept values included; a torn or altered line is refused."""
    from datetime import date
    from decimal import Decimal

    result = _result(3)
    result.kept = {"when": date(2026, 1, 2), "price": Decimal("1.50"), "blob": b"\x00\x01", "tags": ["a"]}
    line = encode(result)
    assert decode(line) == result
    assert decode(line[:-5] + b"\n") is None and decode(line[:-1]) is None
    assert decode(line.replace(b"answer", b"answeR")) is None


def test_killed_run_recovers_results_from_the_journal(tmp_path):
    """Results written but not yet committed as a part survive a crash through the journal."""
    sink = _sink(tmp_path, part_rows=1000)
    for row_id in range(5):
        sink.write(_result(row_id))
    assert not list(sink.parts_dir.glob("part-*.parquet"))
    # a crash: the process dies without flushing or closing; the lock dies with it
    sink._release_lock()
    journal = next(sink.parts_dir.glob("journal-*.jsonl"))
    with open(journal, "ab") as fh:
        fh.write(encode(_result(5))[:20])  # a torn last line
    again = _sink(tmp_path)
    assert [r for r in range(7) if r in again.done] == [0, 1, 2, 3, 4]
    assert again.recovered_from_journal == 5 and not list(again.parts_dir.glob("journal-*"))
    again.write(_result(5))
    again.finalize(6)
    assert pq.read_table(tmp_path / "out.parquet").column("row_id").to_pylist() == list(range(6))


def test_second_writer_is_refused(tmp_path):
    """While one sink holds the output, a second one is refused with the holder's pid."""
    import os

    first = _sink(tmp_path)
    with pytest.raises(SinkError, match=f"another run \\(pid {os.getpid()}\\)"):
        _sink(tmp_path)
    first.close()
    _sink(tmp_path).close()  # released: the next run may start


@pytest.mark.parametrize("policy,done", [("transient", [0, 1]), ("all", [0]), ("none", [0, 1, 2])])
def test_retry_failed_policy(tmp_path, policy, done):
    """Which failed rows a rerun sends again: transient ones (default), all failures, or none."""
    sink = _sink(tmp_path)
    sink.write(_result(0))
    sink.write(_result(1, "error", "PermanentCallError"))
    sink.write(_result(2, "error", "Throttled"))
    sink.close()
    again = _sink(tmp_path, retry_failed=policy)
    assert [r for r in range(3) if r in again.done] == done


def test_final_output_drops_the_request_hash(tmp_path):
    """The request digest lives in the parts only; the output has the documented schema."""
    sink = _sink(tmp_path)
    sink.write(_result(0))
    assert "request_hash" in pq.read_schema(_first_part(sink)).names
    sink.finalize(1)
    assert "request_hash" not in pq.read_schema(tmp_path / "out.parquet").names


def _first_part(sink):
    sink.flush()
    return sorted(sink.parts_dir.glob("part-*.parquet"))[0]


def test_full_disk_is_a_sink_error_and_committed_rows_are_kept(tmp_path, monkeypatch):
    """A part that cannot be written (ENOSPC) is a SinkError naming the path; earlier parts stay committed."""
    import errno

    import runner.sink as sink_module

    sink = _sink(tmp_path)
    for row_id in range(3):
        sink.write(_result(row_id))  # one committed part

    def no_space(table, target):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sink_module, "_write_atomic", no_space)
    with pytest.raises(SinkError, match="No space left on device") as info:
        for row_id in range(3, 6):
            sink.write(_result(row_id))
    assert "part-000002.parquet" in info.value.message and "run the same command again" in info.value.hint
    monkeypatch.undo()
    sink.close()
    again = _sink(tmp_path)
    assert [r for r in range(6) if r in again.done] == [0, 1, 2, 3, 4, 5]  # the journal kept the rest


# -- OS errors: every one is a one-line SinkError naming the path and the OS's reason ---------------------

def _os_error(code: int):
    """A stand-in for an OS call that fails with `code` (ENOSPC, EACCES, ...)."""
    import os

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return fail


def _full(path):
    """Make `path` a symlink to /dev/full: a real device on which every write fails with ENOSPC."""
    import os

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to("/dev/full")


def test_full_disk_on_the_journal_names_the_journal(tmp_path):
    """A result that cannot be journaled (ENOSPC, for real: the journal is /dev/full) is a SinkError naming
    the journal, with a hint about disk space."""
    sink = _sink(tmp_path)
    _full(sink.parts_dir / "journal-000001.jsonl")
    with pytest.raises(SinkError) as info:
        sink.write(_result(0))
    assert "journal-000001.jsonl: cannot write results (No space left on device)" in info.value.message
    assert "free disk space" in info.value.hint
    sink.close()


def test_full_disk_on_a_part_leaves_no_temporary_file_and_loses_nothing(tmp_path):
    """A part whose write fails on a full disk (its temporary file is /dev/full) is a SinkError naming the
    part; the temporary file is removed and the journaled rows are recovered by the next run."""
    sink = _sink(tmp_path)
    tmp = sink.parts_dir / ".part-000001.parquet.tmp"
    _full(tmp)
    with pytest.raises(SinkError, match=r"part-000001\.parquet: cannot write results \(No space left on device\)"):
        for row_id in range(3):
            sink.write(_result(row_id))
    assert not tmp.is_symlink() and not tmp.exists()
    sink._release_lock()  # the process stops here; its lock dies with it
    again = _sink(tmp_path)
    assert [r for r in range(3) if r in again.done] == [0, 1, 2] and again.recovered_from_journal == 3
    again.close()


def test_full_disk_on_the_final_merge_keeps_the_parts(tmp_path):
    """A final merge that cannot be written is a SinkError naming the output; the parts stay, and the
    merge succeeds once there is room."""
    sink = _sink(tmp_path)
    for row_id in range(4):
        sink.write(_result(row_id))
    _full(tmp_path / ".out.parquet.tmp")
    with pytest.raises(SinkError, match=r"out\.parquet: cannot write the output \(.*No space left on device"):
        sink.finalize(4)
    assert not (tmp_path / ".out.parquet.tmp").exists() and list(sink.parts_dir.glob("part-*.parquet"))
    sink.close()
    again = _sink(tmp_path)
    assert again.finalize(4) == 4


def test_summary_file_write_is_atomic_and_a_full_disk_is_a_sink_error(tmp_path):
    """write_file_atomic replaces a file whole; on a full disk it is a SinkError naming the file and the old
    file is untouched."""
    from runner.files import write_file_atomic

    target = tmp_path / "x.summary.json"
    write_file_atomic(target, "old\n")
    _full(tmp_path / ".x.summary.json.tmp")
    with pytest.raises(SinkError, match=r"x\.summary\.json: cannot write \(No space left on device\)"):
        write_file_atomic(target, "new\n")
    assert target.read_text() == "old\n" and not (tmp_path / ".x.summary.json.tmp").exists()


@pytest.mark.parametrize("where,code,expected", [
    ("lock", errno.EACCES, "lock: cannot open the lock file (Permission denied)"),
    ("manifest", errno.ENOSPC, "manifest.json: cannot write (No space left on device)"),
    ("recover", errno.ENOSPC, "part-000001.parquet: cannot recover the journal of an interrupted run into a part "
                              "(No space left on device)"),
    ("read part", errno.EACCES, "part-000001.parquet: cannot read a committed part (Permission denied)"),
    ("read part", errno.EIO, "part-000001.parquet: cannot read a committed part (Input/output error)"),
    ("journal", errno.EROFS, "journal-000003.jsonl: cannot write results (Read-only file system)"),
])
def test_os_errors_on_a_rerun_are_one_line_sink_errors(tmp_path, monkeypatch, where, code, expected):
    """A rerun that meets a full disk or a permission error (taking the lock, writing the manifest, recovering
    the journal into a part, reading a committed part, journaling) stops with a SinkError naming the file,
    never a traceback; committed rows are not set aside as corrupt."""
    import runner.sink as sink_module

    if where == "manifest":
        (tmp_path / "out.parquet.parts").mkdir()  # a first run: no manifest yet
    else:
        sink = _sink(tmp_path, part_rows=3)
        for row_id in range(5):
            sink.write(_result(row_id))  # rows 0-2 committed as part 1, rows 3-4 in the journal
        sink._release_lock()  # the first run is killed
        if where == "recover":
            (sink.parts_dir / "part-000001.parquet").unlink()
            (sink.parts_dir / "journal-000002.jsonl").rename(sink.parts_dir / "journal-000001.jsonl")
        elif where == "read part":
            (sink.parts_dir / "journal-000002.jsonl").unlink()  # only the committed part is read
    fault = _os_error(code)
    if where == "lock":
        monkeypatch.setattr(sink_module.os, "open", fault)
    elif where == "manifest":
        monkeypatch.setattr(sink_module.Path, "write_text", fault)
    elif where == "recover":
        monkeypatch.setattr(sink_module.pq, "write_table", fault)
    elif where == "read part":
        monkeypatch.setattr(sink_module, "open", fault, raising=False)
    with pytest.raises(SinkError) as info:
        again = _sink(tmp_path, part_rows=3)
        if where == "journal":
            monkeypatch.setattr(sink_module.Journal, "append", fault)
            again.write(_result(5))
    assert expected in info.value.message and "\n" not in info.value.message
    monkeypatch.undo()
    assert not list((tmp_path / "out.parquet.parts").glob("*.corrupt"))
