"""The fake model: a dialect-neutral call in, a deterministic completion (or an ApiError) out.

Nothing here knows about HTTP or either wire format; responses.py parses requests into a
ChatCall and renders a Completion, and sse.py cuts the same Completion into stream frames, so a
streamed answer carries exactly the text and usage of the non-streamed one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .instance import instance, quoted_schema
from .config import (
    STREAM_ONLY,
    STREAM_ONLY_WHILE_THINKING,
    THINKING_DEFAULT_ON,
    THINKING_NON_STREAM_OK,
    THINKING_STREAM_ONLY,
)

ECHO_PREFIX = "Echo: "
ECHO_CHARS = 200
CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 3  # role and separator overhead, as real chat templates add
DEFAULT_MAX_INPUT_TOKENS = 129_024
# Input caps per model (dashscope-api.md 9.3); the rest use the qwen-plus-latest default.
MAX_INPUT_TOKENS: dict[str, int] = {
    "qwen-max": 30_720,
    "qwen-max-latest": 30_720,
    "qwen3-max": 258_048,
    "qwen-flash": 997_952,
}

# Messages quoted from the real API (dashscope-api.md 5.2) where one is known.
ALGO_PREFIX = "<400> InternalError.Algo.InvalidParameter: "
MSG_STREAM_ONLY = (
    "This model only support stream mode, please enable the stream parameter to access the model."
)
MSG_THINKING_NON_STREAM = "parameter.enable_thinking must be set to false for non-streaming calls"
MSG_THINKING_RESTRICTED = "The value of the enable_thinking parameter is restricted to True."
MSG_JSON_WORD = (
    "'messages' must contain the word 'json' in some form, to use 'response_format' of type "
    "'json_object'."
)
MSG_JSON_THINKING = "Json mode response is not supported when enable_thinking is true"
# Not captured from the real API: our wording.
MSG_TEXT_FORMAT_THINKING = (
    ALGO_PREFIX + 'The result_format parameter must be "message" when enable_thinking is true'
)
MSG_INCREMENTAL_THINKING = (
    ALGO_PREFIX + 'The incremental_output parameter must be "true" when enable_thinking is true'
)

# Models that think when asked to (or by default) in a stream; a non-streaming call may think
# only on THINKING_NON_STREAM_OK.
THINKING_WHEN_STREAMING: frozenset[str] = (
    THINKING_NON_STREAM_OK | THINKING_STREAM_ONLY | STREAM_ONLY | STREAM_ONLY_WHILE_THINKING
)


class ApiError(Exception):
    """An error answer, by catalogue kind (see responses.ERRORS); `detail` fills the message."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(kind, detail)
        self.kind = kind
        self.detail = detail


def invalid(detail: str) -> ApiError:
    return ApiError("invalid_parameter", detail)


@dataclass(slots=True)
class ChatCall:
    """A parsed, dialect-neutral chat request."""

    model: str
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    enable_thinking: bool | None = None
    thinking_budget: int | None = None
    response_format: str | None = None  # "json_object", "json_schema", "text" or None
    json_schema: dict[str, Any] | None = None  # response_format.json_schema.schema, when it is a JSON object
    result_format: str = "message"  # native only: "message" or "text"
    stream: bool = False  # compat "stream": true; native X-DashScope-SSE / Accept header
    include_usage: bool = False  # compat stream_options.include_usage
    # Frames carry only the new piece: native parameters.incremental_output; always in compat.
    incremental_output: bool = False
    n: int = 1  # compat `n`: answers wanted (1..4, facts 2.1)


@dataclass(slots=True)
class Completion:
    """What the fake model produced, before any wire format."""

    content: str
    reasoning: str | None
    prompt_tokens: int
    completion_tokens: int  # includes reasoning_tokens
    reasoning_tokens: int
    finish_reason: str  # "stop" or "length"


def message_text(content: Any) -> str:
    """The text of one message's content: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        # compat parts are {"type": "text", "text": ...}; native parts are {"text": ...}.
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    raise invalid(ALGO_PREFIX + "message content must be a string or a list of parts")


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate the shape of a messages list (dialect-neutral part)."""
    if not isinstance(messages, list):
        raise invalid(ALGO_PREFIX + "'messages' must be a list of messages")
    if not messages:
        raise invalid(ALGO_PREFIX + "'messages' must contain at least one message")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid(ALGO_PREFIX + "each message must be an object with a string 'role'")
    return messages


def check_max_tokens(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(ALGO_PREFIX + "Range of max_tokens should be [1, 32768]")
    return value


def complete(call: ChatCall) -> Completion:
    """Answer a call deterministically, or raise the ApiError the real model would give."""
    model = call.model
    thinking = call.enable_thinking
    if thinking is None:
        thinking = model in THINKING_DEFAULT_ON or model in STREAM_ONLY
    if model in STREAM_ONLY and call.enable_thinking is False:
        raise invalid(MSG_THINKING_RESTRICTED)
    if call.stream:
        # Streams lift the stream-only rules. Other models (qwen-max, custom names) are not
        # thinking models: the flag is ignored.
        thinking = thinking and model in THINKING_WHEN_STREAMING
        if thinking and not call.incremental_output:
            raise invalid(MSG_INCREMENTAL_THINKING)
    else:
        if model in STREAM_ONLY:
            raise invalid(MSG_STREAM_ONLY)
        if thinking and model in STREAM_ONLY_WHILE_THINKING:
            raise invalid(MSG_STREAM_ONLY)
        if thinking and model in THINKING_STREAM_ONLY:
            raise invalid(MSG_THINKING_NON_STREAM)
        thinking = thinking and model in THINKING_NON_STREAM_OK

    texts = [message_text(m.get("content")) for m in call.messages]
    chars = sum(len(t) for t in texts)
    prompt_tokens = max(1, _tokens(chars)) + TOKENS_PER_MESSAGE * len(texts)
    limit = MAX_INPUT_TOKENS.get(model, DEFAULT_MAX_INPUT_TOKENS)
    if prompt_tokens > limit:
        raise invalid(f"{ALGO_PREFIX}Range of input length should be [1, {limit}]")

    json_mode = call.response_format in ("json_object", "json_schema")
    if json_mode and thinking:
        raise invalid(MSG_JSON_THINKING)
    if call.response_format == "json_object" and not any("json" in t.lower() for t in texts):
        raise invalid(MSG_JSON_WORD)
    if thinking and call.result_format == "text":
        raise invalid(MSG_TEXT_FORMAT_THINKING)

    last = _last_user_text(call.messages, texts)[:ECHO_CHARS]
    if json_mode:
        # The schema asked for, else one the prompt quotes (json_object mode), else a plain object.
        schema = call.json_schema if call.response_format == "json_schema" else None
        schema = schema or quoted_schema(call.messages, texts)
        value = instance(schema, last) if schema is not None else {"echo": last}
        content = json.dumps(value, ensure_ascii=False)
    else:
        content = ECHO_PREFIX + last
    content_tokens = max(1, _tokens(len(content)))
    finish_reason = "stop"
    if call.max_tokens is not None and content_tokens > call.max_tokens:
        content = content[: call.max_tokens * CHARS_PER_TOKEN]
        content_tokens = call.max_tokens
        finish_reason = "length"

    reasoning: str | None = None
    reasoning_tokens = 0
    if thinking:
        reasoning = f"The user wrote {chars} characters in {len(texts)} messages; " + (
            f"the last one begins: {last[:80]!r}. I will echo it back."
        )
        reasoning_tokens = max(1, _tokens(len(reasoning)))
        budget = call.thinking_budget
        if budget is not None and budget >= 1 and reasoning_tokens > budget:
            reasoning = reasoning[: budget * CHARS_PER_TOKEN]
            reasoning_tokens = budget
    return Completion(
        content=content,
        reasoning=reasoning,
        prompt_tokens=prompt_tokens,
        completion_tokens=content_tokens + reasoning_tokens,
        reasoning_tokens=reasoning_tokens,
        finish_reason=finish_reason,
    )


MSG_N_RANGE = ALGO_PREFIX + "Range of n should be [1, 4]"
MSG_N_THINKING = ALGO_PREFIX + "n must be 1 when enable_thinking is true"
MSG_N_STREAM = "n > 1 is not supported for streamed calls by this emulator"


def with_choices(call: ChatCall, done: Completion) -> Completion:
    """The completion of a call asking for `n` answers: every choice is the same deterministic answer, and the
    usage counts the prompt once and every choice's output (as the real API bills it)."""
    if call.n == 1:
        return done
    if done.reasoning is not None:
        raise invalid(MSG_N_THINKING)
    if call.stream:
        raise invalid(MSG_N_STREAM)
    return Completion(content=done.content, reasoning=None, prompt_tokens=done.prompt_tokens,
                      completion_tokens=done.completion_tokens * call.n, reasoning_tokens=0,
                      finish_reason=done.finish_reason)


def check_n(value: Any, tools: Any) -> int:
    """The compat `n`: an integer 1..4, and 1 when tools are given."""
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4:
        raise invalid(MSG_N_RANGE)
    if value > 1 and tools:
        raise invalid(ALGO_PREFIX + "n must be 1 when tools are given")
    return value


def _tokens(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN)


def _last_user_text(messages: list[dict[str, Any]], texts: list[str]) -> str:
    for message, text in zip(reversed(messages), reversed(texts)):
        if message.get("role") == "user":
            return text
    return texts[-1]
