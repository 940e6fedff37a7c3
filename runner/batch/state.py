"""What a batch-mode run has sent, recorded beside the output before and after every step.

`<output>.parts/batch-state.json` lists every batch file of the job: its rows, the uploaded file,
the batch, the last status seen, and whether its answers are joined into the parts. It is
rewritten whole (temporary file, fsync, rename) after each change, so a killed run leaves either
the old or the new state. The order of steps is what makes a rerun safe: a batch is marked
`creating` before the create call is sent, so a rerun that finds that mark looks the batch up on
the server instead of creating a second one.

Per batch file, beside the state: `batch-NNNN.input.jsonl` (what is uploaded, removed once the
batch exists), `batch-NNNN.rows.parquet` (row id, key, request digest and kept columns of each
line, to build the output rows), and the downloaded `batch-NNNN.output.jsonl` / `.errors.jsonl`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SinkError, SpecError
from ..spec import base_url_syntax_problem

STATE_FILE = "batch-state.json"
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})


@dataclass
class BatchRecord:
    seq: int
    model: str
    thinking: bool | None  # the enable_thinking every line of the file has (None: not set)
    rows: int
    bytes: int
    reserved_cost: float = 0.0  # the worst case of its rows, while [run] max_cost is set
    input_file_id: str | None = None
    creating: bool = False  # a create call was sent, maybe carried out: look before sending another
    batch_id: str | None = None
    created_at: float | None = None  # Unix time of the create call
    status: str | None = None  # the last status the server reported
    request_counts: dict[str, int] = field(default_factory=dict)
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None  # a failed batch's validation errors
    times: dict[str, int] = field(default_factory=dict)  # in_progress_at, completed_at, ... (Unix seconds)
    cancel_requested: bool = False  # the runner asked to cancel (for the online finish)
    downloaded: bool = False
    joined: bool = False  # its rows are committed to the parts

    @property
    def name(self) -> str:
        return f"batch-{self.seq:04d}"

    def input_path(self, folder: Path) -> Path:
        return folder / f"{self.name}.input.jsonl"

    def rows_path(self, folder: Path) -> Path:
        return folder / f"{self.name}.rows.parquet"

    def output_path(self, folder: Path) -> Path:
        return folder / f"{self.name}.output.jsonl"

    def errors_path(self, folder: Path) -> Path:
        return folder / f"{self.name}.errors.jsonl"

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def update(self, batch: dict[str, Any]) -> bool:
        """Take what the server says about this batch; True when anything changed."""
        before = (self.status, self.request_counts, self.output_file_id, self.error_file_id)
        self.status = batch.get("status") or self.status
        counts = batch.get("request_counts")
        if isinstance(counts, dict):
            self.request_counts = {k: int(v) for k, v in counts.items() if isinstance(v, int)}
        self.output_file_id = batch.get("output_file_id") or self.output_file_id
        self.error_file_id = batch.get("error_file_id") or self.error_file_id
        errors = batch.get("errors")
        if isinstance(errors, dict) and isinstance(errors.get("data"), list):
            self.errors = [e for e in errors["data"] if isinstance(e, dict)]
        for key, value in batch.items():
            if key.endswith("_at") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.times[key] = int(value)
        return before != (self.status, self.request_counts, self.output_file_id, self.error_file_id)

    def describe(self) -> str:
        counts = self.request_counts
        done = f" {counts.get('completed', 0):,} done, {counts.get('failed', 0):,} failed of {self.rows:,}" \
            if counts else f" {self.rows:,} rows"
        return f"{self.name} {self.model}{' (thinking)' if self.thinking else ''}: " \
               f"{self.batch_id or 'not created'} {self.status or 'not sent'}{done}"


class BatchState:
    """The batch records of one output, loaded from and saved to its parts folder."""

    def __init__(self, folder: Path, records: list[BatchRecord], first_created_at: float | None = None,
                 endpoint: dict[str, Any] | None = None) -> None:
        self.folder = folder
        self.records = records
        self.first_created_at = first_created_at
        # Where the batches live: {"dialect", "base_url", "emulator"} of the run that created them, so
        # `runner status` / `cancel` ask that server, not the job file's default host.
        self.endpoint = endpoint

    @classmethod
    def load(cls, folder: Path) -> "BatchState":
        path = folder / STATE_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError):
            return cls(folder, [])
        except (OSError, ValueError) as exc:
            raise SinkError(f"{path}: cannot read the batch state ({exc})",
                            hint="it records the batches this job created; restore it, or check them with the "
                                 "console before using --restart") from None
        unreadable = _shape_problem(data)
        if unreadable:
            raise SinkError(f"{path}: cannot read the batch state ({unreadable})",
                            hint="it records the batches this job created; restore it, or check them with the "
                                 "console before using --restart")
        fields = {f.name for f in dataclasses.fields(BatchRecord)}
        records = [BatchRecord(**{k: v for k, v in item.items() if k in fields}) for item in data.get("batches", ())]
        endpoint = data.get("endpoint")
        if isinstance(endpoint, dict) and isinstance(endpoint.get("base_url"), str):
            check_recorded_base_url(endpoint["base_url"], path)
        return cls(folder, records, data.get("first_created_at"), endpoint if isinstance(endpoint, dict) else None)

    def save(self) -> None:
        path = self.folder / STATE_FILE
        tmp = path.with_name("." + path.name + ".tmp")
        data = {"first_created_at": self.first_created_at, "saved_at": time.time(), "endpoint": self.endpoint,
                "batches": [dataclasses.asdict(r) for r in self.records]}
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def next_seq(self) -> int:
        return max((r.seq for r in self.records), default=0) + 1

    def add(self, record: BatchRecord) -> None:
        self.records.append(record)
        self.save()

    @property
    def pending(self) -> list[BatchRecord]:
        """Batches whose rows are not joined yet (not created, running, or ended and not downloaded)."""
        return [r for r in self.records if not r.joined]

    @property
    def live(self) -> list[BatchRecord]:
        """Batches that exist on the server and have not ended."""
        return [r for r in self.records if r.batch_id and not r.terminal]


# What a record must hold for the runner to read it (a hand-edited state must not become a traceback).
_REQUIRED = {"seq": int, "model": str, "rows": int, "bytes": int}
_OPTIONAL_TEXT = ("input_file_id", "batch_id", "status", "output_file_id", "error_file_id")


def _shape_problem(data: object) -> str | None:
    if not isinstance(data, dict):
        return "not a JSON object"
    batches = data.get("batches", [])
    if not isinstance(batches, list):
        return '"batches" is not a list'
    for number, item in enumerate(batches, start=1):
        if not isinstance(item, dict):
            return f"batch {number} is not a JSON object"
        for name, kind in _REQUIRED.items():
            if not isinstance(item.get(name), kind) or isinstance(item.get(name), bool):
                return f"batch {number} has no {name} ({kind.__name__})"
        for name in _OPTIONAL_TEXT:
            if item.get(name) is not None and not isinstance(item[name], str):
                return f"batch {number}: {name} is not text"
        for name, kind in (("request_counts", dict), ("times", dict), ("errors", list)):
            if item.get(name) is not None and not isinstance(item[name], kind):
                return f"batch {number}: {name} is not a {'list' if kind is list else 'JSON object'}"
        if not all(isinstance(v, int) for v in (item.get("times") or {}).values()):
            return f"batch {number}: times are not whole seconds"
        if not all(isinstance(e, dict) for e in item.get("errors") or ()):
            return f"batch {number}: errors are not JSON objects"
    return None


def check_recorded_base_url(url: str, path: Path) -> None:
    """A recorded base_url is used as --base-url would be (runner status / cancel): the same rules, and a
    message that does not repeat a password a hand edit put into it."""
    problem = base_url_syntax_problem(url)
    if problem is not None:
        raise SpecError(f"{path}: the recorded endpoint base_url: {problem.message}", hint=problem.hint)
