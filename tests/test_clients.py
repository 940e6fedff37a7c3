"""runner.clients: payloads, success parsing, error classification (API facts 2, 3, 5.2, 10) and ChatClient.

The classification tables (one per dialect) are the most important tests of the project: every row of
the error table in dashscope-api.md section 5.2 that has an HTTP status and a code for the dialect is a
case here, named after its status and code.
"""

from __future__ import annotations

import json
import pickle
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import anyio
import httpx
import pytest

from runner.clients import DIALECTS, ROW_KEY_HEADER, ChatClient, classify_answer
from runner.clients.transport_errors import call_error
from runner.clients import dashscope_native as native
from runner.clients import openai_compat as compat
from runner.clients.classify import parse_error_body, retry_after_seconds
from runner.endpoints import ApiKey
from runner.errors import (AuthError, BadResponse, CallError, NotFound, PermanentCallError, QuotaExhausted, RunnerError,
                           Throttled, TransientCallError)
from runner.records import Completion, Request, Usage
from runner.spec import EndpointSpec

HI = ({"role": "user", "content": "hi"},)


def make_request(model: str = "qwen-plus", params: dict | None = None, key: str = "k0") -> Request:
    return Request(row_id=0, key=key, model=model, messages=HI, params=params or {})


def dumps(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False).encode()


# ---------------------------------------------------------------------------------------------------
# 1. build_payload
# ---------------------------------------------------------------------------------------------------

ALL_PARAMS = {
    "temperature": 0.2,
    "max_tokens": 256,
    "seed": 1234,
    "stop": ["\n\n", "END"],
    "enable_thinking": False,
    "response_format": {"type": "json_object"},
    "top_k": 20,  # a Qwen-only field (extra_body in openai-python)
}


@pytest.mark.parametrize("model, params, expected", [
    pytest.param("qwen-plus", {}, {"model": "qwen-plus", "messages": list(HI)}, id="no-params"),
    pytest.param("qwen-plus", ALL_PARAMS, {"model": "qwen-plus", "messages": list(HI), **ALL_PARAMS},
                 id="all-params-top-level"),
    pytest.param("qwen-max", {"temperature": 0.0},
                 {"model": "qwen-max", "messages": list(HI), "temperature": 0.0}, id="row-model-override"),
])
def test_compat_build_payload(model: str, params: dict, expected: dict) -> None:
    """Compatible mode puts model, messages and every parameter (Qwen extras too) at the top level (facts 2.1)."""
    payload = compat.build_payload(make_request(model, params))
    assert payload == expected
    json.dumps(payload)  # and it is plain JSON


@pytest.mark.parametrize("model, params, expected", [
    pytest.param("qwen-plus", {},
                 {"model": "qwen-plus", "input": {"messages": list(HI)}, "parameters": {"result_format": "message"}},
                 id="no-params"),
    pytest.param("qwen-plus", ALL_PARAMS,
                 {"model": "qwen-plus", "input": {"messages": list(HI)},
                  "parameters": {"result_format": "message", **ALL_PARAMS}}, id="all-params-in-parameters"),
    pytest.param("qwen-max", {"seed": 7},
                 {"model": "qwen-max", "input": {"messages": list(HI)},
                  "parameters": {"result_format": "message", "seed": 7}}, id="row-model-override"),
])
def test_native_build_payload(model: str, params: dict, expected: dict) -> None:
    """Native puts messages in input.messages and parameters (with result_format=message) in parameters (facts 3.1)."""
    payload = native.build_payload(make_request(model, params))
    assert payload == expected
    json.dumps(payload)


def test_dialects_are_named_explicitly() -> None:
    """The dialect name picks the module: openai -> compatible mode, dashscope -> native."""
    assert DIALECTS == {"openai": compat, "dashscope": native}


# ---------------------------------------------------------------------------------------------------
# 2. parse_success
# ---------------------------------------------------------------------------------------------------

# API facts 10.1 A, B, C; 2.6; 2.2 (explicit-cache usage block, wrapped in a 10.1 A-style answer).
COMPAT_A = b'{"choices":[{"message":{"role":"assistant","content":"Paris is the capital of France."},"finish_reason":"stop","index":0,"logprobs":null}],"object":"chat.completion","usage":{"prompt_tokens":25,"completion_tokens":8,"total_tokens":33,"prompt_tokens_details":{"cached_tokens":0}},"created":1764300000,"system_fingerprint":null,"model":"qwen-plus","id":"chatcmpl-3c9d2e71-5a4b-9c8d-b7e6-f5a4b3c2d1e0"}'
COMPAT_A_RID = "3c9d2e71-5a4b-9c8d-b7e6-f5a4b3c2d1e0"
COMPAT_B = b'{"choices":[{"message":{"role":"assistant","content":"Once upon a time, in a"},"finish_reason":"length","index":0,"logprobs":null}],"object":"chat.completion","usage":{"prompt_tokens":18,"completion_tokens":8,"total_tokens":26},"created":1764300001,"system_fingerprint":null,"model":"qwen-flash","id":"chatcmpl-8e7d6c5b-4a39-9281-a0b1-c2d3e4f5a6b7"}'
COMPAT_C = b'{"choices":[{"message":{"role":"assistant","content":"","tool_calls":[{"id":"call_2f1e0d9c8b7a","type":"function","index":0,"function":{"name":"get_weather","arguments":"{\\"city\\": \\"Hangzhou\\"}"}}]},"finish_reason":"tool_calls","index":0,"logprobs":null}],"object":"chat.completion","usage":{"prompt_tokens":210,"completion_tokens":21,"total_tokens":231},"created":1764300002,"system_fingerprint":null,"model":"qwen-plus","id":"chatcmpl-1a2b3c4d-5e6f-9a7b-8c9d-0e1f2a3b4c5d"}'
COMPAT_THINKING = dumps({
    "choices": [{
        "message": {"role": "assistant", "content": "The answer is 42.",
                    "reasoning_content": "The user asks ... so the answer is 42."},
        "finish_reason": "stop", "index": 0, "logprobs": None,
    }],
    "object": "chat.completion",
    "usage": {"prompt_tokens": 30, "completion_tokens": 250, "total_tokens": 280,
              "completion_tokens_details": {"reasoning_tokens": 236},
              "prompt_tokens_details": {"cached_tokens": 0}},
    "created": 1764300000, "system_fingerprint": None,
    "model": "qwen3-max", "id": "chatcmpl-0c0a7d8e-1f3b-9c2a-b0d4-6e5f4a3b2c1d",
})
COMPAT_EXPLICIT_CACHE = dumps({
    "choices": [{"message": {"role": "assistant", "content": "Summary of the cached document."},
                 "finish_reason": "stop", "index": 0, "logprobs": None}],
    "object": "chat.completion",
    "usage": {
        "prompt_tokens": 3019, "completion_tokens": 104, "total_tokens": 3123,
        "prompt_tokens_details": {"cached_tokens": 2048, "cache_type": "ephemeral",
                                  "cache_creation_input_tokens": 0,
                                  "cache_creation": {"ephemeral_5m_input_tokens": 0}, "text_tokens": 3019},
        "completion_tokens_details": {"reasoning_tokens": 0, "text_tokens": 104},
    },
    "created": 1764300003, "system_fingerprint": None, "model": "qwen-plus",
    "id": "chatcmpl-aa11bb22-cc33-9d44-ee55-ff6677889900",
})

# API facts 3.2, 3.3, 10.2 C.
NATIVE_TEXT = b'{"output": {"finish_reason": "stop", "text": "Hello! How can I help you today?"}, "usage": {"total_tokens": 18, "output_tokens": 7, "input_tokens": 11}, "request_id": "db13c38b-e3e7-9b8d-9a9c-7d1b3a4e5f60"}'
NATIVE_MESSAGE = dumps({
    "output": {"choices": [{"finish_reason": "stop", "message": {
        "role": "assistant", "content": "I am Qwen, a large language model created by Alibaba Cloud."}}]},
    "usage": {"input_tokens": 26, "output_tokens": 15, "total_tokens": 41, "prompt_tokens_details": {"cached_tokens": 0}},
    "request_id": "7a4a9c1e-2b3d-9f8e-a1b2-c3d4e5f6a7b8",
})
NATIVE_THINKING = b'{"output":{"choices":[{"finish_reason":"stop","message":{"role":"assistant","content":"Hello!","reasoning_content":"The user greets me, so I greet back."}}]},"usage":{"input_tokens":12,"output_tokens":40,"total_tokens":52,"output_tokens_details":{"reasoning_tokens":37}},"request_id":"1e2f3a4b-5c6d-9e7f-a8b9-c0d1e2f3a4b5"}'


def completion(content, reasoning, finish, usage: tuple, rid: str | None) -> Completion:
    i, o, t, cached, reasoning_tokens = usage
    return Completion(content=content, reasoning=reasoning, finish_reason=finish,
                      usage=Usage(input_tokens=i, output_tokens=o, total_tokens=t, cached_tokens=cached,
                                  reasoning_tokens=reasoning_tokens),
                      request_id=rid, http_status=200)


COMPAT_SUCCESS = [
    pytest.param(COMPAT_A, {"x-request-id": COMPAT_A_RID},
                 completion("Paris is the capital of France.", None, "stop", (25, 8, 33, 0, None), COMPAT_A_RID),
                 id="10.1A-header-rid"),
    pytest.param(COMPAT_A, {},
                 completion("Paris is the capital of France.", None, "stop", (25, 8, 33, 0, None), COMPAT_A_RID),
                 id="10.1A-rid-from-body-id"),
    pytest.param(COMPAT_B, {},
                 completion("Once upon a time, in a", None, "length", (18, 8, 26, None, None),
                            "8e7d6c5b-4a39-9281-a0b1-c2d3e4f5a6b7"), id="10.1B-length"),
    pytest.param(COMPAT_C, {},
                 completion("", None, "tool_calls", (210, 21, 231, None, None),
                            "1a2b3c4d-5e6f-9a7b-8c9d-0e1f2a3b4c5d"), id="10.1C-tool-call-empty-content"),
    pytest.param(COMPAT_THINKING, {},
                 completion("The answer is 42.", "The user asks ... so the answer is 42.", "stop",
                            (30, 250, 280, 0, 236), "0c0a7d8e-1f3b-9c2a-b0d4-6e5f4a3b2c1d"), id="2.6-thinking"),
    pytest.param(COMPAT_EXPLICIT_CACHE, {"x-request-id": "aa11bb22-cc33-9d44-ee55-ff6677889900"},
                 completion("Summary of the cached document.", None, "stop", (3019, 104, 3123, 2048, 0),
                            "aa11bb22-cc33-9d44-ee55-ff6677889900"), id="2.2-explicit-cache-usage"),
    pytest.param(dumps({"choices": [{"message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}),
                 {"x-request-id": "hdr-only-rid"},
                 completion("ok", None, "stop", (1, 1, 2, None, None), "hdr-only-rid"), id="rid-only-in-header"),
    pytest.param(dumps({"choices": [{"message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]}),
                 {}, completion("ok", None, "stop", (None, None, None, None, None), None), id="no-usage-no-rid"),
]


@pytest.mark.parametrize("body, headers, expected", COMPAT_SUCCESS)
def test_compat_parse_success(body: bytes, headers: dict, expected: Completion) -> None:
    """Compatible-mode 200 bodies give content, reasoning, finish_reason, every usage field and the request id."""
    assert compat.parse_success(body, httpx.Headers(headers)) == expected


NATIVE_SUCCESS = [
    pytest.param(NATIVE_TEXT, {},
                 completion("Hello! How can I help you today?", None, "stop", (11, 7, 18, None, None),
                            "db13c38b-e3e7-9b8d-9a9c-7d1b3a4e5f60"), id="3.2-text-format"),
    pytest.param(NATIVE_MESSAGE, {"x-request-id": "7a4a9c1e-2b3d-9f8e-a1b2-c3d4e5f6a7b8"},
                 completion("I am Qwen, a large language model created by Alibaba Cloud.", None, "stop",
                            (26, 15, 41, 0, None), "7a4a9c1e-2b3d-9f8e-a1b2-c3d4e5f6a7b8"),
                 id="3.3-message-format-cached"),
    pytest.param(NATIVE_THINKING, {},
                 completion("Hello!", "The user greets me, so I greet back.", "stop", (12, 40, 52, None, 37),
                            "1e2f3a4b-5c6d-9e7f-a8b9-c0d1e2f3a4b5"), id="10.2C-thinking"),
    pytest.param(dumps({"output": {"choices": [{"finish_reason": "length", "message": {
                     "role": "assistant", "content": "Once upon"}}]},
                        "usage": {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7}}),
                 {"x-request-id": "hdr-only-rid"},
                 completion("Once upon", None, "length", (5, 2, 7, None, None), "hdr-only-rid"),
                 id="rid-only-in-header-length"),
    pytest.param(dumps({"output": {"choices": [{"finish_reason": "null", "message": {
                     "role": "assistant", "content": "I am"}}]},
                        "usage": {"input_tokens": 26, "output_tokens": 2, "total_tokens": 28}, "request_id": "r1"}),
                 {}, completion("I am", None, None, (26, 2, 28, None, None), "r1"), id="string-null-finish-reason"),
]


@pytest.mark.parametrize("body, headers, expected", NATIVE_SUCCESS)
def test_native_parse_success(body: bytes, headers: dict, expected: Completion) -> None:
    """Native 200 bodies (text and message format) give content, reasoning, finish_reason, usage and request_id."""
    assert native.parse_success(body, httpx.Headers(headers)) == expected


@pytest.mark.parametrize("dialect, body", [
    pytest.param(compat, COMPAT_A[: len(COMPAT_A) // 2], id="compat-cut-in-half"),
    pytest.param(compat, b"", id="compat-empty"),
    pytest.param(compat, COMPAT_A[:-1], id="compat-last-brace-missing"),
    pytest.param(native, NATIVE_MESSAGE[: len(NATIVE_MESSAGE) // 2], id="native-cut-in-half"),
    pytest.param(native, b"", id="native-empty"),
    pytest.param(native, b'{"output":{"choices":[{"message":{"content":"caf\xc3', id="native-cut-mid-utf8"),
])
def test_truncated_200_body_is_transient(dialect, body: bytes) -> None:
    """A 200 whose JSON does not parse is a TransientCallError `malformed_body` carrying the header request id."""
    with pytest.raises(CallError) as info:
        dialect.parse_success(body, httpx.Headers({"x-request-id": "rid-cut"}))
    err = info.value
    assert type(err) is TransientCallError
    assert (err.code, err.http_status, err.request_id) == ("malformed_body", 200, "rid-cut")


@pytest.mark.parametrize("dialect, body, rid", [
    pytest.param(compat, b'{"object":"chat.completion","id":"chatcmpl-abc"}', "abc", id="compat-no-choices"),
    pytest.param(compat, b'{"choices":[],"id":"chatcmpl-abc"}', "abc", id="compat-empty-choices"),
    pytest.param(compat, b'{"choices":[null]}', None, id="compat-null-choice"),
    pytest.param(compat, b"[]", None, id="compat-json-array"),
    pytest.param(compat, b"null", None, id="compat-json-null"),
    pytest.param(native, b'{"request_id":"abc"}', "abc", id="native-no-output"),
    pytest.param(native, b'{"output":null,"request_id":"abc"}', "abc", id="native-null-output"),
    pytest.param(native, b'{"output":{},"request_id":"abc"}', "abc", id="native-output-without-text-or-choices"),
    pytest.param(native, b'{"code":"InternalError","message":"x","request_id":"abc"}', "abc",
                 id="native-error-shape-in-200"),
    pytest.param(native, b"[]", None, id="native-json-array"),
    pytest.param(native, b'"text"', None, id="native-json-string"),
])
def test_valid_json_without_answer_is_bad_response(dialect, body: bytes, rid: str | None) -> None:
    """Valid JSON with no choices/output in a 200 is a BadResponse (retried) with code `bad_response`."""
    with pytest.raises(BadResponse) as info:
        dialect.parse_success(body, httpx.Headers({}))
    err = info.value
    assert (err.code, err.http_status, err.request_id) == ("bad_response", 200, rid)


# ---------------------------------------------------------------------------------------------------
# 3. Classification: API facts 5.2, one table per dialect
# ---------------------------------------------------------------------------------------------------

HTML_502 = b"<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center></body></html>"
HTML_504 = b"<html><body><h1>504 Gateway Time-out</h1>The server didn't respond in time.</body></html>"


def _case(case_id: str, status: int, body: bytes, cls: type, code: str | None, message: str | None,
          rid: str | None, headers: dict | None = None):
    return pytest.param(status, body, headers or {}, cls, code, message, rid, id=case_id)


def nat(status: int, code: str, message: str, cls: type, *, rid: str | None = None, suffix: str = ""):
    """A native-shaped error body {"code","message","request_id"} (facts 3.4) and what it must become."""
    rid = rid or f"rid-native-{status}-{code}{suffix}"
    body = dumps({"code": code, "message": message, "request_id": rid})
    return _case(f"{status}-{code}{suffix}", status, body, cls, code, message, rid)


def oai(status: int, code: str, message: str, cls: type, *, type_: str | None = None, rid: str | None = None,
        suffix: str = ""):
    """A compat-shaped error body {"error": {...}, "id", "request_id"} (facts 2.5) and what it must become."""
    rid = rid or f"rid-compat-{status}-{code}{suffix}"
    body = dumps({"error": {"message": message, "type": type_ or code, "param": None, "code": code},
                  "id": f"chatcmpl-{rid}", "request_id": rid})
    return _case(f"{status}-{code}{suffix}", status, body, cls, code, message, rid)


INVALID_PARAMETER_MESSAGES = [
    ("input-length", "Range of input length should be [1, 129024]"),
    ("max-tokens", "Range of max_tokens should be [1, 8192]"),
    ("model-not-exist", "Model not exist."),
    ("incremental-output", 'The incremental_output parameter must be "true" when enable_thinking is true'),
    ("stream-only", "This model only support stream mode, please enable the stream parameter to access the model."),
    ("thinking-non-stream", "parameter.enable_thinking must be set to false for non-streaming calls"),
    ("json-word", "'messages' must contain the word 'json' in some form, to use 'response_format' of type "
                  "'json_object'."),
    ("json-mode-thinking", "Json mode response is not supported when enable_thinking is true"),
    ("thinking-restricted", "The value of the enable_thinking parameter is restricted to True."),
]


def _model_missing_or(name: str) -> type:
    """"Model not exist." is the native API's 400 for an unknown model: a NotFound like the 404s."""
    return NotFound if name == "model-not-exist" else PermanentCallError


INTERNAL_ALGO_MESSAGES = [
    ("during-execution", "An internal error has occurred during execution, please try again later or contact "
                         "service support."),
    ("inference", "Inference internal error."),
    ("rejected", "An error occurred in model serving, error message is: [Request rejected by inference engine!]"),
    ("no-backend", "No backend server available"),
    ("batching", "Receive batching backend response failed!"),
]
DETERMINISTIC_ALGO_MESSAGES = [
    ("bad-tool-json", "Expecting ',' delimiter: line 1 column 57 (char 56)"),
    ("list-index", "list index out of range"),
    ("role-must-be", "Role must be in [user, assistant]"),
]
INTERNAL_ERROR_MESSAGE = "An internal error has occurred, please try again later or contact service support."
MODEL_SERVING_MESSAGE = ("Too many requests. Your requests are being throttled due to system capacity limits. "
                         "Please try again later.")
ALLOCATION_QUOTA_MESSAGE = "Allocated quota exceeded, please increase your quota limit."
RATE_QUOTA_MESSAGE = "Requests rate limit exceeded, please try again later."
BURST_MESSAGE = ("Request rate increased too quickly. To ensure system stability, please adjust your client logic "
                 "to scale requests more smoothly over time.")
ARREARAGE_MESSAGE = "Access denied, please make sure your account is in good standing."

# SSE-framed error bodies on a non-2xx answer (facts 3.5, 10.2 L and M).
NATIVE_10_2_L = (b'id:1\nevent:error\n:HTTP_STATUS/400\n'
                 b'data:{"code":"InvalidParameter","message":"Preprocessor error",'
                 b'"request_id":"0cbe6006-faec-9854-bf8b-c906d75c3bd8"}\n\n')
NATIVE_10_2_M = (b'id:1\nevent:error\n:HTTP_STATUS/400\n'
                 b'data:{"code":"InvalidParameter","message":"<400> InternalError.Algo.InvalidParameter: Range of '
                 b'max_tokens should be [1, 32768]","request_id":"f19efcde-711c-9eff-af2f-e6a09d189750"}\n')
NATIVE_ARREARAGE_SSE = (b'id:1\nevent:error\n:HTTP_STATUS/400\n'
                        b'data:{"code":"Arrearage","message":"' + ARREARAGE_MESSAGE.encode() +
                        b'","request_id":"5b6c7d8e-9f0a-9b1c-d2e3-f4a5b6c7d8e9","type":"Arrearage"}\n\n')

NATIVE_TABLE = [
    # --- 400 ---------------------------------------------------------------------------------------
    *[nat(400, "InvalidParameter", m, _model_missing_or(s), suffix=f"-{s}") for s, m in INVALID_PARAMETER_MESSAGES],
    nat(400, "InvalidParameter", "<400> InternalError.Algo.InvalidParameter: Range of input length should be "
        "[1, 129024]", PermanentCallError, rid="3a4b5c6d-7e8f-9a9b-c0d1-e2f3a4b5c6d7", suffix="-10.2E"),
    _case("400-InvalidParameter-10.2M-sse-framed-json-content-type", 400, NATIVE_10_2_M, PermanentCallError,
          "InvalidParameter", "<400> InternalError.Algo.InvalidParameter: Range of max_tokens should be [1, 32768]",
          "f19efcde-711c-9eff-af2f-e6a09d189750", {"content-type": "application/json"}),
    _case("400-InvalidParameter-10.2L-sse-only-frame", 400, NATIVE_10_2_L, PermanentCallError, "InvalidParameter",
          "Preprocessor error", "0cbe6006-faec-9854-bf8b-c906d75c3bd8",
          {"content-type": "text/event-stream;charset=UTF-8"}),
    nat(400, "InternalError.Algo.InvalidParameter", "Range of input length should be [1, 129024]",
        PermanentCallError),
    nat(400, "InvalidParameter.NotSupportEnableThinking", "The model does not support enable_thinking.",
        PermanentCallError),
    nat(400, "DataInspectionFailed", "Input data may contain inappropriate content.", PermanentCallError,
        suffix="-input"),
    nat(400, "DataInspectionFailed", "Input text data may contain inappropriate content.", PermanentCallError,
        suffix="-input-text"),
    nat(400, "DataInspectionFailed", "Output data may contain inappropriate content.", PermanentCallError,
        suffix="-output"),
    *[nat(400, code, "Input or output data may contain inappropriate content.", PermanentCallError)
      for code in ("FaqRuleBlocked", "CustomRoleBlocked", "IPInfringementSuspect")],
    nat(400, "Arrearage", ARREARAGE_MESSAGE, QuotaExhausted),
    _case("400-Arrearage-sse-framed", 400, NATIVE_ARREARAGE_SSE, QuotaExhausted, "Arrearage", ARREARAGE_MESSAGE,
          None, {"content-type": "application/json"}),
    *[nat(400, f"BadRequest.{sub}", "Required input parameter missing from request.", PermanentCallError)
      for sub in ("EmptyInput", "EmptyParameters", "EmptyModel", "IllegalInput", "InputDownloadFailed",
                  "UnsupportedFileFormat")],
    nat(400, "BadRequest.TooLarge", "Payload Too Large", PermanentCallError),
    nat(413, "BadRequest.TooLarge", "Payload Too Large", PermanentCallError),
    nat(400, "InternalError.Algo", "Missing Content-Length of multimodal url.", PermanentCallError,
        suffix="-multimodal"),
    nat(500, "InternalError.Algo", "Missing Content-Length of multimodal url.", PermanentCallError,
        suffix="-multimodal"),
    # --- 401 ---------------------------------------------------------------------------------------
    nat(401, "InvalidApiKey", "Invalid API-key provided.", AuthError, rid="2f3a4b5c-6d7e-9f8a-b9c0-d1e2f3a4b5c6"),
    nat(401, "InvalidApiKey", "No API-key provided.", AuthError, suffix="-no-key"),
    _case("401-no-code-NOT-AUTHORIZED", 401, b'{"message":"NOT AUTHORIZED","request_id":"rid-401-ws"}', AuthError,
          None, "NOT AUTHORIZED", None),
    # --- 403 ---------------------------------------------------------------------------------------
    nat(403, "AccessDenied", "Access denied.", PermanentCallError),
    nat(403, "AccessDenied", "current user api does not support asynchronous calls", PermanentCallError,
        suffix="-async"),
    nat(403, "AccessDenied", "current user api does not support synchronous calls", PermanentCallError,
        suffix="-sync"),
    nat(403, "AccessDenied.Unpurchased", "Access to model denied. Please make sure you are eligible for using the "
        "model.", PermanentCallError),
    nat(403, "Model.AccessDenied", "Model access denied.", PermanentCallError),
    nat(403, "App.AccessDenied", "App access denied.", PermanentCallError),
    nat(403, "Workspace.AccessDenied", "Workspace access denied.", AuthError),
    nat(403, "AllocationQuota.FreeTierOnly", "The free tier of the model has been exhausted.", QuotaExhausted),
    # --- 404 ---------------------------------------------------------------------------------------
    nat(404, "ModelNotFound", "Model can not be found.", NotFound),
    nat(404, "ModelNotFound", "The provided model qwen-foo is not supported by the Batch API.", NotFound,
        suffix="-batch"),
    nat(404, "WorkSpaceNotFound", "WorkSpace can not be found.", AuthError),
    nat(404, "NotFound", "Not found!", NotFound),
    # --- 408 / 500 RequestTimeOut ---------------------------------------------------------------------
    nat(408, "RequestTimeOut", "Request timed out, please try again later.", TransientCallError),
    nat(500, "RequestTimeOut", "Response timeout!", TransientCallError),
    # --- 429 ---------------------------------------------------------------------------------------
    nat(429, "Throttling", "Requests throttling triggered.", Throttled),
    nat(429, "Throttling.RateQuota", RATE_QUOTA_MESSAGE, Throttled, rid="6d7e8f9a-0b1c-9d2e-f3a4-b5c6d7e8f9a0"),
    nat(429, "LimitRequests", RATE_QUOTA_MESSAGE, Throttled),
    nat(429, "ResourceExhausted", RATE_QUOTA_MESSAGE, Throttled),
    nat(429, "Throttling.BurstRate", BURST_MESSAGE, Throttled),
    nat(429, "Throttling.AllocationQuota", ALLOCATION_QUOTA_MESSAGE, Throttled,
        rid="7e8f9a0b-1c2d-9e3f-a4b5-c6d7e8f9a0b1", suffix="-tpm"),
    nat(429, "Throttling.AllocationQuota", "Free allocated quota exceeded.", QuotaExhausted, suffix="-free"),
    nat(429, "Throttling.AllocationQuota", "Too many requests. Batch requests are being throttled due to system "
        "capacity limits. Please try again later.", Throttled, suffix="-batch"),
    nat(429, "Throttling.Concurrency", "Too many concurrent requests.", Throttled),
    nat(429, "CommodityNotPurchased", "Commodity has not purchased yet.", QuotaExhausted),
    nat(429, "PrepaidBillOverdue", "The prepaid bill is overdue.", QuotaExhausted),
    nat(429, "PostpaidBillOverdue", "The postpaid bill is overdue.", QuotaExhausted),
    # --- 500 / 503 ---------------------------------------------------------------------------------
    nat(500, "InternalError", INTERNAL_ERROR_MESSAGE, TransientCallError),
    nat(500, "InternalError", INTERNAL_ERROR_MESSAGE.replace("occurred", "occured"), TransientCallError,
        suffix="-old-spelling"),
    *[nat(500, "InternalError.Algo", m, TransientCallError, suffix=f"-{s}") for s, m in INTERNAL_ALGO_MESSAGES],
    *[nat(500, "InternalError.Algo", m, PermanentCallError, suffix=f"-deterministic-{s}")
      for s, m in DETERMINISTIC_ALGO_MESSAGES],
    nat(500, "InternalError.Timeout", "An internal timeout error has occurred during execution, please try again "
        "later or contact service support.", TransientCallError),
    nat(500, "SystemError", "A system error has occurred, please try again later.", TransientCallError),
    nat(500, "ModelServiceFailed", "Failed to request model service.", TransientCallError),
    nat(500, "ModelServingError", MODEL_SERVING_MESSAGE, Throttled),
    nat(503, "ModelServingError", MODEL_SERVING_MESSAGE, Throttled),
    nat(503, "ModelUnavailable", "Model is unavailable, please try again later.", TransientCallError),
    # --- gateway answers without a code ----------------------------------------------------------------
    _case("502-gateway-html", 502, HTML_502, TransientCallError, None, None, "rid-gw-502",
          {"x-request-id": "rid-gw-502", "content-type": "text/html"}),
    _case("503-gateway-empty", 503, b"", TransientCallError, None, None, None),
    _case("504-gateway-html", 504, HTML_504, TransientCallError, None, None, None),
    _case("504-gateway-empty", 504, b"", TransientCallError, None, None, "rid-gw-504", {"x-request-id": "rid-gw-504"}),
    # --- request id from the header when the body has none ----------------------------------------------
    _case("429-Throttling.RateQuota-rid-from-header", 429,
          b'{"code":"Throttling.RateQuota","message":"' + RATE_QUOTA_MESSAGE.encode() + b'"}', Throttled,
          "Throttling.RateQuota", RATE_QUOTA_MESSAGE, "rid-hdr-429", {"x-request-id": "rid-hdr-429"}),
    _case("400-InvalidParameter-msg-field", 400,
          b'{"code":"InvalidParameter","msg":"Model not exist.","request_id":"rid-msg"}', NotFound,
          "InvalidParameter", "Model not exist.", "rid-msg"),
]

COMPAT_10_1_D = (b'{"error":{"message":"Incorrect API key provided. For details, see: https://www.alibabacloud.com/'
                 b'help/en/model-studio/error-code#apikey-error","type":"invalid_request_error","param":null,'
                 b'"code":"invalid_api_key"},"request_id":"b02e047c-ca07-98df-ae99-d211d0990216"}')
COMPAT_10_1_E = (b'{"error":{"message":"<400> InternalError.Algo.InvalidParameter: Range of input length should be '
                 b'[1, 258048]","type":"invalid_request_error","param":null,"code":"invalid_parameter_error"},'
                 b'"id":"chatcmpl-c1164b2a-7d3e-9f10-8a2b-3c4d5e6f7a8b","request_id":"c1164b2a-7d3e-9f10-8a2b-3c4d5e6f7a8b"}')
COMPAT_10_1_F = (b'{"error":{"code":"data_inspection_failed","param":null,"message":"Input text data may contain '
                 b'inappropriate content.","type":"data_inspection_failed"},"id":"chatcmpl-9f8e7d6c-5b4a-9382-a1b0-'
                 b'c9d8e7f6a5b4","request_id":"9f8e7d6c-5b4a-9382-a1b0-c9d8e7f6a5b4"}')
COMPAT_10_1_G = (b'{"error":{"message":"You exceeded your current requests list.","type":"limit_requests","param":null,'
                 b'"code":"limit_requests"},"id":"chatcmpl-4d5e6f7a-8b9c-9d0e-a1f2-b3c4d5e6f7a8","request_id":'
                 b'"4d5e6f7a-8b9c-9d0e-a1f2-b3c4d5e6f7a8"}')
COMPAT_10_1_H = (b'{"error":{"message":"' + BURST_MESSAGE.encode() + b'","type":"limit_burst_rate","param":null,'
                 b'"code":"limit_burst_rate"},"id":"chatcmpl-5e6f7a8b-9c0d-9e1f-a2b3-c4d5e6f7a8b9","request_id":'
                 b'"5e6f7a8b-9c0d-9e1f-a2b3-c4d5e6f7a8b9"}')
COMPAT_10_1_I = (b'{"error":{"message":"You exceeded your current quota, please check your plan and billing details.",'
                 b'"type":"insufficient_quota","param":null,"code":"insufficient_quota"},"id":"chatcmpl-6f7a8b9c-0d1e-'
                 b'9f2a-b3c4-d5e6f7a8b9c0","request_id":"6f7a8b9c-0d1e-9f2a-b3c4-d5e6f7a8b9c0"}')
COMPAT_10_1_J = (b'{"error":{"message":"The model `qwen-plux` does not exist or you do not have access to it.",'
                 b'"type":"invalid_request_error","param":null,"code":"model_not_found"},"request_id":'
                 b'"7a8b9c0d-1e2f-9a3b-c4d5-e6f7a8b9c0d1"}')
COMPAT_10_1_K = (b'{"error":{"message":"' + INTERNAL_ERROR_MESSAGE.encode() + b'","type":"internal_error",'
                 b'"param":null,"code":"internal_error"},"id":"chatcmpl-8b9c0d1e-2f3a-9b4c-d5e6-f7a8b9c0d1e2",'
                 b'"request_id":"8b9c0d1e-2f3a-9b4c-d5e6-f7a8b9c0d1e2"}')
COMPAT_10_1_L = (b'{"error":{"code":"Arrearage","param":null,"message":"' + ARREARAGE_MESSAGE.encode() +
                 b'","type":"Arrearage"},"id":"chatcmpl-9c0d1e2f-3a4b-9c5d-e6f7-a8b9c0d1e2f3","request_id":'
                 b'"9c0d1e2f-3a4b-9c5d-e6f7-a8b9c0d1e2f3"}')
# Facts 2.4: content moderation with stream=true, HTTP 400 whose body is one `data: {"error":{...}}` line.
COMPAT_STREAM_ERROR = (b'data: {"error":{"code":"data_inspection_failed","param":null,"message":"Output data may '
                       b'contain inappropriate content.","type":"data_inspection_failed"},"id":"chatcmpl-aa0b1c2d-'
                       b'3e4f-9a5b-c6d7-e8f9a0b1c2d3","request_id":"aa0b1c2d-3e4f-9a5b-c6d7-e8f9a0b1c2d3"}\n\n')
TPM_MESSAGE = "You exceeded your current quota, please check your plan and billing details."

COMPAT_TABLE = [
    # --- 400 ---------------------------------------------------------------------------------------
    *[oai(400, "invalid_parameter_error", m, _model_missing_or(s), type_="invalid_request_error", suffix=f"-{s}")
      for s, m in INVALID_PARAMETER_MESSAGES],
    _case("400-invalid_parameter_error-10.1E-native-code-in-message", 400, COMPAT_10_1_E, PermanentCallError,
          "invalid_parameter_error", "<400> InternalError.Algo.InvalidParameter: Range of input length should be "
          "[1, 258048]", "c1164b2a-7d3e-9f10-8a2b-3c4d5e6f7a8b"),
    oai(400, "invalid_parameter_error", "<400> InternalError.Algo.InvalidParameter: The model does not support "
        "enable_thinking.", PermanentCallError, type_="invalid_request_error", suffix="-not-support-thinking"),
    _case("400-data_inspection_failed-10.1F", 400, COMPAT_10_1_F, PermanentCallError, "data_inspection_failed",
          "Input text data may contain inappropriate content.", "9f8e7d6c-5b4a-9382-a1b0-c9d8e7f6a5b4"),
    oai(400, "data_inspection_failed", "Input data may contain inappropriate content.", PermanentCallError,
        suffix="-input"),
    _case("400-data_inspection_failed-stream-data-line", 400, COMPAT_STREAM_ERROR, PermanentCallError,
          "data_inspection_failed", "Output data may contain inappropriate content.",
          "aa0b1c2d-3e4f-9a5b-c6d7-e8f9a0b1c2d3", {"content-type": "text/event-stream;charset=UTF-8"}),
    _case("400-Arrearage-10.1L", 400, COMPAT_10_1_L, QuotaExhausted, "Arrearage", ARREARAGE_MESSAGE, None),
    oai(400, "invalid_value", "seed should be in [0, 2^31-1]", PermanentCallError, type_="invalid_request_error"),
    # --- 401 ---------------------------------------------------------------------------------------
    _case("401-invalid_api_key-10.1D", 401, COMPAT_10_1_D, AuthError, "invalid_api_key",
          "Incorrect API key provided. For details, see: https://www.alibabacloud.com/help/en/model-studio/"
          "error-code#apikey-error", None),
    _case("401-no-code-NOT-AUTHORIZED", 401,
          b'{"error":{"message":"NOT AUTHORIZED","type":"invalid_request_error","param":null,"code":null},'
          b'"request_id":"rid-401-ws"}', AuthError, None, "NOT AUTHORIZED", None),
    _case("429-no-code-type-invalid_request_error", 429,
          b'{"error":{"message":"' + TPM_MESSAGE.encode() + b'","type":"invalid_request_error","param":null,'
          b'"code":null},"request_id":"rid-429-type"}', Throttled, "invalid_request_error", TPM_MESSAGE,
          "rid-429-type"),
    # --- 403 / 404 ---------------------------------------------------------------------------------
    oai(403, "access_denied", "Access denied.", PermanentCallError),
    _case("404-model_not_found-10.1J", 404, COMPAT_10_1_J, NotFound, "model_not_found",
          "The model `qwen-plux` does not exist or you do not have access to it.",
          "7a8b9c0d-1e2f-9a3b-c4d5-e6f7a8b9c0d1"),
    oai(404, "model_not_supported", "Unsupported model `qwen-foo` for OpenAI compatibility mode.", NotFound,
        type_="invalid_request_error"),
    # --- 429 ---------------------------------------------------------------------------------------
    _case("429-limit_requests-10.1G", 429, COMPAT_10_1_G, Throttled, "limit_requests",
          "You exceeded your current requests list.", "4d5e6f7a-8b9c-9d0e-a1f2-b3c4d5e6f7a8"),
    _case("429-limit_burst_rate-10.1H", 429, COMPAT_10_1_H, Throttled, "limit_burst_rate", BURST_MESSAGE,
          "5e6f7a8b-9c0d-9e1f-a2b3-c4d5e6f7a8b9"),
    _case("429-insufficient_quota-10.1I-tpm", 429, COMPAT_10_1_I, Throttled, "insufficient_quota", TPM_MESSAGE,
          "6f7a8b9c-0d1e-9f2a-b3c4-d5e6f7a8b9c0"),
    oai(429, "insufficient_quota", TPM_MESSAGE, Throttled, type_="invalid_request_error", suffix="-tpm-type-invalid"),
    oai(429, "insufficient_quota", "Free allocated quota exceeded.", QuotaExhausted, suffix="-free"),
    oai(429, "insufficient_quota", "Workspace allocated quota exceeded, please increase your quota limit.", Throttled,
        suffix="-workspace"),
    # --- 500 ---------------------------------------------------------------------------------------
    _case("500-internal_error-10.1K", 500, COMPAT_10_1_K, TransientCallError, "internal_error",
          INTERNAL_ERROR_MESSAGE, "8b9c0d1e-2f3a-9b4c-d5e6-f7a8b9c0d1e2"),
    *[oai(500, "internal_error", m, TransientCallError, suffix=f"-algo-{s}") for s, m in INTERNAL_ALGO_MESSAGES],
    *[oai(500, "internal_error", m, PermanentCallError, suffix=f"-deterministic-{s}")
      for s, m in DETERMINISTIC_ALGO_MESSAGES],
    # --- native codes that reach a compat body (facts 2.5: type and code often keep the native word) ------
    oai(429, "PrepaidBillOverdue", "The prepaid bill is overdue.", QuotaExhausted),
    oai(429, "PostpaidBillOverdue", "The postpaid bill is overdue.", QuotaExhausted),
    oai(429, "CommodityNotPurchased", "Commodity has not purchased yet.", QuotaExhausted),
    oai(403, "AllocationQuota.FreeTierOnly", "The free tier of the model has been exhausted.", QuotaExhausted),
    oai(403, "Workspace.AccessDenied", "Workspace access denied.", AuthError),
    oai(404, "WorkSpaceNotFound", "WorkSpace can not be found.", AuthError),
    oai(429, "Throttling.Concurrency", "Too many concurrent requests.", Throttled),
    oai(500, "ModelServingError", MODEL_SERVING_MESSAGE, Throttled),
    oai(503, "ModelServingError", MODEL_SERVING_MESSAGE, Throttled),
    oai(503, "ModelUnavailable", "Model is unavailable, please try again later.", TransientCallError),
    oai(500, "SystemError", "A system error has occurred, please try again later.", TransientCallError),
    oai(500, "ModelServiceFailed", "Failed to request model service.", TransientCallError),
    oai(408, "RequestTimeOut", "Request timed out, please try again later.", TransientCallError),
    oai(500, "RequestTimeOut", "Response timeout!", TransientCallError),
    # --- gateway answers without a code ----------------------------------------------------------------
    _case("502-gateway-html", 502, HTML_502, TransientCallError, None, None, "rid-gw-502",
          {"x-request-id": "rid-gw-502", "content-type": "text/html"}),
    _case("503-gateway-empty", 503, b"", TransientCallError, None, None, None),
    _case("504-gateway-html", 504, HTML_504, TransientCallError, None, None, None),
    _case("504-gateway-empty", 504, b"", TransientCallError, None, None, "rid-gw-504", {"x-request-id": "rid-gw-504"}),
    # --- where the request id comes from ----------------------------------------------------------------
    _case("429-limit_requests-rid-from-header", 429,
          b'{"error":{"message":"You exceeded your current requests list.","type":"limit_requests","param":null,'
          b'"code":"limit_requests"}}', Throttled, "limit_requests", "You exceeded your current requests list.",
          "rid-hdr-429", {"x-request-id": "rid-hdr-429"}),
    _case("500-internal_error-rid-from-body-id-only", 500,
          b'{"error":{"message":"' + INTERNAL_ERROR_MESSAGE.encode() + b'","type":"internal_error","param":null,'
          b'"code":"internal_error"},"id":"chatcmpl-0f1e2d3c"}', TransientCallError, "internal_error",
          INTERNAL_ERROR_MESSAGE, "0f1e2d3c"),
]


def check_classified(err: Exception, cls: type, code: str | None, message: str | None, rid: str | None,
                     status: int) -> None:
    assert type(err) is cls, f"{type(err).__name__}: {err}"
    if issubclass(cls, RunnerError):
        # Run-level: the provider's code and message are in the text; the hint says what to do.
        if code:
            assert code in err.message
        if message:
            assert message in err.message
        assert err.hint
        return
    assert isinstance(err, CallError)
    assert err.code == code
    assert err.http_status == status
    assert err.request_id == rid
    if message is not None:
        assert err.message == message
        assert str(err) == message
    else:
        assert err.message  # a gateway answer still says something (a body snippet or "HTTP 502")


@pytest.mark.parametrize("status, body, headers, cls, code, message, rid", NATIVE_TABLE)
def test_native_classification(status, body, headers, cls, code, message, rid) -> None:
    """Each native (status, code, message) of facts 5.2 becomes the right error with code, status, request id, message."""
    err = classify_answer(native, status, body, httpx.Headers(headers))
    check_classified(err, cls, code, message, rid, status)


@pytest.mark.parametrize("status, body, headers, cls, code, message, rid", COMPAT_TABLE)
def test_compat_classification(status, body, headers, cls, code, message, rid) -> None:
    """Each compat (status, code, message) of facts 5.2 becomes the right error with code, status, request id, message."""
    err = classify_answer(compat, status, body, httpx.Headers(headers))
    check_classified(err, cls, code, message, rid, status)


@pytest.mark.parametrize("status, expected", [
    pytest.param(502, TransientCallError, id="502"),
    pytest.param(503, TransientCallError, id="503"),
    pytest.param(504, TransientCallError, id="504"),
    pytest.param(429, Throttled, id="429"),
    pytest.param(401, AuthError, id="401"),
    pytest.param(400, PermanentCallError, id="400"),
    pytest.param(404, NotFound, id="404"),
    pytest.param(408, TransientCallError, id="408"),
])
@pytest.mark.parametrize("dialect", [compat, native], ids=["compat", "native"])
def test_status_decides_when_body_has_no_code(dialect, status: int, expected: type) -> None:
    """Without a body code, the status decides: 401 auth, 429 throttled, 408/5xx transient, other 4xx permanent."""
    err = classify_answer(dialect, status, b"<html>upstream said no</html>", httpx.Headers({}))
    assert type(err) is expected
    if isinstance(err, CallError):
        assert err.message == "<html>upstream said no</html>"


@pytest.mark.parametrize("body, expected", [
    pytest.param(b'{"code":"X","message":"m"}', {"code": "X", "message": "m"}, id="json-object"),
    pytest.param(NATIVE_10_2_M, json.loads(NATIVE_10_2_M.split(b"data:", 1)[1]), id="native-sse-framed"),
    pytest.param(COMPAT_STREAM_ERROR, json.loads(COMPAT_STREAM_ERROR[5:]), id="compat-data-line"),
    pytest.param(HTML_502, None, id="html"),
    pytest.param(b"", None, id="empty"),
    pytest.param(b"[1, 2]", None, id="json-array"),
    pytest.param(b"data: [DONE]\n", None, id="data-not-json"),
])
def test_parse_error_body(body: bytes, expected: dict | None) -> None:
    """The error JSON object is found in a plain body or in the first SSE `data:` line; anything else is None."""
    assert parse_error_body(body) == expected


def test_auth_hint_names_the_region() -> None:
    """An AuthError's hint names where the key was used, so a wrong-region key is easy to spot."""
    err = classify_answer(native, 401, b'{"code":"InvalidApiKey","message":"Invalid API-key provided."}',
                          httpx.Headers({}), region_hint="region singapore")
    assert isinstance(err, AuthError) and "region singapore" in err.hint


# ---------------------------------------------------------------------------------------------------
# 4. Retry-After
# ---------------------------------------------------------------------------------------------------

HTTP_DATE = "Wed, 21 Oct 2026 07:28:00 GMT"
HTTP_DATE_TS = parsedate_to_datetime(HTTP_DATE).timestamp()


@pytest.mark.parametrize("headers, now, expected", [
    pytest.param({"Retry-After": "7"}, None, 7.0, id="seconds"),
    pytest.param({"Retry-After": "1.5"}, None, 1.5, id="fractional-seconds"),
    pytest.param({"Retry-After": "0"}, None, 0.0, id="zero"),
    pytest.param({"Retry-After": "-3"}, None, 0.0, id="negative-clamped"),
    pytest.param({"Retry-After": HTTP_DATE}, HTTP_DATE_TS - 30, 30.0, id="http-date-future"),
    pytest.param({"Retry-After": HTTP_DATE}, HTTP_DATE_TS + 30, 0.0, id="http-date-past"),
    pytest.param({"retry-after-ms": "250"}, None, 0.25, id="retry-after-ms"),
    pytest.param({"retry-after-ms": "250", "Retry-After": "9"}, None, 0.25, id="ms-wins"),
    pytest.param({"retry-after-ms": "junk", "Retry-After": "9"}, None, 9.0, id="bad-ms-falls-back"),
    pytest.param({"Retry-After": "soon"}, None, None, id="garbage"),
    pytest.param({"Retry-After": ""}, None, None, id="empty"),
    pytest.param({"retry-after-ms": "junk"}, None, None, id="garbage-ms-only"),
    pytest.param({}, None, None, id="absent"),
])
def test_retry_after_seconds(headers: dict, now: float | None, expected: float | None) -> None:
    """Retry-After as seconds or HTTP date (relative to `now`), or retry-after-ms; None when absent or unreadable."""
    assert retry_after_seconds(httpx.Headers(headers), now=now) == expected


def test_retry_after_http_date_without_now_is_relative_to_the_clock() -> None:
    """An HTTP date far in the past gives 0 with the real clock (no `now` injected)."""
    assert retry_after_seconds(httpx.Headers({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0


@pytest.mark.parametrize("headers, expected", [
    pytest.param({"Retry-After": "3"}, 3.0, id="retry-after"),
    pytest.param({"retry-after-ms": "1500"}, 1.5, id="retry-after-ms"),
    pytest.param({}, None, id="none"),
])
@pytest.mark.parametrize("dialect, body", [
    pytest.param(native, dumps({"code": "Throttling.RateQuota", "message": RATE_QUOTA_MESSAGE}), id="native"),
    pytest.param(compat, COMPAT_10_1_G, id="compat"),
])
def test_throttled_carries_retry_after(dialect, body: bytes, headers: dict, expected: float | None) -> None:
    """A 429 with a Retry-After header gives Throttled.retry_after in seconds; without one, None."""
    err = classify_answer(dialect, 429, body, httpx.Headers(headers))
    assert type(err) is Throttled
    assert err.retry_after == expected


# ---------------------------------------------------------------------------------------------------
# 5. The key never shows
# ---------------------------------------------------------------------------------------------------

CANARY = "sk-canary-7f3e9a1b2c4d6e8f0a1b2c3d4e5f6a7b"


@pytest.mark.parametrize("dialect, base, status, body, cls", [
    pytest.param("openai", "/compatible-mode/v1", 401, COMPAT_10_1_D, AuthError, id="compat-401"),
    pytest.param("dashscope", "/api/v1", 401, b'{"code":"InvalidApiKey","message":"Invalid API-key provided."}',
                 AuthError, id="native-401"),
    pytest.param("openai", "/compatible-mode/v1", 400, COMPAT_10_1_L, QuotaExhausted, id="compat-arrearage"),
    pytest.param("dashscope", "/api/v1", 429, b'{"code":"PrepaidBillOverdue","message":"The prepaid bill is overdue."}',
                 QuotaExhausted, id="native-overdue"),
])
def test_run_level_errors_never_show_the_key(dialect: str, base: str, status: int, body: bytes, cls: type) -> None:
    """AuthError / QuotaExhausted from a real client call never contain the bearer token, nor does the client's repr."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["authorization"])
        return httpx.Response(status, content=body, headers={"content-type": "application/json"})

    spec = EndpointSpec(dialect=dialect, base_url=f"http://127.0.0.1:9{base}", transport="httpx")
    client = ChatClient(spec, ApiKey(CANARY), max_connections=4, transport=httpx.MockTransport(handler))

    async def main() -> Exception:
        async with client:
            with pytest.raises(cls) as info:
                await client.complete(make_request())
            return info.value

    err = anyio.run(main)
    assert seen == [f"Bearer {CANARY}"]  # the key was really sent
    for text in (str(err), repr(err), err.message, err.hint or "", repr(client), str(client), *map(str, err.args)):
        assert CANARY not in text
        assert CANARY[3:] not in text


def test_api_key_hides_itself() -> None:
    """ApiKey's repr, str, format and f-strings show a mask; pickling is refused; reveal() gives the value."""
    key = ApiKey(CANARY)
    for text in (repr(key), str(key), f"{key}", f"{key!r}", f"{key!s}", f"{key:>60}", "%s" % key, "%r" % (key,),
                 repr([key]), repr({"k": key})):
        assert CANARY not in text
    assert key.reveal() == CANARY
    with pytest.raises(TypeError):
        pickle.dumps(key)


# ---------------------------------------------------------------------------------------------------
# 6. ChatClient over httpx.MockTransport
# ---------------------------------------------------------------------------------------------------

BASES = {"openai": "http://127.0.0.1:9/compatible-mode/v1", "dashscope": "http://127.0.0.1:9/api/v1"}
SUCCESS = {"openai": (COMPAT_A, "Paris is the capital of France."),
           "dashscope": (NATIVE_MESSAGE, "I am Qwen, a large language model created by Alibaba Cloud.")}


def run_client(dialect: str, handler, request: Request, *, workspace: str | None = None,
               key: str = "sk-test") -> Completion:
    """Send one request through a ChatClient whose transport is `handler`; return the Completion or raise."""
    spec = EndpointSpec(dialect=dialect, base_url=BASES[dialect], workspace=workspace, transport="httpx")

    async def main() -> Completion:
        async with ChatClient(spec, ApiKey(key), max_connections=4, transport=httpx.MockTransport(handler)) as client:
            return await client.complete(request)

    return anyio.run(main)


@pytest.mark.parametrize("dialect, url", [
    pytest.param("openai", "http://127.0.0.1:9/compatible-mode/v1/chat/completions", id="compat"),
    pytest.param("dashscope", "http://127.0.0.1:9/api/v1/services/aigc/text-generation/generation", id="native"),
])
@pytest.mark.parametrize("workspace", [None, "ws-1234"], ids=["no-workspace", "workspace"])
def test_client_sends_to_dialect_url_with_headers(dialect: str, url: str, workspace: str | None) -> None:
    """A request goes to the dialect's URL as the dialect's JSON, with Bearer auth, the row key, and the workspace only if set."""
    captured: list[httpx.Request] = []
    body, content = SUCCESS[dialect]

    def handler(request: httpx.Request) -> httpx.Response:
        captured.append(request)
        return httpx.Response(200, content=body, headers={"x-request-id": "rid-ok"})

    request = make_request("qwen-max", {"temperature": 0.2, "enable_thinking": False}, key="row-17")
    result = run_client(dialect, handler, request, workspace=workspace)

    (sent,) = captured
    assert sent.method == "POST"
    assert str(sent.url) == url
    assert sent.headers["authorization"] == "Bearer sk-test"
    assert sent.headers[ROW_KEY_HEADER] == "row-17"
    assert sent.headers["content-type"] == "application/json"
    if workspace:
        assert sent.headers["x-dashscope-workspace"] == workspace
    else:
        assert "x-dashscope-workspace" not in sent.headers
    assert json.loads(sent.content) == DIALECTS[dialect].build_payload(request)
    assert result.content == content
    assert result.http_status == 200


def test_client_percent_encodes_non_ascii_row_key() -> None:
    """A non-ASCII row key is sent percent-encoded so it fits in an HTTP header."""
    captured: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        captured.append(request)
        return httpx.Response(200, content=COMPAT_A)

    run_client("openai", handler, make_request(key="行 1/é"))
    assert captured[0].headers[ROW_KEY_HEADER] == "%E8%A1%8C%201%2F%C3%A9"


@pytest.mark.parametrize("exc_type, code", [
    pytest.param(httpx.ReadTimeout, "timeout", id="read-timeout"),
    pytest.param(httpx.ConnectTimeout, "timeout", id="connect-timeout"),
    pytest.param(httpx.PoolTimeout, "timeout", id="pool-timeout"),
    pytest.param(httpx.ConnectError, "connection_error", id="connect-error"),
    pytest.param(httpx.ReadError, "connection_error", id="read-error"),
    pytest.param(httpx.RemoteProtocolError, "protocol_error", id="remote-protocol-error"),
])
@pytest.mark.parametrize("dialect", ["openai", "dashscope"])
def test_client_transport_failures_are_transient(dialect: str, exc_type: type, code: str) -> None:
    """A timeout raised by the transport becomes TransientCallError `timeout`; a failed connection `connection_error`;
    a broken answer `protocol_error`."""
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type("boom", request=request)

    with pytest.raises(CallError) as info:
        run_client(dialect, handler, make_request())
    err = info.value
    assert type(err) is TransientCallError
    assert err.code == code
    assert isinstance(err.__cause__, exc_type)


@pytest.mark.parametrize("exc, code", [
    pytest.param(httpx.ReadTimeout("x"), "timeout", id="plain-read-timeout"),
    pytest.param(httpx.ConnectError("refused"), "connection_error", id="plain-connect-error"),
    pytest.param((httpx.ReadTimeout, aiohttp.SocketTimeoutError("read")), "timeout", id="aiohttp-socket-timeout"),
    pytest.param((httpx.ConnectTimeout, aiohttp.ConnectionTimeoutError("connect")), "timeout",
                 id="aiohttp-connect-timeout"),
    pytest.param((httpx.ConnectTimeout, aiohttp.ServerDisconnectedError()), "connection_error",
                 id="aiohttp-disconnected-mapped-to-connect-timeout"),
    pytest.param((httpx.ConnectTimeout, aiohttp.ClientOSError(104, "Connection reset by peer")), "connection_error",
                 id="aiohttp-reset-mapped-to-connect-timeout"),
])
def test_transport_error_mapping(exc, code: str) -> None:
    """call_error tells a timeout from a failed connection, by the aiohttp cause when there is one."""
    if isinstance(exc, tuple):
        outer, cause = exc
        exc = outer(str(cause))
        exc.__cause__ = cause
    err = call_error(exc)
    assert type(err) is TransientCallError
    assert err.code == code
    assert err.message


@pytest.mark.parametrize("params", [
    pytest.param({"stop": {"a", "b"}}, id="set"),
    pytest.param({"seed": object()}, id="object"),
])
@pytest.mark.parametrize("dialect", ["openai", "dashscope"])
def test_client_unencodable_request_is_permanent(dialect: str, params: dict) -> None:
    """A parameter that JSON cannot encode becomes PermanentCallError `unencodable_request`, and nothing is sent."""
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200, content=COMPAT_A)

    with pytest.raises(PermanentCallError) as info:
        run_client(dialect, handler, make_request(params=params))
    assert type(info.value) is PermanentCallError
    assert info.value.code == "unencodable_request"
    assert calls == []


@pytest.mark.parametrize("dialect, status, body, headers, cls, code", [
    pytest.param("openai", 429, COMPAT_10_1_G, {"Retry-After": "4"}, Throttled, "limit_requests", id="compat-429"),
    pytest.param("dashscope", 429, dumps({"code": "Throttling.RateQuota", "message": RATE_QUOTA_MESSAGE}),
                 {"Retry-After": "4", "x-request-id": "rid-hdr"}, Throttled, "Throttling.RateQuota", id="native-429"),
    pytest.param("dashscope", 400, NATIVE_10_2_M, {"content-type": "application/json"}, PermanentCallError,
                 "InvalidParameter", id="native-400-sse-framed"),
    pytest.param("openai", 500, COMPAT_10_1_K, {}, TransientCallError, "internal_error", id="compat-500"),
    pytest.param("openai", 502, HTML_502, {"content-type": "text/html", "x-request-id": "rid-gw"}, TransientCallError,
                 None, id="compat-502-html"),
])
def test_client_raises_classified_errors(dialect: str, status: int, body: bytes, headers: dict, cls: type,
                                         code: str | None) -> None:
    """A non-2xx answer through the client raises the classified CallError with its status, code and Retry-After."""
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body, headers=headers)

    with pytest.raises(CallError) as info:
        run_client(dialect, handler, make_request())
    err = info.value
    assert type(err) is cls
    assert (err.code, err.http_status) == (code, status)
    assert err.request_id
    if cls is Throttled:
        assert err.retry_after == 4.0


def test_client_auth_error_hint_names_the_host() -> None:
    """An AuthError from a client with a base_url names that host in its hint."""
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, content=COMPAT_10_1_D)

    with pytest.raises(AuthError) as info:
        run_client("openai", handler, make_request())
    assert "127.0.0.1:9" in info.value.hint


@pytest.mark.parametrize("status,code", [(429, None), (429, "Throttling.SomethingNew"), (429, "insufficient_quota")])
def test_free_quota_message_is_quota_exhausted_however_throttling_was_recognised(status, code):
    """'Free allocated quota exceeded' stops the run whether throttling came from the code, a new code or the status."""
    body = json.dumps({"code": code, "message": "Free allocated quota exceeded.", "request_id": "r1"}).encode()
    assert isinstance(classify_answer(native, status, body, {}), QuotaExhausted)


def test_nan_parameter_is_refused_before_sending():
    """A NaN parameter cannot be sent as valid JSON: the row fails as unencodable, nothing is sent."""
    sent = []

    def handler(request):
        sent.append(request)
        return httpx.Response(200, json={})

    async def go():
        endpoint = EndpointSpec(dialect="openai", base_url="http://127.0.0.1:9/compatible-mode/v1", transport="httpx")
        async with ChatClient(endpoint, ApiKey("sk-test"), max_connections=1,
                              transport=httpx.MockTransport(handler)) as client:
            await client.complete(Request(row_id=0, key="k", model="qwen-plus",
                                          messages=({"role": "user", "content": "hi"},),
                                          params={"temperature": float("nan")}))

    with pytest.raises(PermanentCallError) as info:
        anyio.run(go)
    assert info.value.code == "unencodable_request" and not sent
