"""When to stream. `[model] stream = "auto"` streams exactly when the model or its parameters require it.

The rules follow the API facts (9.1 thinking defaults, 9.2 streaming-only models), which change with
each model generation; `[model] stream_only_models` adds names or fnmatch patterns without a release.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import lru_cache
from typing import Any, Mapping

# Streaming only, whatever the parameters: QwQ, QVQ, Omni, and the *-thinking-* releases.
ALWAYS_STREAM = ("qwq-*", "qwq", "qvq-*", "*-omni*", "*-thinking-*", "*-thinking")
# Qwen3 open-source models think by default and then must stream; `enable_thinking: false` lifts that.
# (Their -instruct-2507 releases do not think and end in a date, so the pattern leaves them out.)
THINK_BY_DEFAULT = ("qwen3-*b",)
# Qwen3 commercial models may think only when streaming (400 otherwise).
THINK_ONLY_STREAMED = ("qwen-plus*", "qwen-flash*", "qwen-turbo*")


def _matches(model: str, patterns) -> bool:
    return any(fnmatchcase(model, pattern) for pattern in patterns)


@lru_cache(maxsize=1024)
def _model_class(model: str, stream_only_models: tuple[str, ...]) -> tuple[bool, bool, bool]:
    """(always streams, thinks only when streamed, thinks by default) for a model name. Cached: this runs
    for every request, and pattern matching is a measurable share of the per-request CPU."""
    name = model.lower()
    return (_matches(name, ALWAYS_STREAM) or _matches(model, stream_only_models),
            _matches(name, THINK_ONLY_STREAMED), _matches(name, THINK_BY_DEFAULT))


@dataclass(frozen=True)
class StreamPolicy:
    mode: str = "auto"                       # "auto", "always" or "never"
    stream_only_models: tuple[str, ...] = ()

    def wants_stream(self, model: str, params: Mapping[str, Any]) -> bool:
        """Stream this request? A row's own `stream` parameter wins over the job's mode."""
        explicit = params.get("stream")
        if isinstance(explicit, bool):
            return explicit
        if self.mode != "auto":
            return self.mode == "always"
        always, think_only_streamed, think_by_default = _model_class(model, self.stream_only_models)
        thinking = params.get("enable_thinking")
        if always or params.get("enable_code_interpreter"):
            return True
        if thinking is True and (think_only_streamed or think_by_default):
            return True
        return think_by_default and thinking is not False
