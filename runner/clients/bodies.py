"""Reading answer bodies, shared by both dialects: JSON that may be cut short, usage blocks, content."""

from __future__ import annotations

import json
from typing import Any, Mapping

from ..errors import TransientCallError
from ..records import Usage


def load_success_json(body: bytes, headers: Mapping[str, str]) -> Any:
    """The JSON of a 2xx answer. One that does not parse was cut short on the way: worth another attempt."""
    try:
        return json.loads(body)
    except ValueError as exc:
        raise TransientCallError(f"truncated or malformed JSON in a 200 answer ({exc})", code="malformed_body",
                                 http_status=200, request_id=headers.get("x-request-id")) from exc


def usage_from(usage: Mapping[str, Any] | None, *, input_name: str, output_name: str, output_details: str) -> Usage:
    """A usage block in the dialect's names; cached tokens are `prompt_tokens_details` in both."""
    usage = usage or {}
    return Usage(
        input_tokens=usage.get(input_name),
        output_tokens=usage.get(output_name),
        total_tokens=usage.get("total_tokens"),
        cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
        reasoning_tokens=(usage.get(output_details) or {}).get("reasoning_tokens"),
    )


def text_of(content: Any) -> str | None:
    """Message content as text: a string as is, a list of parts joined by their text."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)
