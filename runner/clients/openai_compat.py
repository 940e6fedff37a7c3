"""OpenAI-compatible mode (`/compatible-mode/v1/chat/completions`): payloads, answers, errors."""

from __future__ import annotations

import json
from typing import Any, Mapping

from ..errors import BadResponse
from ..records import Choice, Completion, Request
from .bodies import StreamText, has_answer, load_success_json, text_of, usage_from
from .classify import AUTH, MODEL_NOT_FOUND, PERMANENT, QUOTA, THROTTLED, TRANSIENT, error_from
from .sse import Event

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
    "model_not_found": MODEL_NOT_FOUND, "model_not_supported": MODEL_NOT_FOUND, "access_denied": PERMANENT,
    # Not the OpenAI `type` "invalid_request_error": it comes with 401, 404 and 429 answers alike (facts 5.2,
    # 10.1 D/I/J), so when it stands in for a missing code the status decides.
}


# Streaming is the client's decision (stream_rules), so these never pass through from row parameters.
STREAM_KEYS = frozenset({"stream", "stream_options", "incremental_output"})
STREAM_HEADERS = {"Accept": "text/event-stream"}


def build_payload(request: Request, *, stream: bool = False) -> dict[str, Any]:
    """The JSON body: Qwen-specific parameters go at the top level, as openai-python's extra_body does.
    Streamed requests ask for the usage chunk, without which a stream carries no token counts."""
    body = {"model": request.model, "messages": list(request.messages),
            **{k: v for k, v in request.params.items() if k not in STREAM_KEYS}}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def parse_success(body: bytes, headers: Mapping[str, str]) -> Completion:
    data = load_success_json(body, headers)
    request_id = headers.get("x-request-id") or _request_id_from_body(data)
    try:
        choice = data["choices"][0]
        message = choice["message"]
    except (KeyError, IndexError, TypeError) as exc:
        raise BadResponse("a 200 answer without choices[0].message", code="bad_response",
                          http_status=200, request_id=request_id) from exc
    if not has_answer(message):
        raise BadResponse("a 200 answer whose message has neither content nor tool calls", code="bad_response",
                          http_status=200, request_id=request_id)
    return Completion(
        content=text_of(message.get("content")),
        reasoning=message.get("reasoning_content") or None,
        finish_reason=choice.get("finish_reason"),
        usage=usage_from(data.get("usage"), input_name="prompt_tokens", output_name="completion_tokens",
                         output_details="completion_tokens_details"),
        request_id=request_id,
        choices=_every_choice(data["choices"], request_id),
    )


def _every_choice(choices: Any, request_id: str | None) -> tuple[Choice, ...]:
    """Every choice of an answer to a request with `n`, in `index` order; () for the usual single choice.
    A choice without an answer is a damaged answer (its sample would be lost), not one to skip."""
    if not isinstance(choices, list) or len(choices) < 2:
        return ()
    found = []
    for position, choice in enumerate(choices):
        message = choice.get("message") if isinstance(choice, dict) else None
        if not has_answer(message):
            raise BadResponse(f"a 200 answer whose choice {position} has no message", code="bad_response",
                              http_status=200, request_id=request_id)
        index = choice.get("index")
        found.append((index if isinstance(index, int) else position, position,
                      Choice(text_of(message.get("content")), message.get("reasoning_content") or None,
                             choice.get("finish_reason"))))
    return tuple(item[2] for item in sorted(found, key=lambda item: item[:2]))


# A delta carries at least one of these (the first one the role, the last one at least its finish_reason).
_DELTA_KEYS = frozenset({"content", "reasoning_content", "tool_calls", "role"})


class StreamAssembler:
    """Builds one Completion from `data:` chunks (facts 2.4): deltas joined, usage from the last chunk,
    complete only once a finish_reason and `[DONE]` have both arrived. A chunk that parses but lacks its
    `choices` list, or a delta with none of its fields, is a malformed frame, not a piece of text to skip."""

    __slots__ = ("text", "_done", "_headers")

    def __init__(self, headers: Mapping[str, str], sent_at: float, clock) -> None:
        self._headers = headers
        self.text = StreamText(headers.get("x-request-id"), sent_at, clock)
        self._done = False

    def add(self, event: Event) -> None:
        if event.data == b"[DONE]":
            self._done = True
            return
        text = self.text
        try:
            chunk = json.loads(event.data)
            if chunk.get("error") is not None:
                # An in-band error (moderation, quota): classified like an error answer; unknown codes retried.
                raise error_from(event.status or 500, chunk, self._headers, error_fields=error_fields,
                                 table=CODE_TABLE)
            if text.request_id is None:
                text.request_id = _request_id_from_body(chunk)
            choices = chunk["choices"]  # a list in every chunk, empty in the usage chunk
            if not isinstance(choices, list):
                raise TypeError("choices is not a list")
            for choice in choices:
                delta = choice["delta"]
                if not (_DELTA_KEYS & delta.keys() or choice.get("finish_reason")):
                    raise KeyError("a delta without content")  # a damaged key: its text would be lost
                text.add(text_of(delta.get("content")), delta.get("reasoning_content"))
                if choice.get("finish_reason"):
                    text.finish_reason = choice["finish_reason"]
            if chunk.get("usage"):
                text.usage = chunk["usage"]
        except (ValueError, KeyError, AttributeError, TypeError) as exc:
            raise text.malformed(repr(exc) if isinstance(exc, KeyError) else str(exc)) from None

    def finish(self) -> Completion:
        return self.text.completion(self._done, input_name="prompt_tokens", output_name="completion_tokens",
                                    output_details="completion_tokens_details")


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

