"""The row actor: sends the rows the driver hands it, each through RowSender.results_of, as online.

One async actor per share of the job's concurrency; its own HTTP client (created on first use, in the
actor's event loop), its own retry budget, and a LeasedRateLimiter that takes its slots from the one
shared limiter actor. `send(requests)` is a streaming generator: it yields, as rows finish, the rows
answered so far (whatever finished together goes in one message), so the driver commits each answer
about as soon as a local run would. A row never fails the call: its failure is its error row; a row
left by a stopping run is simply not answered; what stops the whole run (a bad key, no money, the
retry budget) comes back as a value, and only a bug raises.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from typing import Any, AsyncIterator

import anyio

from ...clients import ChatClient
from ...clients.stream_rules import StreamPolicy
from ...cost import PriceBook
from ...endpoint_check import EndpointGuard
from ...endpoints import ApiKey
from ...errors import RunnerError
from ...limits import RetryPolicy
from ...ratelimit import RetryBudget
from ...records import Request, Result
from ... import structured
from ...row_sender import RowSender
from ...spec import JobSpec
from .. import Stop, Stopping
from .limiter import LeasedRateLimiter

# (row_id of the request, its output rows) for each row that finished; then the run-level error, if any:
# (class, message, hint) of a RunnerError, or ("bug", traceback) for anything else.
Answered = list[tuple[int, list[Result]]]
PortableError = tuple[Any, str, str | None] | None


class SealedKey(ApiKey):
    """The API key as the driver hands it to the row actors: an ApiKey (masked in every repr, str and
    format) that pickles, where ApiKey refuses to so that a key never leaves a process by accident."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "SealedKey('***')"

    __str__ = __repr__

    def __reduce__(self):
        return (SealedKey, (self.reveal(),))


def portable(error: BaseException) -> PortableError:
    """A run-level error as plain values: RunnerError subclasses do not all pickle their hint."""
    if isinstance(error, RunnerError):
        return type(error), error.message, error.hint
    return "bug", "".join(traceback.format_exception(error)), None


def rebuild(error: PortableError) -> BaseException:
    """The exception `portable` described, on the driver."""
    kind, message, hint = error
    if kind == "bug":
        return RuntimeError(f"a Ray row actor failed:\n{message}")
    rebuilt = kind.__new__(kind)
    RunnerError.__init__(rebuilt, message, hint=hint)
    return rebuilt


class SharedBudget:
    """RowSender's `spend` on a row actor: reservations wait in the shared limiter actor."""

    def __init__(self, limiter: LeasedRateLimiter) -> None:
        self._limiter = limiter

    async def reserve(self, amount: float) -> None:
        await self._limiter.reserve(amount)

    def settle(self, reserved: float, actual: float | None) -> None:
        self._limiter.settle_cost(reserved, actual)


class RowActor:
    """The body of a row actor (made a Ray actor with `ray.remote` by the executor)."""

    def __init__(self, spec: JobSpec, limiter_name: str, key: SealedKey, concurrency: int) -> None:
        import ray

        self.spec = spec
        # Found by name, not passed as a handle: Ray keeps a handle argument in its object store, where a
        # restart of this actor could not find it again.
        self.limiter = LeasedRateLimiter(ray.get_actor(limiter_name))
        self._key = key
        self._concurrency = concurrency
        self._sender: RowSender | None = None
        self._client: ChatClient | None = None
        self._ready_lock: asyncio.Lock | None = None
        self._stop: Stop | None = None  # made in the actor's event loop (anyio needs one)

    async def send(self, requests: list[Request]) -> AsyncIterator[tuple[Answered, PortableError]]:
        """Send `requests` at once; yield (rows answered, run-level error) as they finish."""
        try:
            sender = await self._ready()
        except RunnerError as error:  # e.g. a header value the client refuses
            yield [], portable(error)
            return
        finished: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._one(sender, request, finished)) for request in requests]
        try:
            remaining = len(tasks)
            while remaining:
                items = [await finished.get()]
                while not finished.empty():
                    items.append(finished.get_nowait())
                remaining -= len(items)
                answered = [(row_id, results) for row_id, results, _ in items if results]
                error = next((error for _, _, error in items if error is not None), None)
                if answered or error is not None:
                    yield answered, error
        finally:  # the driver went away (or stopped at once): nothing of this call goes on
            for task in tasks:
                task.cancel()

    async def stop(self) -> None:
        """The run is stopping: no new request (rows waiting for the limiter, the budget or a backoff are left)."""
        self.limiter.stop()
        if self._stop is not None:
            self._stop.request("stop")

    async def pause(self, open_in: float, paused_seconds: float) -> None:
        """The shared gate closed (see LeasedRateLimiter.pause)."""
        self.limiter.pause(open_in, paused_seconds)

    async def finish(self) -> None:
        """The run is over: hand the buffered limiter reports to the shared limiter (so the summary counts every
        answer) and close the HTTP client."""
        await self.limiter.flush()
        if self._client is not None:
            client, self._client = self._client, None
            await client.__aexit__(None, None, None)

    async def _ready(self) -> RowSender:
        if self._ready_lock is None:
            self._ready_lock = asyncio.Lock()
        async with self._ready_lock:
            if self._sender is None:
                self._sender = await self._make_sender()
        return self._sender

    async def _make_sender(self) -> RowSender:
        spec = self.spec
        self._stop = self._stop or Stop()
        if self.limiter.stopped:
            self._stop.request("stop")
        key = ApiKey(self._key.reveal())
        client = ChatClient(spec.endpoint, key, max_connections=self._concurrency,
                            streaming=StreamPolicy(spec.model.stream, spec.model.stream_only_models))
        await client.__aenter__()
        self._client = client
        guarded = EndpointGuard(client, dialect=spec.endpoint.dialect, job_models=spec.model.all_names, api_key=key)
        prices = PriceBook(spec.endpoint.region, job_model=spec.model.name, overrides=spec.model.prices)
        spend = SharedBudget(self.limiter) if spec.run.max_cost is not None else None
        # Judged only past four rounds of this actor's requests in flight, as online.
        retry_budget = RetryBudget(spec.run.retry_budget, time.monotonic,
                                   min_retries=max(100, 4 * self._concurrency))
        return RowSender(guarded, RetryPolicy.from_spec(spec), anyio.sleep, self._stop, self.limiter, retry_budget,
                         spec.run.expected_output_tokens, prices, spend, structured.for_job(spec))

    async def _one(self, sender: RowSender, request: Request, finished: asyncio.Queue) -> None:
        results: list[Result] = []
        error: PortableError = None
        try:
            if not sender.stop.requested:  # rows handed over after the stop are not started
                results = await sender.results_of(request)
        except Stopping:
            pass
        except RunnerError as exc:
            sender.stop.fail(exc)  # this actor sends nothing new; the driver stops the others
            error = portable(exc)
        except Exception as exc:  # a bug: the driver raises it with this traceback
            error = portable(exc)
        finished.put_nowait((request.row_id, results, error))
