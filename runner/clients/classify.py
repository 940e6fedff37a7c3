"""Turn an HTTP error answer into the error taxonomy (design.md section 5).

Each dialect owns a table from the provider's body code to a kind; this module owns what the
kinds mean and the rules that need the status or the message as well (API facts 5.2). Run-level
kinds come back as RunnerError subclasses (the run stops); row-level kinds as CallErrors.
"""

from __future__ import annotations

import email.utils
import json
import time
from typing import Mapping

from ..errors import (AuthError, CallError, NotFound, PermanentCallError, QuotaExhausted, RunnerError, Throttled,
                      TransientCallError)

AUTH = "auth"            # the key, region or workspace is wrong: stop the run
QUOTA = "quota"          # the account cannot pay: stop the run
THROTTLED = "throttled"  # rate, burst, token or capacity throttling: retry, slower
TRANSIENT = "transient"  # server-side failure: retry
PERMANENT = "permanent"  # the request is wrong or refused: record the row as failed
MODEL_NOT_FOUND = "model_not_found"  # the provider does not know the model: a row error, or a wrong job model
NOT_FOUND = "not_found"  # 404 without a model code: the URL is wrong (a row error once the URL has worked)

# Messages that turn a throttling code into "the free quota is gone" (facts 5.2, last note).
_FREE_QUOTA_MARKERS = ("free allocated quota", "freetieronly", "free tier of the model has been exhausted")
# InternalError.Algo answers that repeat whatever you do (facts 5.2, "deterministic" row).
# The native API's 400 for a retired or unknown model (facts 5.2, InvalidParameter row; facts 9).
_MODEL_MISSING_MARKERS = ("model not exist",)
_DETERMINISTIC_500 = ("expecting ',' delimiter", "list index out of range", "role must be in",
                      "missing content-length of multimodal url")


def kind_of(status: int, code: str | None, message: str, table: Mapping[str, str]) -> str:
    """The kind for an error answer: the body code first (a dotted code falls back to its first part),
    then the status; the message then refines throttling into exhausted quota and a 500 into a
    deterministic failure."""
    kind = table.get(code) if code else None
    if kind is None and code and "." in code:
        kind = table.get(code.split(".", 1)[0])  # e.g. Throttling.SomethingNew -> Throttling
    if kind is None:
        kind = _kind_of_status(status)
    text = message.lower()
    if kind == THROTTLED and any(m in text for m in _FREE_QUOTA_MARKERS):
        return QUOTA
    if kind == TRANSIENT and any(m in text for m in _DETERMINISTIC_500):
        return PERMANENT
    if kind == PERMANENT and status == 404:
        return NOT_FOUND  # a 404 whose code we do not know (NotFound, a proxy's page): the path
    if kind == PERMANENT and any(m in text for m in _MODEL_MISSING_MARKERS):
        return MODEL_NOT_FOUND
    return kind


def _kind_of_status(status: int) -> str:
    if status == 401:
        return AUTH
    if status == 429:
        return THROTTLED
    if status in (408, 409) or status >= 500:
        return TRANSIENT
    if status == 404:
        return NOT_FOUND
    return PERMANENT


def to_error(kind: str, *, status: int, code: str | None, message: str, request_id: str | None,
             retry_after: float | None, region_hint: str) -> CallError | RunnerError:
    """The exception for a kind. Run-level errors carry a hint; row-level ones the provider's details."""
    detail = f"HTTP {status}" + (f" {code}" if code else "") + (f": {message}" if message else "")
    if kind == AUTH:
        return AuthError(f"the endpoint refused the credentials ({detail})",
                         hint=f"check the API key and that it belongs to {region_hint} (keys are per "
                              "region and workspace)")
    if kind == QUOTA:
        return QuotaExhausted(f"the account cannot pay for more calls ({detail})",
                              hint="settle the bill or quota in the Model Studio console, then run the "
                                   "same command again")
    fields = dict(code=code, http_status=status, request_id=request_id)
    if kind == THROTTLED:
        return Throttled(message or detail, retry_after=retry_after, **fields)
    if kind == TRANSIENT:
        return TransientCallError(message or detail, retry_after=retry_after, **fields)
    if kind in (MODEL_NOT_FOUND, NOT_FOUND):
        return NotFound(message or detail, what="model" if kind == MODEL_NOT_FOUND else "path", **fields)
    return PermanentCallError(message or detail, **fields)


def error_from(status: int, data: dict | None, headers: Mapping[str, str], *, error_fields, table: Mapping[str, str],
               fallback_message: str = "", region_hint: str = "this region") -> CallError | RunnerError:
    """The error for an error answer already parsed to JSON (a response body or an in-band stream frame)."""
    code, message, request_id = error_fields(data)
    if not code and not message:
        message = fallback_message
    return to_error(kind_of(status, code, message, table), status=status, code=code, message=message,
                    request_id=request_id or headers.get("x-request-id"),
                    retry_after=retry_after_seconds(headers), region_hint=region_hint)


def parse_error_body(body: bytes) -> dict | None:
    """The JSON object of an error answer; also finds it in an SSE-framed body (facts 3.5)."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
        for line in body.splitlines():
            if line.startswith(b"data:"):
                try:
                    parsed = json.loads(line[5:])
                except ValueError:
                    pass
                break
    return parsed if isinstance(parsed, dict) else None


def body_snippet(body: bytes, limit: int = 200) -> str:
    text = body.decode("utf-8", "replace").strip()
    return " ".join(text.split())[:limit]


def retry_after_seconds(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Retry-After (seconds or an HTTP date) or retry-after-ms; None when absent or unreadable."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))
