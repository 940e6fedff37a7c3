"""Wire formats: parse each dialect's request into a ChatCall, render data into its bodies.

Bodies follow dashscope-api.md sections 2, 3, 5 and 10: compat (OpenAI-compatible) errors are
``{"error": {message, type, param, code}, "id"?, "request_id"}``, native errors are
``{"code", "message", "request_id"}``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

from .generate import (
    ALGO_PREFIX,
    ApiError,
    ChatCall,
    Completion,
    check_max_tokens,
    check_messages,
    check_n,
    invalid,
)


class ErrorSpec(NamedTuple):
    """One row of the error catalogue; messages may contain ``{detail}``."""

    status: int
    native_code: str
    native_message: str
    compat_code: str
    compat_type: str
    compat_message: str
    compat_has_id: bool = True  # the 401 and 404 captures carry no "id"


_KEY_LINK = "https://www.alibabacloud.com/help/en/model-studio/error-code#apikey-error"
_INTERNAL = "An internal error has occurred, please try again later or contact service support."
_CAPACITY = (
    "Too many requests. Your requests are being throttled due to system capacity limits. "
    "Please try again later."
)

ERRORS: dict[str, ErrorSpec] = {
    "invalid_api_key": ErrorSpec(
        401, "InvalidApiKey", "Invalid API-key provided.",
        "invalid_api_key", "invalid_request_error",
        f"Incorrect API key provided. For details, see: {_KEY_LINK}", False,
    ),
    "missing_api_key": ErrorSpec(
        401, "InvalidApiKey", "No API-key provided.",
        "invalid_api_key", "invalid_request_error",
        f"Incorrect API key provided. For details, see: {_KEY_LINK}", False,
    ),
    "invalid_parameter": ErrorSpec(
        400, "InvalidParameter", "{detail}",
        "invalid_parameter_error", "invalid_request_error", "{detail}",
    ),
    "model_not_found": ErrorSpec(
        404, "ModelNotFound", "Model can not be found.",
        "model_not_found", "invalid_request_error",
        "The model `{detail}` does not exist or you do not have access to it.", False,
    ),
    "429": ErrorSpec(
        429, "Throttling.RateQuota", "Requests rate limit exceeded, please try again later.",
        "limit_requests", "limit_requests", "You exceeded your current requests list.",
    ),
    "429burst": ErrorSpec(
        429, "Throttling.BurstRate",
        "Request rate increased too quickly. To ensure system stability, please adjust your "
        "client logic to scale requests more smoothly over time.",
        "limit_burst_rate", "limit_burst_rate",
        "Request rate increased too quickly. To ensure system stability, please adjust your "
        "client logic to scale requests more smoothly over time.",
    ),
    "429tpm": ErrorSpec(
        429, "Throttling.AllocationQuota",
        "Allocated quota exceeded, please increase your quota limit.",
        "insufficient_quota", "insufficient_quota",
        "You exceeded your current quota, please check your plan and billing details.",
    ),
    "500": ErrorSpec(
        500, "InternalError", _INTERNAL, "internal_error", "internal_error", _INTERNAL
    ),
    "503": ErrorSpec(
        503, "ModelUnavailable", "Model is unavailable, please try again later.",
        "ModelUnavailable", "ModelUnavailable", "Model is unavailable, please try again later.",
    ),
    "429throttling": ErrorSpec(
        429, "Throttling", "Requests throttling triggered.",
        "Throttling", "Throttling", "Requests throttling triggered.",
    ),
    "429concurrency": ErrorSpec(
        429, "Throttling.Concurrency", "Too many concurrent requests.",
        "Throttling.Concurrency", "Throttling.Concurrency", "Too many concurrent requests.",
    ),
    "500capacity": ErrorSpec(
        500, "ModelServingError", _CAPACITY, "ModelServingError", "ModelServingError", _CAPACITY
    ),
    "503capacity": ErrorSpec(
        503, "ModelServingError", _CAPACITY, "ModelServingError", "ModelServingError", _CAPACITY
    ),
    "400": ErrorSpec(
        400, "InvalidParameter",
        "<400> InternalError.Algo.InvalidParameter: Range of input length should be [1, 129024]",
        "invalid_parameter_error", "invalid_request_error",
        "<400> InternalError.Algo.InvalidParameter: Range of input length should be [1, 129024]",
    ),
    "moderation": ErrorSpec(
        400, "DataInspectionFailed", "Input data may contain inappropriate content.",
        "data_inspection_failed", "data_inspection_failed",
        "Input data may contain inappropriate content.",
    ),
    "arrearage": ErrorSpec(
        400, "Arrearage", "Access denied, please make sure your account is in good standing.",
        "Arrearage", "Arrearage",
        "Access denied, please make sure your account is in good standing.",
    ),
}

# Gateway answers carry no JSON: the real service sits behind envoy/nginx-style proxies.
GATEWAY_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n</body>\r\n</html>\r\n"
)
GATEWAY_504 = b"upstream request timeout"

MSG_BAD_JSON = "The request body is not valid JSON."  # our wording; not captured
MSG_NO_MESSAGES = 'Either "prompt" or "messages" must exist and cannot both be none'
MSG_NO_MODEL = "Model not exist."


# json.dumps with non-default options builds a new encoder per call; bodies and stream frames
# are encoded often enough for that to show.
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def dump(body: Any) -> bytes:
    """Compact JSON as the real API sends it, UTF-8 ("replace" only matters for lone
    surrogates echoed from input)."""
    return _ENCODE(body).encode("utf-8", "replace")


def new_request_id(bits: int) -> str:
    """Format 128 random bits in the 8-4-4-4-12 layout real request ids use."""
    h = f"{bits:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _load_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:  # also UnicodeDecodeError
        raise invalid(MSG_BAD_JSON) from None
    if not isinstance(data, dict):
        raise invalid(MSG_BAD_JSON)
    return data


def _model(data: Mapping[str, Any]) -> str:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise invalid(MSG_NO_MODEL)
    return model


def _response_format(value: Any) -> str | None:
    if isinstance(value, dict) and isinstance(value.get("type"), str):
        return value["type"]
    return None


def _json_schema(value: Any) -> dict[str, Any] | None:
    """The schema of a json_schema response_format ({"type": "json_schema", "json_schema": {"schema": ...}})."""
    inner = value.get("json_schema") if isinstance(value, dict) else None
    schema = inner.get("schema") if isinstance(inner, dict) else None
    return schema if isinstance(schema, dict) else None


def _thinking_budget(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _thinking(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def openai_usage(done: Completion) -> dict[str, Any]:
    """The compat usage object, the same in a plain answer and a stream's usage chunk."""
    usage: dict[str, Any] = {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    if done.reasoning is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": done.reasoning_tokens}
    return usage


def native_usage(done: Completion) -> dict[str, Any]:
    """The native usage object, the same in a plain answer and a stream's final frame."""
    usage: dict[str, Any] = {
        "input_tokens": done.prompt_tokens,
        "output_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    if done.reasoning is not None:
        usage["output_tokens_details"] = {"reasoning_tokens": done.reasoning_tokens}
    return usage


class OpenAIDialect:
    """OpenAI-compatible mode: /compatible-mode/v1/chat/completions."""

    name = "openai"

    def parse(self, body: bytes, headers: Mapping[str, str]) -> ChatCall:
        data = _load_object(body)
        model = _model(data)
        if "messages" not in data:
            raise invalid(MSG_NO_MESSAGES)
        messages = check_messages(data["messages"])
        stream = data.get("stream") is True
        options = data.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        max_tokens = data.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = data.get("max_tokens")
        return ChatCall(
            model=model,
            messages=messages,
            max_tokens=check_max_tokens(max_tokens),
            enable_thinking=_thinking(data.get("enable_thinking")),
            thinking_budget=_thinking_budget(data.get("thinking_budget")),
            response_format=_response_format(data.get("response_format")),
            json_schema=_json_schema(data.get("response_format")),
            stream=stream,
            include_usage=stream and include_usage,
            incremental_output=stream,
            n=check_n(data.get("n"), data.get("tools")),
        )

    def sse_requested(self, headers: Mapping[str, str]) -> bool:
        """Compat decides streaming from the body ("stream": true), not from headers."""
        return False

    def success(self, call: ChatCall, done: Completion, rid: str) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": done.content}
        if done.reasoning is not None:
            message["reasoning_content"] = done.reasoning
        usage = openai_usage(done)
        return {
            "choices": [
                {
                    "message": message,
                    "finish_reason": done.finish_reason,
                    "index": index,
                    "logprobs": None,
                }
                for index in range(call.n)  # `n` answers, each the same deterministic text
            ],
            "object": "chat.completion",
            "usage": usage,
            "created": int(time.time()),
            "system_fingerprint": None,
            "model": call.model,
            "id": "chatcmpl-" + rid,
        }

    def error(self, err: ApiError, rid: str) -> tuple[int, dict[str, Any]]:
        spec = ERRORS[err.kind]
        body: dict[str, Any] = {
            "error": {
                "message": spec.compat_message.format(detail=err.detail),
                "type": spec.compat_type,
                "param": None,
                "code": spec.compat_code,
            }
        }
        if spec.compat_has_id:
            body["id"] = "chatcmpl-" + rid
        body["request_id"] = rid
        return spec.status, body


class DashScopeDialect:
    """Native DashScope: /api/v1/services/aigc/{text,multimodal}-generation/generation."""

    name = "dashscope"

    def parse(self, body: bytes, headers: Mapping[str, str]) -> ChatCall:
        data = _load_object(body)
        model = _model(data)
        payload = data.get("input")
        if not isinstance(payload, dict):
            raise invalid(MSG_NO_MESSAGES)
        if "messages" in payload and payload["messages"] is not None:
            messages = check_messages(payload["messages"])
        elif isinstance(payload.get("prompt"), str):
            messages = [{"role": "user", "content": payload["prompt"]}]
        else:
            raise invalid(MSG_NO_MESSAGES)
        stream = self.sse_requested(headers)
        params = data.get("parameters") or {}
        if not isinstance(params, dict):
            raise invalid(ALGO_PREFIX + "'parameters' must be an object")
        result_format = params.get("result_format") or "message"
        if result_format not in ("message", "text"):
            raise invalid(ALGO_PREFIX + "result_format must be 'message' or 'text'")
        return ChatCall(
            model=model,
            messages=messages,
            max_tokens=check_max_tokens(params.get("max_tokens")),
            enable_thinking=_thinking(params.get("enable_thinking")),
            thinking_budget=_thinking_budget(params.get("thinking_budget")),
            response_format=_response_format(params.get("response_format")),
            json_schema=_json_schema(params.get("response_format")),
            result_format=result_format,
            stream=stream,
            incremental_output=stream and params.get("incremental_output") is True,
        )

    def sse_requested(self, headers: Mapping[str, str]) -> bool:
        """The HTTP server decides streaming from headers, not from parameters.stream."""
        if headers.get("X-DashScope-SSE", "").lower() == "enable":
            return True
        return "text/event-stream" in headers.get("Accept", "")

    def success(self, call: ChatCall, done: Completion, rid: str) -> dict[str, Any]:
        usage = native_usage(done)
        if call.result_format == "text":
            output: dict[str, Any] = {"finish_reason": done.finish_reason, "text": done.content}
        else:
            message: dict[str, Any] = {"role": "assistant", "content": done.content}
            if done.reasoning is not None:
                message["reasoning_content"] = done.reasoning
            output = {"choices": [{"finish_reason": done.finish_reason, "message": message}]}
        return {"output": output, "usage": usage, "request_id": rid}

    def error(self, err: ApiError, rid: str) -> tuple[int, dict[str, Any]]:
        spec = ERRORS[err.kind]
        return spec.status, {
            "code": spec.native_code,
            "message": spec.native_message.format(detail=err.detail),
            "request_id": rid,
        }


OPENAI = OpenAIDialect()
DASHSCOPE = DashScopeDialect()
