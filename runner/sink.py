"""Parquet output: part files while running, one ordered file at the end.

Results arrive in completion order. They are buffered and committed as part files under
`<output>.parts/` every `part_rows` rows or `part_seconds` seconds: each part is sorted by row_id,
written to a temporary name, fsynced and renamed, so a part either exists whole or not at all.
The parts are the truth about what is done: a rerun reads them (ignoring and setting aside any that
do not open) and skips rows already answered. When every row is in, the parts are merged in input
order into `<output>` (temporary name + rename) and removed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import SinkError
from .records import Result, results_to_table

MANIFEST = "manifest.json"
MERGE_WINDOW_ROWS = 65_536
# Error classes a rerun sends again; every other finished row (successes, permanent failures) is kept.
RETRY_ON_RERUN = frozenset({"TransientCallError", "Throttled"})


class RowSet:
    """A set of row ids as a bitmap: 2M rows cost 250 KB, not a 100 MB Python set."""

    def __init__(self) -> None:
        self._bits = bytearray()
        self.count = 0

    def add(self, row_id: int) -> None:
        byte, bit = divmod(row_id, 8)
        if byte >= len(self._bits):
            self._bits.extend(bytes(max(byte + 1 - len(self._bits), len(self._bits))))
        if not self._bits[byte] >> bit & 1:
            self._bits[byte] |= 1 << bit
            self.count += 1

    def discard(self, row_id: int) -> None:
        byte, bit = divmod(row_id, 8)
        if byte < len(self._bits) and self._bits[byte] >> bit & 1:
            self._bits[byte] &= ~(1 << bit) & 0xFF
            self.count -= 1

    def __contains__(self, row_id: int) -> bool:
        byte, bit = divmod(row_id, 8)
        return byte < len(self._bits) and bool(self._bits[byte] >> bit & 1)

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


def _write_atomic(table: pa.Table, target: Path) -> None:
    tmp = target.with_name("." + target.name + ".tmp")
    with open(tmp, "wb") as fh:
        pq.write_table(table, fh, compression="zstd")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    _fsync_dir(target.parent)


class ParquetSink:
    """Owns `<output>`, `<output>.parts/` and the manifest that ties the parts to one job."""

    def __init__(self, output: Path, schema: pa.Schema, *, fingerprint: Mapping[str, str],
                 part_rows: int = 1000, part_seconds: float = 5.0, overwrite: bool = False,
                 restart: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self.output = output
        self.parts_dir = output.with_name(output.name + ".parts")
        self.schema = schema
        self.fingerprint = dict(fingerprint)
        self.part_rows = part_rows
        self.part_seconds = part_seconds
        self._clock = clock
        self._buffer: list[Result] = []
        self._last_flush = clock()
        self._parts: list[Part] = []
        self.done = RowSet()
        self._open(overwrite=overwrite, restart=restart)

    # -- opening and resuming ----------------------------------------------------------------
    def _open(self, *, overwrite: bool, restart: bool) -> None:
        try:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(self.output.parent, os.W_OK):
                raise PermissionError(13, "Permission denied")
        except OSError as exc:
            raise SinkError(f"{self.output.parent}: output folder is not writable ({exc.strerror or exc})") from None
        if self.output.exists() and not overwrite:
            raise SinkError(f"{self.output}: output already exists (a finished run)",
                            hint="pass --overwrite to run the job again and replace it, or choose another --output")
        if restart and self.parts_dir.exists():
            shutil.rmtree(self.parts_dir)
        try:
            self.parts_dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise SinkError(f"{self.parts_dir}: cannot create the parts folder ({exc.strerror})") from None
        manifest_path = self.parts_dir / MANIFEST
        if manifest_path.exists():
            self._check_manifest(manifest_path)
            self._load_parts()
        else:
            for stale in self.parts_dir.glob("part-*.parquet"):  # parts without a manifest: not ours to trust
                stale.unlink()
            self._write_manifest(manifest_path)

    def _check_manifest(self, path: Path) -> None:
        try:
            previous = json.loads(path.read_text(encoding="utf-8")).get("fingerprint", {})
        except (OSError, ValueError):
            previous = {}
        changed = sorted(k for k in set(previous) | set(self.fingerprint) if previous.get(k) != self.fingerprint.get(k))
        if changed:
            raise SinkError(f"{self.output}: an unfinished run of a different job is in {self.parts_dir.name}/ "
                            f"(changed: {', '.join(changed)})",
                            hint="pass --restart to discard it and start over, or choose another --output")

    def _write_manifest(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint}, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)

    def _load_parts(self) -> None:
        for tmp in self.parts_dir.glob(".part-*.tmp"):
            tmp.unlink()
        for path in sorted(self.parts_dir.glob("part-*.parquet")):
            try:
                seq = int(path.stem.split("-")[1])
                table = pq.read_table(path, columns=["row_id", "status", "error_type"])
            except (ValueError, IndexError, OSError, pa.ArrowException):
                path.rename(path.with_name(path.name + ".corrupt"))  # kept for inspection, never trusted
                continue
            if table.num_rows == 0:
                continue
            rows = table.column("row_id").to_pylist()
            statuses = table.column("status").to_pylist()
            types = table.column("error_type").to_pylist()
            for row_id, status, error_type in zip(rows, statuses, types):
                if status == "ok" or error_type not in RETRY_ON_RERUN:
                    self.done.add(row_id)
                else:
                    self.done.discard(row_id)
            self._parts.append(Part(seq, path, min(rows), max(rows)))
        self._parts.sort(key=lambda p: p.seq)

    # -- writing -----------------------------------------------------------------------------
    def write(self, result: Result) -> None:
        self._buffer.append(result)
        if len(self._buffer) >= self.part_rows or self.seconds_until_due() <= 0:
            self.flush()

    def seconds_until_due(self) -> float:
        if not self._buffer:
            return self.part_seconds
        return self.part_seconds - (self._clock() - self._last_flush)

    def flush(self) -> None:
        """Commit the buffered results as one part file."""
        self._last_flush = self._clock()
        if not self._buffer:
            return
        results, self._buffer = self._buffer, []
        results.sort(key=lambda r: r.row_id)
        seq = self._parts[-1].seq + 1 if self._parts else 1
        path = self.parts_dir / f"part-{seq:06d}.parquet"
        try:
            _write_atomic(results_to_table(results, self.schema), path)
        except OSError as exc:
            self._buffer = results + self._buffer
            raise SinkError(f"{path}: cannot write results ({exc.strerror or exc}); rows committed "
                            "before this are kept", hint="free disk space or fix permissions, then run "
                            "the same command again to resume") from None
        self._parts.append(Part(seq, path, results[0].row_id, results[-1].row_id))

    # -- finishing ---------------------------------------------------------------------------
    def finalize(self, expected_rows: int) -> int:
        """Merge every part in input order into the output file; returns the row count."""
        self.flush()
        tmp = self.output.with_name("." + self.output.name + ".tmp")
        written = 0
        last_row = -1
        try:
            with pq.ParquetWriter(tmp, self.schema, compression="zstd") as writer:
                top = max((p.max_row for p in self._parts), default=-1)
                for low in range(0, top + 1, MERGE_WINDOW_ROWS):
                    window = self._merge_window(low, low + MERGE_WINDOW_ROWS)
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
            raise SinkError(f"{self.output}: cannot write the output ({exc.strerror or exc}); parts kept in "
                            f"{self.parts_dir}", hint="free disk space, then run the same command again") from None
        finally:
            if tmp.exists():
                tmp.unlink()
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        return written

    def _merge_window(self, low: int, high: int) -> pa.Table:
        """Rows with low <= row_id < high from every part, one per row_id (the newest part wins)."""
        tables = []
        for part in self._parts:
            if part.max_row < low or part.min_row >= high:
                continue
            table = pq.read_table(part.path, schema=self.schema,
                                  filters=[("row_id", ">=", low), ("row_id", "<", high)])
            tables.append(table.append_column("_seq", pa.array([part.seq] * table.num_rows, pa.int64())))
        if not tables:
            return self.schema.empty_table()
        merged = pa.concat_tables(tables).sort_by([("row_id", "ascending"), ("_seq", "descending")])
        row_ids = merged.column("row_id")
        if len(row_ids) > 1:
            keep = pc.not_equal(row_ids.slice(1), row_ids.slice(0, len(row_ids) - 1))
            merged = merged.filter(pa.concat_arrays([pa.array([True])] + keep.chunks))
        return merged.drop_columns(["_seq"])

    def close(self) -> None:
        """Commit what is buffered without merging (the run stopped early); a rerun resumes."""
        if self._buffer:
            self.flush()
