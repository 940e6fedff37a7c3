"""What a job file may hold: its sections and keys, the type each key must have, and the bounds of every
numeric key (also applied to the flags that set the same keys). runner/spec.py reads a job file against
this table; tests/test_docs.py checks that the docs name every key in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# Batch API limits (API facts 7.2, 7.3): the defaults, and the ceilings a job may not raise them above.
BATCH_MAX_LINES = 50_000
BATCH_MAX_BYTES = 500 * 1024 * 1024
BATCH_MAX_DESCRIPTION = 200
DAY = 86_400.0
HOUR = 3_600.0
# Each request in flight holds a connection (a file descriptor: the usual soft limit is 1,024, often
# raised to 65,536), its body and its answer (tens of KB, more for long answers), and DashScope's own
# limits (30,000 RPM at best, about 500 requests a second) keep at most a few thousand requests in
# flight at the latencies LLM calls have. Ten thousand is past any real need; a billion (a typo)
# would grow the run by ~180 MB/s until the machine runs out of memory.
MAX_CONCURRENCY = 10_000
# Far above any account's limits, low enough that rate arithmetic (tokens x seconds) stays finite.
MAX_RPM = 1e8
MAX_TPM = 1e11
# Fan-out ([model] names, [[input.variants]], [model] samples): each input row becomes up to
# MAX_MODELS x MAX_VARIANTS x MAX_SAMPLES output rows. Far past an eval's or a dataset's needs; the
# bounds keep a typo (samples = 1000000) from turning one row into a million paid requests.
MAX_MODELS = 100
MAX_VARIANTS = 100
MAX_SAMPLES = 100


# --- the key table -----------------------------------------------------------------------------

STR, INT, NUM, BOOL = "a string", "an integer", "a number", "true or false"
_PATH_OR_TABLE = "a path (a string) or an inline table"
# Keys whose wrong-typed value is not shown back: a key pasted there must not be echoed.
SECRET_NEIGHBOURS = ("api_key_env", "api_key_file")
_STREAM = 'true, false or "auto"'

# Generation parameters accepted under [model], with the type each must have. They are sent under
# these names (DashScope spells them the same in both dialects).
MODEL_PARAMS: dict[str, str] = {
    "temperature": NUM, "top_p": NUM, "top_k": INT, "max_tokens": INT,
    "max_completion_tokens": INT, "seed": INT, "stop": "a string or a list of strings",
    "enable_thinking": BOOL, "thinking_budget": INT, "presence_penalty": NUM,
    "frequency_penalty": NUM, "repetition_penalty": NUM, "response_format": "a table",
    "enable_search": BOOL, "max_input_tokens": INT,
}
PRICE_KEYS = ("price_input", "price_output", "price_cached_input", "price_thinking_output")

SECTIONS: dict[str, dict[str, str]] = {
    "input": {"path": STR, "id_column": STR, "prompt_column": STR, "messages_column": STR,
              "template": STR, "system_prompt": STR, "keep_columns": "a list of strings",
              "model_column": STR, "params_column": STR, "fail_on_empty": BOOL,
              "variants": "a list of tables", "s3_endpoint": STR, "s3_region": STR, "s3_anonymous": BOOL,
              "s3_addressing": STR, "s3_credentials": STR},
    "endpoint": {"dialect": STR, "region": STR, "base_url": STR, "workspace": STR,
                 "api_key_env": STR, "api_key_file": STR, "timeout": NUM,
                 "connect_timeout": NUM, "stream_idle_timeout": NUM, "read_timeout": NUM, "transport": STR,
                 "api_key": "never set here"},
    "model": {"name": STR, "names": "a list of strings", "samples": INT, "params": "a table",
              **MODEL_PARAMS, "extra": "a table", "stream": _STREAM,
              "stream_only_models": "a list of strings", **{k: NUM for k in PRICE_KEYS}},
    "run": {"concurrency": INT, "max_attempts": INT, "backoff_initial": NUM, "backoff_max": NUM,
            "retry_after_max": NUM, "max_error_rate": NUM, "limit": INT, "part_rows": INT,
            "part_seconds": NUM, "drain_seconds": NUM, "rpm": NUM, "tpm": NUM, "limits": "a table",
            "adaptive_rate": BOOL, "expected_output_tokens": INT, "cooldown_seconds": NUM,
            "retry_budget": NUM, "max_cost": NUM, "mode": STR, "completion_window": STR,
            "batch_fallback_after": STR, "batch_poll_seconds": NUM, "batch_max_lines": INT,
            "batch_max_bytes": INT, "batch_description": STR, "reask_attempts": INT, "executor": STR,
            "ray_address": STR, "ray_runtime_env": "a table"},
    "output": {"path": STR, "json_schema": _PATH_OR_TABLE, "parsed_columns": BOOL},
}


@dataclass(frozen=True)
class Bound:
    """The values a numeric key may take: `low` to `high` (above `low` when `low_open`; no upper end when
    `high` is None). Never nan or inf, which TOML and float flags both accept."""

    low: float
    high: float | None = None
    low_open: bool = False
    why: str = ""  # appended to the error: why the limit is there

    def problem(self, value: float, *, integer: bool) -> str | None:
        """None when the value is allowed, else what is expected, e.g. "expected an integer from 1 to 10,000"."""
        too_low = value <= self.low if self.low_open else value < self.low
        finite = not isinstance(value, float) or math.isfinite(value)  # ints may be huge but are finite
        if finite and not too_low and (self.high is None or value <= self.high):
            return None
        kind = "an integer" if integer else "a number" if self.high is not None else "a finite number"
        if self.high is None:
            text = f"{kind} {'>' if self.low_open else '>='} {_number(self.low)}"
        elif self.low_open:
            text = f"{kind} > {_number(self.low)} and at most {_number(self.high)}"
        else:
            text = f"{kind} from {_number(self.low)} to {_number(self.high)}"
        return f"expected {text}{f' ({self.why})' if self.why else ''}"


def _number(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


_POSITIVE_SECONDS = Bound(0, DAY, low_open=True)
_PRICE = Bound(0, 1e6)  # per 1M tokens; the dearest model costs well under 1,000
# Every numeric key of the job file, and (through `JobSpec.override`) the flags that set the same keys.
BOUNDS: dict[tuple[str, str], Bound] = {
    ("endpoint", "timeout"): _POSITIVE_SECONDS,
    ("endpoint", "connect_timeout"): _POSITIVE_SECONDS,
    ("endpoint", "stream_idle_timeout"): _POSITIVE_SECONDS,
    ("endpoint", "read_timeout"): _POSITIVE_SECONDS,
    **{("model", key): _PRICE for key in PRICE_KEYS},
    ("model", "samples"): Bound(1, MAX_SAMPLES, why="each sample is a paid answer"),
    ("run", "concurrency"): Bound(1, MAX_CONCURRENCY, why="each request in flight holds a connection and memory"),
    ("run", "max_attempts"): Bound(1, 100),
    ("run", "backoff_initial"): Bound(0, HOUR),
    ("run", "backoff_max"): Bound(0, HOUR),
    ("run", "retry_after_max"): Bound(0, DAY),
    ("run", "max_error_rate"): Bound(0, 1),
    ("run", "limit"): Bound(0),
    ("run", "part_rows"): Bound(1, 1_000_000, why="a part's rows are held in memory until it is written"),
    ("run", "part_seconds"): Bound(0, HOUR, low_open=True),
    ("run", "drain_seconds"): Bound(0, DAY),
    ("run", "rpm"): Bound(0, MAX_RPM, low_open=True),
    ("run", "tpm"): Bound(0, MAX_TPM, low_open=True),
    ("run", "expected_output_tokens"): Bound(1, 1_000_000),
    ("run", "cooldown_seconds"): Bound(0, HOUR),
    ("run", "retry_budget"): Bound(0, 100, low_open=True),
    ("run", "max_cost"): Bound(0, 1e12, low_open=True),
    ("run", "batch_poll_seconds"): _POSITIVE_SECONDS,
    ("run", "batch_max_lines"): Bound(1, BATCH_MAX_LINES, why=f"the Batch API takes at most {BATCH_MAX_LINES:,} lines a file"),
    ("run", "batch_max_bytes"): Bound(1, BATCH_MAX_BYTES, why=f"the Batch API takes at most {BATCH_MAX_BYTES:,} bytes a file"),
    ("run", "reask_attempts"): Bound(0, 10, why="each re-ask is a paid request that also resends the answer"),
}
# [run.limits] "model" = { rpm = .., tpm = .. } take the same values as [run] rpm and tpm.
BOUNDS.update({("run.limits", key): BOUNDS[("run", key)] for key in ("rpm", "tpm")})
# The CLI flags that override a numeric key of [run].
FLAG_KEYS = ("concurrency", "max_attempts", "rpm", "tpm", "max_cost", "limit", "max_error_rate", "batch_poll_seconds")


def type_ok(expected: str, value: Any) -> bool:
    if expected == STR:
        return isinstance(value, str)
    if expected == INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected == NUM:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected == BOOL:
        return isinstance(value, bool)
    if expected == _STREAM:
        return isinstance(value, bool) or value == "auto"
    if expected == "a table":
        return isinstance(value, dict)
    if expected == _PATH_OR_TABLE:
        return isinstance(value, (str, dict))
    if expected == "a list of tables":
        return isinstance(value, list) and all(isinstance(v, dict) for v in value)
    if expected == "a list of strings":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if expected.startswith("a string or a list"):
        return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    return False


def describe_value(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} ({text if len(text) <= 40 else text[:37] + '...'})"


def unencodable_text(text: str) -> str | None:
    """None for text that can be sent (encoded as UTF-8), else where it breaks: a lone surrogate, which a
    JSON escape ("\\ud800") or an undecodable byte in a command-line argument can produce."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"character {exc.start}: {ascii(text[exc.start])}"
    return None


def unusable_value(value: Any, at: str) -> tuple[str, str] | None:
    """Where (`at`, a key path such as extra.a[0]) and why a job-file value is unusable, in nested tables and
    lists too: nan or inf, which TOML accepts but JSON bodies and rate arithmetic cannot, or text that is
    not valid UTF-8."""
    if isinstance(value, float) and not math.isfinite(value):
        return at, f"expected a finite number, got {value}"
    if isinstance(value, str):
        bad = unencodable_text(value)
        return (at, f"not valid UTF-8 text ({bad})") if bad else None
    if isinstance(value, dict):
        for name, item in value.items():
            found = unusable_value(name, f"{at} (a key)") or unusable_value(item, f"{at}.{ascii(name)[1:-1]}")
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = unusable_value(item, f"{at}[{index}]")
            if found:
                return found
    return None
