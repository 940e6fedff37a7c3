"""Stream frames for both dialects, cut from the same Completion a plain answer renders.

Pure functions, no HTTP: a StreamPlan holds the JSON payloads of one stream, split into the
`body` frames and the `final` frames whose arrival marks a complete stream, and each dialect
knows how to wrap a payload in its SSE framing (dashscope-api.md 2.4, 3.5, 10.1 M/N, 10.2 H-M):

- compat: ``data: <json>\\n\\n``; body = role chunk + content chunks; final = the finish chunk,
  the usage chunk (only with stream_options.include_usage) and ``data: [DONE]``;
- native: ``id:N\\nevent:result\\n:HTTP_STATUS/200\\ndata:<json>\\n\\n``; body = every frame but
  the last; final = the frame with a real finish_reason.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from .generate import CHARS_PER_TOKEN, ChatCall, Completion
from .responses import ERRORS, dump, native_usage, openai_usage

SSE_CONTENT_TYPE = "text/event-stream;charset=UTF-8"
DONE = b"[DONE]"
# The in-band error streams send mid-stream (facts 10.2 K): the TPM throttle.
MID_STREAM_ERROR = ERRORS["429tpm"]


class StreamPlan(NamedTuple):
    body: list[bytes]  # JSON payloads of the frames before the final ones
    final: list[bytes]  # payloads of the frames that complete the stream


def split_text(text: str, parts: int) -> list[str]:
    """`text` cut into min(parts, len(text)) near-equal non-empty pieces ([] for "")."""
    parts = min(parts, len(text))
    if parts <= 0:
        return []
    size = len(text)
    edges = [size * i // parts for i in range(parts + 1)]
    return [text[edges[i] : edges[i + 1]] for i in range(parts)]


def pieces(done: Completion, chunks: int) -> list[tuple[bool, str]]:
    """(is_reasoning, text) pieces: the reasoning, then the content, `chunks` in all (fewer if
    the text is shorter; at least one per non-empty part, and at least one piece)."""
    reasoning = done.reasoning or ""
    content = done.content
    total = len(reasoning) + len(content)
    if not total:
        return [(False, "")]
    if reasoning and content:
        chunks = max(chunks, 2)
        share = round(chunks * len(reasoning) / total)
        for_reasoning = min(max(share, 1), chunks - 1)
        out = [(True, p) for p in split_text(reasoning, for_reasoning)]
        return out + [(False, p) for p in split_text(content, chunks - for_reasoning)]
    if reasoning:
        return [(True, p) for p in split_text(reasoning, chunks)]
    return [(False, p) for p in split_text(content, chunks)]


def _tokens(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN)


# -- compat --------------------------------------------------------------------------------


def compat_frame(payload: bytes, index: int = 0) -> bytes:
    return b"data: " + payload + b"\n\n"


def compat_plan(call: ChatCall, done: Completion, rid: str, chunks: int) -> StreamPlan:
    """Sample 10.1 M (and N with thinking): one id on every chunk, usage null on content."""
    tail = {
        "object": "chat.completion.chunk",
        "usage": None,
        "created": int(time.time()),
        "system_fingerprint": None,
        "model": call.model,
        "id": "chatcmpl-" + rid,
    }
    # The same bytes as dump({"choices": [choice], **tail}), with the constant part of every
    # chunk encoded once per stream: frame rendering is most of a stream's CPU cost.
    after_choice = b'}],' + dump(tail)[1:]

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return (b'{"choices":[{"delta":' + dump(delta) + b',"index":0,"logprobs":null,'
                b'"finish_reason":' + dump(finish) + after_choice)

    thinking = done.reasoning is not None
    if thinking:
        body = [chunk({"content": None, "role": "assistant", "reasoning_content": ""})]
        for is_reasoning, text in pieces(done, chunks):
            if is_reasoning:
                body.append(chunk({"content": None, "reasoning_content": text}))
            else:
                body.append(chunk({"content": text, "reasoning_content": None}))
        final = [chunk({"content": "", "reasoning_content": None}, done.finish_reason)]
    else:
        body = [chunk({"content": "", "role": "assistant"})]
        body += [chunk({"content": text}) for _, text in pieces(done, chunks)]
        final = [chunk({"content": ""}, done.finish_reason)]
    if call.include_usage:
        final.append(dump({"choices": [], **tail, "usage": openai_usage(done)}))
    final.append(DONE)
    return StreamPlan(body, final)


def compat_error_payload(rid: str) -> bytes:
    """The in-band error chunk (openai-python raises APIError on a chunk with an "error" key)."""
    spec = MID_STREAM_ERROR
    error = {
        "message": spec.compat_message,
        "type": spec.compat_type,
        "param": None,
        "code": spec.compat_code,
    }
    return dump({"error": error, "request_id": rid})


# -- native --------------------------------------------------------------------------------


def native_frame(payload: bytes, index: int, event: str = "result", status: int = 200) -> bytes:
    """One native frame; `index` is 0-based, the id line counts from 1."""
    head = f"id:{index + 1}\nevent:{event}\n:HTTP_STATUS/{status}\ndata:"
    return head.encode("ascii") + payload + b"\n\n"


def native_plan(call: ChatCall, done: Completion, rid: str, chunks: int) -> StreamPlan:
    """Samples 10.2 H (incremental), I (cumulative), J (text format): finish_reason "null"
    until the last frame, cumulative usage on every frame, no [DONE]."""
    parts = pieces(done, chunks)
    thinking = done.reasoning is not None
    content_tokens = done.completion_tokens - done.reasoning_tokens
    reasoning_chars = content_chars = 0
    so_far: list[str] = []
    payloads: list[bytes] = []
    last = len(parts) - 1
    for i, (is_reasoning, text) in enumerate(parts):
        if is_reasoning:
            reasoning_chars += len(text)
        else:
            content_chars += len(text)
            so_far.append(text)
        if i == last:
            finish = done.finish_reason
            usage = native_usage(done)
        else:
            finish = "null"
            output_tokens = min(_tokens(reasoning_chars), done.reasoning_tokens) + min(
                _tokens(content_chars), content_tokens
            )
            usage = {
                "total_tokens": done.prompt_tokens + output_tokens,
                "input_tokens": done.prompt_tokens,
                "output_tokens": output_tokens,
            }
        if is_reasoning:
            shown = ""
        elif call.incremental_output:
            shown = text
        else:
            shown = "".join(so_far)
        if call.result_format == "text":
            output: dict[str, Any] = {"finish_reason": finish, "text": shown}
        else:
            message: dict[str, Any] = {"content": shown, "role": "assistant"}
            if thinking:
                message["reasoning_content"] = text if is_reasoning else ""
            output = {"choices": [{"message": message, "finish_reason": finish}]}
        payloads.append(dump({"output": output, "usage": usage, "request_id": rid}))
    return StreamPlan(payloads[:-1], payloads[-1:])


def native_error_payload(code: str, message: str, rid: str) -> bytes:
    return dump({"code": code, "message": message, "request_id": rid})


__all__ = [
    "DONE",
    "MID_STREAM_ERROR",
    "SSE_CONTENT_TYPE",
    "StreamPlan",
    "compat_error_payload",
    "compat_frame",
    "compat_plan",
    "native_error_payload",
    "native_frame",
    "native_plan",
    "pieces",
    "split_text",
]
