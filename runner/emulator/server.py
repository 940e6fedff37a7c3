"""The aiohttp application: routes, the request handler, faults and delays, serving."""

from __future__ import annotations

import asyncio
import json
import random
import sys
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .config import EmulatorConfig
from .faults import row_key
from .generate import ApiError, complete
from .responses import (
    DASHSCOPE,
    ERRORS,
    GATEWAY_502,
    GATEWAY_504,
    OPENAI,
    DashScopeDialect,
    OpenAIDialect,
    new_request_id,
)
from .stats import Stats, bump

OPENAI_PREFIX = "/compatible-mode/v1"
DASHSCOPE_PREFIX = "/api/v1"
BACKLOG = 2048
# Bodies well above the real API's 6 MB line limit still get a JSON answer, not a 413 page.
CLIENT_MAX_SIZE = 16 * 1024 * 1024
# Handlers are woken at shutdown (see Sleeper), so this only bounds a stuck body read.
SHUTDOWN_TIMEOUT = 2.0

_JSON = "application/json"
_HTML = "text/html"
_TEXT = "text/plain"

Dialect = OpenAIDialect | DashScopeDialect


class Sleeper:
    """asyncio.sleep that shutdown can cut short, so `hang` never holds the server open."""

    def __init__(self) -> None:
        self._waiting: set[asyncio.Future[bool]] = set()
        self.closing = False

    async def sleep(self, seconds: float) -> bool:
        """Sleep; True if the time passed, False if woken by shutdown."""
        if self.closing:
            return False
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        handle = loop.call_later(seconds, _resolve, future, True)
        self._waiting.add(future)
        try:
            return await future
        finally:
            handle.cancel()
            self._waiting.discard(future)

    def wake_all(self) -> None:
        self.closing = True
        for future in self._waiting:
            _resolve(future, False)


def _resolve(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)


class EmulatorState:
    """Everything one app instance owns: config, counters, randomness, sleepers."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.stats = Stats()
        self.sleeper = Sleeper()
        self.api_keys = frozenset(config.api_keys) if config.api_keys is not None else None
        # Request ids and latency jitter only; fault choice never uses this stream.
        self.rng = random.Random()
        self.retry_after = None if config.retry_after is None else f"{config.retry_after:g}"

    def check_auth(self, header: str | None) -> None:
        if not header:
            raise ApiError("missing_api_key")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError("invalid_api_key")
        if self.api_keys is None:
            if not token.startswith("sk-"):
                raise ApiError("invalid_api_key")
        elif token not in self.api_keys:
            raise ApiError("invalid_api_key")

    def delay_seconds(self, extra_ms: float = 0.0) -> float:
        config = self.config
        ms = config.latency_ms + extra_ms
        if config.latency_jitter_ms:
            ms += config.latency_jitter_ms * self.rng.random()
        return ms / 1000.0

    def reply(
        self,
        status: int,
        body: bytes,
        rid: str,
        content_type: str = _JSON,
        extra: dict[str, str] | None = None,
    ) -> web.Response:
        bump(self.stats.by_status, status)
        headers = {"Content-Type": content_type, "x-request-id": rid}
        if extra:
            headers.update(extra)
        return web.Response(body=body, status=status, headers=headers)


STATE: web.AppKey[EmulatorState] = web.AppKey("runner_emulator_state", EmulatorState)


def build_app(config: EmulatorConfig) -> web.Application:
    """The emulator as an aiohttp Application (both dialects, stats and reset endpoints)."""
    app = web.Application(client_max_size=CLIENT_MAX_SIZE)
    state = EmulatorState(config)
    app[STATE] = state

    async def openai_handler(request: web.Request) -> web.StreamResponse:
        return await _handle(request, state, OPENAI)

    async def dashscope_handler(request: web.Request) -> web.StreamResponse:
        return await _handle(request, state, DASHSCOPE)

    async def stats_handler(request: web.Request) -> web.Response:
        keys = request.query.get("keys", "1").lower() not in ("0", "false", "no")
        return web.json_response(state.stats.snapshot(keys=keys))

    async def reset_handler(request: web.Request) -> web.Response:
        state.stats.reset()
        return web.json_response({"reset": True})

    async def wake_sleepers(app: web.Application) -> None:
        state.sleeper.wake_all()

    app.router.add_post(OPENAI_PREFIX + "/chat/completions", openai_handler)
    for kind in ("text-generation", "multimodal-generation"):
        app.router.add_post(
            f"{DASHSCOPE_PREFIX}/services/aigc/{kind}/generation", dashscope_handler
        )
    app.router.add_get("/_emulator/stats", stats_handler)
    app.router.add_post("/_emulator/reset", reset_handler)
    app.on_shutdown.append(wake_sleepers)
    return app


async def _handle(
    request: web.Request, state: EmulatorState, dialect: Dialect
) -> web.StreamResponse:
    stats = state.stats
    stats.enter()
    try:
        return await _answer(request, state, dialect)
    finally:
        stats.leave()


async def _answer(
    request: web.Request, state: EmulatorState, dialect: Dialect
) -> web.StreamResponse:
    config = state.config
    stats = state.stats
    stats.requests += 1
    bump(stats.by_dialect, dialect.name)
    headers = request.headers
    workspace = headers.get("X-DashScope-WorkSpace")
    if workspace:
        bump(stats.workspaces, workspace)
    rid = new_request_id(state.rng.getrandbits(128))

    # Order: auth, body, model, semantics, then the injected fault, so permanent request
    # errors are reported the same way on every attempt.
    try:
        state.check_auth(headers.get("Authorization"))
        call = dialect.parse(await request.read(), headers)
        bump(stats.by_model, call.model)
        key = headers.get("X-Runner-Row-Key") or row_key(call.messages)
        attempt = stats.received(key)
        if call.model not in config.models:
            raise ApiError("model_not_found", call.model)
        done = complete(call)
    except ApiError as err:
        status, body = dialect.error(err, rid)
        await _delay(state, 0.0)
        return state.reply(status, _dump(body), rid)

    fault = config.faults.pick(config.seed, key, attempt)
    if fault is None:
        await _delay(state, 0.0)
        stats.succeeded(key)
        return state.reply(200, _dump(dialect.success(call, done, rid)), rid)

    bump(stats.by_fault, fault)
    spec = ERRORS.get(fault)
    if spec is not None:
        status, body = dialect.error(ApiError(fault), rid)
        await _delay(state, 0.0)
        if spec.status == 429 and state.retry_after is not None:
            return state.reply(status, _dump(body), rid, extra={"Retry-After": state.retry_after})
        return state.reply(status, _dump(body), rid)
    if fault == "slow":
        await _delay(state, config.slow_ms)
        stats.succeeded(key)
        return state.reply(200, _dump(dialect.success(call, done, rid)), rid)
    if fault == "malformed":
        await _delay(state, 0.0)
        whole = _dump(dialect.success(call, done, rid))
        return state.reply(200, whole[: len(whole) // 2], rid)
    if fault == "502":
        await _delay(state, 0.0)
        return state.reply(502, GATEWAY_502, rid, _HTML)
    if fault == "hang":
        # Woken early only by shutdown; the 504 then goes to a closing connection.
        await state.sleeper.sleep(config.hang_seconds)
        return state.reply(504, GATEWAY_504, rid, _TEXT)
    if fault == "drop":
        await _delay(state, 0.0)
        return _drop(request)
    raise AssertionError(f"fault {fault!r} has no handler")  # FAULT_NAMES and this drifted


def _dump(body: dict[str, Any]) -> bytes:
    # UTF-8 like the real API; "replace" only matters for lone surrogates echoed from input.
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")


async def _delay(state: EmulatorState, extra_ms: float) -> None:
    seconds = state.delay_seconds(extra_ms)
    if seconds > 0:
        await state.sleeper.sleep(seconds)


def _drop(request: web.Request) -> web.StreamResponse:
    """Close the TCP connection without a byte of response."""
    transport = request.transport
    if transport is not None:
        transport.abort()
    # aiohttp finds the transport closed and writes nothing; this object is never sent.
    return web.Response(status=500)


async def start_site(
    app: web.Application, host: str, port: int
) -> tuple[web.AppRunner, int]:
    """Start serving `app`; return the runner (for cleanup) and the bound port."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=BACKLOG, reuse_address=True)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, runner.addresses[0][1]


async def serve(
    config: EmulatorConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    on_ready: Callable[[int], None] | None = None,
) -> None:
    """Serve until cancelled. `on_ready(port)` is called once the socket listens."""
    runner, bound = await start_site(build_app(config), host, port)
    try:
        if on_ready is not None:
            on_ready(bound)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def base_url(host: str, port: int) -> str:
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def run_forever(config: EmulatorConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the emulator in this thread until Ctrl-C (for `runner emulator`)."""

    def announce(bound: int) -> None:
        url = base_url(host, bound)
        print(
            f"emulator listening on {url} "
            f"(openai: {url}{OPENAI_PREFIX}, dashscope: {url}{DASHSCOPE_PREFIX})",
            file=sys.stderr,
            flush=True,
        )

    try:
        asyncio.run(serve(config, host, port, on_ready=announce))
    except KeyboardInterrupt:
        pass
