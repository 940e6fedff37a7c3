"""CSV and TSV inputs (also gzipped), streamed block by block with pyarrow's CSV reader.

Only the columns the job reads are converted, all as text: an id such as 007 keeps its zeros, and a
messages or params column holds JSON text, which runner/sources.py parses per row. An empty cell is
the empty string. Rows are numbered as a spreadsheet user counts them: data row 1 is the first row
after the header (row_id 0). A malformed row (a field count that differs from the header's) is a
SourceError naming that data row; it is found up front, by the counting pass, before anything is sent.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from .errors import SourceError
from .object_store import ObjectInput, open_bytes

# A row must fit in one block, and pyarrow reads blocks ahead of the consumer: measured reading every row
# into Python objects, peak RSS was 201 MB for a 125 MB CSV and 233 MB for a 500 MB one with 4 MB blocks,
# but 231 MB and 544 MB with 16 MB blocks (the read-ahead grows with the block).
CSV_BLOCK_BYTES = 4 * 1024 * 1024
_HINT = "a CSV row has as many fields as the header; quote a field holding the delimiter, a quote or a newline"


class CsvInput:
    """One CSV or TSV file: its header (`columns`), a row count and the rows as record batches."""

    def __init__(self, path: Path, *, tsv: bool, gzipped: bool, store: ObjectInput | None = None) -> None:
        self.path = path
        self.store = store  # the object in S3-compatible storage the input is, else None (a local file)
        self.delimiter = "\t" if tsv else ","
        self.gzipped = gzipped
        self.columns = self._header()

    def _stream(self):
        if self.store is not None:  # pyarrow's own stream: the reader reads it from Arrow's threads
            stream = self.store.open_native_stream()
            return pa.CompressedInputStream(stream, "gzip") if self.gzipped else stream
        if self.gzipped:
            return pa.input_stream(str(self.path), compression="gzip")
        # A memory map: the reader's readahead slices it without Arrow allocations (peak 17 MB on a 285 MB file;
        # pa.OSFile: 160 MB), and, unlike a Python file read from Arrow's threads, no abort at exit
        # ("terminate called without an active exception": 1 process in about 80 with a Python file, 0 in 400).
        return pa.memory_map(str(self.path))

    def _reader(self, columns: list[str] | None):
        import pyarrow.csv as pc

        convert = pc.ConvertOptions(check_utf8=False)  # bad text becomes a bad row, not a failed file
        if columns is not None:
            convert = pc.ConvertOptions(include_columns=columns, column_types={c: pa.string() for c in columns},
                                        check_utf8=False)
        return pc.open_csv(self._stream(), read_options=pc.ReadOptions(block_size=CSV_BLOCK_BYTES),
                           parse_options=pc.ParseOptions(delimiter=self.delimiter, newlines_in_values=True),
                           convert_options=convert)

    def _header(self) -> list[str]:
        try:
            reader = self._reader(None)
        except pa.ArrowInvalid as exc:
            if "Empty CSV file" in str(exc):  # no header at all: an empty input, like an empty .jsonl
                return []
            raise self._error(exc, 0) from None
        except (OSError, EOFError, pa.ArrowException) as exc:
            if self.store is not None:
                raise self.store.error(exc) from None
            raise SourceError(f"{self.path}: cannot read input file ({exc})") from None
        with reader:
            return list(reader.schema.names)

    def batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        """The named columns as text, block by block; a malformed row raises SourceError naming it."""
        if not self.columns:
            return
        rows = 0
        try:
            with self._reader(columns) as reader:
                for batch in reader:
                    rows += batch.num_rows
                    yield batch
        except pa.ArrowInvalid as exc:
            raise self._error(exc, rows) from None

    def count(self) -> int:
        """Data rows, read one column at a time (it checks every row's field count too)."""
        return sum(batch.num_rows for batch in self.batches(self.columns[:1]))

    def _error(self, exc: Exception, rows_before: int) -> SourceError:
        """pyarrow names no row when fields may hold newlines: find the malformed row with the csv module."""
        text = str(exc)
        if "straddling" in text or "straddles" in text:
            return SourceError(f"{self.path}: a row after data row {rows_before:,} is longer than "
                               f"{CSV_BLOCK_BYTES // (1 << 20)} MB, or a quote is never closed", hint=_HINT)
        found = self._find_malformed_row()
        if found is not None:
            row, line, got, expected = found
            return SourceError(f"{self.path}: data row {row:,} (line {line:,}) has {got} field(s); the header has "
                               f"{expected}", hint=_HINT)
        return SourceError(f"{self.path}: not a readable CSV file ({text.splitlines()[0] if text else exc!r})",
                           hint=_HINT)

    def _find_malformed_row(self) -> tuple[int, int, int, int] | None:
        """(data row, line where it ends, its fields, the header's fields) of the first row whose field count
        differs from the header's; blank lines are not rows (as for pyarrow)."""
        csv.field_size_limit(CSV_BLOCK_BYTES)
        raw = open_bytes(self.path, self.store, gzipped=self.gzipped)
        with io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="") as fh:
            reader = csv.reader(fh, delimiter=self.delimiter)
            header: list[str] | None = None
            row = 0
            try:
                for fields in reader:
                    if not fields:
                        continue
                    if header is None:
                        header = fields
                        continue
                    row += 1
                    if len(fields) != len(header):
                        return row, reader.line_num, len(fields), len(header)
            except (csv.Error, OSError, EOFError):
                return None
        return None
