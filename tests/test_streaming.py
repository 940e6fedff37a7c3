"""SSE parsing and stream assembly for both dialects, and when to stream."""

from __future__ import annotations

import itertools

import pytest

from runner.clients import dashscope_native as native
from runner.clients import openai_compat as compat
from runner.clients.sse import Event, MalformedSSE, SSEParser
from runner.clients.stream_rules import StreamPolicy
from runner.errors import AuthError, PermanentCallError, QuotaExhausted, Throttled, TransientCallError

# Sample 10.1 M of the API facts (compatible mode, include_usage), shortened ids.
COMPAT_STREAM = (
    b'data: {"choices":[{"delta":{"content":"","role":"assistant"},"index":0,"finish_reason":null}],'
    b'"object":"chat.completion.chunk","usage":null,"id":"chatcmpl-e30f"}\n\n'
    b'data: {"choices":[{"finish_reason":null,"delta":{"content":"I am"},"index":0}],"usage":null,"id":"chatcmpl-e30f"}\n\n'
    b'data: {"choices":[{"finish_reason":null,"delta":{"content":" Qwen."},"index":0}],"usage":null,"id":"chatcmpl-e30f"}\n\n'
    b'data: {"choices":[{"finish_reason":"stop","delta":{"content":""},"index":0}],"usage":null,"id":"chatcmpl-e30f"}\n\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":22,"completion_tokens":12,"total_tokens":34,'
    b'"prompt_tokens_details":{"cached_tokens":0}},"id":"chatcmpl-e30f"}\n\n'
    b'data: [DONE]\n\n'
)
# Sample 10.1 N (thinking).
COMPAT_THINKING = (
    b'data: {"choices":[{"delta":{"content":null,"role":"assistant","reasoning_content":""},"finish_reason":null}],"id":"chatcmpl-0d1e"}\n\n'
    b'data: {"choices":[{"delta":{"content":null,"reasoning_content":"The user greets me"},"finish_reason":null}],"id":"chatcmpl-0d1e"}\n\n'
    b'data: {"choices":[{"delta":{"content":"Hello!","reasoning_content":null},"finish_reason":null}],"id":"chatcmpl-0d1e"}\n\n'
    b'data: {"choices":[{"delta":{"content":"","reasoning_content":null},"finish_reason":"stop"}],"id":"chatcmpl-0d1e"}\n\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":40,"total_tokens":52,'
    b'"completion_tokens_details":{"reasoning_tokens":37}},"id":"chatcmpl-0d1e"}\n\n'
    b'data: [DONE]\n\n'
)
# Sample 10.2 H (native, message format, incremental).
NATIVE_STREAM = (
    b'id:1\nevent:result\n:HTTP_STATUS/200\ndata:{"output":{"choices":[{"message":{"content":"I am","role":"assistant"},'
    b'"finish_reason":"null"}]},"usage":{"total_tokens":28,"input_tokens":26,"output_tokens":2},"request_id":"9a0b"}\n\n'
    b'id:2\nevent:result\n:HTTP_STATUS/200\ndata:{"output":{"choices":[{"message":{"content":" Qwen.","role":"assistant"},'
    b'"finish_reason":"stop"}]},"usage":{"total_tokens":38,"input_tokens":26,"output_tokens":12,'
    b'"prompt_tokens_details":{"cached_tokens":4}},"request_id":"9a0b"}\n\n'
)
# Sample 10.2 J (native, text format).
NATIVE_TEXT = (
    b'id:1\nevent:result\n:HTTP_STATUS/200\ndata:{"output":{"finish_reason":"null","text":"Hello"},'
    b'"usage":{"total_tokens":12,"input_tokens":11,"output_tokens":1},"request_id":"1c2d"}\n\n'
    b'id:2\nevent:result\n:HTTP_STATUS/200\ndata:{"output":{"finish_reason":"stop","text":" there"},'
    b'"usage":{"total_tokens":18,"input_tokens":11,"output_tokens":7},"request_id":"1c2d"}\n\n'
)
# Sample 10.2 K (throttled mid-stream) and L (error as the only frame).
NATIVE_MIDSTREAM_429 = (
    b'id:1\nevent:result\n:HTTP_STATUS/200\ndata:{"output":{"choices":[{"message":{"content":"Sure,","role":"assistant"},'
    b'"finish_reason":"null"}]},"usage":{"total_tokens":31,"input_tokens":30,"output_tokens":1},"request_id":"2d3e"}\n\n'
    b'id:2\nevent:error\n:HTTP_STATUS/429\ndata:{"code":"Throttling.AllocationQuota","message":"Allocated quota exceeded, '
    b'please increase your quota limit.","request_id":"2d3e"}\n\n'
)
NATIVE_ONLY_ERROR = (b'id:1\nevent:error\n:HTTP_STATUS/400\ndata:{"code":"InvalidParameter","message":"Preprocessor error",'
                     b'"request_id":"0cbe"}\n\n')


def _events(raw: bytes, cuts: tuple[int, ...] = ()) -> list[Event]:
    parser = SSEParser()
    events = []
    edges = (0, *cuts, len(raw))
    for start, end in zip(edges, edges[1:]):
        events.extend(parser.feed(raw[start:end]))
    return events + parser.close()


@pytest.mark.parametrize("raw", [COMPAT_STREAM, NATIVE_STREAM, NATIVE_MIDSTREAM_429], ids=["compat", "native", "error"])
def test_split_at_every_byte_boundary_gives_the_same_events(raw):
    """However TCP cuts the stream (one cut or two, anywhere), the parser yields the same events."""
    whole = _events(raw)
    assert whole
    for cut in range(1, len(raw)):
        assert _events(raw, (cut,)) == whole
    for a, b in itertools.combinations(range(1, len(raw), 7), 2):
        assert _events(raw, (a, b)) == whole


def test_crlf_and_cr_line_ends_are_the_same_as_lf():
    """CRLF and lone CR line ends parse like LF, also when a CRLF is split across reads."""
    lf = _events(NATIVE_STREAM)
    crlf = NATIVE_STREAM.replace(b"\n", b"\r\n")
    assert _events(crlf) == lf
    assert _events(NATIVE_STREAM.replace(b"\n", b"\r")) == lf
    for cut in range(1, len(crlf)):
        assert _events(crlf, (cut,)) == lf


@pytest.mark.parametrize("raw,expected", [
    (b"data: one\ndata: two\n\n", [Event("message", b"one\ntwo", None, None)]),
    (b"data:no-space\n\n", [Event("message", b"no-space", None, None)]),
    (b"data:  two-spaces\n\n", [Event("message", b" two-spaces", None, None)]),
    (b": just a comment\n\n", []),
    (b": keepalive\ndata: x\n\n", [Event("message", b"x", None, None)]),
    (b"id:7\nevent:result\n:HTTP_STATUS/200\ndata:{}\n\n", [Event("result", b"{}", "7", 200)]),
    (b"event:error\n:HTTP_STATUS/429\ndata:{}\n\n", [Event("error", b"{}", None, 429)]),
    (b"\n\n\ndata: a\n\n\n\ndata: b\n\n", [Event("message", b"a", None, None), Event("message", b"b", None, None)]),
    (b"retry: 100\nid\ndata: z\n\n", [Event("message", b"z", "", None)]),
    (b"data: tail-without-blank-line", [Event("message", b"tail-without-blank-line", None, None)]),
], ids=["multi-line", "no-space", "two-spaces", "comment-only", "comment-then-data", "native-frame", "error-frame",
        "extra-blank-lines", "retry-and-bare-field", "unterminated"])
def test_frame_table(raw, expected):
    """Field parsing per the SSE spec, plus DashScope's status comment."""
    assert _events(raw) == expected


@pytest.mark.parametrize("raw", [
    b"data: a\n\ndta: {\"choices\":[]}\n\n",
    b"data: a\nfoo: bar\n\n",
    b"\x01data: {}\n\n",
    b"id:1\nevent:result\n:HTTP_STATUS/200\nd\xffta:{}\n\n",
    b"data: a\n\nda",
    b'data: {"a":"Ech"}\n\n\rdata: {"b":1}\n\n',
    b'data: {"a":"Ech\ro"}\n\n',
], ids=["damaged-data-prefix", "unknown-field", "control-byte", "damaged-native-frame", "cut-field-name",
        "cr-after-lf-event", "cr-inside-lf-line"])
def test_a_line_that_is_not_sse_is_an_error(raw):
    """A line that is neither a comment nor data/event/id/retry, or a CR in a stream whose lines end with LF (what
    aiohttp's lenient chunk parser leaves of a chunk that lost a byte), raises MalformedSSE instead of being skipped."""
    with pytest.raises(MalformedSSE):
        _events(raw)


def test_partial_event_is_reported():
    """A stream that ends mid-event leaves a partial block the caller can see."""
    parser = SSEParser()
    parser.feed(b"data: complete\n\ndata: half")
    assert parser.has_partial


def _assemble(dialect, raw: bytes, headers=None):
    ticks = iter(range(0, 10_000, 5))
    assembler = dialect.StreamAssembler(headers or {}, 0.0, lambda: next(ticks) / 1000)
    for event in _events(raw):
        assembler.add(event)
    return assembler.finish()


def test_compat_stream_assembles_content_usage_and_request_id():
    """Compatible-mode chunks join into one answer; usage comes from the final chunk; id gives the request id."""
    done = _assemble(compat, COMPAT_STREAM)
    assert done.content == "I am Qwen." and done.finish_reason == "stop" and done.reasoning is None
    assert (done.usage.input_tokens, done.usage.output_tokens, done.usage.total_tokens, done.usage.cached_tokens) == \
        (22, 12, 34, 0)
    assert done.request_id == "e30f" and done.first_token_ms is not None
    assert _assemble(compat, COMPAT_STREAM, {"x-request-id": "from-header"}).request_id == "from-header"


def test_compat_thinking_stream_keeps_reasoning():
    """reasoning_content deltas go to `reasoning`, content deltas to the answer; reasoning tokens from usage."""
    done = _assemble(compat, COMPAT_THINKING)
    assert done.reasoning == "The user greets me" and done.content == "Hello!"
    assert done.usage.reasoning_tokens == 37


def test_native_streams_message_and_text_format():
    """Native incremental frames join; usage is the last cumulative frame's; text format works the same."""
    done = _assemble(native, NATIVE_STREAM)
    assert done.content == "I am Qwen." and done.finish_reason == "stop"
    assert (done.usage.output_tokens, done.usage.cached_tokens, done.request_id) == (12, 4, "9a0b")
    text = _assemble(native, NATIVE_TEXT)
    assert text.content == "Hello there" and text.usage.total_tokens == 18


@pytest.mark.parametrize("dialect,raw", [
    (compat, COMPAT_STREAM[:COMPAT_STREAM.index(b"data: [DONE]")]),
    (compat, COMPAT_STREAM[:COMPAT_STREAM.index(b'data: {"choices":[{"finish_reason":"stop"')]),
    (native, NATIVE_STREAM[:NATIVE_STREAM.index(b"id:2")]),
], ids=["compat-no-done", "compat-no-finish", "native-no-final-frame"])
def test_stream_without_its_final_frame_is_transient(dialect, raw):
    """A stream cut before its final frame is never a success: a retryable stream_truncated error."""
    with pytest.raises(TransientCallError) as info:
        _assemble(dialect, raw)
    assert info.value.code == "stream_truncated" and not isinstance(info.value, Throttled)


@pytest.mark.parametrize("dialect,raw", [
    (compat, b'data: {"choices":[{"delta":{"content":"x"\n\n'),
    (native, b'id:1\nevent:result\ndata:{"output":\n\n'),
    (native, b'id:1\nevent:result\ndata:{"nothing":1}\n\n'),
], ids=["compat-bad-json", "native-bad-json", "native-no-output"])
def test_malformed_frame_is_transient(dialect, raw):
    """A frame that is not the expected JSON fails the attempt as malformed_frame (retried from scratch)."""
    with pytest.raises(TransientCallError) as info:
        _assemble(dialect, raw)
    assert info.value.code == "malformed_frame"


def test_native_in_band_errors_are_classified_with_their_status():
    """event:error frames use the error table with the :HTTP_STATUS status, mid-stream or as the only frame."""
    with pytest.raises(Throttled) as throttled:
        _assemble(native, NATIVE_MIDSTREAM_429)
    assert throttled.value.code == "Throttling.AllocationQuota" and throttled.value.http_status == 429
    with pytest.raises(PermanentCallError) as invalid:
        _assemble(native, NATIVE_ONLY_ERROR)
    assert invalid.value.code == "InvalidParameter" and invalid.value.message == "Preprocessor error"
    arrears = b'id:1\nevent:error\n:HTTP_STATUS/400\ndata:{"code":"Arrearage","message":"Access denied.","request_id":"r"}\n\n'
    with pytest.raises(QuotaExhausted):
        _assemble(native, arrears)


def test_compat_in_band_errors_are_classified():
    """A `data: {"error": ...}` chunk raises the classified error: throttling, moderation, a bad key."""
    def frame(code, message=b"m"):
        return b'data: {"error":{"code":"%s","message":"%s","type":"x"},"request_id":"r9"}\n\n' % (code, message)

    with pytest.raises(Throttled):
        _assemble(compat, COMPAT_STREAM[:200].rsplit(b"\n\n", 1)[0] + b"\n\n" + frame(b"insufficient_quota"))
    with pytest.raises(PermanentCallError) as moderated:
        _assemble(compat, frame(b"data_inspection_failed", b"Output data may contain inappropriate content."))
    assert moderated.value.request_id == "r9"
    with pytest.raises(AuthError):
        _assemble(compat, frame(b"invalid_api_key"))


@pytest.mark.parametrize("model,params,mode,expected", [
    ("qwen-plus", {}, "auto", False),
    ("qwen-plus", {"enable_thinking": True}, "auto", True),
    ("qwen-flash-2025-07-28", {"enable_thinking": True}, "auto", True),
    ("qwq-plus", {}, "auto", True),
    ("qwen3-235b-a22b", {}, "auto", True),
    ("qwen3-235b-a22b", {"enable_thinking": False}, "auto", False),
    ("qwen3-235b-a22b-instruct-2507", {}, "auto", False),
    ("qwen3-235b-a22b-thinking-2507", {}, "auto", True),
    ("qwen3-max", {"enable_thinking": True}, "auto", False),
    ("qwen-omni-turbo", {}, "auto", True),
    ("qwen-max", {"enable_code_interpreter": True}, "auto", True),
    ("qwen-max", {}, "always", True),
    ("qwq-plus", {}, "never", False),
    ("qwen-max", {"stream": True}, "never", True),
    ("my-reasoner-1", {}, "auto", True),
], ids=lambda v: str(v))
def test_stream_rules(model, params, mode, expected):
    """auto streams exactly when the model or its parameters require it; a row's stream param wins."""
    policy = StreamPolicy(mode, stream_only_models=("my-reasoner-*",))
    assert policy.wants_stream(model, params) is expected


@pytest.mark.parametrize("dialect", [compat, native], ids=["compat", "native"])
def test_streamed_payloads(dialect):
    """Streamed bodies ask for usage (compat) or incremental frames (native); row stream keys never pass through."""
    from runner.records import Request

    request = Request(row_id=0, key="k", model="qwq-plus", messages=({"role": "user", "content": "hi"},),
                      params={"stream": False, "incremental_output": False, "temperature": 0.5})
    body = dialect.build_payload(request, stream=True)
    if dialect is compat:
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["temperature"] == 0.5 and "incremental_output" not in body
    else:
        assert body["parameters"] == {"result_format": "message", "incremental_output": True, "temperature": 0.5}
        assert dialect.STREAM_HEADERS["X-DashScope-SSE"] == "enable"
    assert "stream" not in str(dialect.build_payload(request, stream=False))
