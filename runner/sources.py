"""Input rows -> Requests, streamed in file order. Never reads a whole file into memory.

Formats, by file name: JSON Lines (.jsonl, .ndjson), CSV (.csv), TSV (.tsv), a JSON array of objects
(.json), each also gzipped (.gz), and Parquet. CSV/TSV rows come from runner/csv_input.py and JSON
arrays from runner/json_array.py; every format gives row_id 0 to its first row.

`open_source` checks what can be checked up front (the file exists, is a regular file and is
readable, named columns exist) and raises SourceError (exit 2). After that, a bad row never raises:
it becomes a Request with `problem` set, naming the line or row and the column, and the executor
writes it as an error row. Bad rows include text that cannot be sent (lone surrogates, which a
valid JSON escape such as "\\ud800" produces, or invalid UTF-8 in a Parquet file), JSON lines nested
deeper than MAX_NESTING (both checked in runner/rowcheck.py) and lines longer than MAX_LINE_BYTES
(skipped without being read whole).

An input may also be an object in S3-compatible storage (`[input] path = "s3://bucket/key"`, any of the
formats above): runner/object_store.py opens it, and every reader here reads it as it reads a local file,
streamed. A plain JSON Lines object is not counted up front (a second download); its total is unknown, as
for a gzipped file.
"""

from __future__ import annotations

import functools
import io
import json
import os
import stat
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pyarrow as pa

from .errors import SourceError
from .fanout import Expander, expanded_total, never_n
from .object_store import ObjectInput, ObjectUri, open_bytes
from .records import Request
from .rowcheck import MAX_NESTING, TOO_DEEP, UNDECODABLE, nested_problem, scrubbed, unencodable, value_problem
from .spec import InputSpec, ModelSpec

# File name endings -> format, longest first (.csv.gz before .gz).
FORMATS = {".jsonl.gz": "jsonl.gz", ".ndjson.gz": "jsonl.gz", ".csv.gz": "csv.gz", ".tsv.gz": "tsv.gz",
           ".json.gz": "json.gz", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv",
           ".json": "json", ".parquet": "parquet"}
ACCEPTED = ".jsonl, .csv, .tsv, .json (each also .gz) or .parquet"
ROLES = frozenset({"system", "user", "assistant", "tool"})
# JSONL has no schema: a named column absent from every one of the first rows is a usage error.
JSONL_PEEK_ROWS = 1000
PARQUET_BATCH_ROWS = 2048
# A JSON line longer than this is a bad row, skipped without being read whole (so one bad line cannot
# take gigabytes of memory). The largest real requests are about 1M tokens of text (a few MB) and a
# Batch API line may be at most 6 MB; 32 MB leaves room for base64 images in a messages column.
MAX_LINE_BYTES = 32 * 1024 * 1024


def input_format(path: Path | ObjectUri) -> str:
    name = path.name.lower()
    for ending, fmt in FORMATS.items():
        if name.endswith(ending):
            return fmt
    raise SourceError(f"{path}: unsupported input format; expected {ACCEPTED}")


class RequestSource:
    """An opened input: `total` rows (None if unknown without a full read), `kept_fields`, iteration."""

    def __init__(self, spec: InputSpec, model: ModelSpec, *, limit: int | None = None, count: bool = True,
                 provider_n=never_n, decorate: Callable[[Request], Request] | None = None) -> None:
        self.spec = spec
        self.model = model
        self.limit = limit
        self.provider_n = provider_n  # runner.fanout.provider_n_rule: whether samples may share a request (`n`)
        # Applied to every rendered request (structured output asks for JSON), so every executor, the dry run
        # and the request digest see the request as it is sent.
        self.decorate = decorate
        self.input_rows_read = 0  # input rows the last iteration read (several requests each with fan-out)
        self.path = spec.path
        self.format = input_format(spec.path)
        self._count = count  # False: `total` stays None where knowing it takes a pass over the file
        # The object in S3-compatible storage the input is, else None (a local file)
        self._store = ObjectInput(spec.path, spec.object_store) if isinstance(spec.path, ObjectUri) else None
        if self._store is not None:
            self._store.check()
        else:
            _check_regular_file(self.path)
        if self.format == "parquet":
            self._open_parquet()
        elif self.format.startswith(("csv", "tsv")):
            self._open_csv()
        elif self.format in ("json", "json.gz"):
            self._open_json_array()
        else:
            self._check_jsonl_columns()
            self.kept_fields = tuple(pa.field(name, pa.string()) for name in spec.keep_columns)
            counted = self.format == "jsonl" and self._count and self._store is None
            self.total = _count_lines(self.path) if counted else None
        if self.total is not None and limit is not None:
            self.total = min(self.total, limit)
        self.input_total = self.total  # input rows; `total` counts output rows (fan-out: several a row)
        self.total = expanded_total(spec, model, self.total)

    # -- Parquet -----------------------------------------------------------------------------
    def _open_parquet(self) -> None:
        import pyarrow.parquet as pq

        try:
            self._parquet = pq.ParquetFile(self._store.open_random_access() if self._store else self.path)
        except (OSError, pa.ArrowException) as exc:
            raise self._error(exc, "not a readable Parquet file") from None
        schema = self._parquet.schema_arrow
        missing = [c for c in self.spec.needed_columns() if schema.get_field_index(c) < 0]
        if missing:
            raise SourceError(f"{self.path}: no column {_names(missing)} in the input; it has "
                              f"{', '.join(schema.names) or 'no columns'}")
        self.kept_fields = tuple(schema.field(name) for name in self.spec.keep_columns)
        self.total = self._parquet.metadata.num_rows

    def _parquet_rows(self) -> Iterator[tuple[str, Any, bool]]:
        """(where, values, whether the values need checking) per row. Parquet text is UTF-8 and pyarrow reads
        no schema nested more than 100 levels deep, so only a batch whose text would not decode is checked."""
        columns = list(self.spec.needed_columns())
        yield from self._batch_rows(self._parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns or None),
                                    first=0)

    def _batch_rows(self, batches: Iterator[pa.RecordBatch], first: int) -> Iterator[tuple[str, Any, bool]]:
        """(where, values, whether the values need checking) per row of Arrow batches; rows are named
        "row N" from `first` on (Parquet counts from 0 like row_id, CSV data rows from 1)."""
        number = first
        noun = "data row" if first else "row"
        for block in batches:
            # A CSV block (4 MB) holds ~25k rows: made into Python objects a slice at a time, they take far less memory.
            for start in range(0, block.num_rows, PARQUET_BATCH_ROWS):
                batch = block.slice(start, PARQUET_BATCH_ROWS)
                try:
                    rows, check = batch.to_pylist(), False
                except UnicodeDecodeError:  # Arrow does not check that a string column holds UTF-8
                    rows, check = _rows_with_bad_text(batch), True
                for values in rows:
                    yield f"{noun} {number}", values, check
                    number += 1

    # -- CSV / TSV ---------------------------------------------------------------------------
    def _open_csv(self) -> None:
        from .csv_input import CsvInput

        self._csv = CsvInput(self.path, tsv=self.format.startswith("tsv"), gzipped=self.format.endswith(".gz"),
                             store=self._store)
        missing = [c for c in self.spec.needed_columns() if c not in self._csv.columns]
        if missing and self._csv.columns:  # a file without even a header is an empty input
            raise SourceError(f"{self.path}: no column {_names(missing)} in the header; it has "
                              f"{', '.join(self._csv.columns)}")
        self.kept_fields = tuple(pa.field(name, pa.string()) for name in self.spec.keep_columns)
        self.total = self._csv.count() if self._count else None

    def _csv_rows(self) -> Iterator[tuple[str, Any, bool]]:
        columns = list(self.spec.needed_columns()) or self._csv.columns[:1]
        return self._batch_rows(self._csv.batches(columns), first=1)

    # -- JSON array --------------------------------------------------------------------------
    def _open_json_array(self) -> None:
        from .json_array import JsonArrayReader

        self._array = JsonArrayReader(self.path, gzipped=self.format.endswith(".gz"),
                                      max_element_chars=MAX_LINE_BYTES, store=self._store)
        try:
            # Parses the whole file once: a syntax error stops the job before anything is sent.
            self.total = self._array.count() if self._count else None
            self._check_jsonl_columns()
        except (OSError, EOFError, zlib.error) as exc:
            raise self._error(exc, "cannot read input file") from None
        self.kept_fields = tuple(pa.field(name, pa.string()) for name in self.spec.keep_columns)

    def _array_rows(self) -> Iterator[tuple[str, Any, bool]]:
        for index, values in enumerate(self._array):
            if isinstance(values, list):  # the JSON Lines wording of _not_an_object would mislead here
                values = _Problem("expected a JSON object, got a list")
            yield f"array element {index}", values, True

    # -- JSONL -------------------------------------------------------------------------------
    def _open_text(self) -> io.BufferedIOBase:
        return open_bytes(self.path, self._store, gzipped=self.format == "jsonl.gz")

    def _error(self, exc: BaseException, doing: str, *, midway: bool = False) -> SourceError:
        """A SourceError for a failed read; an object store's errors are classified and scrubbed (pyarrow's text
        may quote request headers)."""
        if self._store is None:
            return SourceError(f"{self.path}: {doing} ({exc})")
        return self._store.error(exc, doing, midway=midway)

    def _check_jsonl_columns(self) -> None:
        needed = self.spec.needed_columns()
        if not needed:
            return
        seen: set[str] = set()
        rows = 0
        objects = 0
        first_problem = ""
        rows_of = self._array_rows if self.format in ("json", "json.gz") else self._jsonl_rows
        try:
            for where, values, _check in rows_of():
                if (not rows and rows_of == self._jsonl_rows and isinstance(values, (list, _Problem))
                        and _starts_an_array(self._open_text)):
                    raise SourceError(f"{self.path}: {where} is a JSON array, not an object; JSON Lines has one "
                                      "object per line",
                                      hint="name the file .json (a JSON array of objects is read from .json), or "
                                           "convert it: jq -c '.[]' file.json > file.jsonl")
                if isinstance(values, dict):
                    seen.update(k for k in needed if k in values)
                    objects += 1
                elif not first_problem:
                    first_problem = f"{where}: {_not_an_object(values)}"
                rows += 1
                if rows >= JSONL_PEEK_ROWS or len(seen) == len(needed):
                    break
        except (OSError, EOFError, zlib.error) as exc:
            raise self._error(exc, "cannot read input file") from None
        noun = "lines" if rows_of == self._jsonl_rows else "array elements"
        if rows and not objects:
            raise SourceError(f"{self.path}: none of the first {rows} {noun} is a JSON object ({first_problem})",
                              hint="JSON Lines has one object per line, e.g. {\"prompt\": \"...\"}; "
                                   "a JSON array converts with: jq -c '.[]' file.json > file.jsonl" if noun == "lines"
                              else "a .json input is an array of objects, e.g. [{\"prompt\": \"...\"}]")
        missing = [c for c in needed if c not in seen]
        if rows and missing:
            raise SourceError(f"{self.path}: no column {_names(missing)} in any of the first {rows} rows")

    def _jsonl_rows(self) -> Iterator[tuple[str, Any, bool]]:
        """(where, parsed object or a problem string, whether the values need checking) per non-blank line."""
        with self._open_text() as fh:
            for lineno, line in enumerate(_lines(fh), start=1):
                if len(line) > MAX_LINE_BYTES and _overlong(line, fh):  # len first: a call costs more
                    yield f"line {lineno}", _Problem(f"longer than {MAX_LINE_BYTES:,} bytes"), False
                elif line.strip():
                    yield f"line {lineno}", _parse_line(line), True

    # -- rows -> requests --------------------------------------------------------------------
    def __iter__(self) -> Iterator[Request]:
        rows = {"parquet": self._parquet_rows, "csv": self._csv_rows, "tsv": self._csv_rows,
                "json": self._array_rows}.get(self.format.removesuffix(".gz"), self._jsonl_rows)()
        limit = self.limit
        needed = self.spec.needed_columns()
        decorate = self.decorate
        expander = Expander(self.spec, self.model, build_request, self.provider_n)
        keep_as_text = self.format != "parquet"
        self.input_rows_read = 0
        try:
            for input_row, (where, values, check) in enumerate(rows):
                if limit is not None and input_row >= limit:
                    return
                self.input_rows_read += 1
                for request in expander.expand(values, where=where, keep_as_text=keep_as_text,
                                               check_columns=needed if check else ()):
                    yield request if decorate is None else decorate(request)
        except (OSError, EOFError, zlib.error, pa.ArrowException) as exc:
            raise self._error(exc, "input became unreadable while reading", midway=True) from None


def open_source(spec: InputSpec, model: ModelSpec, *, limit: int | None = None, provider_n=never_n,
                decorate: Callable[[Request], Request] | None = None) -> RequestSource:
    return RequestSource(spec, model, limit=limit, provider_n=provider_n, decorate=decorate)


def check_not_empty(spec: InputSpec, model: ModelSpec, *, fail: bool) -> str | None:
    """A warning if the input has no rows (None if it has); with `fail`, a SourceError instead (exit 2).

    An input that cannot be read is left to `open_source`, which names the problem."""
    try:
        source = RequestSource(spec, model, count=False)
        empty = source.total == 0 if source.total is not None else next(iter(source), None) is None
    except SourceError:
        return None
    if not empty:
        return None
    message = f"{spec.path} has no rows"
    if fail:
        raise SourceError(message, hint="--fail-on-empty (or [input] fail_on_empty) makes an empty input an error")
    return message


def _check_regular_file(path: Path) -> None:
    """The input must be a regular file: it is read twice (rows are counted first), and opening a named pipe
    would wait for a writer."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise SourceError(f"{path}: input file not found") from None
    except OSError as exc:
        raise SourceError(f"{path}: cannot read input file ({exc.strerror})") from None
    if stat.S_ISDIR(mode):
        raise SourceError(f"{path}: input file is a directory, not a file")
    if not stat.S_ISREG(mode):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device")
        raise SourceError(f"{path}: input is {kind}, not a regular file; expected a .jsonl, .jsonl.gz or "
                          ".parquet file", hint="the input is read twice (rows are counted first): save the "
                                                "stream to a file and name that file")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise SourceError(f"{path}: cannot read input file ({exc.strerror})") from None


def _lines(fh: io.BufferedIOBase) -> Iterator[bytes]:
    """The file's lines, each cut at MAX_LINE_BYTES + 1 bytes: a longer line comes back as its first piece
    (no newline at the end); `_overlong` says so and skips the rest, so no line is ever held whole."""
    return iter(functools.partial(fh.readline, MAX_LINE_BYTES + 1), b"")


def _overlong(line: bytes, fh: io.BufferedIOBase) -> bool:
    """Whether `line` is the first piece of a line longer than MAX_LINE_BYTES; if so, the rest is skipped."""
    if len(line) <= MAX_LINE_BYTES or line.endswith(b"\n"):
        return False
    while True:
        rest = fh.readline(1 << 20)
        if not rest or rest.endswith(b"\n"):
            return True


def _starts_an_array(open_text) -> bool:
    """Whether the file's first character (after a byte order mark and white space) is '['."""
    with open_text() as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()
    return head.startswith(b"[")


def _parse_line(line: bytes) -> Any:
    """A JSON line -> its value, or a _Problem saying why it has none.

    Decoding first (strict UTF-8) is faster than json.loads on bytes (no encoding detection, no
    surrogatepass: a fifth fewer instructions a line) and refuses encoded surrogates, so after it only
    a \\uD... escape can make a lone surrogate; `value_problem` looks for those in the columns used."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _Problem(f"not valid UTF-8 (byte 0x{line[exc.start]:02x} at byte {exc.start + 1})")
    try:
        return json.loads(text)
    except RecursionError:
        return _Problem(f"nested deeper than {MAX_NESTING} levels")
    except ValueError as exc:
        if text.startswith("\ufeff"):  # a byte order mark, which json.loads on bytes used to drop
            return _parse_line(line[3:])
        return _Problem(f"invalid JSON ({_json_reason(exc)})")


def _rows_with_bad_text(batch: pa.RecordBatch) -> list[dict]:
    """The rows of a Parquet batch with invalid UTF-8 in a string column: the bad text comes back with its
    bad bytes as lone surrogates (the row check then refuses the row and stores U+FFFD); a value with bad
    text nested in a list or struct comes back as UNDECODABLE (stored as null)."""
    columns = {}
    for name, column in zip(batch.schema.names, batch.columns):
        try:
            columns[name] = column.to_pylist()
            continue
        except UnicodeDecodeError:
            pass
        cells = []
        for scalar in column:
            try:
                cells.append(scalar.as_py())
            except UnicodeDecodeError:
                text = pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
                cells.append(scalar.as_buffer().to_pybytes().decode("utf-8", "surrogateescape") if text
                             else UNDECODABLE)
        columns[name] = cells
    return [dict(zip(columns, row)) for row in zip(*columns.values())]


class _Problem(str):
    """A row that could not even be parsed: the string says why."""


def build_request(values: Any, *, row_id: int, where: str, spec: InputSpec, model: ModelSpec,
                  keep_as_text: bool = False, check_columns: tuple[str, ...] | None = None) -> Request:
    """Render one row into a Request; a bad row gives a Request with `problem` naming where and what.

    The values of `check_columns` (default: every column the job reads) are checked for text that cannot
    be sent as UTF-8 and for nesting deeper than MAX_NESTING; a reader passes () for rows that cannot have
    either."""
    key = str(row_id)
    model_name = model.name

    def bad(message: str, kept: Mapping[str, Any] | None = None) -> Request:
        return Request(row_id=row_id, key=key, model=model_name, kept=kept or {},
                       problem=f"{spec.path.name} {where}: {message}")

    if isinstance(values, _Problem):
        return bad(str(values))
    if not isinstance(values, dict):
        return bad(_not_an_object(values))

    found = value_problem(values, spec.needed_columns() if check_columns is None else check_columns)
    text_problem = None
    if found is not None:
        text_problem, storable = found
        if not storable:
            return bad(text_problem)
        # The error row stores U+FFFD for each bad code point (Parquet and the journal need valid text);
        # the same row gives the same key and digest on every run, so a rerun skips it.
        values = scrubbed(values)
    kept = {name: _kept_value(values.get(name), keep_as_text) for name in spec.keep_columns}
    if spec.id_column:
        raw_key = values.get(spec.id_column)
        if raw_key is None or raw_key == "":
            return bad(f"column {spec.id_column!r}: expected an id, got {_what(raw_key)}", kept)
        key = raw_key if isinstance(raw_key, str) else json.dumps(raw_key)
    if text_problem is not None:
        return bad(text_problem, kept)

    if spec.model_column:
        override = values.get(spec.model_column)
        if override is not None and override != "":
            if not isinstance(override, str):
                return bad(f"column {spec.model_column!r}: expected a model name, got {_what(override)}", kept)
            model_name = override

    params = dict(model.params)
    if spec.params_column:
        row_params = values.get(spec.params_column)
        if isinstance(row_params, str) and row_params.strip():
            row_params, problem = _json_in_column(row_params, spec.params_column)
            if problem:
                return bad(problem, kept)
        if row_params not in (None, ""):
            if not isinstance(row_params, dict):
                return bad(f"column {spec.params_column!r}: expected a JSON object, got {_what(row_params)}", kept)
            if "n" in row_params:  # n - 1 paid answers would be dropped: samples are the job's to ask for
                return bad(f"column {spec.params_column!r}: n is not passed through (only the first answer would be "
                           "kept); set [model] samples = N for N answers per row", kept)
            params.update(row_params)

    if spec.prompt_column:
        prompt = values.get(spec.prompt_column)
        if not isinstance(prompt, str) or not prompt.strip():
            return bad(f"column {spec.prompt_column!r}: expected a non-empty string, got {_what(prompt)}", kept)
        messages: list[dict] = [{"role": "user", "content": prompt}]
    elif spec.messages_column:
        messages_or_problem = _messages(values.get(spec.messages_column), spec.messages_column)
        if isinstance(messages_or_problem, str):
            return bad(messages_or_problem, kept)
        messages = messages_or_problem
    else:
        fields = {}
        for name in spec.template_columns:
            value = values.get(name)
            if value is None:
                return bad(f"column {name!r}: template needs a value, got {_what(value)}", kept)
            fields[name] = value
        try:
            prompt = spec.template.format_map(fields)  # type: ignore[union-attr]
        except (ValueError, TypeError) as exc:  # a format spec that does not fit the value, e.g. {n:d} for text
            return bad(f"template cannot be filled in with this row's values ({exc})", kept)
        if not prompt.strip():
            return bad("template rendered an empty prompt", kept)
        messages = [{"role": "user", "content": prompt}]

    if spec.system_prompt and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": spec.system_prompt})
    return Request(row_id=row_id, key=key, model=model_name, messages=tuple(messages), params=params, kept=kept)


def _json_in_column(text: str, column: str) -> tuple[Any, str | None]:
    """A column's JSON text -> (its value, None) or (None, the problem): invalid JSON, nesting deeper than
    MAX_NESTING, or a \\uD... escape that makes a lone surrogate."""
    try:
        value = json.loads(text)
    except RecursionError:
        return None, f"column {column!r}: nested deeper than {MAX_NESTING} levels"
    except ValueError as exc:
        return None, f"column {column!r}: invalid JSON ({_json_reason(exc)})"
    if value.__class__ is str:
        bad = None if value.isascii() else unencodable(value)
    else:
        bad = nested_problem(value) if value.__class__ in (list, dict) else None
    if bad is TOO_DEEP:
        return None, f"column {column!r}: nested deeper than {MAX_NESTING} levels"
    if bad is not None:
        return None, f"column {column!r}: not valid UTF-8 text: {bad} is a lone surrogate and cannot be sent"
    return value, None


def _messages(value: Any, column: str) -> list[dict] | str:
    if isinstance(value, str):
        value, problem = _json_in_column(value, column)
        if problem:
            return problem
    if not isinstance(value, list) or not value:
        return f"column {column!r}: expected a non-empty list of {{role, content}} messages, got {_what(value)}"
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            return f"column {column!r}: message {i}: expected an object with role and content, got {_what(message)}"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"column {column!r}: message {i}: expected role one of {', '.join(sorted(ROLES))}, got {_what(role)}"
        if not isinstance(content, (str, list)) or (isinstance(content, str) and not content.strip()
                                                     and role != "assistant"):
            return f"column {column!r}: message {i}: expected non-empty content, got {_what(content)}"
        messages.append({k: v for k, v in message.items() if v is not None})
    return messages


def _not_an_object(values: Any) -> str:
    if isinstance(values, _Problem):
        return str(values)
    if isinstance(values, list):
        return "expected a JSON object, got a list (JSON Lines has one object per line, not an array)"
    return f"expected a JSON object, got {type(values).__name__}"


def _kept_value(value: Any, as_text: bool) -> Any:
    if not as_text or value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _what(value: Any) -> str:
    if value is None:
        return "nothing (missing or null)"
    if isinstance(value, str):
        return "an empty string" if not value.strip() else f"the string {value[:30]!r}"
    return f"{type(value).__name__} {json.dumps(value, default=str)[:40]}"


def _json_reason(exc: Exception) -> str:
    return str(exc).split(":")[0] if isinstance(exc, json.JSONDecodeError) else str(exc)


def _names(columns: list[str]) -> str:
    return ", ".join(repr(c) for c in columns)


def _count_lines(path: Path) -> int:
    """Non-blank lines (an overlong line counts: it is a row), counted on raw bytes (about 1 s per GB) so the
    progress bar has a total."""
    count = 0
    with open(path, "rb", buffering=1 << 20) as fh:
        for line in _lines(fh):
            if (len(line) > MAX_LINE_BYTES and _overlong(line, fh)) or line.strip():  # skip the rest first
                count += 1
    return count
