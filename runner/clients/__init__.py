"""HTTP clients for the two API dialects.

Each dialect module is a set of pure functions (build_payload, parse_success, error_fields,
CODE_TABLE); `ChatClient` is the one async class that sends a request with httpx and hands the
answer to its dialect. Only this package sees httpx (and aiohttp) exceptions and status codes:
transport_errors.py turns them into CallErrors, so a damaged answer is a row, never a crash.
"""

from __future__ import annotations

import json
import time
from types import ModuleType
from typing import Callable, Mapping
from urllib.parse import quote

import anyio
import httpx

from ..endpoints import ApiKey, chat_url, request_headers
from ..errors import CallError, PermanentCallError, RunnerError, SpecError, TransientCallError
from ..records import Completion, Request
from ..spec import EndpointSpec
from . import dashscope_native, openai_compat
from .classify import body_snippet, error_from, parse_error_body
from .sse import MalformedSSE, SSEParser
from .stream_rules import StreamPolicy
from .transport_errors import call_error, caught_exceptions, scrub

DIALECTS: dict[str, ModuleType] = {"openai": openai_compat, "dashscope": dashscope_native}

# Sent with every request so the emulator (and any proxy a user runs) can count per row; the
# provider ignores unknown headers.
ROW_KEY_HEADER = "X-Runner-Row-Key"


def classify_answer(dialect: ModuleType, status: int, body: bytes, headers: Mapping[str, str],
                    *, region_hint: str = "this region") -> CallError | RunnerError:
    """The error for a non-2xx answer, by status, body code and message."""
    return error_from(status, parse_error_body(body), headers, error_fields=dialect.error_fields,
                      table=dialect.CODE_TABLE, fallback_message=body_snippet(body), region_hint=region_hint)


def _check_header_values(headers: Mapping[str, str]) -> None:
    """SpecError for a header value no transport will send (a control or non-ASCII character: a stray line
    break or quote in the key's variable, say), before any request fails on it. The value is not shown."""
    for name, value in headers.items():
        bad = next((i for i, char in enumerate(value) if not (char == "\t" or " " <= char <= "~")), None)
        if bad is None:
            continue
        kind = "a control character" if ord(value[bad]) < 32 or value[bad] == "\x7f" else "a non-ASCII character"
        if name.lower() == "authorization":
            raise SpecError(f"the API key holds {kind} (at position {bad - len('Bearer ') + 1}), which an HTTP "
                            "header cannot carry", hint="check the key's variable or file for a stray line break, "
                                                        "space, quote or character pasted by mistake")
        raise SpecError(f"the {name} header holds {kind} (at position {bad + 1}), which an HTTP header cannot carry",
                        hint="check the [endpoint] value it comes from")


# What httpx.AsyncClient would add to every request; the client sends to its transport directly.
CLIENT_HEADERS = {"Accept-Encoding": "gzip, deflate", "Connection": "keep-alive"}


class ChatClient:
    """Sends one attempt of a chat request. Raises CallError (row-level) or RunnerError (run-level).

    Requests go straight to an httpx transport (aiohttp's, httpx's own pool, or one a test injects),
    not through httpx.AsyncClient: the URL, headers and timeouts are the same for every request, so
    they are built once, and the client's per-request work (merging URL, headers, cookies and params,
    auth and redirect flows, a cookie jar fed from every answer) is all for features this API does
    not use; it was a fifth of the runner's CPU at 1,024 requests in flight."""

    def __init__(self, endpoint: EndpointSpec, api_key: ApiKey, *, max_connections: int,
                 transport: httpx.AsyncBaseTransport | None = None, streaming: StreamPolicy = StreamPolicy(),
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.endpoint = endpoint
        self.streaming = streaming
        self._clock = clock
        self.dialect = DIALECTS[endpoint.dialect]
        self.url = chat_url(endpoint)
        self._api_key = api_key
        self._max_connections = max_connections
        self._given_transport = transport
        self._transport: httpx.AsyncBaseTransport | None = None
        self._region_hint = (f"the host {self.url.split('/')[2]}" if endpoint.base_url
                             else f"region {endpoint.region}")

    def __repr__(self) -> str:
        return f"ChatClient(dialect={self.endpoint.dialect!r}, url={self.url!r})"

    async def __aenter__(self) -> "ChatClient":
        headers = {**CLIENT_HEADERS, **request_headers(self.endpoint, self._api_key)}
        _check_header_values(headers)
        limits = httpx.Limits(max_connections=self._max_connections,
                              max_keepalive_connections=self._max_connections)
        transport = self._given_transport
        if transport is None and self.endpoint.transport == "aiohttp":
            from httpx_aiohttp import AiohttpTransport

            transport = AiohttpTransport(limits=limits)
        elif transport is None:
            transport = httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
        self._url = httpx.URL(self.url)
        self._headers = httpx.Headers(headers)
        self._stream_headers = httpx.Headers({**self._headers, **self.dialect.STREAM_HEADERS})
        self._timeout = {"timeout": httpx.Timeout(self.endpoint.timeout,
                                                  connect=self.endpoint.connect_timeout).as_dict()}
        self._stream_timeout = {"timeout": httpx.Timeout(self.endpoint.timeout, connect=self.endpoint.connect_timeout,
                                                         read=self.endpoint.stream_idle_timeout).as_dict()}
        # What the transport may raise for one request; known once its module (aiohttp's or not) is loaded.
        self._transport_errors = caught_exceptions()
        # Created here, not in __init__, so no state is bound to an event loop before it runs.
        self._transport = transport
        return self

    async def __aexit__(self, *exc_info) -> None:
        if self._transport is not None:
            await self._transport.aclose()
            self._transport = None

    def _request(self, payload: bytes, key: str, *, stream: bool) -> httpx.Request:
        headers = (self._stream_headers if stream else self._headers).copy()
        headers[ROW_KEY_HEADER] = key
        return httpx.Request("POST", self._url, content=payload, headers=headers,
                             extensions=self._stream_timeout if stream else self._timeout)

    async def complete(self, request: Request) -> Completion:
        """One attempt. Whatever the transport raises for it (while sending, or reading the body or the
        stream) becomes a CallError here, and no error message leaves with the key in it."""
        assert self._transport is not None, "use `async with ChatClient(...)`"
        stream = self.streaming.wants_stream(request.model, request.params)
        try:
            payload = json.dumps(self.dialect.build_payload(request, stream=stream), ensure_ascii=False,
                                 allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise PermanentCallError(f"the request cannot be encoded as JSON ({exc})", code="unencodable_request") from None
        key = request.row_key  # the key, and a fanned-out row's model, variant and sample
        if not (key.isascii() and key.isprintable()):  # a header carries printable ASCII only
            key = quote(key, safe="")
        http_request = self._request(payload, key, stream=stream)
        try:
            if stream:
                return await self._complete_streamed(http_request)
            return await self._complete_plain(http_request)
        except self._transport_errors as exc:
            raise call_error(exc, secrets=(self._api_key.reveal(),)) from exc
        except (CallError, RunnerError) as error:
            _scrub_message(error, (self._api_key.reveal(),))
            raise

    async def _complete_plain(self, http_request: httpx.Request) -> Completion:
        response = await self._transport.handle_async_request(http_request)
        try:
            body = await _read_body(response, self.endpoint.read_timeout)
        finally:
            await response.aclose()
        return self._answer(response, body)

    def _answer(self, response: httpx.Response, body: bytes) -> Completion:
        if 200 <= response.status_code < 300:
            return self.dialect.parse_success(body, response.headers)
        raise classify_answer(self.dialect, response.status_code, body, response.headers,
                              region_hint=self._region_hint)

    async def _complete_streamed(self, http_request: httpx.Request) -> Completion:
        """One streamed attempt: a Completion only from a stream that reached its final frame, with every line
        of it well formed (a damaged line fails the attempt instead of being skipped)."""
        sent_at = self._clock()
        response = await self._transport.handle_async_request(http_request)
        try:
            if not (200 <= response.status_code < 300) or \
                    "text/event-stream" not in response.headers.get("content-type", ""):
                # An error answer, or a server that answered without streaming.
                return self._answer(response, await _read_body(response, self.endpoint.stream_idle_timeout))
            parser = SSEParser()
            assembler = self.dialect.StreamAssembler(response.headers, sent_at, self._clock)
            try:
                async for chunk in response.aiter_bytes():
                    for event in parser.feed(chunk):
                        assembler.add(event)
                for event in parser.close():
                    assembler.add(event)
            except MalformedSSE as exc:
                raise assembler.text.malformed(str(exc)) from None
            return assembler.finish()
        finally:
            await response.aclose()


async def _read_body(response: httpx.Response, idle_timeout: float) -> bytes:
    """The whole body, each piece due within `idle_timeout` of the last. The transport's read timeout cannot
    be that deadline: it also covers the wait for the headers, which for a non-streamed answer is the whole
    generation (bounded by [endpoint] timeout only); once the headers are in, a silence means bytes were lost
    on a connection that stays open, and waiting longer will not bring them."""
    pieces: list[bytes] = []
    body = response.aiter_bytes()
    try:
        while True:
            with anyio.move_on_after(idle_timeout) as idle:
                piece = await anext(body, None)
            if idle.cancelled_caught:
                raise TransientCallError(f"the answer stopped for {idle_timeout:g} s after its headers arrived",
                                         code="timeout", http_status=response.status_code,
                                         request_id=response.headers.get("x-request-id"))
            if piece is None:
                return b"".join(pieces)
            pieces.append(piece)
    finally:
        await body.aclose()


def _scrub_message(error: CallError | RunnerError, secrets: tuple[str, ...]) -> None:
    """Take the secrets out of the error's message (a server or a proxy may quote a header back)."""
    message = scrub(error.message, secrets)
    if message != error.message:
        error.message = message
        error.args = (message,)
