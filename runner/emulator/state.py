"""What one app instance owns: config, counters, rate limits, randomness, sleepers."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

from aiohttp import web

from .batches import BatchStore
from .config import EmulatorConfig
from .generate import ApiError
from .limits import RateLimits
from .stats import Stats, client_label


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
    """Everything one app instance owns. `clock` drives the rate limiter and the batches'
    lifecycle (scaled by batch_time_scale)."""

    def __init__(
        self, config: EmulatorConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.stats = Stats(clock, keep_log=config.request_log)
        self.sleeper = Sleeper()
        self.api_keys = frozenset(config.api_keys) if config.api_keys is not None else None
        # Request ids and latency jitter only; fault choice never uses this stream.
        self.rng = random.Random()
        # Retry-After header values by answer status (the real API sends none).
        self.retry_after: dict[int, str] = {
            status: f"{seconds:g}"
            for status, seconds in ((429, config.retry_after), (503, config.retry_after_503))
            if seconds is not None
        }
        self.limits = RateLimits(
            rpm=config.rpm,
            tpm=config.tpm,
            limits=config.limits,
            burst_factor=config.burst_factor,
            burst_window_s=config.burst_window_s,
            clock=clock,
            schedule=config.limit_schedule,
        )
        self.stats.limits_view = self.limits.view
        self.fail_first_left = config.fail_first
        self._labels: dict[str, str] = {}
        self.chunk_delay = config.chunk_delay_ms / 1000.0
        self.batches = BatchStore(config, clock, self.rng)
        self.stats.batch_statuses = self.batches.status_counts

    def reset(self) -> None:
        """POST /_emulator/reset: zero the counters and restart the limit schedule (limits set at
        run time, bucket levels and fail_first are kept)."""
        self.stats.reset()
        self.limits.reset_schedule()

    def arrive(self) -> int:
        """Count a chat request arriving now (the first one starts the limit schedule); its second."""
        stats = self.stats
        second = stats.arrive()
        if stats.requests == 1:
            self.limits.start_schedule(stats.origin)  # type: ignore[arg-type]
        return second

    def first_fault(self) -> str | None:
        """fail_first's fault while some are left."""
        if self.fail_first_left > 0:
            self.fail_first_left -= 1
            return self.config.fail_first_fault
        return None

    def client_label(self, token: str) -> str:
        label = self._labels.get(token)
        if label is None:
            self._labels[token] = label = client_label(token)
        return label

    def check_auth(self, header: str | None) -> str:
        """The bearer token of an accepted Authorization header; ApiError otherwise."""
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
        return token

    def delay_seconds(self, extra_ms: float = 0.0) -> float:
        config = self.config
        ms = config.latency_ms + extra_ms
        if config.latency_jitter_ms:
            ms += config.latency_jitter_ms * self.rng.random()
        return ms / 1000.0

    async def delay(self, extra_ms: float = 0.0) -> None:
        seconds = self.delay_seconds(extra_ms)
        if seconds > 0:
            await self.sleeper.sleep(seconds)


STATE: web.AppKey[EmulatorState] = web.AppKey("runner_emulator_state", EmulatorState)
