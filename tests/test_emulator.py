"""The DashScope emulator over real loopback sockets: shapes, rules, auth, faults, stats."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import httpx
import pytest

from runner.emulator import (
    FAULT_NAMES,
    Emulator,
    EmulatorConfig,
    parse_fault_spec,
    row_key,
)

COMPAT = "/compatible-mode/v1/chat/completions"
NATIVE = "/api/v1/services/aigc/text-generation/generation"
MULTIMODAL = "/api/v1/services/aigc/multimodal-generation/generation"
AUTH = {"Authorization": "Bearer sk-test"}
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]


def compat_body(model: str = "qwen-plus", messages: list | None = None, **extra: object) -> dict:
    return {"model": model, "messages": HELLO if messages is None else messages, **extra}


def native_body(model: str = "qwen-plus", messages: list | None = None, **params: object) -> dict:
    return {"model": model, "input": {"messages": HELLO if messages is None else messages},
            "parameters": params}


class Served:
    """An Emulator plus an httpx client bound to it."""

    def __init__(self, emulator: Emulator) -> None:
        self.emu = emulator
        self.http = httpx.Client(base_url=emulator.url, headers=AUTH, timeout=10)

    def compat(self, body: object, **kw: object) -> httpx.Response:
        return self.http.post(COMPAT, json=body, **kw)

    def native(self, body: object, **kw: object) -> httpx.Response:
        return self.http.post(NATIVE, json=body, **kw)


@contextmanager
def serving(config: EmulatorConfig | None = None) -> Iterator[Served]:
    with Emulator(config or EmulatorConfig()) as emu:
        served = Served(emu)
        with served.http:
            yield served


@pytest.fixture
def srv() -> Iterator[Served]:
    with serving() as served:
        yield served


def faulty(name: str, **config: object) -> AbstractContextManager[Served]:
    return serving(EmulatorConfig(faults={name: 1.0}, **config))


def assert_compat_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status
    body = r.json()
    assert body["error"]["code"] == code
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["request_id"] == r.headers["x-request-id"]
    assert UUID.match(body["request_id"])
    return body


def assert_native_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status
    body = r.json()
    assert set(body) == {"code", "message", "request_id"}
    assert body["code"] == code
    assert body["request_id"] == r.headers["x-request-id"]
    assert UUID.match(body["request_id"])
    return body


# -- success shapes ----------------------------------------------------------------------


def test_compat_success_shape(srv: Served) -> None:
    """Compat 200: OpenAI shape, id = chatcmpl-<x-request-id>, echo content, usage with cache."""
    r = srv.compat(compat_body())
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    rid = r.headers["x-request-id"]
    assert UUID.match(rid)
    body = r.json()
    assert body["id"] == "chatcmpl-" + rid
    assert body["object"] == "chat.completion"
    assert body["model"] == "qwen-plus"
    assert body["system_fingerprint"] is None
    assert isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice == {
        "message": {"role": "assistant", "content": "Echo: hello there"},
        "finish_reason": "stop",
        "index": 0,
        "logprobs": None,
    }
    usage = body["usage"]
    assert usage["prompt_tokens"] >= 1 + 2  # text plus per-message overhead
    assert usage["completion_tokens"] == 5  # len("Echo: hello there") / 4, rounded up
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}


def test_native_message_format_shape(srv: Served) -> None:
    """Native 200 (message format by default): output.choices, input/output tokens, request_id."""
    r = srv.native(native_body())
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"output", "usage", "request_id"}
    assert body["request_id"] == r.headers["x-request-id"]
    assert UUID.match(body["request_id"])
    assert body["output"] == {
        "choices": [
            {
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": "Echo: hello there"},
            }
        ]
    }
    usage = body["usage"]
    assert usage["output_tokens"] == 5
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}


def test_native_text_format_and_prompt_input(srv: Served) -> None:
    """Native result_format=text gives output.text/finish_reason; input.prompt is a user turn."""
    r = srv.native({"model": "qwen-turbo", "input": {"prompt": "hi"},
                    "parameters": {"result_format": "text"}})
    assert r.status_code == 200
    body = r.json()
    assert body["output"] == {"finish_reason": "stop", "text": "Echo: hi"}
    assert body["usage"]["output_tokens"] == 2


def test_multimodal_path_answers_like_text_generation(srv: Served) -> None:
    """The multimodal-generation path serves the same native shape."""
    r = srv.http.post(MULTIMODAL, json=native_body(messages=[
        {"role": "user", "content": [{"image": "https://x/y.png"}, {"text": "what is it"}]}
    ]))
    assert r.status_code == 200
    assert r.json()["output"]["choices"][0]["message"]["content"] == "Echo: what is it"


def test_same_request_same_content_fresh_request_ids(srv: Served) -> None:
    """Content and usage depend only on the request; every answer has a new request id."""
    first, second = srv.compat(compat_body()), srv.compat(compat_body())
    assert first.json()["choices"] == second.json()["choices"]
    assert first.json()["usage"] == second.json()["usage"]
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


def test_max_tokens_truncates_with_length(srv: Served) -> None:
    """max_tokens, max_completion_tokens and native max_tokens cut output: finish_reason=length."""
    long = [{"role": "user", "content": "x" * 400}]
    for r in (
        srv.compat(compat_body(messages=long, max_tokens=3)),
        srv.compat(compat_body(messages=long, max_completion_tokens=3)),
    ):
        body = r.json()
        assert body["choices"][0]["finish_reason"] == "length"
        assert len(body["choices"][0]["message"]["content"]) == 12
        assert body["usage"]["completion_tokens"] == 3
    body = srv.native(native_body(messages=long, max_tokens=3)).json()
    assert body["output"]["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["output_tokens"] == 3
    body = srv.compat(compat_body(max_tokens=1000)).json()
    assert body["choices"][0]["finish_reason"] == "stop"


# -- model rules --------------------------------------------------------------------------


def test_thinking_allowed_on_qwen3_max(srv: Served) -> None:
    """enable_thinking on qwen3-max adds reasoning_content and reasoning tokens (both dialects)."""
    body = srv.compat(compat_body("qwen3-max", enable_thinking=True)).json()
    message, usage = body["choices"][0]["message"], body["usage"]
    assert message["content"] == "Echo: hello there"
    assert message["reasoning_content"]
    reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
    assert reasoning >= 1
    assert usage["completion_tokens"] == reasoning + 5
    body = srv.native(native_body("qwen3-max", enable_thinking=True)).json()
    assert body["output"]["choices"][0]["message"]["reasoning_content"]
    assert body["usage"]["output_tokens_details"]["reasoning_tokens"] == reasoning
    assert body["usage"]["output_tokens"] == reasoning + 5
    plain = srv.compat(compat_body("qwen3-max")).json()
    assert "reasoning_content" not in plain["choices"][0]["message"]


def test_thinking_rejected_for_non_stream_on_qwen_plus(srv: Served) -> None:
    """enable_thinking with stream=false on qwen-plus/flash/turbo is a 400 InvalidParameter."""
    msg = "parameter.enable_thinking must be set to false for non-streaming calls"
    for model in ("qwen-plus", "qwen-flash", "qwen-turbo"):
        body = assert_compat_error(
            srv.compat(compat_body(model, enable_thinking=True)), 400, "invalid_parameter_error"
        )
        assert body["error"]["message"] == msg
        body = assert_native_error(
            srv.native(native_body(model, enable_thinking=True)), 400, "InvalidParameter"
        )
        assert body["message"] == msg


def test_stream_only_models_reject_non_stream(srv: Served) -> None:
    """qwq-plus always, qwen3 open-source unless enable_thinking=false, need streaming."""
    msg = ("This model only support stream mode, please enable the stream parameter to access "
           "the model.")
    for model in ("qwq-plus", "qwen3-235b-a22b", "qwen3-32b"):
        body = assert_compat_error(srv.compat(compat_body(model)), 400, "invalid_parameter_error")
        assert body["error"]["message"] == msg
        assert assert_native_error(srv.native(native_body(model)), 400, "InvalidParameter")[
            "message"
        ] == msg
    assert srv.compat(compat_body("qwen3-32b", enable_thinking=False)).status_code == 200


def test_json_object_needs_the_word_json(srv: Served) -> None:
    """response_format json_object: 400 without "json" in messages, a JSON object string with it."""
    fmt = {"type": "json_object"}
    body = assert_compat_error(
        srv.compat(compat_body(response_format=fmt)), 400, "invalid_parameter_error"
    )
    assert body["error"]["message"] == (
        "'messages' must contain the word 'json' in some form, to use 'response_format' of type "
        "'json_object'."
    )
    assert_native_error(srv.native(native_body(response_format=fmt)), 400, "InvalidParameter")
    ok = [{"role": "user", "content": "Answer in JSON: what is 2+2?"}]
    content = srv.compat(compat_body(messages=ok, response_format=fmt)).json()["choices"][0][
        "message"
    ]["content"]
    assert isinstance(json.loads(content), dict)


def test_streaming_requests_are_answered_as_sse(srv: Served) -> None:
    """stream=true (compat) and X-DashScope-SSE / Accept: text/event-stream (native) get an SSE
    stream (its frames are pinned in test_emulator_stream.py)."""
    r = srv.compat(compat_body(stream=True))
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream;charset=UTF-8"
    assert r.text.startswith("data: {") and r.text.endswith("data: [DONE]\n\n")
    for header in ({"X-DashScope-SSE": "enable"}, {"Accept": "text/event-stream"}):
        r = srv.native(native_body(), headers=header)
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream;charset=UTF-8"
        assert r.text.startswith("id:1\nevent:result\n:HTTP_STATUS/200\ndata:{")


def test_malformed_requests_are_400_in_dialect_shape(srv: Served) -> None:
    """Bad JSON, missing messages and empty messages are 400 InvalidParameter per dialect."""
    bad = {"content": b"{not json", "headers": {"Content-Type": "application/json"}}
    assert_compat_error(srv.http.post(COMPAT, **bad), 400, "invalid_parameter_error")
    assert_native_error(srv.http.post(NATIVE, **bad), 400, "InvalidParameter")
    assert_compat_error(srv.compat({"model": "qwen-plus"}), 400, "invalid_parameter_error")
    assert_native_error(srv.native({"model": "qwen-plus", "input": {}}), 400, "InvalidParameter")
    assert_compat_error(srv.compat(compat_body(messages=[])), 400, "invalid_parameter_error")
    assert_native_error(srv.native({"model": "qwen-plus", "input": {"messages": []}}), 400,
                        "InvalidParameter")


def test_unknown_model_is_404_per_dialect(srv: Served) -> None:
    """An unknown model: compat 404 model_not_found naming it; native 404 ModelNotFound."""
    body = assert_compat_error(srv.compat(compat_body("qwen-plux")), 404, "model_not_found")
    assert "`qwen-plux`" in body["error"]["message"]
    assert "id" not in body
    assert_native_error(srv.native(native_body("qwen-plux")), 404, "ModelNotFound")


# -- auth ------------------------------------------------------------------------------------


def test_missing_and_invalid_keys_are_401(srv: Served) -> None:
    """No Authorization header or a non sk- token: 401 invalid_api_key / InvalidApiKey."""
    no_auth = {"Authorization": ""}
    body = assert_compat_error(srv.compat(compat_body(), headers=no_auth), 401, "invalid_api_key")
    assert body["error"]["type"] == "invalid_request_error"
    assert "id" not in body
    body = assert_native_error(srv.native(native_body(), headers=no_auth), 401, "InvalidApiKey")
    assert body["message"] == "No API-key provided."
    wrong = {"Authorization": "Bearer nope"}
    assert_compat_error(srv.compat(compat_body(), headers=wrong), 401, "invalid_api_key")
    body = assert_native_error(srv.native(native_body(), headers=wrong), 401, "InvalidApiKey")
    assert body["message"] == "Invalid API-key provided."


def test_configured_api_keys_are_the_only_ones_accepted() -> None:
    """With api_keys set, only those keys pass; another sk- key is a 401."""
    with serving(EmulatorConfig(api_keys=("sk-good",))) as srv:
        good = srv.compat(compat_body(), headers={"Authorization": "Bearer sk-good"})
        assert good.status_code == 200
        assert_compat_error(srv.compat(compat_body()), 401, "invalid_api_key")


def test_workspace_header_is_counted(srv: Served) -> None:
    """X-DashScope-WorkSpace values are counted in stats.workspaces."""
    for _ in range(2):
        srv.native(native_body(), headers={"X-DashScope-WorkSpace": "ws-a"})
    srv.compat(compat_body(), headers={"X-DashScope-WorkSpace": "ws-b"})
    assert srv.emu.stats()["workspaces"] == {"ws-a": 2, "ws-b": 1}


# -- faults ----------------------------------------------------------------------------------

ERROR_FAULTS = [
    ("429", 429, "Throttling.RateQuota", "limit_requests"),
    ("429burst", 429, "Throttling.BurstRate", "limit_burst_rate"),
    ("429tpm", 429, "Throttling.AllocationQuota", "insufficient_quota"),
    ("500", 500, "InternalError", "internal_error"),
    ("503", 503, "ModelUnavailable", "ModelUnavailable"),
    ("400", 400, "InvalidParameter", "invalid_parameter_error"),
    ("moderation", 400, "DataInspectionFailed", "data_inspection_failed"),
    ("arrearage", 400, "Arrearage", "Arrearage"),
    ("429throttling", 429, "Throttling", "Throttling"),
    ("429concurrency", 429, "Throttling.Concurrency", "Throttling.Concurrency"),
    ("500capacity", 500, "ModelServingError", "ModelServingError"),
    ("503capacity", 503, "ModelServingError", "ModelServingError"),
]


@pytest.mark.parametrize(("fault", "status", "native_code", "compat_code"), ERROR_FAULTS)
def test_error_faults_send_the_real_bodies(
    fault: str, status: int, native_code: str, compat_code: str
) -> None:
    """Each error fault answers its documented status and code in both dialects, no Retry-After."""
    with faulty(fault) as srv:
        r = srv.compat(compat_body())
        body = assert_compat_error(r, status, compat_code)
        assert body["id"] == "chatcmpl-" + body["request_id"]
        assert "retry-after" not in r.headers
        assert_native_error(srv.native(native_body()), status, native_code)
        assert srv.emu.stats()["by_fault"] == {fault: 2}


def test_arrearage_and_moderation_messages() -> None:
    """Arrearage and moderation carry the real messages."""
    with faulty("arrearage") as srv:
        assert srv.native(native_body()).json()["message"] == (
            "Access denied, please make sure your account is in good standing."
        )
    with faulty("moderation") as srv:
        assert srv.compat(compat_body()).json()["error"]["message"] == (
            "Input data may contain inappropriate content."
        )


def test_retry_after_header_when_configured() -> None:
    """retry_after in the config adds Retry-After to 429 answers."""
    with faulty("429tpm", retry_after=2.5) as srv:
        assert srv.compat(compat_body()).headers["retry-after"] == "2.5"


def test_502_is_an_html_gateway_page() -> None:
    """The 502 fault answers an HTML body, not JSON, still with x-request-id."""
    with faulty("502") as srv:
        for r in (srv.compat(compat_body()), srv.native(native_body())):
            assert r.status_code == 502
            assert r.headers["content-type"].startswith("text/html")
            assert "<html>" in r.text
            assert UUID.match(r.headers["x-request-id"])


def test_slow_fault_still_succeeds() -> None:
    """The slow fault answers a normal 200 (after slow_ms) and counts as a success."""
    with faulty("slow", slow_ms=1.0) as srv:
        assert srv.compat(compat_body()).status_code == 200
        assert srv.emu.stats()["keys"][row_key(HELLO)] == {"received": 1, "succeeded": 1}


def test_drop_closes_the_connection_without_a_response() -> None:
    """The drop fault closes the TCP connection: the client sees a transport error."""
    with faulty("drop") as srv:
        with pytest.raises(httpx.TransportError):
            srv.compat(compat_body())
        with pytest.raises(httpx.TransportError):
            srv.native(native_body())


def test_malformed_is_a_200_with_truncated_json() -> None:
    """The malformed fault answers 200 application/json whose body does not parse; no success."""
    with faulty("malformed") as srv:
        for r in (srv.compat(compat_body()), srv.native(native_body())):
            assert r.status_code == 200
            assert r.headers["content-type"] == "application/json"
            with pytest.raises(ValueError):
                json.loads(r.content)
        stats = srv.emu.stats()
        assert stats["by_status"] == {"200": 2}
        assert stats["keys"][row_key(HELLO)] == {"received": 2, "succeeded": 0}


def test_hang_times_out_the_client_and_stop_returns() -> None:
    """A hanging request times the client out; stop() still returns and closes the socket."""
    emu = Emulator(EmulatorConfig(faults={"hang": 1.0}, hang_seconds=600)).start()
    with httpx.Client(base_url=emu.url, headers=AUTH, timeout=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post(COMPAT, json=compat_body())
    stopper = threading.Thread(target=emu.stop)
    stopper.start()
    stopper.join(timeout=20)
    assert not stopper.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.post(emu.url + COMPAT, json=compat_body(), headers=AUTH, timeout=2)
    assert emu.stats()["by_fault"] == {"hang": 1}


def test_fault_sequence_is_a_function_of_seed_key_and_attempt() -> None:
    """Same seed+key+attempt gives the same fault, whatever other rows do in between."""
    config = EmulatorConfig(faults={"500": 0.5}, seed=7)
    sequences = []
    for interleave in (False, True):
        with serving(config) as srv:
            seq = []
            for n in range(20):
                if interleave:
                    srv.compat(compat_body(), headers={"X-Runner-Row-Key": f"other-{n}"})
                r = srv.compat(compat_body(), headers={"X-Runner-Row-Key": "row-1"})
                seq.append(r.status_code)
            sequences.append(seq)
    assert sequences[0] == sequences[1]
    assert set(sequences[0]) == {200, 500}
    expected = [500 if config.faults.pick(7, "row-1", n) else 200 for n in range(1, 21)]
    assert sequences[0] == expected


def test_retried_rows_eventually_succeed_at_rate_half() -> None:
    """With rate 0.5, retrying each of 40 rows reaches a 200 within a bounded number of tries."""
    with serving(EmulatorConfig(faults={"429": 0.25, "503": 0.25})) as srv:
        for row in range(40):
            messages = [{"role": "user", "content": f"row {row}"}]
            statuses = []
            while not statuses or statuses[-1] != 200:
                assert len(statuses) < 30, statuses
                statuses.append(srv.native(native_body(messages=messages)).status_code)
            assert set(statuses) <= {200, 429, 503}


# -- stats -----------------------------------------------------------------------------------


def test_stats_count_requests_keys_and_successes(srv: Served) -> None:
    """Stats count totals, status, model, dialect, per-key received/succeeded; HTTP agrees."""
    srv.compat(compat_body())
    srv.native(native_body())  # same messages: same key, succeeds a second time
    srv.compat(compat_body(), headers={"X-Runner-Row-Key": "k1"})
    srv.compat(compat_body("qwen-plux"), headers={"X-Runner-Row-Key": "k2"})
    srv.compat(compat_body(), headers={"Authorization": "Bearer bad"})
    stats = srv.emu.stats()
    assert stats["requests"] == 5
    assert stats["by_status"] == {"200": 3, "401": 1, "404": 1}
    assert stats["by_dialect"] == {"openai": 4, "dashscope": 1}
    assert stats["by_model"] == {"qwen-plus": 3, "qwen-plux": 1}
    assert stats["keys"] == {
        row_key(HELLO): {"received": 2, "succeeded": 2},
        "k1": {"received": 1, "succeeded": 1},
        "k2": {"received": 1, "succeeded": 0},
    }
    assert stats["succeeded_more_than_once"] == 1
    assert stats["max_in_flight"] >= 1
    over_http = srv.http.get("/_emulator/stats").json()
    assert over_http == srv.emu.stats()
    assert "keys" not in srv.http.get("/_emulator/stats?keys=0").json()


def test_reset_zeroes_the_counters(srv: Served) -> None:
    """Emulator.reset() and POST /_emulator/reset clear every counter."""
    srv.compat(compat_body(), headers={"X-DashScope-WorkSpace": "ws-x"})
    srv.emu.reset()
    stats = srv.emu.stats()
    assert (stats["requests"], stats["keys"], stats["workspaces"], stats["by_status"]) == (
        0, {}, {}, {}
    )
    srv.compat(compat_body())
    assert srv.http.post("/_emulator/reset").status_code == 200
    assert srv.emu.stats()["requests"] == 0


def test_row_key_is_sha1_of_canonical_messages() -> None:
    """Without the header, the key is sha1 of the messages' canonical JSON (sort_keys)."""
    reordered = [{"content": "hi", "role": "user"}]
    assert row_key([{"role": "user", "content": "hi"}]) == row_key(reordered)
    assert len(row_key(reordered)) == 40


# -- config ----------------------------------------------------------------------------------


def test_parse_fault_spec_accepts_and_rejects() -> None:
    """parse_fault_spec parses NAME=RATE and names bad text and the valid names on errors."""
    assert parse_fault_spec("429=0.1") == ("429", 0.1)
    assert parse_fault_spec("drop=1") == ("drop", 1.0)
    with pytest.raises(ValueError, match=r"'nope=0.1'.*unknown fault 'nope'.*429burst"):
        parse_fault_spec("nope=0.1")
    with pytest.raises(ValueError, match=r"'429=lots'.*not a number"):
        parse_fault_spec("429=lots")
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        parse_fault_spec("429=1.5")
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        parse_fault_spec("429=-0.1")
    with pytest.raises(ValueError, match="NAME=RATE"):
        parse_fault_spec("429")


def test_config_rejects_rates_summing_above_one_and_is_hashable() -> None:
    """EmulatorConfig refuses fault rates summing above 1 and unknown names; it stays hashable."""
    with pytest.raises(ValueError, match="sum"):
        EmulatorConfig(faults={"429": 0.6, "500": 0.5})
    with pytest.raises(ValueError, match="unknown fault"):
        EmulatorConfig(faults={"teapot": 0.1})
    a = EmulatorConfig(faults={"500": 0.1, "429": 0.2})
    b = EmulatorConfig(faults=[("429", 0.2), ("500", 0.1)])
    assert a == b and hash(a) == hash(b)
    assert dict(a.faults) == {"429": 0.2, "500": 0.1}
    assert set(FAULT_NAMES) >= {"429", "hang", "drop", "malformed", "slow", "502", "stream_drop",
                                "stream_truncate", "stream_malformed", "stream_error"}
    assert parse_fault_spec("stream_error=0.05") == ("stream_error", 0.05)
