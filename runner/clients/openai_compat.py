"""OpenAI-compatible mode (`/compatible-mode/v1/chat/completions`): payloads, answers, errors."""

from __future__ import annotations

import json
from typing import Any, Mapping

from ..errors import BadResponse, TransientCallError
from ..records import Completion, Request, Usage
from .classify import AUTH, PERMANENT, QUOTA, THROTTLED, TRANSIENT

NAME = "openai"

# Body `error.code` (or top-level `code`) -> kind. API facts 5.2, compat column.
CODE_TABLE: dict[str, str] = {
    "invalid_api_key": AUTH,
    "Arrearage": QUOTA, "PrepaidBillOverdue": QUOTA, "PostpaidBillOverdue": QUOTA,
    "CommodityNotPurchased": QUOTA, "AllocationQuota.FreeTierOnly": QUOTA,
    "Workspace.AccessDenied": AUTH, "WorkSpaceNotFound": AUTH,
    "limit_requests": THROTTLED, "limit_burst_rate": THROTTLED, "insufficient_quota": THROTTLED,
    "Throttling": THROTTLED, "ModelServingError": THROTTLED,
    "internal_error": TRANSIENT, "InternalError": TRANSIENT, "ModelUnavailable": TRANSIENT,
    "SystemError": TRANSIENT, "ModelServiceFailed": TRANSIENT, "RequestTimeOut": TRANSIENT,
    "invalid_parameter_error": PERMANENT, "invalid_value": PERMANENT, "data_inspection_failed": PERMANENT,
    "model_not_found": PERMANENT, "model_not_supported": PERMANENT, "access_denied": PERMANENT,
    # Not the OpenAI `type` "invalid_request_error": it comes with 401, 404 and 429 answers alike (facts 5.2,
    # 10.1 D/I/J), so when it stands in for a missing code the status decides.
}


def build_payload(request: Request) -> dict[str, Any]:
    """The JSON body: Qwen-specific parameters go at the top level, as openai-python's extra_body does."""
    return {"model": request.model, "messages": list(request.messages), **request.params}


def parse_success(body: bytes, headers: Mapping[str, str]) -> Completion:
    try:
        data = json.loads(body)
    except ValueError as exc:
        # A 200 whose JSON does not parse was cut short on the way: worth another attempt.
        raise TransientCallError(f"truncated or malformed JSON in a 200 answer ({exc})", code="malformed_body",
                                 http_status=200, request_id=headers.get("x-request-id")) from exc
    request_id = headers.get("x-request-id") or _request_id_from_body(data)
    try:
        choice = data["choices"][0]
        message = choice.get("message") or {}
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise BadResponse("a 200 answer without choices[0].message", code="bad_response",
                          http_status=200, request_id=request_id) from exc
    usage = data.get("usage") or {}
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    return Completion(
        content=text_of(message.get("content")),
        reasoning=message.get("reasoning_content") or None,
        finish_reason=choice.get("finish_reason"),
        usage=Usage(
            input_tokens=usage.get("prompt_tokens"),
            output_tokens=usage.get("completion_tokens"),
            total_tokens=usage.get("total_tokens"),
            cached_tokens=prompt_details.get("cached_tokens"),
            reasoning_tokens=completion_details.get("reasoning_tokens"),
        ),
        request_id=request_id,
    )


def error_fields(data: dict | None) -> tuple[str | None, str, str | None]:
    """(code, message, request_id) from an error body; tolerant of the native shape too."""
    if not data:
        return None, "", None
    error = data.get("error")
    if isinstance(error, dict):
        code = error.get("code") or error.get("type")
        message = error.get("message") or ""
    else:
        code, message = data.get("code"), data.get("message") or data.get("msg") or ""
    return (str(code) if code else None), str(message), data.get("request_id") or _request_id_from_body(data)


def _request_id_from_body(data: Any) -> str | None:
    if isinstance(data, dict):
        body_id = data.get("id")
        if isinstance(body_id, str) and body_id.startswith("chatcmpl-"):
            return body_id[len("chatcmpl-"):]
        return data.get("request_id")
    return None


def text_of(content: Any) -> str | None:
    """Message content as text: a string as is, a list of parts joined by their text."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)
