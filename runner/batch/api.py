"""The files and batches API (API facts 7.1) over httpx: upload, create, retrieve, find, cancel, download.

Every call is retried a few times on a connection failure, a 429, a 5xx or an answer it cannot read,
except `create`, which is not idempotent: the driver looks for the batch before it sends a create
again. Errors the user must act on (bad key, no money) come back as the usual RunnerErrors; any
other refusal or failure as BatchApiError, naming the call, on one line. Nothing the transport
raises and no answer's shape gets past `_call` as a traceback: an answer is checked for the fields
the callers read before it is returned (`Answer`), and a download cut short never replaces the file.

The key never leaves in a message, a returned answer or a downloaded file: every message built from
an answer or an exception is scrubbed (clients.transport_errors.scrub), and so are the answers and the
files' lines (a server or a proxy that echoes the Authorization header would otherwise put the key
into the state file and the output).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import quote

import anyio
import httpx

from ..clients import classify_answer, openai_compat
from ..clients.classify import body_snippet
from ..clients.transport_errors import UNSENDABLE, call_error, caught_exceptions, scrub
from ..endpoints import ApiKey, batch_base_url, request_headers
from ..errors import BadResponse, CallError, PermanentCallError, RunnerError, SinkError, SpecError
from ..spec import EndpointSpec

CHAT_ENDPOINT = "/v1/chat/completions"
ATTEMPTS = 5
LIST_PAGE = 100
MALFORMED = "malformed_answer"
MESSAGE_LIMIT = 400  # characters of a BatchApiError's message: one line, whatever the server said


class BatchApiError(RunnerError):
    """The files or batches API refused a call (or kept failing): the batches already created are kept.
    `transient`: the call failed on the way (connection, 429, 5xx, an answer cut or garbled), so it may
    have been carried out."""

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
        try:
            self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout,
                                           transport=self._transport, trust_env=False)
        except httpx.InvalidURL as exc:  # a spec built without load_job, which checks base_url
            raise SpecError(f"[endpoint] base_url: not a URL the runner can send to ({self._scrub(str(exc))})",
                            hint="set base_url to http(s)://host[:port]/compatible-mode/v1") from None
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # -- calls -------------------------------------------------------------------------------
    async def upload(self, path: Path) -> dict[str, Any]:
        """POST /files (purpose batch), streaming the file from disk."""
        async def send() -> httpx.Response:
            with _local(f"cannot read the batch file {path}", lambda: open(path, "rb")) as fh:
                return await self._client.post("/files", data={"purpose": "batch"},
                                               files={"file": (path.name, fh, "application/jsonl")})
        return await self._call(f"upload {path.name}", send, check=_file_object)

    async def create(self, input_file_id: str, completion_window: str, metadata: dict[str, str]) -> dict[str, Any]:
        """POST /batches, sent once: a failure is raised, and the caller checks `find` before trying again."""
        body = {"input_file_id": input_file_id, "endpoint": CHAT_ENDPOINT, "completion_window": completion_window,
                "metadata": metadata}
        return await self._call(f"create a batch from {input_file_id}",
                                lambda: self._client.post("/batches", json=body), check=_batch_object, attempts=1)

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        return await self._call(f"check batch {batch_id}", lambda: self._client.get(f"/batches/{_segment(batch_id)}"),
                                check=_batch_object)

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return await self._call(f"cancel batch {batch_id}",
                                lambda: self._client.post(f"/batches/{_segment(batch_id)}/cancel"),
                                check=_batch_object)

    async def find(self, input_file_id: str, ds_name: str | None = None) -> dict[str, Any] | None:
        """The batch made from `input_file_id`, if one exists (newest first, the last 30 days are listed)."""
        params: dict[str, Any] = {"limit": LIST_PAGE, "input_file_ids": input_file_id}
        if ds_name:
            params["ds_name"] = ds_name
        seen: set[str] = set()
        while True:
            page = await self._call("list batches", lambda: self._client.get("/batches", params=params),
                                    check=_batch_page)
            for batch in page["data"]:
                if batch.get("input_file_id") == input_file_id:
                    return batch
            if not page.get("has_more") or not page.get("last_id"):
                return None
            if page["last_id"] in seen:  # a server that hands the same cursor back would list forever
                raise self._failure("list batches", BadResponse(
                    f"the server returned the page after {page['last_id']} again", code=MALFORMED))
            seen.add(page["last_id"])
            params["after"] = page["last_id"]

    async def download(self, file_id: str, target: Path) -> int:
        """GET /files/{id}/content into `target` (written whole or not at all); returns its size. A body cut
        short (by Content-Length or chunking) fails the attempt; the key is taken out of every line."""
        tmp = target.with_name("." + target.name + ".tmp")
        secrets = self._secrets

        async def fetch() -> httpx.Response:
            async with self._client.stream("GET", f"/files/{_segment(file_id)}/content") as response:
                if not response.is_success:
                    await response.aread()
                    return response
                with _local(f"cannot write {tmp}", lambda: open(tmp, "wb")) as fh:
                    lines = _LineScrubber(secrets)
                    async for chunk in response.aiter_bytes(1 << 20):
                        _write(fh, tmp, lines.feed(chunk))
                    _write(fh, tmp, lines.close())
                    try:
                        fh.flush()
                        os.fsync(fh.fileno())
                    except OSError as exc:
                        raise SinkError(f"cannot write {tmp} ({exc.strerror or exc})") from None
                return response

        try:
            await self._call(f"download file {file_id}", fetch)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)  # an attempt cut short leaves no half file behind
        return target.stat().st_size

    # -- plumbing ----------------------------------------------------------------------------
    @property
    def _client(self) -> httpx.AsyncClient:
        assert self._http is not None, "use `async with BatchApi(...)`"
        return self._http

    @property
    def _secrets(self) -> tuple[str, ...]:
        return (self._api_key.reveal(),)

    def _scrub(self, text: str) -> str:
        return scrub(text, self._secrets)

    async def _call(self, what: str, send: Callable[[], Awaitable[httpx.Response]], *,
                    check: Callable[[httpx.Response], Any] | None = None, attempts: int | None = None) -> Any:
        """`send()` until it succeeds (then `check(response)`, the answer the caller reads, or the response),
        retrying what may pass; anything else becomes a one-line BatchApiError or the RunnerError it means."""
        attempts = self._attempts if attempts is None else attempts
        for attempt in range(1, attempts + 1):
            try:
                response = await send()
                if response.is_success:
                    return response if check is None else _scrubbed_answer(check(response), self._secrets)
                error = classify_answer(openai_compat, response.status_code, response.content, response.headers,
                                        region_hint=f"the host {self.base_url.split('/')[2]}")
            except BadResponse as exc:  # a 2xx answer `check` cannot read
                error = exc
            except httpx.InvalidURL as exc:  # not an httpx.HTTPError: a path the URL cannot carry
                error = PermanentCallError(f"the request could not be sent (InvalidURL: {exc})", code=UNSENDABLE)
            except caught_exceptions() as exc:
                error = call_error(exc, secrets=self._secrets)
                error.__cause__ = exc
            if isinstance(error, RunnerError):
                _scrub_error(error, self._secrets)
                raise error
            if not error.retryable or attempt == attempts:
                raise self._failure(what, error) from error.__cause__
            await self._sleep(min(2.0 ** (attempt - 1), 30.0))
        raise AssertionError("unreachable")

    def _failure(self, what: str, error: CallError) -> BatchApiError:
        status = f"HTTP {error.http_status} " if error.http_status else ""
        message = _one_line(self._scrub(f"cannot {what}: {status}{error.code or ''} {error.message}"))
        hint = "check [endpoint] base_url (or --base-url)" if error.code == UNSENDABLE else \
            "run the same command again; batches already created are kept and picked up"
        failure = BatchApiError(message, hint=hint)
        failure.transient = error.retryable
        return failure


# -- what a caller reads of an answer: checked here, so a garbled one is an error, not a KeyError ----------

def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:  # not JSON, or not UTF-8
        kind = response.headers.get("content-type", "no content type")
        raise BadResponse(f"the answer is not JSON ({kind}: {body_snippet(response.content, 120)!r})",
                          code=MALFORMED, http_status=response.status_code) from None


def _missing(response: httpx.Response, what: str) -> BadResponse:
    return BadResponse(f"the answer lacks {what}", code=MALFORMED, http_status=response.status_code)


def _file_object(response: httpx.Response) -> dict[str, Any]:
    data = _json(response)
    if not isinstance(data, dict) or not _text(data.get("id")):
        raise _missing(response, "the file's id")
    return data


def _is_batch(data: Any) -> bool:
    return isinstance(data, dict) and _text(data.get("id")) and _text(data.get("status")) and \
        all(data.get(name) is None or _text(data[name]) for name in ("output_file_id", "error_file_id",
                                                                     "input_file_id")) and \
        all(data.get(name) is None or isinstance(data[name], dict) for name in ("request_counts", "errors"))


def _batch_object(response: httpx.Response) -> dict[str, Any]:
    data = _json(response)
    if not _is_batch(data):
        raise _missing(response, "a batch object (id, status and file ids as text)")
    return data


def _batch_page(response: httpx.Response) -> dict[str, Any]:
    data = _json(response)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list) or \
            not all(_is_batch(batch) for batch in data["data"]) or \
            not (data.get("last_id") is None or _text(data["last_id"])):
        raise _missing(response, "a list of batch objects (data, has_more, last_id)")
    return data


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _segment(file_or_batch_id: str) -> str:
    """An id as one path segment: an id from a state file cannot point the call at another path."""
    return quote(file_or_batch_id, safe="")


# -- secrets: out of every message, answer and downloaded line -----------------------------------------------

def _scrubbed_answer(value: Any, secrets: tuple[str, ...]) -> Any:
    if isinstance(value, str):
        return scrub(value, secrets)
    if isinstance(value, dict):
        return {key: _scrubbed_answer(item, secrets) for key, item in value.items()}
    if isinstance(value, list):
        return [_scrubbed_answer(item, secrets) for item in value]
    return value


def _scrub_error(error: RunnerError, secrets: tuple[str, ...]) -> None:
    error.message = _one_line(scrub(error.message, secrets))
    error.args = (error.message,)
    if error.hint:
        error.hint = _one_line(scrub(error.hint, secrets))


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MESSAGE_LIMIT else text[:MESSAGE_LIMIT - 3] + "..."


class _LineScrubber:
    """A downloaded file's bytes with every spelling of the secrets replaced by `***`, a whole line at a time
    (a secret never straddles two pieces of the output). Only the secrets themselves: the file holds model
    answers, whose text may mention `Bearer` on purpose."""

    def __init__(self, secrets: tuple[str, ...]) -> None:
        self._spellings = sorted({spelling.encode("utf-8", "surrogatepass") for secret in secrets if secret
                                  for spelling in _spellings(secret)}, key=len, reverse=True)
        self._carry = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._carry + chunk
        cut = data.rfind(b"\n") + 1
        self._carry = data[cut:]
        return self._clean(data[:cut])

    def close(self) -> bytes:
        rest, self._carry = self._carry, b""
        return self._clean(rest)

    def _clean(self, data: bytes) -> bytes:
        for spelling in self._spellings:
            data = data.replace(spelling, b"***")
        return data


def _spellings(secret: str) -> set[str]:
    """The ways a key (printable ASCII, endpoints.key_problem) can appear in a JSON line: as is, JSON-escaped
    (with `/` escaped too, as some encoders do) and percent-encoded."""
    escaped = json.dumps(secret)[1:-1]
    return {secret, escaped, escaped.replace("/", "\\/"), quote(secret, safe="")}


class _local:
    """`open()` for a local file in an HTTP call: its OSError is a SinkError, never a connection failure."""

    def __init__(self, what: str, opener: Callable[[], Any]) -> None:
        self.what, self.opener = what, opener

    def __enter__(self) -> Any:
        try:
            self.fh = self.opener()
        except OSError as exc:
            raise SinkError(f"{self.what} ({exc.strerror or exc})",
                            hint="the batch files live in the output's .parts folder; run the same command "
                                 "again once it is readable and writable") from None
        return self.fh

    def __exit__(self, *exc_info: Any) -> None:
        self.fh.close()


def _write(fh: Any, path: Path, data: bytes) -> None:
    try:
        fh.write(data)
    except OSError as exc:
        raise SinkError(f"cannot write {path} ({exc.strerror or exc})") from None
