"""Token estimates without a tokenizer, for rate limiting and cost reservations.

Qwen's tokenizer gives about 4 characters per token for English and about 1 token per CJK
character; chat templates add a few tokens per message. The estimate errs a little high so a
reservation rarely falls short; the real usage settles it afterwards.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

TOKENS_PER_MESSAGE = 4
DEFAULT_OUTPUT_RESERVE = 512


def estimate_text_tokens(text: str) -> int:
    ascii_chars = sum(1 for ch in text if ch < "\u0080") if not text.isascii() else len(text)
    return (ascii_chars + 3) // 4 + (len(text) - ascii_chars)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def estimate_prompt_tokens(messages: Iterable[Mapping[str, Any]]) -> int:
    total = 0
    for message in messages:
        total += TOKENS_PER_MESSAGE + estimate_text_tokens(_content_text(message.get("content")))
    return max(total, 1)


def output_reserve(params: Mapping[str, Any], expected_output_tokens: int | None) -> int:
    """Output tokens to reserve for a request: the configured expectation, else its cap, else a default."""
    if expected_output_tokens is not None:
        return expected_output_tokens
    cap = params.get("max_completion_tokens") or params.get("max_tokens")
    return int(cap) if isinstance(cap, (int, float)) and cap > 0 else DEFAULT_OUTPUT_RESERVE
