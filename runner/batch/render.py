"""Rows -> Batch JSONL files (API facts 7.2): one file per model and thinking mode, split at the line
and byte caps, each line checked against the API's limits before anything is uploaded.

Lines are `{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}` with the body the
compatible-mode payload (Qwen parameters at the top level, never streamed). The custom_id is the
row id and the start of the row key (`"17-ticket-0017"`): unique within a job, readable in the
console.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from ..clients import openai_compat
from ..cost import PriceBook
from ..errors import SinkError
from ..records import Request, Result, unsent_result
from ..sink import DoneRows
from ..spec import RunSpec
from .api import CHAT_ENDPOINT
from .state import BatchRecord, BatchState

MAX_LINE_BYTES = 6 * 1024 * 1024  # API facts 7.2
KEY_CHARS_IN_ID = 64


def custom_id(row_id: int, key: str) -> str:
    return f"{row_id}-{key[:KEY_CHARS_IN_ID]}"


def encode_line(request: Request) -> bytes:
    """One Batch JSONL line; ValueError or TypeError when the request cannot be JSON."""
    line = {"custom_id": custom_id(request.row_id, request.key), "method": "POST", "url": CHAT_ENDPOINT,
            "body": openai_compat.build_payload(request, stream=False)}
    return json.dumps(line, ensure_ascii=False, allow_nan=False).encode() + b"\n"


def batch_group(request: Request) -> tuple[str, bool | None]:
    """The file a row goes into: a batch holds one model and one thinking mode (API facts 7.2)."""
    return request.model, request.params.get("enable_thinking")


def fits_in_file(lines: int, size: int, line_size: int, run: RunSpec) -> bool:
    """Whether a line of `line_size` bytes may join a file of `lines` lines and `size` bytes (a file always
    takes its first line)."""
    return lines < run.batch_max_lines and (lines == 0 or size + line_size <= run.batch_max_bytes)


def sidecar_schema(kept_fields: tuple[pa.Field, ...]) -> pa.Schema:
    """What batch-NNNN.rows.parquet keeps of each line to build its output row."""
    return pa.schema([pa.field("row_id", pa.int64()), pa.field("key", pa.string()),
                      pa.field("request_hash", pa.int64()), *SIDECAR_FANOUT, *kept_fields])


# A fanned-out row's variant and sample (runner/fanout.py); a sidecar written before fan-out has neither.
SIDECAR_FANOUT = (pa.field("variant", pa.string()), pa.field("sample_index", pa.int32()))
SIDECAR_COLUMNS = frozenset({"row_id", "key", "request_hash", *(f.name for f in SIDECAR_FANOUT)})


class _OpenFile:
    """A batch input file being written, and its rows' sidecar columns."""

    def __init__(self, record: BatchRecord, folder: Path, schema: pa.Schema) -> None:
        self.record = record
        self.folder = folder
        self.schema = schema
        self.path = record.input_path(folder)
        self.tmp = self.path.with_name("." + self.path.name + ".tmp")
        self.fh = open(self.tmp, "wb")
        self.columns: dict[str, list] = {name: [] for name in schema.names}
        self.kept_names = [name for name in schema.names if name not in SIDECAR_COLUMNS]

    def add(self, line: bytes, request: Request, worst_cost: float) -> None:
        self.fh.write(line)
        self.record.rows += 1
        self.record.bytes += len(line)
        self.record.reserved_cost += worst_cost
        self.columns["row_id"].append(request.row_id)
        self.columns["key"].append(request.key)
        self.columns["request_hash"].append(request.digest())
        self.columns["variant"].append(request.variant)
        self.columns["sample_index"].append(request.sample_index)
        for name in self.kept_names:
            self.columns[name].append(request.kept.get(name))

    def close(self) -> BatchRecord:
        """Make the files durable; the caller records the batch in the state after this."""
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        rows = self.record.rows_path(self.folder)
        tmp = rows.with_name("." + rows.name + ".tmp")
        pq.write_table(pa.Table.from_pydict(self.columns, schema=self.schema), tmp, compression="zstd")
        os.replace(tmp, rows)
        os.replace(self.tmp, self.path)
        return self.record

    def discard(self) -> None:
        self.fh.close()
        self.tmp.unlink(missing_ok=True)


@dataclass
class Plan:
    rows_seen: int = 0
    planned: int = 0
    changed: int = 0  # rows answered before whose request is different now
    over_budget: int = 0  # rows left out because their worst case would cross [run] max_cost


class RowSet:
    """A set of row ids as one byte a row (a million rows in a megabyte, where a set of ints takes ~60)."""

    def __init__(self, row_ids: Iterable[int] = ()) -> None:
        self._flags = bytearray()
        for row_id in row_ids:
            self.add(row_id)

    def add(self, row_id: int) -> None:
        if row_id >= len(self._flags):
            self._flags.extend(bytes(max(row_id + 1 - len(self._flags), len(self._flags))))
        self._flags[row_id] = 1

    def __contains__(self, row_id: int) -> bool:
        return row_id < len(self._flags) and self._flags[row_id] == 1

    def __len__(self) -> int:
        return self._flags.count(1)


def plan_batches(requests: Iterable[Request], *, done: DoneRows, covered: RowSet, state: BatchState,
                 run: RunSpec, kept_fields: tuple[pa.Field, ...], write_unsent: Callable[[Result], None],
                 prices: PriceBook, budget_left: float | None = None) -> Plan:
    """Write every row that is neither done nor in a pending batch into batch files, recorded in `state`
    as each file is closed. Rows that can never be sent become error rows through `write_unsent`."""
    plan = Plan()
    schema = sidecar_schema(kept_fields)
    open_files: dict[tuple[str, bool | None], _OpenFile] = {}
    next_seq = state.next_seq()
    reserved = 0.0
    try:
        for request in _one_per_row(requests):
            plan.rows_seen += 1
            row_id = request.row_id
            if row_id in covered:
                continue
            if row_id in done:
                if done.matches(row_id, request.digest()):
                    continue
                plan.changed += 1
            if request.problem is not None:
                write_unsent(unsent_result(request, "invalid_row", request.problem, mode="batch"))
                continue
            try:
                line = encode_line(request)
            except (TypeError, ValueError) as exc:
                write_unsent(unsent_result(request, "unencodable_request",
                                           f"row_id {row_id}: the request cannot be encoded as JSON ({exc})", mode="batch"))
                continue
            if len(line) > MAX_LINE_BYTES:
                write_unsent(unsent_result(
                    request, "batch_line_too_large",
                    f"row_id {row_id} (key {request.key!r}): its Batch API line is {len(line):,} bytes; a line may "
                    f"be at most {MAX_LINE_BYTES:,} (send it online with --mode online)", mode="batch"))
                continue
            worst = 0.0
            if budget_left is not None:
                worst = prices.worst_case(request)
                if reserved + worst > budget_left:
                    plan.over_budget += 1
                    continue
                reserved += worst
            group = batch_group(request)
            current = open_files.get(group)
            if current is not None and not fits_in_file(current.record.rows, current.record.bytes, len(line), run):
                state.add(current.close())
                current = None
            if current is None:
                record = BatchRecord(seq=next_seq, model=request.model, thinking=group[1], rows=0, bytes=0)
                next_seq += 1
                current = open_files[group] = _OpenFile(record, state.folder, schema)
            current.add(line, request, worst)
            plan.planned += 1
        for current in sorted(open_files.values(), key=lambda f: f.record.seq):
            state.add(current.close())
        open_files.clear()
    finally:
        for current in open_files.values():  # stopped part way: unrecorded files are written again next run
            current.discard()
    return plan


def _one_per_row(requests: Iterable[Request]) -> Iterable[Request]:
    """Each output row's own request: a batch line is one answer, so samples that share a request online (`n`)
    are a line each here, each with its own seed (the source only groups them online; this keeps it so)."""
    for request in requests:
        yield from request.rows


def covered_rows(state: BatchState) -> RowSet:
    """Row ids in batches whose answers are not joined yet: never planned into a second batch."""
    rows = RowSet()
    for record in state.pending:
        path = record.rows_path(state.folder)
        for row_id in read_sidecar(path, columns=["row_id"]).column("row_id").to_pylist():
            rows.add(row_id)
    return rows


def read_sidecar(path: Path, columns: list[str] | None = None) -> pa.Table:
    """A batch file's rows sidecar; SinkError when it is gone or damaged (a hand-edited or half-copied parts
    folder), not a pyarrow traceback."""
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise SinkError(f"{path}: cannot read the rows of {path.name.split('.')[0]} ({detail})",
                        hint="it is written with the batch state and needed to join that batch's answers; restore "
                             "it (`runner status JOB --offline` lists what the state records)") from None
