"""The files and batches API (API facts 7.1) over httpx: upload, create, retrieve, find, cancel, download.

Every call is retried a few times on a connection failure, a 429 or a 5xx, except `create`, which
is not idempotent: the driver looks for the batch before it sends a create again. Errors the user
must act on (bad key, no money) come back as the usual RunnerErrors; any other refusal as
BatchApiError, naming the call.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Awaitable, Callable

import anyio
import httpx

from ..clients import classify_answer, openai_compat
from ..endpoints import ApiKey, batch_base_url, request_headers
from ..errors import CallError, RunnerError, TransientCallError
from ..spec import EndpointSpec

CHAT_ENDPOINT = "/v1/chat/completions"
ATTEMPTS = 5
LIST_PAGE = 100


class BatchApiError(RunnerError):
    """The files or batches API refused a call (or kept failing): the batches already created are kept.
    `transient`: the call failed on the way (connection, 429, 5xx), so it may have been carried out."""

    exit_code = 1
    transient = False


class BatchApi:
    """One httpx client for the batch endpoints of a job's host. Use as `async with BatchApi(...) as api`."""

    def __init__(self, endpoint: EndpointSpec, api_key: ApiKey, *,
                 transport: httpx.AsyncBaseTransport | None = None,
                 sleep: Callable[[float], Awaitable[None]] = anyio.sleep, attempts: int = ATTEMPTS) -> None:
        self.base_url = batch_base_url(endpoint)
        self._attempts = attempts  # per call, for the calls that may be retried
        self._endpoint = endpoint
        self._api_key = api_key
        self._transport = transport
        self._sleep = sleep
        self._http: httpx.AsyncClient | None = None

    def __repr__(self) -> str:
        return f"BatchApi(base_url={self.base_url!r})"

    async def __aenter__(self) -> "BatchApi":
        headers = {k: v for k, v in request_headers(self._endpoint, self._api_key).items() if k != "Content-Type"}
        timeout = httpx.Timeout(max(self._endpoint.timeout, 120.0), connect=self._endpoint.connect_timeout)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout,
                                       transport=self._transport, trust_env=False)
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # -- calls -------------------------------------------------------------------------------
    async def upload(self, path: Path) -> dict[str, Any]:
        """POST /files (purpose batch), streaming the file from disk."""
        async def send() -> httpx.Response:
            with open(path, "rb") as fh:
                return await self._client.post("/files", data={"purpose": "batch"},
                                               files={"file": (path.name, fh, "application/jsonl")})
        return (await self._call(f"upload {path.name}", send)).json()

    async def create(self, input_file_id: str, completion_window: str, metadata: dict[str, str]) -> dict[str, Any]:
        """POST /batches, sent once: a failure is raised, and the caller checks `find` before trying again."""
        body = {"input_file_id": input_file_id, "endpoint": CHAT_ENDPOINT, "completion_window": completion_window,
                "metadata": metadata}
        return (await self._call(f"create a batch from {input_file_id}",
                                 lambda: self._client.post("/batches", json=body), attempts=1)).json()

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        return (await self._call(f"check batch {batch_id}", lambda: self._client.get(f"/batches/{batch_id}"))).json()

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return (await self._call(f"cancel batch {batch_id}",
                                 lambda: self._client.post(f"/batches/{batch_id}/cancel"))).json()

    async def find(self, input_file_id: str, ds_name: str | None = None) -> dict[str, Any] | None:
        """The batch made from `input_file_id`, if one exists (newest first, the last 30 days are listed)."""
        params: dict[str, Any] = {"limit": LIST_PAGE, "input_file_ids": input_file_id}
        if ds_name:
            params["ds_name"] = ds_name
        while True:
            page = (await self._call("list batches", lambda: self._client.get("/batches", params=params))).json()
            for batch in page.get("data") or ():
                if batch.get("input_file_id") == input_file_id:
                    return batch
            if not page.get("has_more") or not page.get("last_id"):
                return None
            params["after"] = page["last_id"]

    async def download(self, file_id: str, target: Path) -> int:
        """GET /files/{id}/content into `target` (written whole or not at all); returns its size."""
        tmp = target.with_name("." + target.name + ".tmp")

        async def fetch() -> httpx.Response:
            async with self._client.stream("GET", f"/files/{file_id}/content") as response:
                if response.is_success:
                    with open(tmp, "wb") as fh:
                        async for chunk in response.aiter_bytes(1 << 20):
                            fh.write(chunk)
                        fh.flush()
                        os.fsync(fh.fileno())
                else:
                    await response.aread()
                return response

        await self._call(f"download file {file_id}", fetch)
        os.replace(tmp, target)
        return target.stat().st_size

    # -- plumbing ----------------------------------------------------------------------------
    @property
    def _client(self) -> httpx.AsyncClient:
        assert self._http is not None, "use `async with BatchApi(...)`"
        return self._http

    async def _call(self, what: str, send: Callable[[], Awaitable[httpx.Response]], *,
                    attempts: int | None = None) -> httpx.Response:
        attempts = self._attempts if attempts is None else attempts
        for attempt in range(1, attempts + 1):
            try:
                response = await send()
            except httpx.TransportError as exc:
                error: CallError | RunnerError = TransientCallError(f"connection failed: {exc or type(exc).__name__}")
            else:
                if response.is_success:
                    return response
                error = classify_answer(openai_compat, response.status_code, response.content, response.headers,
                                        region_hint=f"the host {self.base_url.split('/')[2]}")
            if isinstance(error, RunnerError):
                raise error
            if not error.retryable or attempt == attempts:
                status = f"HTTP {error.http_status} " if error.http_status else ""
                failure = BatchApiError(f"cannot {what}: {status}{error.code or ''} {error.message}".replace("  ", " "),
                                        hint="run the same command again; batches already created are kept and "
                                             "picked up")
                failure.transient = error.retryable
                raise failure
            await self._sleep(min(2.0 ** (attempt - 1), 30.0))
        raise AssertionError("unreachable")
