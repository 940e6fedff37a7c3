"""Answering one request: auth, body, model rules, rate limits, the fault draw, then a plain
answer or a stream."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .faults import STREAM_FAULTS, draw, row_key
from .generate import ApiError, ChatCall, Completion, complete, message_text, with_choices
from .instance import bad_answer, quoted_schema
from .responses import (
    DASHSCOPE,
    ERRORS,
    GATEWAY_502,
    GATEWAY_504,
    DashScopeDialect,
    OpenAIDialect,
    dump,
    new_request_id,
)
from .sse import (
    MID_STREAM_ERROR,
    SSE_CONTENT_TYPE,
    compat_error_payload,
    compat_frame,
    compat_plan,
    native_error_payload,
    native_frame,
    native_plan,
)
from .state import EmulatorState
from .stats import ClientStats, bump

_JSON = "application/json"
_HTML = "text/html"
_TEXT = "text/plain"

Dialect = OpenAIDialect | DashScopeDialect

JSON_FORMATS = ("json_object", "json_schema")
# Limiter verdict -> the error catalogue entry it answers with (and the stats key).
LIMIT_ERRORS = {"rpm": "429", "tpm": "429tpm", "burst": "429burst"}


class Exchange:
    """One request being answered: its request id, dialect and model, and how its errors are
    framed (a native stream frames them as SSE, see EmulatorConfig.native_stream_error_status);
    the client (API key) it counts for, and its request log entry when there is a log."""

    __slots__ = ("state", "dialect", "rid", "model", "native_sse", "client", "entry")

    def __init__(self, state: EmulatorState, dialect: Dialect, rid: str, native_sse: bool) -> None:
        self.state = state
        self.dialect = dialect
        self.rid = rid
        self.model: str | None = None
        self.native_sse = native_sse
        self.client: ClientStats | None = None
        self.entry: list[Any] | None = None

    def count(self, status: int) -> None:
        stats = self.state.stats
        bump(stats.by_status, status)
        entry = self.entry
        if entry is not None:
            entry[1] = stats.clock()
            entry[2] = status
        if self.model is not None:
            per_model = stats.by_model_status.get(self.model)
            if per_model is None:
                stats.by_model_status[self.model] = per_model = {}
            bump(per_model, status)

    def reply(
        self,
        status: int,
        body: bytes,
        content_type: str = _JSON,
        extra: dict[str, str] | None = None,
    ) -> web.Response:
        self.count(status)
        headers = {"Content-Type": content_type, "x-request-id": self.rid}
        if extra:
            headers.update(extra)
        return web.Response(body=body, status=status, headers=headers)

    def error(self, err: ApiError) -> web.Response:
        status, body = self.dialect.error(err, self.rid)
        retry_after = self.state.retry_after.get(status)
        extra = {"Retry-After": retry_after} if retry_after is not None else None
        if not self.native_sse:
            return self.reply(status, dump(body), _JSON, extra)
        frame = native_frame(dump(body), 0, "error", status)
        if self.state.config.native_stream_error_status == "4xx":
            # Seen from the real API (facts 10.2 M): the real status, an SSE-framed body, and
            # a content-type that claims JSON.
            return self.reply(status, frame, _JSON, extra)
        return self.reply(200, frame, SSE_CONTENT_TYPE, extra)


async def answer(
    request: web.Request, state: EmulatorState, dialect: Dialect
) -> web.StreamResponse:
    config = state.config
    stats = state.stats
    second = state.arrive()
    bump(stats.by_dialect, dialect.name)
    headers = request.headers
    workspace = headers.get("X-DashScope-WorkSpace")
    if workspace:
        bump(stats.workspaces, workspace)
    ex = Exchange(state, dialect, new_request_id(state.rng.getrandbits(128)),
                  dialect.sse_requested(headers))
    if stats.log is not None:
        ex.entry = entry = [stats.last_arrival, None, None, None, None, None, None]
        stats.log.append(entry)

    # Order: auth, body, model, semantics, rate limits, then the injected fault, so permanent
    # request errors are reported the same way on every attempt.
    try:
        label = state.client_label(state.check_auth(headers.get("Authorization")))
        ex.client = stats.client(label, second)
        call = dialect.parse(await request.read(), headers)
        ex.model = call.model
        bump(stats.by_model, call.model)
        bump(stats.by_stream, "stream" if call.stream else "plain")
        key = headers.get("X-Runner-Row-Key") or row_key(call.messages)
        attempt = stats.received(key)
        if ex.entry is not None:
            ex.entry[3:6] = label, key, attempt
        if call.model not in config.models:
            raise ApiError("model_not_found", call.model)
        done = with_choices(call, complete(call))
        tokens = done.prompt_tokens + done.completion_tokens
        verdict = state.limits.check(call.model, tokens)
        if verdict is not None:
            stats.rejected[verdict] += 1
            stats.mark("rejected", ex.client, second)
            raise ApiError(LIMIT_ERRORS[verdict])
        stats.admit(call.model, tokens)
        stats.mark("admitted", ex.client, second)
    except ApiError as err:
        await state.delay()
        return ex.error(err)

    fault = state.first_fault() or config.faults.pick(config.seed, key, attempt)
    if fault in STREAM_FAULTS and not call.stream:
        fault = None  # stream faults spare plain requests
    if fault == "bad_json" and call.response_format not in JSON_FORMATS:
        fault = None  # so do JSON faults requests that do not ask for JSON
    if fault is None:
        await state.delay()
        return await _success(request, ex, call, done, key)

    bump(stats.by_fault, fault)
    stats.mark("faulted", ex.client, second)
    if ex.entry is not None:
        ex.entry[6] = fault
    if fault in ERRORS:
        await state.delay()
        return ex.error(ApiError(fault))
    if fault == "bad_json":
        await state.delay()
        return await _success(request, ex, call, _bad_json(state, call, done, key, attempt), key)
    if fault == "slow":
        await state.delay(config.slow_ms)
        return await _success(request, ex, call, done, key)
    if fault in STREAM_FAULTS or (fault == "malformed" and call.stream):
        await state.delay()
        return await _stream(request, ex, call, done, key,
                             "stream_malformed" if fault == "malformed" else fault)
    if fault == "malformed":
        await state.delay()
        whole = dump(dialect.success(call, done, ex.rid))
        return ex.reply(200, whole[: len(whole) // 2])
    if fault == "502":
        await state.delay()
        return ex.reply(502, GATEWAY_502, _HTML)
    if fault == "hang":
        # Woken early only by shutdown; the 504 then goes to a closing connection.
        await state.sleeper.sleep(config.hang_seconds)
        return ex.reply(504, GATEWAY_504, _TEXT)
    if fault == "drop":
        await state.delay()
        return _drop(request)
    raise AssertionError(f"fault {fault!r} has no handler")  # FAULT_NAMES and this drifted


def _bad_json(state: EmulatorState, call: ChatCall, done: Completion, key: str, attempt: int) -> Completion:
    """The same completion (and usage: the model spent its tokens all the same) with an answer the client
    must reject; which kind of bad is a second draw on the same (seed, key, attempt)."""
    schema = call.json_schema if call.response_format == "json_schema" else None
    if schema is None:
        schema = quoted_schema(call.messages, [message_text(m.get("content")) for m in call.messages])
    unit = draw(state.config.seed, key + "\x1fbad_json", attempt)
    done.content = bad_answer(schema, done.content, unit)
    return done


async def _success(
    request: web.Request, ex: Exchange, call: ChatCall, done: Completion, key: str
) -> web.StreamResponse:
    if call.stream:
        return await _stream(request, ex, call, done, key, None)
    ex.state.stats.succeeded(key, ex.client)
    return ex.reply(200, dump(ex.dialect.success(call, done, ex.rid)))


def _frames(ex: Exchange, call: ChatCall, done: Completion, fault: str | None) -> list[bytes]:
    """The bytes of every frame to send: the whole stream, or the part a fault leaves."""
    chunks = ex.state.config.stream_chunks
    native = ex.dialect is DASHSCOPE
    if native:
        body, final = native_plan(call, done, ex.rid, chunks)
        frame: Any = native_frame
    else:
        body, final = compat_plan(call, done, ex.rid, chunks)
        frame = compat_frame
    if fault is None:
        return [frame(payload, i) for i, payload in enumerate(body + final)]
    # Faults send half the body frames (at least one where there is one), then their ending.
    cut = min(max(1, len(body) // 2), len(body))
    out = [frame(payload, i) for i, payload in enumerate(body[:cut])]
    if fault == "stream_malformed":
        following = (body + final)[cut]  # a JSON payload: [DONE] is never right after the body
        out.append(frame(following[: len(following) // 2], cut))
    elif fault == "stream_error":
        if native:
            spec = MID_STREAM_ERROR
            payload = native_error_payload(spec.native_code, spec.native_message, ex.rid)
            out.append(native_frame(payload, cut, "error", spec.status))
        else:
            out.append(compat_frame(compat_error_payload(ex.rid)))
    # stream_truncate and stream_drop end here; they differ in how the response ends.
    return out


async def _stream(
    request: web.Request,
    ex: Exchange,
    call: ChatCall,
    done: Completion,
    key: str,
    fault: str | None,
) -> web.StreamResponse:
    """Send an SSE stream. A success counts only once its final frame has been handed to the
    socket and the response ended cleanly."""
    state = ex.state
    frames = _frames(ex, call, done, fault)
    response = web.StreamResponse(
        status=200,
        headers={
            "Content-Type": SSE_CONTENT_TYPE,
            "Cache-Control": "no-cache",
            "x-request-id": ex.rid,
        },
    )
    await response.prepare(request)
    ex.count(200)
    abort = fault == "stream_drop"
    delay = state.chunk_delay
    try:
        if delay <= 0:
            # No pause between frames: one write (one syscall) for the lot.
            data = b"".join(frames)
            if abort:
                await response.write(data)
            else:
                await response.write_eof(data)
        else:
            for i, data in enumerate(frames):
                if i and not await state.sleeper.sleep(delay):
                    abort = True  # shutting down: cut the stream
                    break
                await response.write(data)
            if not abort:
                await response.write_eof()
    except ConnectionError:
        return response  # the client went away: not a success
    if abort:
        # Frames already written have reached the kernel; the body never ends.
        transport = request.transport
        if transport is not None:
            transport.abort()
        return response
    if fault is None:
        state.stats.succeeded(key, ex.client)
    return response


def _drop(request: web.Request) -> web.StreamResponse:
    """Close the TCP connection without a byte of response."""
    transport = request.transport
    if transport is not None:
        transport.abort()
    # aiohttp finds the transport closed and writes nothing; this object is never sent.
    return web.Response(status=500)
