"""The values that flow through a run: Request -> Completion or CallError -> Result.

A leaf module with no I/O. `result_schema` is the one place the output table's columns are named.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

import pyarrow as pa


@dataclass(frozen=True, slots=True)
class Request:
    """One input row rendered into a chat request (or, with `problem` set, a row that could not be)."""

    row_id: int
    key: str
    model: str
    messages: tuple[Mapping[str, Any], ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    kept: Mapping[str, Any] = field(default_factory=dict)
    problem: str | None = None
    # Fan-out (runner/fanout.py): the prompt variant's name, and the sample's index (None when the job has
    # no fan-out at all). `members`: the output rows one request answers with several choices (provider
    # `n`), each a Request of its own (row_id, sample_index, digest); empty for a request of one row.
    variant: str | None = None
    sample_index: int | None = None
    members: tuple["Request", ...] = ()

    def digest(self) -> int:
        """A stable 64-bit hash of everything that makes this row's request and output row (never 0).

        A rerun compares it with the one recorded for the row, so a row whose input changed is sent again.
        A job without fan-out hashes what it always did, so its earlier outputs resume."""
        what = [self.key, self.model, self.messages, self.params, self.kept, self.problem]
        if self.sample_index is not None:
            what += [self.variant, self.sample_index]
        text = json.dumps(what, sort_keys=True, ensure_ascii=False, default=str)
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True) | 1

    @property
    def row_key(self) -> str:
        """What names this output row to the server (the emulator counts answers per row by it): the key,
        and for a fanned-out row its model, variant and sample too."""
        if self.sample_index is None:
            return self.key
        return f"{self.key}#{self.model}#{self.variant or ''}#{self.sample_index}"

    @property
    def rows(self) -> tuple["Request", ...]:
        """The output rows this request answers: its members, or itself."""
        return self.members or (self,)


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Choice:
    """One answer of several to one request (the provider's `n`)."""

    content: str | None
    reasoning: str | None
    finish_reason: str | None


@dataclass(frozen=True, slots=True)
class Completion:
    """A parsed successful answer. `content`, `reasoning` and `finish_reason` are the first choice's;
    `choices` holds every choice when the answer has more than one (a request with `n`)."""

    content: str | None
    reasoning: str | None
    finish_reason: str | None
    usage: Usage
    request_id: str | None
    http_status: int = 200
    first_token_ms: float | None = None  # streamed answers: time from sending to the first text
    choices: tuple[Choice, ...] = ()

    @property
    def all_choices(self) -> tuple[Choice, ...]:
        return self.choices or (Choice(self.content, self.reasoning, self.finish_reason),)


@dataclass(slots=True)
class Result:
    """One output row: a success or a recorded failure, never both."""

    row_id: int
    key: str
    model: str
    status: str  # "ok" or "error"
    mode: str = "online"  # how the row was sent: "online" (one request) or "batch" (the Batch API)
    kept: Mapping[str, Any] = field(default_factory=dict)
    response: str | None = None
    reasoning: str | None = None
    finish_reason: str | None = None
    usage: Usage = Usage()
    cost: float | None = None
    request_id: str | None = None
    error_type: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    http_status: int | None = None
    attempts: int = 0
    latency_ms: float | None = None  # the last attempt alone: from its send to its answer
    # The whole row: from its first send to its end, retries, back-off and rate-limit waits included.
    # None for a row never sent and for a batch row (a batch has no per-row time).
    duration_ms: float | None = None
    time_to_first_token_ms: float | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    request_hash: int | None = None  # Request.digest(); kept in part files, not in the final output
    # [output] json_schema: the valid answer as compact JSON text, or the last answer's validation error.
    parsed: str | None = None
    parse_error: str | None = None
    variant: str | None = None  # fan-out: the prompt variant's name
    sample_index: int | None = None  # fan-out: 0-based; None for a job without fan-out

    @property
    def ok(self) -> bool:
        return self.status == "ok"


STATUS_OK = "ok"
STATUS_ERROR = "error"
MODES = ("online", "batch")


def unsent_result(request: Request, code: str, message: str, *, mode: str = "online") -> Result:
    """The output row of a row that is never sent: it cannot be rendered or breaks a limit of the API."""
    now = datetime.now(timezone.utc)
    return Result(row_id=request.row_id, key=request.key, model=request.model, status=STATUS_ERROR, mode=mode,
                  kept=request.kept, error_type="InvalidRow", error_code=code, error_message=message, attempts=0,
                  started_at=now, finished_at=now, request_hash=request.digest(), variant=request.variant,
                  sample_index=request.sample_index)

_TS = pa.timestamp("us", tz="UTC")

# Columns before and after the kept input columns, in output order.
LEADING_FIELDS = (pa.field("row_id", pa.int64(), nullable=False), pa.field("key", pa.string()))
RESULT_FIELDS = (
    pa.field("model", pa.string()),
    pa.field("variant", pa.string()),
    pa.field("sample_index", pa.int32()),
    pa.field("response", pa.string()),
    pa.field("reasoning", pa.string()),
    pa.field("finish_reason", pa.string()),
    pa.field("input_tokens", pa.int64()),
    pa.field("output_tokens", pa.int64()),
    pa.field("total_tokens", pa.int64()),
    pa.field("cached_tokens", pa.int64()),
    pa.field("reasoning_tokens", pa.int64()),
    pa.field("cost", pa.float64()),
    pa.field("request_id", pa.string()),
    pa.field("status", pa.string()),
    pa.field("mode", pa.string()),
    pa.field("error_type", pa.string()),
    pa.field("error_code", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("http_status", pa.int32()),
    pa.field("attempts", pa.int32()),
    pa.field("latency_ms", pa.float64()),
    pa.field("duration_ms", pa.float64()),
    pa.field("time_to_first_token_ms", pa.float64()),
    pa.field("started_at", _TS),
    pa.field("finished_at", _TS),
)
REQUEST_HASH_FIELD = pa.field("request_hash", pa.int64())
# Structured output's columns ([output] json_schema), after the result columns. The schema's typed property
# columns ([output] parsed_columns) follow them, marked with this metadata so they are not taken for kept
# input columns; their values come from `parsed`.
PARSED_COLUMN_META = {b"runner.column": b"parsed"}
PARSED_FIELDS = (pa.field("parsed", pa.string()), pa.field("parse_error", pa.string()))
RESERVED_COLUMNS = frozenset(f.name for f in LEADING_FIELDS + RESULT_FIELDS + PARSED_FIELDS + (REQUEST_HASH_FIELD,))

RESULT_SCHEMA = pa.schema(LEADING_FIELDS + RESULT_FIELDS)


def result_schema(kept_fields: tuple[pa.Field, ...] = (), extra_fields: tuple[pa.Field, ...] = ()) -> pa.Schema:
    """The output schema: row_id, key, the kept input columns, the result columns, then `extra_fields`
    (structured output's columns, when the job has them)."""
    return pa.schema(LEADING_FIELDS + tuple(kept_fields) + RESULT_FIELDS + tuple(extra_fields))


def _is_parsed_column(f: pa.Field) -> bool:
    return (f.metadata or {}).get(b"runner.column") == b"parsed"


def _typed_value(value: Any, type_: pa.DataType) -> Any:
    """A parsed JSON value as a value of the column's Arrow type; None when it does not fit (the answer was
    validated, so that is a value the column type cannot hold, e.g. an integer past int64: `parsed` has it)."""
    if value is None:
        return None
    if pa.types.is_string(type_):
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if pa.types.is_boolean(type_):
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):
        return None
    if pa.types.is_int64(type_):
        return value if isinstance(value, int) and -2**63 <= value < 2**63 else None
    if pa.types.is_float64(type_):
        return float(value) if isinstance(value, (int, float)) and abs(value) < 1e308 else None
    if pa.types.is_list(type_) and isinstance(value, list):
        return [_typed_value(item, type_.value_type) for item in value]
    return None


def _parsed_columns(results: list[Result], fields: list[pa.Field]) -> dict[str, list]:
    columns: dict[str, list] = {f.name: [] for f in fields}
    for r in results:
        value = json.loads(r.parsed) if r.parsed is not None else None
        for f in fields:
            columns[f.name].append(_typed_value(value.get(f.name), f.type) if isinstance(value, dict) else None)
    return columns


def results_to_table(results: list[Result], schema: pa.Schema) -> pa.Table:
    """Column-wise conversion of results (in any order) into a table with `schema`."""
    parsed_fields = [f for f in schema if _is_parsed_column(f)]
    kept_names = [f.name for f in schema if f.name not in RESERVED_COLUMNS and not _is_parsed_column(f)]
    usage = [r.usage for r in results]
    columns: dict[str, list] = {
        "row_id": [r.row_id for r in results],
        "key": [r.key for r in results],
        "model": [r.model for r in results],
        "variant": [r.variant for r in results],
        "sample_index": [r.sample_index for r in results],
        "response": [r.response for r in results],
        "reasoning": [r.reasoning for r in results],
        "finish_reason": [r.finish_reason for r in results],
        "input_tokens": [u.input_tokens for u in usage],
        "output_tokens": [u.output_tokens for u in usage],
        "total_tokens": [u.total_tokens for u in usage],
        "cached_tokens": [u.cached_tokens for u in usage],
        "reasoning_tokens": [u.reasoning_tokens for u in usage],
        "cost": [r.cost for r in results],
        "request_id": [r.request_id for r in results],
        "status": [r.status for r in results],
        "mode": [r.mode for r in results],
        "error_type": [r.error_type for r in results],
        "error_code": [r.error_code for r in results],
        "error_message": [r.error_message for r in results],
        "http_status": [r.http_status for r in results],
        "attempts": [r.attempts for r in results],
        "latency_ms": [r.latency_ms for r in results],
        "duration_ms": [r.duration_ms for r in results],
        "time_to_first_token_ms": [r.time_to_first_token_ms for r in results],
        "started_at": [r.started_at for r in results],
        "finished_at": [r.finished_at for r in results],
        "request_hash": [r.request_hash for r in results],
        "parsed": [r.parsed for r in results],
        "parse_error": [r.parse_error for r in results],
    }
    for name in kept_names:
        columns[name] = [r.kept.get(name) for r in results]
    if parsed_fields:
        columns.update(_parsed_columns(results, parsed_fields))
    return pa.Table.from_pydict({f.name: columns[f.name] for f in schema}, schema=schema)
