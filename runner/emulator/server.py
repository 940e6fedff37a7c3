"""The aiohttp application: routes, serving, and the stats/reset endpoints."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .batch_http import add_batch_routes
from .config import EmulatorConfig
from .handler import answer
from .responses import DASHSCOPE, OPENAI, DashScopeDialect, OpenAIDialect, dump, new_request_id
from .state import STATE, EmulatorState, Sleeper
from .stats import bump

OPENAI_PREFIX = "/compatible-mode/v1"
DASHSCOPE_PREFIX = "/api/v1"
BACKLOG = 2048
# Bodies well above the real API's 6 MB line limit still get a JSON answer, not a 413 page.
CLIENT_MAX_SIZE = 16 * 1024 * 1024
# Handlers are woken at shutdown (see Sleeper), so this only bounds a stuck body read.
SHUTDOWN_TIMEOUT = 2.0


def build_app(
    config: EmulatorConfig, *, clock: Callable[[], float] = time.monotonic
) -> web.Application:
    """The emulator as an aiohttp Application (both dialects, stats and reset endpoints).

    `clock` (monotonic seconds) drives the rate limiter and the batches' lifecycle; tests pass
    a fake one."""
    app = web.Application(client_max_size=CLIENT_MAX_SIZE)
    state = EmulatorState(config, clock=clock)
    app[STATE] = state

    async def openai_handler(request: web.Request) -> web.StreamResponse:
        return await _handle(request, state, OPENAI)

    async def dashscope_handler(request: web.Request) -> web.StreamResponse:
        return await _handle(request, state, DASHSCOPE)

    async def stats_handler(request: web.Request) -> web.Response:
        keys = _flag(request, "keys", True)
        log = _flag(request, "log", False)
        return web.json_response(state.stats.snapshot(keys=keys, log=log))

    async def reset_handler(request: web.Request) -> web.Response:
        state.reset()
        return web.json_response({"reset": True})

    async def unknown_path(request: web.Request) -> web.Response:
        # The real gateway's answer to a path it does not serve (API facts 5.2, the NotFound row): a
        # base_url ending in /chat/completions, or the other dialect's root, lands here.
        state.stats.unrouted += 1
        bump(state.stats.by_status, 404)
        rid = new_request_id(state.rng.getrandbits(128))
        body = dump({"code": "NotFound", "message": "Not found!", "request_id": rid})
        return web.Response(body=body, status=404, content_type="application/json", headers={"x-request-id": rid})

    async def limits_get_handler(request: web.Request) -> web.Response:
        return web.json_response(state.limits.view())

    async def limits_post_handler(request: web.Request) -> web.Response:
        try:
            change = parse_limits_change(await request.read())
            state.limits.set_limits(**change)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(state.limits.view())

    async def wake_sleepers(app: web.Application) -> None:
        state.sleeper.wake_all()

    app.router.add_post(OPENAI_PREFIX + "/chat/completions", openai_handler)
    for kind in ("text-generation", "multimodal-generation"):
        app.router.add_post(
            f"{DASHSCOPE_PREFIX}/services/aigc/{kind}/generation", dashscope_handler
        )
    add_batch_routes(app, state, OPENAI_PREFIX)
    app.router.add_get("/_emulator/stats", stats_handler)
    app.router.add_post("/_emulator/reset", reset_handler)
    app.router.add_get("/_emulator/limits", limits_get_handler)
    app.router.add_post("/_emulator/limits", limits_post_handler)
    app.router.add_route("*", "/{path:.*}", unknown_path)  # last: only what no route above serves
    app.on_shutdown.append(wake_sleepers)
    return app


def _flag(request: web.Request, name: str, default: bool) -> bool:
    value = request.query.get(name)
    if value is None:
        return default
    return value.lower() not in ("0", "false", "no")


LIMITS_FIELDS = ("rpm", "tpm", "scale")


def parse_limits_change(body: bytes) -> dict[str, Any]:
    """The body of POST /_emulator/limits: a JSON object with any of rpm, tpm (a number > 0, or
    null for no limit) and scale (a number > 0); ValueError with a one-line message otherwise."""
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise ValueError("the body must be a JSON object like {\"rpm\": 600, \"scale\": 0.5}") from None
    if not isinstance(data, dict):
        raise ValueError("the body must be a JSON object like {\"rpm\": 600, \"scale\": 0.5}")
    unknown = sorted(set(data) - set(LIMITS_FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; expected {', '.join(LIMITS_FIELDS)}")
    if data.get("scale", 1) is None:
        raise ValueError("scale must be a number > 0, not null")
    return dict(data)


async def _handle(
    request: web.Request, state: EmulatorState, dialect: OpenAIDialect | DashScopeDialect
) -> web.StreamResponse:
    stats = state.stats
    stats.enter()
    try:
        return await answer(request, state, dialect)
    finally:
        stats.leave()


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


__all__ = [
    "DASHSCOPE_PREFIX",
    "OPENAI_PREFIX",
    "STATE",
    "EmulatorState",
    "Sleeper",
    "base_url",
    "build_app",
    "run_forever",
    "serve",
    "start_site",
]
