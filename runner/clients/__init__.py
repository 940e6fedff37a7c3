"""HTTP clients for the two API dialects.

Each dialect module is a set of pure functions (build_payload, parse_success, error_fields,
CODE_TABLE); `ChatClient` is the one async class that sends a request with httpx and hands the
answer to its dialect. Only this package sees httpx exceptions and status codes.
"""

from __future__ import annotations

import json
import time
from types import ModuleType
from typing import Callable, Mapping
from urllib.parse import quote

import httpx

from ..endpoints import ApiKey, chat_url, request_headers
from ..errors import CallError, PermanentCallError, RunnerError, TransientCallError
from ..records import Completion, Request
from ..spec import EndpointSpec
from . import dashscope_native, openai_compat
from .classify import body_snippet, error_from, parse_error_body
from .sse import SSEParser
from .stream_rules import StreamPolicy

DIALECTS: dict[str, ModuleType] = {"openai": openai_compat, "dashscope": dashscope_native}

# Sent with every request so the emulator (and any proxy a user runs) can count per row; the
# provider ignores unknown headers.
ROW_KEY_HEADER = "X-Runner-Row-Key"


def classify_answer(dialect: ModuleType, status: int, body: bytes, headers: Mapping[str, str],
                    *, region_hint: str = "this region") -> CallError | RunnerError:
    """The error for a non-2xx answer, by status, body code and message."""
    return error_from(status, parse_error_body(body), headers, error_fields=dialect.error_fields,
                      table=dialect.CODE_TABLE, fallback_message=body_snippet(body), region_hint=region_hint)


def _transport_error(exc: httpx.TransportError) -> TransientCallError:
    """A timeout or a failed connection. The aiohttp transport maps every aiohttp connection error
    to httpx.ConnectTimeout, so its cause tells which it really was."""
    cause = exc.__cause__
    if cause is not None and type(cause).__module__.startswith("aiohttp"):
        timed_out = isinstance(cause, TimeoutError)
    else:
        timed_out = isinstance(exc, httpx.TimeoutException)
    if timed_out:
        return TransientCallError(f"request timed out ({type(cause or exc).__name__})", code="timeout")
    detail = str(cause or exc) or type(cause or exc).__name__
    return TransientCallError(f"connection failed: {detail}", code="connection_error")


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
        limits = httpx.Limits(max_connections=self._max_connections,
                              max_keepalive_connections=self._max_connections)
        transport = self._given_transport
        if transport is None and self.endpoint.transport == "aiohttp":
            from httpx_aiohttp import AiohttpTransport

            transport = AiohttpTransport(limits=limits)
        elif transport is None:
            transport = httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
        self._url = httpx.URL(self.url)
        self._headers = httpx.Headers({**CLIENT_HEADERS, **request_headers(self.endpoint, self._api_key)})
        self._stream_headers = httpx.Headers({**self._headers, **self.dialect.STREAM_HEADERS})
        self._timeout = {"timeout": httpx.Timeout(self.endpoint.timeout,
                                                  connect=self.endpoint.connect_timeout).as_dict()}
        self._stream_timeout = {"timeout": httpx.Timeout(self.endpoint.timeout, connect=self.endpoint.connect_timeout,
                                                         read=self.endpoint.stream_idle_timeout).as_dict()}
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
        assert self._transport is not None, "use `async with ChatClient(...)`"
        stream = self.streaming.wants_stream(request.model, request.params)
        try:
            payload = json.dumps(self.dialect.build_payload(request, stream=stream), ensure_ascii=False,
                                 allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise PermanentCallError(f"the request cannot be encoded as JSON ({exc})", code="unencodable_request") from None
        key = request.key if request.key.isascii() else quote(request.key, safe="")
        if stream:
            return await self._complete_streamed(self._request(payload, key, stream=True))
        try:
            response = await self._transport.handle_async_request(self._request(payload, key, stream=False))
            try:
                await response.aread()
            finally:
                await response.aclose()
        except httpx.TransportError as exc:
            raise _transport_error(exc) from exc
        return self._answer(response)

    def _answer(self, response: httpx.Response) -> Completion:
        if 200 <= response.status_code < 300:
            return self.dialect.parse_success(response.content, response.headers)
        raise classify_answer(self.dialect, response.status_code, response.content, response.headers,
                              region_hint=self._region_hint)

    async def _complete_streamed(self, http_request: httpx.Request) -> Completion:
        """One streamed attempt: a Completion only from a stream that reached its final frame."""
        sent_at = self._clock()
        try:
            response = await self._transport.handle_async_request(http_request)
            try:
                if not (200 <= response.status_code < 300) or \
                        "text/event-stream" not in response.headers.get("content-type", ""):
                    await response.aread()  # an error answer, or a server that answered without streaming
                    return self._answer(response)
                parser = SSEParser()
                assembler = self.dialect.StreamAssembler(response.headers, sent_at, self._clock)
                async for chunk in response.aiter_bytes():
                    for event in parser.feed(chunk):
                        assembler.add(event)
                for event in parser.close():
                    assembler.add(event)
                return assembler.finish()
            finally:
                await response.aclose()
        except httpx.TransportError as exc:
            raise _transport_error(exc) from exc
