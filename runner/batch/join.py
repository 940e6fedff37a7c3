"""A finished batch's output and error files (API facts 7.5) joined back to its rows on custom_id.

Every row of the batch gets exactly one Result: its answer, its error line, or, for a row that
neither file mentions (a failed, cancelled or expired batch), an error saying why it did not run.
Answers are parsed and classified by the same code as online answers, so the table reads the same.
Rows a batch did not run are TransientCallErrors (code batch_expired, batch_cancelled,
batch_failed or batch_missing_line): the kind `--retry-failed transient` and the online finish
send again.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from ..clients import classify_answer, openai_compat
from ..cost import PriceBook
from ..errors import CallError, PermanentCallError, RunnerError, TransientCallError
from ..records import STATUS_ERROR, STATUS_OK, Completion, Request, Result
from .render import SIDECAR_COLUMNS, custom_id, read_sidecar
from .state import BatchRecord

NOT_RUN_MESSAGES = {
    "expired": ("batch_expired", "the batch's completion window ended before this row ran"),
    "cancelled": ("batch_cancelled", "the batch was cancelled before this row ran"),
    "failed": ("batch_failed", "the batch failed validation, so no row of it ran"),
}
MISSING_LINE = "batch_missing_line"
# Codes of rows a batch never ran: transient (sent again on request) and never attempted.
NOT_RUN_CODES = frozenset({code for code, _ in NOT_RUN_MESSAGES.values()} | {MISSING_LINE})


def parse_line(item: dict[str, Any]) -> Completion | CallError:
    """One output or error file line -> the answer, or the error it records."""
    response = item.get("response") if isinstance(item.get("response"), dict) else {}
    status = response.get("status_code")
    if not isinstance(status, int) or isinstance(status, bool):
        status = None  # a line whose status is not a number: its row fails, the table keeps its types
    body = response.get("body")
    request_id = next((v for v in (response.get("request_id"), item.get("id")) if isinstance(v, str) and v), None)
    headers = {"x-request-id": request_id} if isinstance(request_id, str) else {}
    error = item.get("error") if isinstance(item.get("error"), dict) else None
    if status == 200 and isinstance(body, dict) and error is None:
        try:
            return openai_compat.parse_success(json.dumps(body).encode(), headers)
        except CallError as exc:
            return exc
    code = str(error.get("code")) if error and error.get("code") else None
    message = str(error.get("message") or "") if error else ""
    if code in NOT_RUN_CODES:
        return TransientCallError(message or code, code=code, http_status=status, request_id=request_id)
    if isinstance(status, int) and status >= 400:
        answer = json.dumps(body).encode() if body is not None else json.dumps({"error": error or {}}).encode()
        found = classify_answer(openai_compat, status, answer, headers)
    else:
        found = PermanentCallError(message or "the batch recorded an error without a status", code=code,
                                   request_id=request_id)
    if isinstance(found, RunnerError):  # a bad key or no money, for this line only: the row failed
        return PermanentCallError(found.message, code=code, http_status=status, request_id=request_id)
    return found


def read_lines(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with open(path, "rb") as fh:
        for raw in fh:
            try:
                item = json.loads(raw)
            except ValueError:
                continue  # a line we cannot read leaves its row to the "not in the files" rule
            if isinstance(item, dict) and isinstance(item.get("custom_id"), str):
                yield item


def _stamp(seconds: int | None) -> datetime | None:
    return datetime.fromtimestamp(seconds, timezone.utc) if seconds else None


def join_batch(record: BatchRecord, folder: Path, prices: PriceBook) -> list[Result]:
    """The Results of every row of a finished, downloaded batch, in row order."""
    rows = read_sidecar(record.rows_path(folder)).to_pylist()
    by_id = {custom_id(row["row_id"], row["key"]): row for row in rows}
    outcomes: dict[str, Completion | CallError] = {}
    for path in (record.output_path(folder), record.errors_path(folder)):
        for item in read_lines(path):
            if item["custom_id"] in by_id:
                outcomes.setdefault(item["custom_id"], parse_line(item))
    times = record.times
    started = _stamp(times.get("in_progress_at") or times.get("created_at"))
    ended = _stamp(times.get("completed_at") or times.get("expired_at") or times.get("cancelled_at")
                   or times.get("failed_at") or times.get("finalizing_at"))
    line_errors = {e.get("line"): e for e in record.errors or () if isinstance(e.get("line"), int)}
    stub_params = {"enable_thinking": True} if record.thinking else {}
    results = []
    for line_number, (cid, row) in enumerate(by_id.items(), start=1):
        kept = {k: v for k, v in row.items() if k not in SIDECAR_COLUMNS}
        base = dict(row_id=row["row_id"], key=row["key"], model=record.model, mode="batch", kept=kept,
                    request_hash=row["request_hash"], started_at=started, finished_at=ended,
                    variant=row.get("variant"), sample_index=row.get("sample_index"),
                    # No per-row time: the batch ran its rows in an order and at times it does not report.
                    # started_at..finished_at is the batch's own span; a per-row copy of it would only
                    # pollute the duration percentiles of a mixed run.
                    duration_ms=None)
        outcome = outcomes.get(cid)
        if outcome is None:
            outcome = _not_run(record, line_errors.get(line_number))
        if isinstance(outcome, Completion):
            stub = Request(row_id=row["row_id"], key=row["key"], model=record.model, params=stub_params)
            results.append(Result(**base, status=STATUS_OK, response=outcome.content, reasoning=outcome.reasoning,
                                  finish_reason=outcome.finish_reason, usage=outcome.usage,
                                  cost=prices.row_cost(stub, outcome.usage), request_id=outcome.request_id,
                                  http_status=outcome.http_status, attempts=1))
        else:
            ran = outcome.code not in NOT_RUN_CODES
            results.append(Result(**base, status=STATUS_ERROR, request_id=outcome.request_id,
                                  error_type=outcome.error_type, error_code=outcome.code,
                                  error_message=outcome.message, http_status=outcome.http_status,
                                  attempts=1 if ran else 0))
    return results


def _not_run(record: BatchRecord, line_error: dict[str, Any] | None) -> CallError:
    if record.status == "rejected":  # the create call was refused (e.g. a model the Batch API does not serve)
        first = (record.errors or [{}])[0]
        return PermanentCallError(str(first.get("message") or "the Batch API refused the batch"),
                                  code="batch_rejected")
    if line_error is not None:  # validation named this line: sending it again the same way fails again
        return PermanentCallError(str(line_error.get("message") or "the Batch API refused this line"),
                                  code=str(line_error.get("code") or "batch_invalid_line"))
    if record.status in NOT_RUN_MESSAGES:
        code, message = NOT_RUN_MESSAGES[record.status]
        if record.status == "failed" and record.errors:
            first = record.errors[0]
            message += f" ({first.get('code')}: {first.get('message')})"
        return TransientCallError(message, code=code)
    return TransientCallError("the batch's output and error files do not mention this row", code=MISSING_LINE)
