"""Batch input and output files: validate a JSONL input (dashscope-api.md 7.2, 5.2) and answer
its lines with the same deterministic completion the chat endpoint gives (7.5 line shapes).

Pure functions over bytes and the config: no HTTP, no clock, no store.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any

from .config import EmulatorConfig
from .faults import draw
from .generate import ApiError, complete, with_choices
from .responses import OPENAI, dump, new_request_id

CHAT_URL = "/v1/chat/completions"
# At most this many entries in a failed batch's errors.data; the rest are left out.
MAX_ERROR_ENTRIES = 1000

# Quoted from the real API (dashscope-api.md 5.2); the tail of the duplicate message follows
# OpenAI's wording, which the capture elides.
MSG_DUPLICATE = (
    "The custom_id '{}' for this request is a duplicate of another request. "
    "The custom_id parameter must be unique for each request in a batch."
)
MSG_MISMATCHED = (
    "The model '{}' for this request does not match the rest of the batch. "
    "Each batch must contain requests for a single model."
)
# Our wording (codes follow OpenAI's batch validation codes): not captured from DashScope.
MSG_TOO_MANY = "The input file has {} requests; a batch may contain at most {}."
MSG_EMPTY = "The input file contains no requests."
MSG_TOO_LARGE = "The request is {} bytes; a line may be at most {} bytes."
MSG_BAD_JSON = "This line is not parseable as valid JSON."
MSG_BAD_LINE = "Each line must be a JSON object with custom_id, method, url and body."
MSG_CUSTOM_ID = "custom_id must be a non-empty string."
MSG_METHOD = "method must be 'POST'."
MSG_URL = "url must be '{}', the endpoint of the batch."
MSG_BODY = "body must be a JSON object with a string 'model'."
MSG_INJECTED = "The input file failed validation (injected by the emulator)."
# Lines not finished when a batch ended early (our wording and codes).
MSG_EXPIRED = "This request could not be executed before the completion window expired."
MSG_CANCELLED = "This request was not executed because the batch was cancelled."


@dataclass(frozen=True, slots=True)
class InputLine:
    custom_id: str
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Checked:
    """A checked input file: its lines and model, or the errors that fail the batch."""

    lines: list[InputLine]
    model: str | None
    errors: list[dict[str, Any]]
    count: int  # lines in the file


def _error(code: str, message: str, line: int | None) -> dict[str, Any]:
    return {"code": code, "message": message, "line": line}


def check_input(data: bytes, endpoint: str, config: EmulatorConfig) -> Checked:
    """Validate a JSONL input file. `model` is the first line's model (None if no line has
    one); `errors` lists every problem found, capped at MAX_ERROR_ENTRIES."""
    raw = data.split(b"\n")
    if raw and not raw[-1].strip():
        raw.pop()  # the newline that ends the last line
    if not raw:
        return Checked([], None, [_error("empty_file", MSG_EMPTY, None)], 0)
    if len(raw) > config.batch_max_lines:
        message = MSG_TOO_MANY.format(len(raw), config.batch_max_lines)
        return Checked([], None, [_error("too_many_tasks", message, None)], len(raw))
    errors: list[dict[str, Any]] = []
    lines: list[InputLine] = []
    seen: set[str] = set()
    model: str | None = None
    for number, text in enumerate(raw, start=1):
        if len(errors) >= MAX_ERROR_ENTRIES:
            break
        if len(text) > config.batch_max_line_bytes:
            message = MSG_TOO_LARGE.format(len(text), config.batch_max_line_bytes)
            errors.append(_error("request_too_large", message, number))
            continue
        try:
            item = json.loads(text)
        except ValueError:  # also UnicodeDecodeError
            errors.append(_error("invalid_json_line", MSG_BAD_JSON, number))
            continue
        problem = _line_problem(item, endpoint)
        if problem is not None:
            errors.append(_error(problem[0], problem[1], number))
            continue
        custom_id, body = item["custom_id"], item["body"]
        if custom_id in seen:
            errors.append(_error("duplicate_custom_id", MSG_DUPLICATE.format(custom_id), number))
            continue
        seen.add(custom_id)
        if model is None:
            model = body["model"]
        elif body["model"] != model:
            errors.append(_error("mismatched_model", MSG_MISMATCHED.format(body["model"]), number))
            continue
        lines.append(InputLine(custom_id, body))
    return Checked(lines, model, errors, len(raw))


def _line_problem(item: Any, endpoint: str) -> tuple[str, str] | None:
    if not isinstance(item, dict):
        return "invalid_request", MSG_BAD_LINE
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "missing_required_parameter", MSG_CUSTOM_ID
    if item.get("method") != "POST":
        return "invalid_method", MSG_METHOD
    if item.get("url") != endpoint:
        return "invalid_url", MSG_URL.format(endpoint)
    body = item.get("body")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body["model"]:
        return "invalid_request", MSG_BODY
    return None


def injected_failure() -> dict[str, Any]:
    """The errors.data entry of EmulatorConfig.batch_fail_validation."""
    return _error("validation_failed", MSG_INJECTED, None)


# -- answering lines -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LineResult:
    custom_id: str
    ok: bool
    line: bytes  # one JSONL line of the output or error file, without the newline


def processing_order(lines: list[InputLine], seed: int) -> list[InputLine]:
    """The lines in the order the batch finishes them: a shuffle fixed by the seed and the
    custom_ids, so clients must join on custom_id rather than rely on input order."""
    digest = hashlib.sha256(f"{seed}".encode())
    for line in lines:
        digest.update(line.custom_id.encode("utf-8", "surrogatepass") + b"\x00")
    order = list(lines)
    random.Random(digest.digest()).shuffle(order)
    return order


def is_faulty(config: EmulatorConfig, custom_id: str, attempt: int = 0) -> bool:
    """Whether EmulatorConfig.batch_line_fault_rate sends this line to the error file. `attempt` counts
    the earlier batches that held this custom_id, so a line sent again gets a fresh draw. Negative
    attempts never collide with the chat endpoint's draws (those count from 1)."""
    rate = config.batch_line_fault_rate
    return rate > 0 and draw(config.seed, "batch\x1f" + custom_id, -attempt) < rate


def answer_line(
    line: InputLine, config: EmulatorConfig, rid_bits: int, finished_at: int, attempt: int = 0
) -> LineResult:
    """The output or error file line for one request, as the chat endpoint would answer it."""
    rid = new_request_id(rid_bits)
    if is_faulty(config, line.custom_id, attempt):
        return _error_line(line.custom_id, rid, ApiError("500"))
    # A batch never streams: stream flags in a body are ignored.
    body = {k: v for k, v in line.body.items() if k not in ("stream", "stream_options")}
    try:
        call = OPENAI.parse(dump(body), {})
        if call.model not in config.models:
            raise ApiError("model_not_found", call.model)
        done = with_choices(call, complete(call))
    except ApiError as err:
        return _error_line(line.custom_id, rid, err)
    answer = OPENAI.success(call, done, rid)
    answer["created"] = finished_at
    response = {"status_code": 200, "request_id": rid, "body": answer}
    return LineResult(
        line.custom_id,
        True,
        dump({"id": rid, "custom_id": line.custom_id, "response": response, "error": None}),
    )


def unfinished_line(custom_id: str, rid_bits: int, code: str) -> bytes:
    """The error file line of a request a cancelled or expired batch never ran."""
    rid = new_request_id(rid_bits)
    message = MSG_EXPIRED if code == "batch_expired" else MSG_CANCELLED
    error = {"code": code, "message": message, "param": None, "type": "invalid_request_error"}
    response = {"status_code": 400, "request_id": rid, "body": {"error": error}}
    return dump({
        "id": rid,
        "custom_id": custom_id,
        "response": response,
        "error": {"code": code, "message": message},
    })


def _error_line(custom_id: str, rid: str, err: ApiError) -> LineResult:
    status, body = OPENAI.error(err, rid)
    error = body["error"]
    response = {"status_code": status, "request_id": rid, "body": {"error": error}}
    line = {
        "id": rid,
        "custom_id": custom_id,
        "response": response,
        "error": {"code": error["code"], "message": error["message"]},
    }
    return LineResult(custom_id, False, dump(line))


__all__ = [
    "CHAT_URL",
    "Checked",
    "InputLine",
    "LineResult",
    "answer_line",
    "check_input",
    "injected_failure",
    "is_faulty",
    "processing_order",
    "unfinished_line",
]
