"""Emulator SSE streams over loopback, read as raw bytes: framing, content, faults, stats."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import pytest

from runner.emulator import Emulator, EmulatorConfig, row_key

COMPAT = "/compatible-mode/v1/chat/completions"
NATIVE = "/api/v1/services/aigc/text-generation/generation"
AUTH = {"Authorization": "Bearer sk-test"}
SSE = {"X-DashScope-SSE": "enable"}
SSE_TYPE = "text/event-stream;charset=UTF-8"
HELLO = [{"role": "user", "content": "hello there, please repeat this sentence back to me"}]
THINKING_400 = ('<400> InternalError.Algo.InvalidParameter: The incremental_output parameter '
                'must be "true" when enable_thinking is true')
NATIVE_LINES = re.compile(r"id:(\d+)\nevent:(result|error)\n:HTTP_STATUS/(\d{3})\ndata:(\S.*)")


# -- a reference SSE reader, strict about the framing of the samples -------------------------


@dataclass
class Frame:
    data: str
    id: int | None = None  # native only
    event: str | None = None
    status: int | None = None

    def json(self) -> dict:
        return json.loads(self.data)


def parse_compat(raw: bytes) -> list[Frame]:
    """Compat frames: exactly one ``data: <payload>`` line (one space) then a blank line."""
    text = raw.decode("utf-8")
    blocks = text.split("\n\n")
    assert blocks[-1] == "", f"stream does not end with a blank line: {text[-80:]!r}"
    frames = []
    for block in blocks[:-1]:
        assert block.startswith("data: ") and "\n" not in block, block
        frames.append(Frame(block[len("data: "):]))
    return frames


def parse_native(raw: bytes) -> list[Frame]:
    """Native frames: ``id:N``, ``event:X``, ``:HTTP_STATUS/NNN``, ``data:<json>`` (no spaces
    after the colons), then a blank line."""
    text = raw.decode("utf-8")
    blocks = text.split("\n\n")
    assert blocks[-1] == "", f"stream does not end with a blank line: {text[-80:]!r}"
    frames = []
    for block in blocks[:-1]:
        match = NATIVE_LINES.fullmatch(block)
        assert match, block
        frames.append(Frame(match[4], int(match[1]), match[2], int(match[3])))
    return frames


@dataclass
class Streamed:
    """A streamed response: status, headers, the raw body bytes read, and the transport error
    that cut it (None when it ended cleanly)."""

    status: int
    headers: httpx.Headers
    raw: bytes
    error: Exception | None = None
    frames: list[Frame] = field(default_factory=list)


class Served:
    def __init__(self, emulator: Emulator) -> None:
        self.emu = emulator
        self.http = httpx.Client(base_url=emulator.url, headers=AUTH, timeout=10)

    def stream(self, path: str, body: dict, headers: dict | None = None) -> Streamed:
        received = bytearray()
        with self.http.stream("POST", path, json=body, headers=headers) as r:
            try:
                for chunk in r.iter_raw():
                    received += chunk
            except httpx.TransportError as exc:
                return Streamed(r.status_code, r.headers, bytes(received), exc)
        return Streamed(r.status_code, r.headers, bytes(received))

    def compat(self, body: dict, **kw: object) -> Streamed:
        out = self.stream(COMPAT, body, **kw)
        if out.error is None and out.headers["content-type"] == SSE_TYPE:
            out.frames = parse_compat(out.raw)
        return out

    def native(self, body: dict, headers: dict | None = None) -> Streamed:
        out = self.stream(NATIVE, body, SSE if headers is None else headers)
        if out.error is None and out.raw.startswith(b"id:"):
            out.frames = parse_native(out.raw)
        return out


@contextmanager
def serving(**config: object) -> Iterator[Served]:
    with Emulator(EmulatorConfig(**config)) as emu:
        served = Served(emu)
        with served.http:
            yield served


@pytest.fixture(scope="module")
def srv() -> Iterator[Served]:
    with serving() as served:
        yield served


def compat_body(model: str = "qwen-plus", usage: bool = True, **extra: object) -> dict:
    body = {"model": model, "messages": HELLO, "stream": True, **extra}
    if usage:
        body["stream_options"] = {"include_usage": True}
    return body


def native_body(model: str = "qwen-plus", **params: object) -> dict:
    return {"model": model, "input": {"messages": HELLO}, "parameters": params}


def plain_compat(srv: Served, body: dict) -> dict:
    body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    r = srv.http.post(COMPAT, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def plain_native(srv: Served, body: dict) -> dict:
    r = srv.http.post(NATIVE, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def compat_text(frames: list[Frame], key: str = "content") -> str:
    return "".join(
        f.json()["choices"][0]["delta"].get(key) or "" for f in frames if f.data != "[DONE]"
        and f.json()["choices"]
    )


# -- compatible mode -------------------------------------------------------------------------


def test_compat_stream_frames_follow_sample_m(srv: Served) -> None:
    """Compat stream: role chunk, content chunks, empty finish chunk, usage chunk, [DONE]."""
    out = srv.compat(compat_body())
    assert out.status == 200 and out.error is None
    assert out.headers["content-type"] == SSE_TYPE
    frames = out.frames
    assert frames[-1].data == "[DONE]"
    chunks = [f.json() for f in frames[:-1]]
    rid = out.headers["x-request-id"]
    for chunk in chunks:
        assert chunk["id"] == "chatcmpl-" + rid
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == "qwen-plus"
        assert chunk["system_fingerprint"] is None
        assert isinstance(chunk["created"], int)
    first, *content, finish, usage = chunks
    assert first["choices"] == [{"delta": {"content": "", "role": "assistant"}, "index": 0,
                                 "logprobs": None, "finish_reason": None}]
    assert len(content) == 8  # stream_chunks default
    for chunk in content:
        (choice,) = chunk["choices"]
        assert choice["finish_reason"] is None and set(choice["delta"]) == {"content"}
        assert chunk["usage"] is None
    assert finish["choices"] == [{"delta": {"content": ""}, "index": 0, "logprobs": None,
                                  "finish_reason": "stop"}]
    assert finish["usage"] is None
    assert usage["choices"] == []
    assert usage["usage"]["total_tokens"] == (usage["usage"]["prompt_tokens"]
                                              + usage["usage"]["completion_tokens"])


def test_compat_stream_without_include_usage_has_no_usage(srv: Served) -> None:
    """Without stream_options.include_usage there is no usage chunk and usage is always null."""
    frames = srv.compat(compat_body(usage=False)).frames
    assert frames[-1].data == "[DONE]"
    chunks = [f.json() for f in frames[:-1]]
    assert all(c["usage"] is None and c["choices"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("extra", [
    {},
    {"max_tokens": 3},
    {"model": "qwen3-max", "enable_thinking": True},
    {"response_format": {"type": "json_object"},
     "messages": [{"role": "user", "content": "Reply in JSON please"}]},
])
def test_compat_stream_equals_plain_answer(srv: Served, extra: dict) -> None:
    """Streamed content, reasoning, finish_reason and usage equal the non-stream answer."""
    body = compat_body(**extra)
    plain = plain_compat(srv, body)
    frames = srv.compat(body).frames
    message = plain["choices"][0]["message"]
    assert compat_text(frames) == message["content"]
    assert (compat_text(frames, "reasoning_content") or None) == message.get("reasoning_content")
    finish = frames[-3].json()["choices"][0]["finish_reason"]
    assert finish == plain["choices"][0]["finish_reason"]
    assert frames[-2].json()["usage"] == plain["usage"]


def test_compat_thinking_stream_follows_sample_n(srv: Served) -> None:
    """Thinking: reasoning chunks (content null), then content chunks (reasoning null)."""
    frames = srv.compat(compat_body("qwen-plus", enable_thinking=True)).frames
    chunks = [f.json() for f in frames[:-1]]
    first, *middle, finish, usage = chunks
    assert first["choices"][0]["delta"] == {"content": None, "role": "assistant",
                                            "reasoning_content": ""}
    deltas = [c["choices"][0]["delta"] for c in middle]
    kinds = ["r" if d["content"] is None else "c" for d in deltas]
    assert kinds == sorted(kinds, reverse=True) and "r" in kinds and "c" in kinds  # r... then c...
    for d in deltas:
        assert (d["content"] is None) != (d["reasoning_content"] is None)
    assert finish["choices"][0]["delta"] == {"content": "", "reasoning_content": None}
    details = usage["usage"]["completion_tokens_details"]
    assert details["reasoning_tokens"] >= 1
    assert usage["usage"]["completion_tokens"] > details["reasoning_tokens"]


def test_stream_lifts_stream_only_rules(srv: Served) -> None:
    """qwq-plus, qwen3 open source and thinking on qwen-plus/flash/turbo stream fine."""
    for model in ("qwq-plus", "qwen3-235b-a22b", "qwen3-32b"):
        frames = srv.compat(compat_body(model)).frames
        assert compat_text(frames, "reasoning_content"), model  # thinking by default
        out = srv.native(native_body(model, incremental_output=True))
        assert out.status == 200 and out.frames[-1].event == "result", model
    for model in ("qwen-plus", "qwen-flash", "qwen-turbo"):
        assert compat_text(srv.compat(compat_body(model, enable_thinking=True)).frames,
                           "reasoning_content")
    plain = srv.compat(compat_body("qwen-max", enable_thinking=True)).frames
    assert not compat_text(plain, "reasoning_content")  # not a thinking model: flag ignored


def test_qwq_rejects_thinking_off_even_when_streaming(srv: Served) -> None:
    """enable_thinking=false on qwq-plus is a JSON 400 before the stream (compat)."""
    r = srv.http.post(COMPAT, json=compat_body("qwq-plus", enable_thinking=False))
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"]["message"] == (
        "The value of the enable_thinking parameter is restricted to True.")


def test_stream_chunks_and_delay_config() -> None:
    """stream_chunks sets the number of content frames (fewer for short text); a delay keeps
    the frames the same."""
    with serving(stream_chunks=3, chunk_delay_ms=1.0) as srv:
        frames = srv.compat(compat_body(usage=False)).frames
        assert len(frames) == 1 + 3 + 1 + 1
        assert len(srv.native(native_body()).frames) == 3
    with serving(stream_chunks=1000) as srv:
        short = {"model": "qwen-plus", "messages": [{"role": "user", "content": "hi"}],
                 "stream": True}
        frames = srv.compat(short).frames
        assert [len(f.json()["choices"][0]["delta"]["content"]) for f in frames[1:-2]] == [1] * 8


# -- native ----------------------------------------------------------------------------------


def native_outputs(frames: list[Frame]) -> list[dict]:
    return [f.json()["output"] for f in frames]


def test_native_incremental_stream_follows_sample_h(srv: Served) -> None:
    """Native incremental: ids from 1, event:result, finish "null" until the last frame,
    cumulative usage on every frame, the same request_id, no [DONE]."""
    body = native_body(incremental_output=True)
    out = srv.native(body)
    assert out.status == 200 and out.headers["content-type"] == SSE_TYPE
    frames = out.frames
    assert [f.id for f in frames] == list(range(1, len(frames) + 1))
    assert len(frames) == 8
    assert {(f.event, f.status) for f in frames} == {("result", 200)}
    rid = out.headers["x-request-id"]
    data = [f.json() for f in frames]
    assert {d["request_id"] for d in data} == {rid}
    choices = [d["output"]["choices"][0] for d in data]
    assert [c["finish_reason"] for c in choices] == ["null"] * 7 + ["stop"]
    output_tokens = [d["usage"]["output_tokens"] for d in data]
    assert output_tokens == sorted(output_tokens)
    for d in data:
        usage = d["usage"]
        assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    plain = plain_native(srv, body)
    assert "".join(c["message"]["content"] for c in choices) == (
        plain["output"]["choices"][0]["message"]["content"])
    assert data[-1]["usage"] == plain["usage"]
    assert b"[DONE]" not in out.raw


def test_native_cumulative_stream_by_default(srv: Served) -> None:
    """Without incremental_output each frame carries the whole text so far (sample I)."""
    frames = srv.native(native_body()).frames
    contents = [o["choices"][0]["message"]["content"] for o in native_outputs(frames)]
    for before, after in zip(contents, contents[1:]):
        assert after.startswith(before) and len(after) > len(before)
    assert contents[-1] == plain_native(srv, native_body())["output"]["choices"][0]["message"][
        "content"]


@pytest.mark.parametrize("incremental", [True, False])
def test_native_text_format_stream(srv: Served, incremental: bool) -> None:
    """result_format=text streams output.text and output.finish_reason (sample J)."""
    body = native_body(result_format="text", incremental_output=incremental)
    outputs = native_outputs(srv.native(body).frames)
    assert all(set(o) == {"finish_reason", "text"} for o in outputs)
    assert [o["finish_reason"] for o in outputs][-2:] == ["null", "stop"]
    texts = [o["text"] for o in outputs]
    whole = "".join(texts) if incremental else texts[-1]
    assert whole == plain_native(srv, body)["output"]["text"]


def test_native_thinking_stream_reasoning_then_content(srv: Served) -> None:
    """Native thinking: frames with reasoning_content (content ""), then content; the final
    usage has output_tokens_details; the text equals the non-stream answer."""
    body = native_body("qwen3-max", enable_thinking=True, incremental_output=True)
    outputs = native_outputs(srv.native(body).frames)
    messages = [o["choices"][0]["message"] for o in outputs]
    kinds = ["r" if m["reasoning_content"] else "c" for m in messages]
    assert kinds == sorted(kinds, reverse=True) and "r" in kinds and "c" in kinds
    for m in messages:
        assert (m["content"] == "") != (m["reasoning_content"] == "")
    plain = plain_native(srv, body)["output"]["choices"][0]["message"]
    assert "".join(m["reasoning_content"] for m in messages) == plain["reasoning_content"]
    assert "".join(m["content"] for m in messages) == plain["content"]


def test_native_thinking_needs_incremental_output(srv: Served) -> None:
    """Thinking without incremental_output=true: one event:error frame, 400 InvalidParameter."""
    out = srv.native(native_body("qwen-plus", enable_thinking=True))
    assert out.status == 200 and out.headers["content-type"] == SSE_TYPE
    (frame,) = out.frames
    assert (frame.id, frame.event, frame.status) == (1, "error", 400)
    assert frame.json() == {"code": "InvalidParameter", "message": THINKING_400,
                            "request_id": out.headers["x-request-id"]}


def test_accept_header_also_streams(srv: Served) -> None:
    """Accept: text/event-stream turns native streaming on like X-DashScope-SSE."""
    out = srv.native(native_body(), headers={"Accept": "text/event-stream"})
    assert out.headers["content-type"] == SSE_TYPE and len(out.frames) == 8


@pytest.mark.parametrize(("fault", "status", "code"), [
    ("429", 429, "Throttling.RateQuota"),
    ("400", 400, "InvalidParameter"),
])
def test_native_pre_stream_errors_in_both_modes(fault: str, status: int, code: str) -> None:
    """Before any frame: mode "200" sends HTTP 200 + one event:error frame; mode "4xx" sends the
    real status with the SSE-framed body and content-type application/json (sample 10.2 M)."""
    for mode in ("200", "4xx"):
        with serving(faults={fault: 1.0}, native_stream_error_status=mode) as srv:
            out = srv.native(native_body())
            (frame,) = parse_native(out.raw)
            assert (frame.id, frame.event, frame.status) == (1, "error", status)
            assert frame.json()["code"] == code
            assert frame.json()["request_id"] == out.headers["x-request-id"]
            assert "retry-after" not in out.headers
            if mode == "200":
                assert (out.status, out.headers["content-type"]) == (200, SSE_TYPE)
            else:
                assert (out.status, out.headers["content-type"]) == (status, "application/json")
            # Compat pre-stream errors stay plain JSON error bodies.
            r = srv.http.post(COMPAT, json=compat_body())
            assert r.status_code == status and r.headers["content-type"] == "application/json"
            assert "error" in r.json()


# -- stream faults ---------------------------------------------------------------------------


def test_stream_drop_cuts_the_connection_mid_body() -> None:
    """stream_drop: some frames arrive, then the connection ends inside the body."""
    with serving(faults={"stream_drop": 1.0}) as srv:
        for out, parse in ((srv.compat(compat_body()), parse_compat),
                           (srv.native(native_body()), parse_native)):
            assert out.status == 200
            assert isinstance(out.error, httpx.TransportError)
            assert out.raw.endswith(b"\n\n")
            frames = parse(out.raw)
            assert frames and all(f.json() for f in frames)
        stats = srv.emu.stats()
        assert stats["keys"][row_key(HELLO)] == {"received": 2, "succeeded": 0}
        assert stats["by_fault"] == {"stream_drop": 2}


def test_stream_truncate_ends_cleanly_without_final_frames() -> None:
    """stream_truncate: a clean end, but no finish chunk/usage/[DONE] (compat) and no frame
    with a real finish_reason (native)."""
    with serving(faults={"stream_truncate": 1.0}) as srv:
        out = srv.compat(compat_body())
        assert out.error is None and out.frames
        chunks = [f.json() for f in out.frames]  # [DONE] absent: every frame is JSON
        assert all(c["choices"] and c["choices"][0]["finish_reason"] is None for c in chunks)
        assert all(c["usage"] is None for c in chunks)
        out = srv.native(native_body())
        assert out.error is None and out.frames
        assert {o["choices"][0]["finish_reason"] for o in native_outputs(out.frames)} == {"null"}
        assert srv.emu.stats()["keys"][row_key(HELLO)]["succeeded"] == 0


def test_stream_malformed_sends_a_frame_that_is_not_json() -> None:
    """stream_malformed: good frames, then one frame whose data does not parse, then the end."""
    with serving(faults={"stream_malformed": 1.0}) as srv:
        for out in (srv.compat(compat_body()), srv.native(native_body())):
            assert out.error is None
            *good, bad = out.frames
            assert good and all(f.json() for f in good)
            with pytest.raises(ValueError):
                json.loads(bad.data)
        assert srv.emu.stats()["keys"][row_key(HELLO)]["succeeded"] == 0


def test_stream_error_is_in_band_after_result_frames() -> None:
    """stream_error: native event:error with :HTTP_STATUS/429 AllocationQuota (sample 10.2 K);
    compat a data: {"error": ...} insufficient_quota chunk; then the stream ends."""
    with serving(faults={"stream_error": 1.0}) as srv:
        out = srv.native(native_body())
        *good, bad = out.frames
        assert good and {f.event for f in good} == {"result"}
        assert (bad.id, bad.event, bad.status) == (len(good) + 1, "error", 429)
        assert bad.json() == {
            "code": "Throttling.AllocationQuota",
            "message": "Allocated quota exceeded, please increase your quota limit.",
            "request_id": out.headers["x-request-id"],
        }
        out = srv.compat(compat_body())
        *good, bad = out.frames
        assert good and all(f.json()["choices"] for f in good)
        error = bad.json()["error"]
        assert error["code"] == error["type"] == "insufficient_quota"
        assert error["message"] == (
            "You exceeded your current quota, please check your plan and billing details.")
        assert srv.emu.stats()["keys"][row_key(HELLO)]["succeeded"] == 0


def test_stream_faults_spare_plain_requests() -> None:
    """A non-streaming request that draws a stream fault answers normally and succeeds."""
    with serving(faults={"stream_drop": 0.5, "stream_error": 0.5}) as srv:
        plain = {"model": "qwen-plus", "messages": HELLO}
        assert srv.http.post(COMPAT, json=plain).status_code == 200
        stats = srv.emu.stats()
        assert stats["by_fault"] == {}
        assert stats["keys"][row_key(HELLO)] == {"received": 1, "succeeded": 1}


def test_malformed_fault_on_a_stream_is_a_malformed_frame() -> None:
    """The plain "malformed" fault on a stream sends a frame that is not JSON."""
    with serving(faults={"malformed": 1.0}) as srv:
        out = srv.native(native_body())
        with pytest.raises(ValueError):
            json.loads(out.frames[-1].data)


# -- stats -----------------------------------------------------------------------------------


def test_stats_count_streams_and_only_complete_streams_succeed() -> None:
    """by_stream splits stream/plain; a key succeeds only for streams sent to their end."""
    with serving(faults={"stream_truncate": 0.5}, seed=3) as srv:
        complete = 0
        for n in range(20):
            headers = {"X-Runner-Row-Key": f"row-{n}"}
            out = srv.compat(compat_body(), headers=headers)
            complete += out.frames[-1].data == "[DONE]"
        srv.http.post(COMPAT, json={"model": "qwen-plus", "messages": HELLO})
        stats = srv.emu.stats()
        assert 0 < complete < 20
        assert stats["by_stream"] == {"stream": 20, "plain": 1}
        succeeded = sum(v["succeeded"] for k, v in stats["keys"].items() if k.startswith("row-"))
        assert succeeded == complete
        assert stats["by_fault"] == {"stream_truncate": 20 - complete}
        assert stats["by_status"] == {"200": 21}
        assert stats["by_model_status"] == {"qwen-plus": {"200": 21}}
