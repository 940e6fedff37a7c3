"""Parquet output: a journal and part files while running, one ordered file at the end.

Results arrive in completion order. Each is appended to the open part's journal at once (so a
kill loses only requests in flight), buffered, and committed as a part file under
`<output>.parts/` every `part_rows` rows or `part_seconds` seconds: sorted by row_id, written to a
temporary name, fsynced and renamed, so a part exists whole or not at all. The parts are the truth
about what is done: a rerun reads them (setting aside any that do not open), replays journals whose
part was never committed, and skips rows already answered with the same request. When every row is
in, the parts are merged in input order into `<output>` (temporary name + rename) and removed.
One run at a time: a lock on the parts folder refuses a second writer.

Every OS error (a full disk, a read-only folder, permissions) is translated where it happens into a
one-line SinkError naming the path and the reason (runner/files.py), on a first run, a rerun, a
recovery from the journal and the final merge alike.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import OutputConflict, SinkError
from .files import os_errors, os_hint, os_reason, remove_quietly, sink_error, write_file_atomic
from .journal import Journal, replay
from .records import REQUEST_HASH_FIELD, Result, results_to_table

MANIFEST = "manifest.json"
LOCK = "lock"
# Rows merged (and written as one row group) at a time. The merge's memory grows with it, about
# 3 MB per 1,000 rows of peak RSS (16,384: +47 MB; 65,536 used to cost +100 MB). 4,096: 300,000 rows of
# 400-character answers merge in 1.24 s instead of 1.08 s, at a peak RSS of 153 MB instead of 190 MB.
MERGE_WINDOW_ROWS = 4_096
RETRY_FAILED = ("transient", "all", "none")
# Error classes that `retry_failed = "transient"` (the default) sends again on a rerun.
# Failures a rerun sends again by default: a damaged answer (BadResponse) is retried like a reset.
TRANSIENT_ERRORS = frozenset({"TransientCallError", "Throttled", "BadResponse"})


ANY_DIGEST = 2  # a row answered for a request we no longer know (a reopened output): any request matches
FINGERPRINT_KEY = b"runner.fingerprint"  # in the output's Parquet metadata, to reopen it safely
CURRENCY_KEY = b"runner.currency"  # in the output's metadata and the manifest: `runner summary` shows it


class DoneRows:
    """Row id -> the request digest it was answered for (0: not done). 8 bytes a row, dense.
    Request digests are odd, so the even ANY_DIGEST never equals one."""

    def __init__(self) -> None:
        self._digests = array("q")
        self.count = 0

    def add(self, row_id: int, digest: int) -> None:
        if row_id >= len(self._digests):
            self._digests.extend(bytes(8 * max(row_id + 1 - len(self._digests), len(self._digests))))
        if not self._digests[row_id]:
            self.count += 1
        self._digests[row_id] = digest or 1

    def discard(self, row_id: int) -> None:
        if row_id < len(self._digests) and self._digests[row_id]:
            self._digests[row_id] = 0
            self.count -= 1

    def digest(self, row_id: int) -> int:
        return self._digests[row_id] if row_id < len(self._digests) else 0

    def matches(self, row_id: int, digest: int) -> bool:
        """Whether the row is done for this request (so it is not sent again)."""
        done = self.digest(row_id)
        return done == digest or done == ANY_DIGEST

    def __contains__(self, row_id: int) -> bool:
        return self.digest(row_id) != 0

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True)
class Part:
    seq: int
    path: Path
    min_row: int
    max_row: int


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _count_below(sorted_row_ids: pa.ChunkedArray, bound: int) -> int:
    """How many of the ascending row ids are < bound: where `bound` would be inserted."""
    return pc.sum(pc.less(sorted_row_ids, bound)).as_py() or 0


def _with_columns_of(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with every column of `schema`, in its order: a part written before a column existed (e.g.
    duration_ms) gets it as nulls, so an old unfinished run or a reopened old output merges with new parts."""
    if table.schema.names == schema.names:
        return table
    columns = [table.column(f.name) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, names=schema.names)


def _write_atomic(table: pa.Table, target: Path) -> None:
    tmp = target.with_name("." + target.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh, compression="zstd")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        remove_quietly(tmp)  # a half-written file only takes space a full disk does not have
        raise
    _fsync_dir(target.parent)


class ParquetSink:
    """Owns `<output>`, `<output>.parts/` (parts, journal, manifest, lock) and the merge."""

    def __init__(self, output: Path, schema: pa.Schema, *, fingerprint: Mapping[str, str],
                 part_rows: int = 1000, part_seconds: float = 5.0, overwrite: bool = False,
                 restart: bool = False, retry_failed: str = "transient", reopen: bool = False,
                 clock: Callable[[], float] = time.monotonic, currency: str | None = None) -> None:
        if retry_failed not in RETRY_FAILED:
            raise ValueError(f"retry_failed must be one of {RETRY_FAILED}")
        self.output = output
        self.parts_dir = output.with_name(output.name + ".parts")
        self.schema = schema
        self.part_schema = schema.append(REQUEST_HASH_FIELD)
        self.fingerprint = dict(fingerprint)
        self.currency = currency  # of the costs; recorded only (not part of the fingerprint)
        self.part_rows = part_rows
        self.part_seconds = part_seconds
        self.retry_failed = retry_failed
        self._clock = clock
        self._buffer: list[Result] = []
        self._journal: Journal | None = None
        self._last_flush = clock()
        self._parts: list[Part] = []
        self._next_seq = 1
        self._lock_fd: int | None = None
        self.done = DoneRows()
        self.done_cost = 0.0  # what the rows already done cost, so a budget covers the whole job
        self.recovered_from_journal = 0
        self.reopened = False  # the finished output was taken back as the first part
        self._open(overwrite=overwrite, restart=restart, reopen=reopen)

    # -- opening and resuming ----------------------------------------------------------------
    def _open(self, *, overwrite: bool, restart: bool, reopen: bool) -> None:
        try:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(self.output.parent, os.W_OK):
                read_only = os.statvfs(self.output.parent).f_flag & os.ST_RDONLY
                code = errno.EROFS if read_only else errno.EACCES
                raise OSError(code, os.strerror(code))
        except OSError as exc:
            raise SinkError(f"{self.output.parent}: output folder is not writable ({exc.strerror or exc})") from None
        reopening = self.output.exists() and not overwrite
        if reopening and not reopen:
            raise OutputConflict(f"{self.output}: output already exists (a finished run)",
                            hint="pass --retry-failed transient (or all) to send its failed rows again, --overwrite "
                                 "to run the whole job again and replace it, or choose another --output")
        with os_errors(self.parts_dir, "cannot create the parts folder"):
            self.parts_dir.mkdir(exist_ok=True)
        self._take_lock()
        try:
            if restart:
                self._clear_parts()
            manifest_path = self.parts_dir / MANIFEST
            if manifest_path.exists() and not reopening and self._holds_nothing():
                manifest_path.unlink()  # a run that committed nothing (e.g. stopped by a wrong endpoint): no job to keep
            if manifest_path.exists():
                self._check_manifest(manifest_path)
            else:
                self._clear_parts()  # parts without a manifest are not ours to trust
                if reopening:
                    self._take_back_output()
                self._write_manifest(manifest_path)
            self._load_parts()
        except BaseException as exc:
            self._release_lock()
            if isinstance(exc, OSError):  # what the steps above did not name themselves
                raise sink_error(self.parts_dir, "cannot open the run's parts folder", exc) from exc
            raise

    def _take_back_output(self) -> None:
        """Make the finished output the first part of a new run (to send its failed rows again). It stays in
        place, linked, until the new merge replaces it."""
        try:
            metadata = pq.read_schema(self.output).metadata or {}
        except (OSError, pa.ArrowException) as exc:
            raise SinkError(f"{self.output}: cannot read the finished output ({exc})") from None
        previous = json.loads(metadata.get(FINGERPRINT_KEY, b"null"))
        changed = self._changed_keys(previous or {})
        if changed:
            detail = f"it was written for a different job ({', '.join(changed)} changed)" if previous else \
                "it does not record which job wrote it"
            raise OutputConflict(f"{self.output}: cannot send its failed rows again: {detail}",
                            hint="pass --overwrite to run the whole job again, or choose another --output")
        first = self.parts_dir / "part-000000.parquet"
        try:
            os.link(self.output, first)
        except OSError:
            with os_errors(first, "cannot copy the finished output into the parts folder"):
                try:
                    shutil.copyfile(self.output, first)
                except BaseException:
                    remove_quietly(first)
                    raise
        self.reopened = True

    def _take_lock(self) -> None:
        path = self.parts_dir / LOCK
        with os_errors(path, "cannot open the lock file"):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SinkError(f"{self.output}: another run (pid {holder}) is writing this output",
                            hint="wait for it to finish, stop it, or choose another --output") from None
        # The lock dies with the process, so a lock file left by a killed run is never stale. The pid in it
        # is only shown to a second run, so a full disk that cannot take it does not stop this one.
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _holds_nothing(self) -> bool:
        """The parts folder has no committed row and no batch state: only the manifest and the lock."""
        return all(path.name in (MANIFEST, LOCK) for path in self.parts_dir.iterdir())

    def _clear_parts(self) -> None:
        with os_errors(self.parts_dir, "cannot clear the parts folder"):
            for path in self.parts_dir.iterdir():
                if path.name != LOCK:
                    path.unlink()

    def _check_manifest(self, path: Path) -> None:
        try:
            previous = json.loads(path.read_text(encoding="utf-8")).get("fingerprint", {})
        except (OSError, ValueError):
            previous = {}
        changed = self._changed_keys(previous)
        if changed:
            details = "; ".join(f"{k}: {previous.get(k)!r} -> {self.fingerprint.get(k)!r}" for k in changed)
            raise OutputConflict(f"{self.output}: an unfinished run of a different job is in {self.parts_dir.name}/ "
                            f"({details})",
                            hint="pass --restart to discard it and start over, or choose another --output")

    def _changed_keys(self, previous: Mapping[str, str]) -> list[str]:
        """The fingerprint keys in which an earlier run's job differs from this one."""
        return sorted(k for k in set(previous) | set(self.fingerprint) if previous.get(k) != self.fingerprint.get(k))

    def _write_manifest(self, path: Path) -> None:
        info = {"fingerprint": self.fingerprint, **({"currency": self.currency} if self.currency else {})}
        write_file_atomic(path, json.dumps(info, indent=1, sort_keys=True))

    def _load_parts(self) -> None:
        with os_errors(self.parts_dir, "cannot remove a half-written part"):
            for tmp in self.parts_dir.glob(".part-*.tmp"):
                tmp.unlink()
        seqs = [int(p.stem.split("-")[1]) for p in self.parts_dir.glob("journal-*.jsonl")]
        seqs += [int(p.name.split("-")[1].split(".")[0]) for p in self.parts_dir.glob("part-*.parquet*")]
        self._next_seq = max(seqs, default=0) + 1
        for journal in sorted(self.parts_dir.glob("journal-*.jsonl")):
            part = self.parts_dir / f"part-{journal.stem.split('-')[1]}.parquet"
            if not part.exists():
                self._recover(journal, part)
            with os_errors(journal, "cannot remove a replayed journal"):
                journal.unlink()
        for path in sorted(self.parts_dir.glob("part-*.parquet")):
            with os_errors(path, "cannot read a committed part"):
                fh = open(path, "rb")  # opened here, so a permission error is not taken for a corrupt part
            try:
                seq = int(path.stem.split("-")[1])
                with fh, pq.ParquetFile(fh) as parquet:
                    # A reopened output is a part without request digests.
                    columns = ["row_id", "status", "error_type", "cost"] + \
                        (["request_hash"] if "request_hash" in parquet.schema_arrow.names else [])
                    table = parquet.read(columns=columns)
            except OSError as exc:
                if exc.errno is not None:  # the OS failed to read it (pyarrow's parse errors carry no errno)
                    raise sink_error(path, "cannot read a committed part", exc) from exc
                self._set_aside(path)
                continue
            except (ValueError, IndexError, pa.ArrowException):
                self._set_aside(path)
                continue
            if table.num_rows == 0:
                continue
            rows = table.column("row_id").to_pylist()
            self.done_cost += sum(c for c in table.column("cost").to_pylist() if c)
            for row_id, status, error_type, digest in zip(rows, table.column("status").to_pylist(),
                                                          table.column("error_type").to_pylist(),
                                                          table.column("request_hash").to_pylist()
                                                          if "request_hash" in columns else [None] * len(rows)):
                if self._is_done(status, error_type):
                    self.done.add(row_id, ANY_DIGEST if digest is None else digest)
                else:
                    self.done.discard(row_id)
            self._parts.append(Part(seq, path, min(rows), max(rows)))
        self._parts.sort(key=lambda p: p.seq)

    def _set_aside(self, part: Path) -> None:
        """A part that does not open is kept for inspection as .corrupt, never trusted: its rows are redone."""
        with os_errors(part, "cannot set aside a corrupt part"):
            part.rename(part.with_name(part.name + ".corrupt"))

    def _recover(self, journal: Path, part: Path) -> None:
        """Turn the whole lines of a journal whose part was never committed into that part."""
        with os_errors(journal, "cannot read the journal of an interrupted run"):
            results = list(replay(journal))
        if not results:
            return
        try:  # the part is registered by the scan of part files that follows
            self._write_part(results, part)
        except OSError as exc:  # the journal stays, so the next run can try again
            raise sink_error(part, "cannot recover the journal of an interrupted run into a part", exc) from exc
        except (pa.ArrowException, ValueError, TypeError):
            return  # rows that cannot be rebuilt are simply not done: the rerun sends them again
        self.recovered_from_journal += len(results)

    def _is_done(self, status: str, error_type: str | None) -> bool:
        if status == "ok":
            return True
        if self.retry_failed == "all":
            return False
        return self.retry_failed == "none" or error_type not in TRANSIENT_ERRORS

    # -- writing -----------------------------------------------------------------------------
    def write(self, result: Result) -> None:
        journal = self._journal.path if self._journal else self.parts_dir / f"journal-{self._next_seq:06d}.jsonl"
        try:
            if self._journal is None:
                self._journal = Journal(journal)
            self._journal.append(result)
        except OSError as exc:
            raise self._disk_error(journal, exc) from exc
        self._buffer.append(result)
        if len(self._buffer) >= self.part_rows or self.seconds_until_due() <= 0:
            self.flush()

    def seconds_until_due(self) -> float:
        if not self._buffer:
            return self.part_seconds
        return self.part_seconds - (self._clock() - self._last_flush)

    def flush(self) -> None:
        """Commit the buffered results as one part file, then drop its journal."""
        self._last_flush = self._clock()
        if not self._buffer:
            return
        path = self.parts_dir / f"part-{self._next_seq:06d}.parquet"
        try:
            self._parts.append(self._write_part(self._buffer, path))
        except OSError as exc:
            raise self._disk_error(path, exc) from exc
        self._buffer = []
        if self._journal is not None:
            journal, self._journal = self._journal, None
            with os_errors(journal.path, "cannot remove the journal of a committed part"):
                journal.discard()

    def commit(self, results: list[Result]) -> None:
        """Commit a whole set of results as one part at once (a batch's answers, read from files that
        are kept until this returns, so they need no journal)."""
        self.flush()
        if not results:
            return
        path = self.parts_dir / f"part-{self._next_seq:06d}.parquet"
        try:
            self._parts.append(self._write_part(results, path))
        except OSError as exc:
            raise self._disk_error(path, exc) from exc

    def _write_part(self, results: list[Result], path: Path) -> Part:
        results = sorted(results, key=lambda r: r.row_id)  # the merge relies on it: it slices parts by row_id
        _write_atomic(results_to_table(results, self.part_schema), path)
        seq = int(path.stem.split("-")[1])
        self._next_seq = max(self._next_seq, seq + 1)
        return Part(seq, path, results[0].row_id, results[-1].row_id)

    def _disk_error(self, path: Path, exc: OSError) -> SinkError:
        return SinkError(f"{path}: cannot write results ({os_reason(exc)}); rows committed before this are kept",
                         hint=os_hint(exc))

    # -- finishing ---------------------------------------------------------------------------
    def finalize(self, expected_rows: int) -> int:
        """Merge every part in input order into the output file; returns the row count."""
        self.flush()
        tmp = self.output.with_name("." + self.output.name + ".tmp")
        written = 0
        last_row = -1
        try:
            stamped = self.schema.with_metadata({**(self.schema.metadata or {}),
                                                 FINGERPRINT_KEY: json.dumps(self.fingerprint, sort_keys=True),
                                                 **({CURRENCY_KEY: self.currency} if self.currency else {})})
            with pq.ParquetWriter(tmp, stamped, compression="zstd") as writer:
                for low in range(0, expected_rows, MERGE_WINDOW_ROWS):
                    window = self._merge_window(low, min(low + MERGE_WINDOW_ROWS, expected_rows))
                    if window.num_rows:
                        writer.write_table(window)
                        written += window.num_rows
                        last_row = window.column("row_id")[-1].as_py()
                if written == 0:
                    writer.write_table(self.schema.empty_table())
            if written != expected_rows or last_row != expected_rows - 1:
                raise SinkError(f"{self.output}: the parts hold {written} rows (last row_id {last_row}) but the "
                                f"input has {expected_rows}; parts kept in {self.parts_dir}",
                                hint="this is a bug; please report it with the parts folder")
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, self.output)
            _fsync_dir(self.output.parent)
        except OSError as exc:
            raise SinkError(f"{exc.filename or self.output}: cannot write the output ({os_reason(exc)}); parts kept "
                            f"in {self.parts_dir}", hint=os_hint(exc)) from exc
        finally:
            remove_quietly(tmp)
        self._release_lock()
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        return written

    def _merge_window(self, low: int, high: int) -> pa.Table:
        """Rows with low <= row_id < high from every part, one per row_id (the newest part wins).

        Memory is what bounds the window: each overlapping part is read whole (a plain read; a
        filtered dataset read holds far more), its rows in the window taken as one zero-copy slice
        (parts are sorted by row_id), and the winners are chosen on (row_id, seq) alone and copied
        out once."""
        slices, seqs = [], []
        for part in self._parts:
            if part.max_row < low or part.min_row >= high:
                continue
            with os_errors(part.path, "cannot read a committed part"):  # not "cannot write the output"
                with pq.ParquetFile(part.path) as parquet:
                    present = set(parquet.schema_arrow.names)
                    table = parquet.read(columns=[n for n in self.schema.names if n in present], use_threads=False)
            table = _with_columns_of(table, self.schema)
            row_ids = table.column("row_id")
            start, stop = _count_below(row_ids, low), _count_below(row_ids, high)
            if stop > start:
                slices.append(table.slice(start, stop - start).cast(self.schema))
                seqs.append(pa.repeat(pa.scalar(part.seq, pa.int64()), stop - start))
        if not slices:
            return self.schema.empty_table()
        merged = pa.concat_tables(slices)
        keys = pa.table({"row_id": merged.column("row_id"), "seq": pa.chunked_array(seqs, pa.int64())})
        order = pc.sort_indices(keys, sort_keys=[("row_id", "ascending"), ("seq", "descending")])
        row_ids = keys.column("row_id").take(order)
        if len(row_ids) > 1:  # the first of each row_id is its newest
            first = pc.not_equal(row_ids.slice(1), row_ids.slice(0, len(row_ids) - 1))
            order = order.filter(pa.concat_arrays([pa.array([True])] + first.chunks))
        return merged.take(order)

    def close(self) -> None:
        """Commit what is buffered without merging (the run stopped early); a rerun resumes."""
        try:
            if self._buffer:
                self.flush()
        finally:
            if self._journal is not None:
                self._journal.close()
                self._journal = None
            self._release_lock()
