"""Input rows -> Requests, streamed in file order. Never reads a whole file into memory.

`open_source` checks what can be checked up front (the file exists and is readable, named
columns exist) and raises SourceError (exit 2). After that, a bad row never raises: it becomes a
Request with `problem` set, naming the line or row and the column, and the engine writes it as
an error row.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Any, Iterator, Mapping

import pyarrow as pa

from .errors import SourceError
from .records import Request
from .spec import InputSpec, ModelSpec

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".gz": "jsonl.gz", ".parquet": "parquet"}
ROLES = frozenset({"system", "user", "assistant", "tool"})
# JSONL has no schema: a named column absent from every one of the first rows is a usage error.
JSONL_PEEK_ROWS = 1000
PARQUET_BATCH_ROWS = 2048


def input_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".jsonl.gz", ".ndjson.gz")):
        return "jsonl.gz"
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None or fmt == "jsonl.gz":
        raise SourceError(f"{path}: unsupported input format; expected .jsonl, .jsonl.gz or .parquet")
    return fmt


class RequestSource:
    """An opened input: `total` rows (None if unknown without a full read), `kept_fields`, iteration."""

    def __init__(self, spec: InputSpec, model: ModelSpec, *, limit: int | None = None) -> None:
        self.spec = spec
        self.model = model
        self.limit = limit
        self.path = spec.path
        self.format = input_format(spec.path)
        if not self.path.is_file():
            what = "is a directory, not a file" if self.path.is_dir() else "not found"
            raise SourceError(f"{self.path}: input file {what}")
        try:
            with open(self.path, "rb"):
                pass
        except OSError as exc:
            raise SourceError(f"{self.path}: cannot read input file ({exc.strerror})") from None
        if self.format == "parquet":
            self._open_parquet()
        else:
            self._check_jsonl_columns()
            self.kept_fields = tuple(pa.field(name, pa.string()) for name in spec.keep_columns)
            self.total = _count_lines(self.path) if self.format == "jsonl" else None
        if self.total is not None and limit is not None:
            self.total = min(self.total, limit)

    # -- Parquet -----------------------------------------------------------------------------
    def _open_parquet(self) -> None:
        import pyarrow.parquet as pq

        try:
            self._parquet = pq.ParquetFile(self.path)
        except (OSError, pa.ArrowException) as exc:
            raise SourceError(f"{self.path}: not a readable Parquet file ({exc})") from None
        schema = self._parquet.schema_arrow
        missing = [c for c in self.spec.needed_columns() if schema.get_field_index(c) < 0]
        if missing:
            raise SourceError(f"{self.path}: no column {_names(missing)} in the input; it has "
                              f"{', '.join(schema.names) or 'no columns'}")
        self.kept_fields = tuple(schema.field(name) for name in self.spec.keep_columns)
        self.total = self._parquet.metadata.num_rows

    def _parquet_rows(self) -> Iterator[tuple[str, dict]]:
        row_id = 0
        columns = list(self.spec.needed_columns())
        for batch in self._parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns or None):
            for values in batch.to_pylist():
                yield f"row {row_id}", values
                row_id += 1

    # -- JSONL -------------------------------------------------------------------------------
    def _open_text(self) -> io.BufferedIOBase:
        if self.format == "jsonl.gz":
            return gzip.open(self.path, "rb")
        return open(self.path, "rb", buffering=1 << 20)

    def _check_jsonl_columns(self) -> None:
        needed = self.spec.needed_columns()
        if not needed:
            return
        seen: set[str] = set()
        rows = 0
        try:
            for _where, values in self._jsonl_rows():
                if isinstance(values, dict):
                    seen.update(k for k in needed if k in values)
                rows += 1
                if rows >= JSONL_PEEK_ROWS or len(seen) == len(needed):
                    break
        except (OSError, EOFError) as exc:
            raise SourceError(f"{self.path}: cannot read input file ({exc})") from None
        missing = [c for c in needed if c not in seen]
        if rows and missing:
            raise SourceError(f"{self.path}: no column {_names(missing)} in any of the first {rows} rows")

    def _jsonl_rows(self) -> Iterator[tuple[str, Any]]:
        """(where, parsed object or a problem string) per non-blank line."""
        with self._open_text() as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"line {lineno}", json.loads(line)
                except ValueError as exc:
                    yield f"line {lineno}", _Problem(f"invalid JSON ({_json_reason(exc)})")

    # -- rows -> requests --------------------------------------------------------------------
    def __iter__(self) -> Iterator[Request]:
        rows = self._parquet_rows() if self.format == "parquet" else self._jsonl_rows()
        limit = self.limit
        try:
            for row_id, (where, values) in enumerate(rows):
                if limit is not None and row_id >= limit:
                    return
                yield build_request(values, row_id=row_id, where=where, spec=self.spec, model=self.model,
                                    keep_as_text=self.format != "parquet")
        except (OSError, EOFError, pa.ArrowException) as exc:
            raise SourceError(f"{self.path}: input became unreadable while reading ({exc})") from None


def open_source(spec: InputSpec, model: ModelSpec, *, limit: int | None = None) -> RequestSource:
    return RequestSource(spec, model, limit=limit)


class _Problem(str):
    """A row that could not even be parsed: the string says why."""


def build_request(values: Any, *, row_id: int, where: str, spec: InputSpec, model: ModelSpec,
                  keep_as_text: bool = False) -> Request:
    """Render one row into a Request; a bad row gives a Request with `problem` naming where and what."""
    key = str(row_id)
    model_name = model.name

    def bad(message: str, kept: Mapping[str, Any] | None = None) -> Request:
        return Request(row_id=row_id, key=key, model=model_name, kept=kept or {},
                       problem=f"{spec.path.name} {where}: {message}")

    if isinstance(values, _Problem):
        return bad(str(values))
    if not isinstance(values, dict):
        return bad(f"expected a JSON object, got {type(values).__name__}")

    kept = {name: _kept_value(values.get(name), keep_as_text) for name in spec.keep_columns}
    if spec.id_column:
        raw_key = values.get(spec.id_column)
        if raw_key is None or raw_key == "":
            return bad(f"column {spec.id_column!r}: expected an id, got {_what(raw_key)}", kept)
        key = raw_key if isinstance(raw_key, str) else json.dumps(raw_key)

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
            try:
                row_params = json.loads(row_params)
            except ValueError as exc:
                return bad(f"column {spec.params_column!r}: invalid JSON ({_json_reason(exc)})", kept)
        if row_params not in (None, ""):
            if not isinstance(row_params, dict):
                return bad(f"column {spec.params_column!r}: expected a JSON object, got {_what(row_params)}", kept)
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
        prompt = spec.template.format_map(fields)  # type: ignore[union-attr]
        if not prompt.strip():
            return bad("template rendered an empty prompt", kept)
        messages = [{"role": "user", "content": prompt}]

    if spec.system_prompt and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": spec.system_prompt})
    return Request(row_id=row_id, key=key, model=model_name, messages=tuple(messages), params=params, kept=kept)


def _messages(value: Any, column: str) -> list[dict] | str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            return f"column {column!r}: invalid JSON ({_json_reason(exc)})"
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
    """Non-blank lines, counted on raw bytes (about 1 s per GB) so the progress bar has a total."""
    count = 0
    with open(path, "rb") as fh:
        for line in fh:
            if line.strip():
                count += 1
    return count
