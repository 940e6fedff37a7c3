"""Native DashScope API (`/api/v1/services/aigc/text-generation/generation`): payloads, answers, errors."""

from __future__ import annotations

import json
from typing import Any, Mapping

from ..errors import BadResponse
from ..records import Completion, Request
from .bodies import StreamText, has_answer, load_success_json, text_of, usage_from
from .classify import AUTH, MODEL_NOT_FOUND, NOT_FOUND, PERMANENT, QUOTA, THROTTLED, TRANSIENT, error_from
from .openai_compat import STREAM_KEYS
from .sse import Event

NAME = "dashscope"

# Body `code` -> kind. API facts 5.2, native column. Dotted codes not listed fall back to their
# first part (Throttling.X -> Throttling), then to the HTTP status.
CODE_TABLE: dict[str, str] = {
    "InvalidApiKey": AUTH, "Workspace.AccessDenied": AUTH, "WorkSpaceNotFound": AUTH,
    "Arrearage": QUOTA, "PrepaidBillOverdue": QUOTA, "PostpaidBillOverdue": QUOTA,
    "CommodityNotPurchased": QUOTA, "AllocationQuota.FreeTierOnly": QUOTA,
    "Throttling": THROTTLED, "Throttling.RateQuota": THROTTLED, "Throttling.BurstRate": THROTTLED,
    "Throttling.AllocationQuota": THROTTLED, "Throttling.Concurrency": THROTTLED,
    "LimitRequests": THROTTLED, "ResourceExhausted": THROTTLED, "ModelServingError": THROTTLED,
    "InternalError": TRANSIENT, "InternalError.Algo": TRANSIENT, "InternalError.Timeout": TRANSIENT,
    "SystemError": TRANSIENT, "ModelServiceFailed": TRANSIENT, "ModelUnavailable": TRANSIENT,
    "RequestTimeOut": TRANSIENT,
    "InvalidParameter": PERMANENT, "InternalError.Algo.InvalidParameter": PERMANENT,
    "InvalidParameter.NotSupportEnableThinking": PERMANENT, "DataInspectionFailed": PERMANENT,
    "BadRequest": PERMANENT, "AccessDenied": PERMANENT, "AccessDenied.Unpurchased": PERMANENT,
    "Model.AccessDenied": PERMANENT, "App.AccessDenied": PERMANENT, "ModelNotFound": MODEL_NOT_FOUND,
    "NotFound": NOT_FOUND,
}


# The server decides streaming from this header (facts 3.5), not from a body field.
STREAM_HEADERS = {"Accept": "text/event-stream", "X-DashScope-SSE": "enable", "X-Accel-Buffering": "no"}


def build_payload(request: Request, *, stream: bool = False) -> dict[str, Any]:
    """`result_format: message` always, so both dialects answer with choices[0].message. Streamed requests
    ask for incremental frames (each carries only its new text; thinking requires it)."""
    parameters = {"result_format": "message",
                  **{k: v for k, v in request.params.items() if k not in STREAM_KEYS}}
    if stream:
        parameters["incremental_output"] = True
    return {"model": request.model, "input": {"messages": list(request.messages)}, "parameters": parameters}


def parse_success(body: bytes, headers: Mapping[str, str]) -> Completion:
    data = load_success_json(body, headers)
    request_id = (data.get("request_id") if isinstance(data, dict) else None) or headers.get("x-request-id")
    try:
        output = data["output"]
        if output.get("choices"):
            choice = output["choices"][0]
            message = choice["message"]
            answered = has_answer(message)
            content, reasoning = text_of(message.get("content")), message.get("reasoning_content") or None
        else:  # result_format=text
            choice, content, reasoning = output, output["text"], None
            answered = isinstance(content, str)
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise BadResponse("a 200 answer without output.choices[0].message or output.text", code="bad_response",
                          http_status=200, request_id=request_id) from exc
    if not answered:
        raise BadResponse("a 200 answer whose message has neither content nor tool calls", code="bad_response",
                          http_status=200, request_id=request_id)
    finish = choice.get("finish_reason")
    return Completion(
        content=content,
        reasoning=reasoning,
        finish_reason=None if finish == "null" else finish,  # streaming frames spell "still going" "null"
        usage=usage_from(data.get("usage"), input_name="input_tokens", output_name="output_tokens",
                         output_details="output_tokens_details"),
        request_id=request_id,
    )


class StreamAssembler:
    """Builds one Completion from `event:result` frames (facts 3.5): incremental pieces joined, usage from the
    last (cumulative) frame, complete once a frame has a real finish_reason; `event:error` frames are
    classified with the status from their `:HTTP_STATUS/<n>` comment (400 without one, as the SDK does).
    A frame that parses but whose message has no content (nor reasoning, nor tool calls) is malformed."""

    __slots__ = ("text", "_headers")

    def __init__(self, headers: Mapping[str, str], sent_at: float, clock) -> None:
        self._headers = headers
        self.text = StreamText(headers.get("x-request-id"), sent_at, clock)

    def add(self, event: Event) -> None:
        text = self.text
        try:
            frame = json.loads(event.data)
        except ValueError as exc:
            raise text.malformed(str(exc)) from None
        if event.event == "error":
            raise error_from(event.status or 400, frame if isinstance(frame, dict) else None, self._headers,
                             error_fields=error_fields, table=CODE_TABLE)
        try:
            text.request_id = frame.get("request_id") or text.request_id
            output = frame["output"]
            if output.get("choices"):
                choice = output["choices"][0]
                message = choice["message"]
                if not (has_answer(message) or isinstance(message.get("reasoning_content"), str)):
                    raise KeyError("a message without content")  # a damaged key: its text would be lost
                text.add(text_of(message.get("content")), message.get("reasoning_content"))
            else:  # result_format=text
                choice = output
                if not isinstance(output["text"], str):
                    raise TypeError("output.text is not a string")
                text.add(output["text"], None)
            finish = choice.get("finish_reason")
            if finish and finish != "null":
                text.finish_reason = finish
            if frame.get("usage"):
                text.usage = frame["usage"]
        except (KeyError, IndexError, AttributeError, TypeError) as exc:
            raise text.malformed(repr(exc)) from None

    def finish(self) -> Completion:
        return self.text.completion(True, input_name="input_tokens", output_name="output_tokens",
                                    output_details="output_tokens_details")


def error_fields(data: dict | None) -> tuple[str | None, str, str | None]:
    """(code, message, request_id) from `{"code", "message" | "msg", "request_id"}`."""
    if not data:
        return None, "", None
    error = data.get("error")
    if isinstance(error, dict):  # a gateway answering in the compatible shape
        return error.get("code"), str(error.get("message") or ""), data.get("request_id")
    code = data.get("code")
    return (str(code) if code else None), str(data.get("message") or data.get("msg") or ""), data.get("request_id")
