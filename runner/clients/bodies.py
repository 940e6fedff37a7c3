"""Reading answer bodies, shared by both dialects: JSON that may be cut short, usage blocks, content."""

from __future__ import annotations

import json
from typing import Any, Mapping

from ..errors import TransientCallError
from ..records import Completion, Usage


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


def has_answer(message: Any) -> bool:
    """A message carries an answer: a `content` string or list of parts (an empty string is an answer),
    or tool calls. One without either parsed, but something was lost on the way."""
    return isinstance(message, Mapping) and (isinstance(message.get("content"), (str, list))
                                             or bool(message.get("tool_calls")))


def text_of(content: Any) -> str | None:
    """Message content as text: a string as is, a list of parts joined by their text."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


class StreamText:
    """What a stream has delivered so far, in either dialect: answer and reasoning pieces, the time to the
    first of them, and the frames that end it (finish reason, last usage, request id)."""

    __slots__ = ("content", "reasoning", "first_token_ms", "finish_reason", "usage", "request_id", "_sent_at",
                 "_clock")

    def __init__(self, request_id: str | None, sent_at: float, clock) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.first_token_ms: float | None = None
        self.finish_reason: str | None = None
        self.usage: Mapping[str, Any] | None = None
        self.request_id = request_id
        self._sent_at = sent_at
        self._clock = clock

    def add(self, content: str | None, reasoning: str | None) -> None:
        if reasoning:
            self.reasoning.append(reasoning)
        if content:
            self.content.append(content)
        if (content or reasoning) and self.first_token_ms is None:
            self.first_token_ms = (self._clock() - self._sent_at) * 1000

    def malformed(self, detail: str) -> TransientCallError:
        return TransientCallError(f"malformed stream frame ({detail})", code="malformed_frame", http_status=200,
                                  request_id=self.request_id)

    def completion(self, complete: bool, *, input_name: str, output_name: str, output_details: str) -> Completion:
        """The whole answer; a stream that did not reach its final frame is a retryable error, never a success."""
        if not complete or self.finish_reason is None:
            raise TransientCallError("the stream ended before its final frame", code="stream_truncated",
                                     http_status=200, request_id=self.request_id)
        return Completion(content="".join(self.content), reasoning="".join(self.reasoning) or None,
                          finish_reason=self.finish_reason,
                          usage=usage_from(self.usage, input_name=input_name, output_name=output_name,
                                           output_details=output_details),
                          request_id=self.request_id, first_token_ms=self.first_token_ms)
