"""HTTP routes of the OpenAI-compatible files and batches API (dashscope-api.md 7) under
``/compatible-mode/v1``: bearer auth as the chat endpoint, compat error bodies
``{"error": {message, type, param, code}, "request_id"}``.

These calls never touch the rate limiter (facts 7.3) nor the chat counters; they count in
``stats.batches`` and ``stats.files``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

from .batches import BatchStore
from .batchfile import CHAT_URL, check_input
from .generate import ApiError
from .responses import ERRORS, dump, new_request_id
from .state import EmulatorState

MIN_WINDOW_HOURS, MAX_WINDOW_HOURS = 24, 336
DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT = 20, 100
MAX_DS_NAME, MAX_DS_DESCRIPTION = 100, 200
_WINDOW = re.compile(r"^([1-9][0-9]*)([hd])$")

# Messages quoted from the real API where known (dashscope-api.md 5.2, 7.6); the rest are ours.
MSG_NOT_FOUND = "Not found!"
MSG_BATCH_MODEL = "The provided model {} is not supported by the Batch API."


class BatchApiError(Exception):
    """An error answer of the files/batches API: status and compat body fields."""

    def __init__(self, status: int, code: str, message: str,
                 type_: str = "invalid_request_error", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.type, self.param = (
            status, code, message, type_, param)


def invalid(message: str, param: str | None = None) -> BatchApiError:
    return BatchApiError(400, "invalid_parameter_error", message, param=param)


def not_found() -> BatchApiError:
    return BatchApiError(404, "NotFound", MSG_NOT_FOUND)


def parse_window(text: Any) -> float:
    """completion_window ("24h".."336h", or "1d".."14d") in seconds."""
    match = _WINDOW.match(text) if isinstance(text, str) else None
    hours = 0
    if match is not None:
        hours = int(match.group(1)) * (24 if match.group(2) == "d" else 1)
    if not MIN_WINDOW_HOURS <= hours <= MAX_WINDOW_HOURS:
        raise invalid(
            f"completion_window must be from 24h to 336h (or 1d to 14d), got {text!r}",
            "completion_window",
        )
    return hours * 3600.0


def add_batch_routes(app: web.Application, state: EmulatorState, prefix: str) -> None:
    """Register /files and /batches under `prefix` (the compat /compatible-mode/v1)."""
    store = state.batches
    stats = state.stats

    def route(handler: Any) -> Any:
        async def wrapped(request: web.Request) -> web.Response:
            rid = new_request_id(state.rng.getrandbits(128))
            try:
                state.check_auth(request.headers.get("Authorization"))
                body, status = await handler(request)
            except ApiError as err:  # auth
                spec = ERRORS[err.kind]
                failure = BatchApiError(spec.status, spec.compat_code,
                                        spec.compat_message.format(detail=err.detail),
                                        spec.compat_type)
                return _error(failure, rid)
            except BatchApiError as err:
                return _error(err, rid)
            if isinstance(body, bytes):
                return web.Response(body=body, status=status, headers={
                    "Content-Type": "application/octet-stream", "x-request-id": rid})
            return web.Response(body=dump(body), status=status, headers={
                "Content-Type": "application/json", "x-request-id": rid})
        return wrapped

    def get_file(request: web.Request) -> Any:
        stored = store.files.get(request.match_info["file_id"])
        if stored is None:
            raise not_found()
        return stored

    def get_batch(request: web.Request) -> Any:
        batch = store.batches.get(request.match_info["batch_id"])
        if batch is None:
            raise not_found()
        return batch

    async def upload(request: web.Request) -> tuple[Any, int]:
        if not request.content_type.startswith("multipart/"):
            raise invalid("The request must be multipart/form-data with 'file' and 'purpose'.")
        form = await request.post()
        purpose = form.get("purpose")
        if purpose != "batch":
            raise invalid(f"purpose must be 'batch', got {purpose!r}", "purpose")
        upload = form.get("file")
        if not isinstance(upload, web.FileField):
            raise invalid("The 'file' field is missing or not a file.", "file")
        data = upload.file.read()
        stored = store.add_file(data, upload.filename or "upload.jsonl", "batch")
        stats.files_uploaded += 1
        stats.file_bytes += len(data)
        return stored.describe(), 200

    async def file_info(request: web.Request) -> tuple[Any, int]:
        return get_file(request).describe(), 200

    async def file_content(request: web.Request) -> tuple[Any, int]:
        return get_file(request).data, 200

    async def file_delete(request: web.Request) -> tuple[Any, int]:
        stored = get_file(request)
        del store.files[stored.id]
        return {"id": stored.id, "object": "file", "deleted": True}, 200

    async def create(request: web.Request) -> tuple[Any, int]:
        try:
            data = json.loads(await request.read())
        except ValueError:
            raise invalid("The request body is not valid JSON.") from None
        if not isinstance(data, dict):
            raise invalid("The request body must be a JSON object.")
        endpoint = data.get("endpoint")
        if endpoint != CHAT_URL:
            raise invalid(f"endpoint must be {CHAT_URL!r}, got {endpoint!r}", "endpoint")
        window_text = data.get("completion_window", "24h")
        window = parse_window(window_text)
        metadata = _metadata(data.get("metadata"))
        file_id = data.get("input_file_id")
        stored = store.files.get(file_id) if isinstance(file_id, str) else None
        if stored is None:
            raise not_found()
        checked = check_input(stored.data, endpoint, state.config)
        if checked.model is not None and checked.model not in state.config.models:
            raise BatchApiError(404, "ModelNotFound", MSG_BATCH_MODEL.format(checked.model))
        batch = store.create(checked, stored.id, endpoint, window_text, window, metadata)
        stats.batches_created += 1
        stats.batch_lines += checked.count
        return store.describe(batch), 200

    async def retrieve(request: web.Request) -> tuple[Any, int]:
        return store.describe(get_batch(request)), 200

    async def cancel(request: web.Request) -> tuple[Any, int]:
        batch = get_batch(request)
        if not store.cancel(batch):
            status = store.describe(batch)["status"]
            raise BatchApiError(400, "invalid_request",
                                f"Cannot cancel a batch with status {status!r}.")
        return store.describe(batch), 200

    async def listing(request: web.Request) -> tuple[Any, int]:
        return _list(store, request.query), 200

    app.router.add_post(prefix + "/files", route(upload))
    app.router.add_get(prefix + "/files/{file_id}", route(file_info))
    app.router.add_get(prefix + "/files/{file_id}/content", route(file_content))
    app.router.add_delete(prefix + "/files/{file_id}", route(file_delete))
    app.router.add_post(prefix + "/batches", route(create))
    app.router.add_get(prefix + "/batches", route(listing))
    app.router.add_get(prefix + "/batches/{batch_id}", route(retrieve))
    app.router.add_post(prefix + "/batches/{batch_id}/cancel", route(cancel))


def _metadata(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise invalid("metadata must be an object of strings.", "metadata")
    for key, cap in (("ds_name", MAX_DS_NAME), ("ds_description", MAX_DS_DESCRIPTION)):
        if len(value.get(key, "")) > cap:
            raise invalid(f"metadata.{key} may be at most {cap} characters.", "metadata")
    return dict(value)


def _list(store: BatchStore, query: Any) -> dict[str, Any]:
    """Newest first; `after` is the id of the last batch of the previous page."""
    try:
        limit = int(query.get("limit", DEFAULT_LIST_LIMIT))
    except ValueError:
        raise invalid("limit must be an integer from 1 to 100.", "limit") from None
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise invalid("limit must be an integer from 1 to 100.", "limit")
    ids = list(reversed(store.batches))
    after = query.get("after")
    if after:
        if after not in store.batches:
            raise not_found()
        ids = ids[ids.index(after) + 1 :]
    rows = []
    # input_file_ids: up to 20, comma-separated (dashscope-api.md 7.3)
    file_ids = set(query["input_file_ids"].split(",")) if query.get("input_file_ids") else None
    for batch_id in ids:
        batch = store.batches[batch_id]
        if file_ids is not None and batch.input_file_id not in file_ids:
            continue
        if "ds_name" in query and (batch.metadata or {}).get("ds_name") != query["ds_name"]:
            continue
        row = store.describe(batch)
        if "status" in query and row["status"] != query["status"]:
            continue
        rows.append(row)
        if len(rows) > limit:
            break
    page = rows[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(rows) > limit,
    }


def _error(err: BatchApiError, rid: str) -> web.Response:
    body = {
        "error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code},
        "request_id": rid,
    }
    return web.Response(body=dump(body), status=err.status, headers={
        "Content-Type": "application/json", "x-request-id": rid})


__all__ = ["BatchApiError", "add_batch_routes", "parse_window"]
