"""Transport faults become retried or recorded CallErrors on both transports, never a crash, and never carry the key.

A raw asyncio socket server on 127.0.0.1 answers each request with the fault its path names (a bad status
line, a bad header, a body cut short, a reset, a damaged stream...). ChatClient is driven over both
transports, aiohttp (the default, through httpx-aiohttp) and httpx's own, for every fault; then a whole
run goes through run_job against a server that answers every row's first attempt with a fault.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from runner.clients import ROW_KEY_HEADER, ChatClient
from runner.clients.stream_rules import StreamPolicy
from runner.clients.transport_errors import scrub
from runner.endpoints import ApiKey
from runner.job import run_job
from runner.errors import BadResponse, CallError, PermanentCallError, SpecError, TransientCallError
from runner.records import Request
from runner.spec import EndpointSpec, load_job

from tests.helpers import TEST_KEY, make_job, read_output

TRANSPORTS = ["aiohttp", "httpx"]


def answer_json(text: str) -> bytes:
    return json.dumps({"id": "chatcmpl-r1", "choices": [{"index": 0, "finish_reason": "stop",
                                                         "message": {"role": "assistant", "content": text}}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}).encode()


def sse_events(text: str) -> list[bytes]:
    """A compatible-mode stream of `text` in two pieces, with usage and [DONE]."""
    def chunk(delta: dict, finish: str | None = None) -> bytes:
        frame = {"id": "chatcmpl-r1", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + json.dumps(frame).encode() + b"\n\n"

    half = len(text) // 2
    return [chunk({"role": "assistant", "content": text[:half]}), chunk({"content": text[half:]}),
            chunk({"content": ""}, "stop"),
            b'data: {"id":"chatcmpl-r1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,'
            b'"total_tokens":5}}\n\n', b"data: [DONE]\n\n"]


def head(status: str = "200 OK", *headers: str) -> bytes:
    return ("HTTP/1.1 " + status + "\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode("latin-1")


def with_length(body: bytes, content_type: str = "application/json") -> bytes:
    return head("200 OK", f"Content-Type: {content_type}", f"Content-Length: {len(body)}") + body


def chunked(pieces: list[bytes], *, end: bool = True) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + (b"0\r\n\r\n" if end else b"")
    return head("200 OK", "Content-Type: text/event-stream", "Transfer-Encoding: chunked") + body


GOOD = answer_json("fine")
EVENTS = sse_events("a streamed answer")


@dataclass(frozen=True)
class Fault:
    """What the server writes, then how it ends the connection: "close" (FIN), "reset" (RST), or "hold"
    (say nothing more until the test ends)."""

    raw: bytes
    ending: str = "close"


FAULTS: dict[str, Fault] = {
    "bad-status-line": Fault(b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\n{}"),
    "garbage-status-line": Fault(b"\x00\x01garbage\r\n\r\n"),
    "no-status-line": Fault(GOOD),
    "invalid-header-token": Fault(b"HTTP/1.1 200 OK\r\nContent-Ty pe: x\r\nContent-Length: 2\r\n\r\n{}"),
    "header-without-colon": Fault(b"HTTP/1.1 200 OK\r\nContentLength 2\r\nContent-Length: 2\r\n\r\n{}"),
    "bad-content-length": Fault(b"HTTP/1.1 200 OK\r\nContent-Length: x2\r\n\r\n{}"),
    "bad-chunk-size": Fault(head("200 OK", "Transfer-Encoding: chunked") + b"zz\r\n{}\r\n0\r\n\r\n"),
    "truncated-chunked-body": Fault(head("200 OK", "Transfer-Encoding: chunked") + b"40\r\n" + GOOD[:20]),
    "truncated-content-length-body": Fault(with_length(GOOD)[:-10]),
    "close-before-headers": Fault(b""),
    "reset-before-headers": Fault(b"", "reset"),
    "reset-after-headers": Fault(with_length(GOOD)[:-10], "reset"),
    "silent-after-headers": Fault(with_length(GOOD)[:-10], "hold"),
    "undecodable-gzip-body": Fault(head("200 OK", "Content-Type: application/json", "Content-Encoding: gzip",
                                        "Content-Length: 9") + b"not gzip!"),
    "ok-without-content": Fault(with_length(b'{"choices":[{"message":{"role":"assistant"},"finish_reason":"stop"}]}')),
    "ok-with-damaged-content-key": Fault(with_length(GOOD.replace(b'"content"', b'"con\\u0000tent"'))),
    "error-quoting-the-key": Fault(head("500 Internal Server Error", "Content-Type: application/json")
                                   + json.dumps({"code": "InternalError",
                                                 "message": f"upstream refused Authorization: Bearer {TEST_KEY}"}
                                                ).encode()),
}
STREAM_FAULTS: dict[str, Fault] = {
    "sse-damaged-data-prefix": Fault(chunked([EVENTS[0], EVENTS[1].replace(b"data:", b"dta:"), *EVENTS[2:]])),
    "sse-garbage-line": Fault(chunked([EVENTS[0], b"\xff\xfe garbage\n\n", *EVENTS[1:]])),
    "sse-data-not-json": Fault(chunked([EVENTS[0], b"data: {not json\n\n", *EVENTS[1:]])),
    "sse-delta-without-content": Fault(chunked([EVENTS[0], EVENTS[1].replace(b'"content"', b'"cont"'),
                                                *EVENTS[2:]])),
    # A chunk that lost one byte: httpx (strict) rejects the framing; aiohttp's lenient parser hands on the
    # CR of the chunk's CRLF as data, which the SSE parser refuses in an LF stream.
    "sse-chunk-missing-a-byte": Fault(chunked([EVENTS[0]]).replace(b"0\r\n\r\n", b"")
                                      + b"%x\r\n%s\r\n" % (len(EVENTS[1]), EVENTS[1][:9] + EVENTS[1][10:])
                                      + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in EVENTS[2:]) + b"0\r\n\r\n"),
    "sse-truncated": Fault(chunked(EVENTS[:2], end=False)),
    "sse-ends-before-done": Fault(chunked(EVENTS[:-1])),
    "sse-reset-mid-stream": Fault(chunked(EVENTS[:2], end=False), "reset"),
    "sse-silent-mid-stream": Fault(chunked(EVENTS[:2], end=False), "hold"),
}
# The class and code each fault must become (any transport); None: the code may differ by transport.
EXPECTED: dict[str, tuple[type[CallError], str | None]] = {
    "bad-status-line": (TransientCallError, "protocol_error"),
    "garbage-status-line": (TransientCallError, "protocol_error"),
    "no-status-line": (TransientCallError, None),  # aiohttp: a bad status line; httpx: no answer at all
    "invalid-header-token": (TransientCallError, "protocol_error"),
    "header-without-colon": (TransientCallError, "protocol_error"),
    "bad-content-length": (TransientCallError, "protocol_error"),
    "bad-chunk-size": (TransientCallError, "protocol_error"),
    "truncated-chunked-body": (TransientCallError, "truncated_body"),
    "truncated-content-length-body": (TransientCallError, "truncated_body"),
    "close-before-headers": (TransientCallError, "connection_error"),
    "reset-before-headers": (TransientCallError, "connection_error"),
    "reset-after-headers": (TransientCallError, None),  # a reset, or a body cut short, by who reads first
    "silent-after-headers": (TransientCallError, "timeout"),
    "undecodable-gzip-body": (TransientCallError, "malformed_body"),
    "ok-without-content": (BadResponse, "bad_response"),
    "ok-with-damaged-content-key": (BadResponse, "bad_response"),
    "error-quoting-the-key": (TransientCallError, "InternalError"),
    "sse-damaged-data-prefix": (TransientCallError, "malformed_frame"),
    "sse-garbage-line": (TransientCallError, "malformed_frame"),
    "sse-data-not-json": (TransientCallError, "malformed_frame"),
    "sse-delta-without-content": (TransientCallError, "malformed_frame"),
    "sse-chunk-missing-a-byte": (TransientCallError, None),  # httpx: protocol_error; aiohttp: malformed_frame
    "sse-truncated": (TransientCallError, None),  # the transport's truncated_body, or our stream_truncated
    "sse-ends-before-done": (TransientCallError, "stream_truncated"),
    "sse-reset-mid-stream": (TransientCallError, None),
    "sse-silent-mid-stream": (TransientCallError, "timeout"),
}


class FaultServer:
    """A raw HTTP/1.1 server: each request is answered by the fault named by the first part of its path
    (`/<fault>/chat/completions`); "good" and "good-stream" answer properly. `pick(key, attempt)` may instead
    choose the answer by the row key and the attempt number (for whole runs)."""

    def __init__(self, pick=None) -> None:
        self.pick = pick
        self.attempts: dict[str, int] = {}
        self._server: asyncio.base_events.Server | None = None
        self._release = asyncio.Event()
        self._handlers: set[asyncio.Task] = set()

    async def __aenter__(self) -> "FaultServer":
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._handlers.add(asyncio.current_task())
            try:
                await self._serve(reader, writer)
            finally:
                self._handlers.discard(asyncio.current_task())
                writer.transport.abort()

        self._server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info) -> None:
        self._release.set()
        self._server.close()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    def base_url(self, fault: str = "run") -> str:
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/{fault}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head_bytes = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head_bytes.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
                await reader.readexactly(int(headers.get("content-length", "0")))
                name = lines[0].split(" ")[1].split("/")[1]
                if self.pick is not None:
                    key = headers[ROW_KEY_HEADER.lower()]
                    self.attempts[key] = self.attempts.get(key, 0) + 1
                    name = self.pick(key, self.attempts[key])
                if name in ("good", "good-stream"):
                    writer.write(with_length(answer_json("fine")) if name == "good"
                                 else chunked(sse_events("a streamed answer")))
                    await writer.drain()
                    continue
                fault = FAULTS.get(name) or STREAM_FAULTS[name]
                writer.write(fault.raw)
                await writer.drain()
                if fault.ending == "hold":
                    await self._release.wait()
                if fault.ending == "reset":
                    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                               struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                writer.close()
                return
        except ConnectionError:
            return


def endpoint(url: str, transport: str, *, idle: float = 10.0) -> EndpointSpec:
    return EndpointSpec(dialect="openai", base_url=url, transport=transport, timeout=20.0, read_timeout=idle,
                        stream_idle_timeout=idle)


REQUEST = Request(row_id=0, key="row-1", model="qwen-plus", messages=({"role": "user", "content": "hi"},), params={})


async def attempt(server: FaultServer, fault: str, transport: str, *, stream: bool = False, key: str = TEST_KEY,
                  request: Request = REQUEST):
    """One ChatClient attempt at `fault`; the Completion, or the CallError it raised."""
    policy = StreamPolicy("always" if stream else "never")
    # Short idle deadlines only where the server falls silent on purpose: elsewhere a loaded machine must not
    # turn a good answer into a timeout.
    spec = endpoint(server.base_url(fault), transport, idle=0.3 if "silent" in fault else 10.0)
    async with ChatClient(spec, ApiKey(key), max_connections=2, streaming=policy) as client:
        try:
            return await client.complete(request)
        except CallError as error:
            return error


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("fault", [*FAULTS, *STREAM_FAULTS])
def test_each_fault_becomes_the_right_call_error_without_the_key(fault: str, transport: str) -> None:
    """Every fault on either transport ends the attempt with its CallError (class and code), a one-line message
    that does not hold the key, and the transport's exception chained as its cause."""
    async def main():
        async with FaultServer() as server:
            with anyio.fail_after(30):
                return await attempt(server, fault, transport, stream=fault in STREAM_FAULTS)

    error = anyio.run(main)
    cls, code = EXPECTED[fault]
    assert isinstance(error, CallError), f"{fault} on {transport} gave {error!r}"
    assert type(error) is cls, error
    assert error.retryable
    if code is not None:
        assert error.code == code, error.message
    assert error.message and "\n" not in error.message
    assert TEST_KEY not in error.message and TEST_KEY not in str(error)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_good_answers_pass_on_both_transports(transport: str) -> None:
    """The fault server's good answers (plain and streamed) are read in full: the faults above are the only failures."""
    async def main():
        async with FaultServer() as server:
            return (await attempt(server, "good", transport), await attempt(server, "good-stream", transport, stream=True))

    plain, streamed = anyio.run(main)
    assert plain.content == "fine" and streamed.content == "a streamed answer"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_row_key_with_a_control_character_is_sent(transport: str) -> None:
    """A row key holding a line break is percent-encoded into its header instead of failing the request."""
    request = Request(row_id=0, key="row\n1\x00", model="qwen-plus", messages=REQUEST.messages, params={})

    async def main():
        async with FaultServer() as server:
            return await attempt(server, "good", transport, request=request)

    assert anyio.run(main).content == "fine"


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("key", ["sk-abc\n", "sk-a\x00b", "sk-é", "sk-\x7f1"])
def test_a_key_no_header_can_carry_stops_the_run_without_showing_it(key: str, transport: str) -> None:
    """An API key with a control or non-ASCII character is a SpecError before any request, and the message
    does not show the key."""
    async def main():
        async with FaultServer() as server:
            return await attempt(server, "good", transport, key=key)

    with pytest.raises(SpecError) as info:
        anyio.run(main)
    assert key not in info.value.message and key.strip() not in info.value.message
    assert "API key" in info.value.message and info.value.hint


@pytest.mark.parametrize("text, secret, expected", [
    pytest.param("Illegal header value b'Bearer sk-abc\\n'", "sk-abc\n", "Illegal header value b'***'",
                 id="h11-illegal-header-value"),
    pytest.param("refused Authorization: Bearer sk-live-123", "other", "refused Authorization: Bearer ***",
                 id="bearer-token"),
    pytest.param("header {'authorization': 'Bearer sk-x'} sent", "sk-x", "header {'authorization': 'Bearer ***'} sent",
                 id="bearer-in-a-repr"),
    pytest.param("key sk-é1 is wrong", "sk-é1", "key *** is wrong", id="literal-key"),
    pytest.param("key sk-\\xe9 is wrong", "sk-é", "key *** is wrong", id="repr-spelling"),
    pytest.param("key b'sk-\\xc3\\xa9' is wrong", "sk-é", "key b'***' is wrong", id="bytes-spelling"),
    pytest.param("key sk-%C3%A9 is wrong", "sk-é", "key *** is wrong", id="percent-spelling"),
    pytest.param("nothing secret here: Bearer", "sk-1", "nothing secret here: Bearer", id="nothing-to-scrub"),
    pytest.param("Illegal header value b'x\\'y' then more", "", "Illegal header value b'***' then more",
                 id="escaped-quote-inside-value"),
])
def test_scrub_removes_header_values_and_every_spelling_of_the_key(text: str, secret: str, expected: str) -> None:
    """scrub() removes the key (as is, repr'd, as bytes, percent-encoded), bearer tokens and quoted header values."""
    assert scrub(text, [secret]) == expected


def test_an_illegal_header_value_error_is_permanent_and_scrubbed() -> None:
    """h11's LocalProtocolError (a request it refuses to send) is a PermanentCallError whose message hides the value."""
    import h11
    import httpx

    from runner.clients.transport_errors import call_error

    inner = h11.LocalProtocolError(f"Illegal header value b'Bearer {TEST_KEY}\\n'")
    outer = httpx.LocalProtocolError(str(inner))
    outer.__cause__ = inner
    error = call_error(outer, secrets=[TEST_KEY])
    assert type(error) is PermanentCallError and error.code == "invalid_request"
    assert TEST_KEY not in error.message and "Bearer" not in error.message.replace("b'***'", "")




@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_run_through_alternating_faults_finishes_with_every_row_once(tmp_path: Path, transport: str) -> None:
    """run_job against a server that answers the first attempt of every other row with a fault (every kind, plain
    and streamed) finishes; every row is in the output once, ok, and every faulty row was retried."""
    plain_faults, stream_faults = list(FAULTS), list(STREAM_FAULTS)
    rows = 4 * max(len(plain_faults), len(stream_faults))

    def pick(key: str, attempt_number: int) -> str:
        """Row n: streamed when n % 4 is 2 or 3; its first attempt meets a fault when n is even."""
        number = int(key.split("-")[1])
        streamed = number % 4 >= 2
        if number % 2 == 0 and attempt_number == 1:
            faults = stream_faults if streamed else plain_faults
            return faults[(number // 4) % len(faults)]
        return "good-stream" if streamed else "good"

    async def main():
        async with FaultServer(pick) as server:
            job = make_job(tmp_path, None, input={"path": "prompts.jsonl", "id_column": "id", "prompt_column": "prompt",
                                                  "params_column": "params"},
                           endpoint={"base_url": server.base_url(), "transport": transport, "timeout": 10,
                                     "read_timeout": 0.5, "stream_idle_timeout": 0.5},
                           run={"concurrency": 8, "max_attempts": 5})
            with anyio.fail_after(120):
                return await run_job(load_job(job), api_key=ApiKey(TEST_KEY)), server.attempts

    # Rows 2 and 3 of every 4 stream (their own `stream` parameter), so stream faults meet streamed requests.
    records = [{"id": f"row-{i:05d}", "prompt": f"q{i}", "params": {"stream": i % 4 >= 2}} for i in range(rows)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    summary, attempts = anyio.run(main)
    out = read_output(tmp_path / "out" / "result.parquet")
    assert sorted(r["key"] for r in out) == sorted(r["id"] for r in records)
    assert all(r["status"] == "ok" for r in out), [(r["key"], r["error_code"], r["error_message"]) for r in out
                                                   if r["status"] != "ok"]
    for r in out:
        number = int(r["key"].split("-")[1])
        assert r["response"] == ("a streamed answer" if number % 4 >= 2 else "fine")
        if number % 2 == 0:  # met its fault, then a good answer (a pooled connection the server had closed
            assert r["attempts"] >= 2 and attempts[r["key"]] >= 2  # after a fault may cost one more attempt)
    assert TEST_KEY not in (tmp_path / "out" / "result.parquet").read_bytes().decode("latin-1")


@pytest.mark.parametrize("value, error", [(2.5, None), (0, "read_timeout"), (-1, "read_timeout"),
                                          ("nan", "read_timeout"), ("'x'", "read_timeout")])
def test_read_timeout_is_a_positive_number(tmp_path: Path, value, error) -> None:
    """[endpoint] read_timeout takes a number of seconds > 0 (default 30); anything else is a SpecError naming it."""
    job = tmp_path / "job.toml"
    job.write_text(f'[input]\npath = "p.jsonl"\nprompt_column = "prompt"\n[endpoint]\nread_timeout = {value}\n'
                   '[model]\nname = "qwen-plus"\n[output]\npath = "out.parquet"\n', encoding="utf-8")
    if error is None:
        assert load_job(job).endpoint.read_timeout == 2.5
        job.write_text(job.read_text().replace("read_timeout = 2.5\n", ""), encoding="utf-8")
        assert load_job(job).endpoint.read_timeout == 30.0
    else:
        with pytest.raises(SpecError, match=error):
            load_job(job)
