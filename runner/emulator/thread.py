"""Emulator: the server on a background thread with its own event loop, for tests and scripts."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

from .config import EmulatorConfig
from .server import (
    DASHSCOPE_PREFIX,
    OPENAI_PREFIX,
    STATE,
    EmulatorState,
    base_url,
    build_app,
    start_site,
)

T = TypeVar("T")

# Waiting longer than this for the server thread means it is wedged; fail loudly instead.
THREAD_TIMEOUT = 30.0


class Emulator:
    """Run the emulator in a background thread.

    >>> with Emulator(EmulatorConfig(faults={"429": 0.1})) as emu:
    ...     client = httpx.Client(base_url=emu.openai_base_url)

    `clock` (monotonic seconds, called on the server thread) drives the rate limiter and the
    batches' lifecycle.
    start() returns once the socket listens; stop() wakes sleeping `hang`/`slow` handlers,
    closes the listening socket and joins the thread. stats() and reset() are safe from any
    thread, and stats() still works after stop().
    """

    def __init__(
        self,
        config: EmulatorConfig = EmulatorConfig(),
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.clock = clock
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._state: EmulatorState | None = None
        # Guards "the loop is serving" so that calls scheduled onto it always run.
        self._lock = threading.Lock()
        self._serving = False

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> Emulator:
        if self._thread is not None:
            raise RuntimeError("Emulator already started")
        self._thread = threading.Thread(target=self._run, name="runner-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(THREAD_TIMEOUT):
            raise RuntimeError("emulator thread did not start listening in time")
        if self._error is not None:
            self._thread.join(THREAD_TIMEOUT)
            raise self._error
        return self

    def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        with self._lock:
            if self._serving and self._loop is not None and self._stop_event is not None:
                self._loop.call_soon_threadsafe(self._stop_event.set)
        thread.join(THREAD_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError("emulator thread did not stop in time")

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to start(); the thread must not die silently
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        app = build_app(self.config, clock=self.clock)
        runner, self._port = await start_site(app, self.host, self._requested_port)
        self._state = app[STATE]
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        with self._lock:
            self._serving = True
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            with self._lock:
                self._serving = False
            await runner.cleanup()

    # -- addresses -----------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("Emulator not started")
        return self._port

    @property
    def url(self) -> str:
        return base_url(self.host, self.port)

    @property
    def openai_base_url(self) -> str:
        return self.url + OPENAI_PREFIX

    @property
    def dashscope_base_url(self) -> str:
        return self.url + DASHSCOPE_PREFIX

    # -- stats -----------------------------------------------------------------------------

    def stats(self, keys: bool = True, log: bool = False) -> dict[str, Any]:
        """The same JSON-ready dict as GET /_emulator/stats (keys=False leaves out "keys"; log=True
        adds the request log, kept when the config says request_log)."""
        return self._call(lambda state: state.stats.snapshot(keys=keys, log=log))

    def reset(self) -> None:
        """Zero all counters and restart the limit schedule, as POST /_emulator/reset does."""
        self._call(lambda state: state.reset())

    def set_limits(self, **change: Any) -> dict[str, Any]:
        """Change the limits now, as POST /_emulator/limits does: rpm, tpm (None: no limit) and
        scale, each optional. Returns the limits in force."""
        def apply(state: EmulatorState) -> dict[str, Any]:
            state.limits.set_limits(**change)
            return state.limits.view()

        return self._call(apply)

    def _call(self, fn: Callable[[EmulatorState], T]) -> T:
        state = self._state
        if state is None:
            raise RuntimeError("Emulator not started")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn(state))
            except BaseException as exc:
                future.set_exception(exc)

        with self._lock:
            on_loop = self._serving and self._loop is not None
            if on_loop:
                self._loop.call_soon_threadsafe(run)  # type: ignore[union-attr]
        if not on_loop:
            # Stopped: no other thread touches the counters any more.
            run()
        return future.result(THREAD_TIMEOUT)
