"""EmulatorConfig: the frozen description of how the emulator behaves, and the model table."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from .faults import FAULT_NAMES, STREAM_FAULTS, FaultRates
from .limits import Limit, LimitTable, check_rate
from .schedule import Schedule, check_schedule

DEFAULT_MODELS: frozenset[str] = frozenset(
    {
        "qwen-plus",
        "qwen-plus-latest",
        "qwen-flash",
        "qwen-turbo",
        "qwen-max",
        "qwen-max-latest",
        "qwen3-max",
        "qwen3.5-plus",
        "qwq-plus",
        "qwen3-235b-a22b",
        "qwen3-32b",
    }
)

# Thinking behaviour per model family (dashscope-api.md 9.1, 9.2). Names outside these sets
# (qwen-max, or a custom name added to `models`) are plain non-thinking models that ignore
# enable_thinking.
THINKING_NON_STREAM_OK: frozenset[str] = frozenset({"qwen3-max", "qwen3.5-plus"})
# Models whose thinking is on unless the request turns it off.
THINKING_DEFAULT_ON: frozenset[str] = frozenset({"qwen3.5-plus", "qwen3-235b-a22b", "qwen3-32b"})
# Qwen3 commercial: thinking exists but only when streaming.
THINKING_STREAM_ONLY: frozenset[str] = frozenset(
    {"qwen-plus", "qwen-plus-latest", "qwen-flash", "qwen-turbo"}
)
# Always stream-only (QwQ), whatever enable_thinking says.
STREAM_ONLY: frozenset[str] = frozenset({"qwq-plus"})
# Qwen3 open source: stream-only while thinking (the default); fine with enable_thinking=false.
STREAM_ONLY_WHILE_THINKING: frozenset[str] = frozenset({"qwen3-235b-a22b", "qwen3-32b"})


NATIVE_STREAM_ERROR_MODES: tuple[str, ...] = ("200", "4xx")


@dataclass(frozen=True)
class EmulatorConfig:
    """How the emulator answers. Frozen and hashable, so it can be shared across threads
    and processes.

    faults maps a fault name (see FAULT_NAMES) to its probability per attempt; any mapping
    or iterable of (name, rate) pairs is accepted and stored as a read-only FaultRates.

    Streams: the answer text (reasoning, then content) is cut into at most `stream_chunks`
    frames with `chunk_delay_ms` between frames. `native_stream_error_status` says how a native
    stream reports an error that happens before its first frame: "200" (HTTP 200, one
    ``event:error`` frame) or "4xx" (the error's own status, the SSE-framed error as body,
    ``content-type: application/json``), the two behaviours seen from the real API.

    Rate limits (see limits.py): `rpm`/`tpm` apply to each model separately (None: no limit),
    `limits` overrides them per model as model -> (rpm, tpm), where None inherits the global
    value and ``inf`` lifts it. `burst_factor` (None: off) and `burst_window_s` configure
    Throttling.BurstRate. Accepted as a mapping, pairs or "MODEL=RPM:TPM" strings.

    `retry_after` (seconds) is sent as Retry-After on every 429 (rate-caused or a fault) and
    `retry_after_503` on every 503: the real API sends neither (facts 2.3), so both default to
    None; they are separate so a test can give one without the other.

    Limits that move (the quota is shared with the account's other jobs): `limit_schedule` is a
    tuple of (seconds, factor) pairs (or "30:0.5,60:1"): from that many seconds after the first
    request (after start, or after a stats reset) every limit is scaled by factor (see
    schedule.py). POST /_emulator/limits changes them at any moment.

    `fail_first` (N) answers the first N requests that pass the limiter with the fault
    `fail_first_fault` instead of the random draw, in arrival order: a deterministic 429 (or
    503, ...) for tests. Not restarted by a stats reset.

    `request_log` keeps one entry per request (arrival and answer time on the emulator's clock,
    status, row key, attempt, client), served at GET /_emulator/stats?log=1; off by default,
    since it grows with every request.

    Batches (see batches.py): emulated time runs `batch_time_scale` times as fast as the clock;
    each phase (validating, in_progress, finalizing) lasts `batch_phase_seconds` emulated
    seconds. `batch_line_fault_rate` of the lines (by a hash of seed and custom_id) go to the
    error file as 500s; `batch_fail_validation` fails every batch in validation;
    `batch_expire_after_fraction` expires every batch once that share of its lines is done.
    `batch_max_lines` and `batch_max_line_bytes` are the real API's caps, lowered in tests.
    """

    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    faults: Mapping[str, float] = field(default_factory=FaultRates)
    api_keys: tuple[str, ...] | None = None
    seed: int = 0
    slow_ms: float = 2000.0
    hang_seconds: float = 600.0
    models: frozenset[str] = DEFAULT_MODELS
    retry_after: float | None = None
    stream_chunks: int = 8
    chunk_delay_ms: float = 0.0
    native_stream_error_status: str = "200"
    rpm: float | None = None
    tpm: float | None = None
    limits: Mapping[str, Limit] = field(default_factory=LimitTable)
    burst_window_s: float = 1.0
    burst_factor: float | None = None
    retry_after_503: float | None = None
    limit_schedule: Schedule = ()
    fail_first: int = 0
    fail_first_fault: str = "429"
    request_log: bool = False
    batch_time_scale: float = 1.0
    batch_phase_seconds: float = 60.0
    batch_line_fault_rate: float = 0.0
    batch_fail_validation: bool = False
    batch_expire_after_fraction: float | None = None
    batch_max_lines: int = 50_000
    batch_max_line_bytes: int = 6 * 1024 * 1024

    def __post_init__(self) -> None:
        # object.__setattr__ because the dataclass is frozen; this only normalises inputs.
        if not isinstance(self.faults, FaultRates):
            object.__setattr__(self, "faults", FaultRates(self.faults))
        if not isinstance(self.limits, LimitTable):
            object.__setattr__(self, "limits", LimitTable(self.limits))
        if self.api_keys is not None:
            if isinstance(self.api_keys, str):
                raise ValueError("api_keys must be a tuple of keys, not one string")
            object.__setattr__(self, "api_keys", tuple(self.api_keys))
        if not isinstance(self.models, frozenset):
            object.__setattr__(self, "models", frozenset(self.models))
        for name in ("latency_ms", "latency_jitter_ms", "slow_ms", "hang_seconds"):
            _check_non_negative(name, getattr(self, name))
        for name in ("retry_after", "retry_after_503"):
            if getattr(self, name) is not None:
                _check_non_negative(name, getattr(self, name))
        object.__setattr__(self, "limit_schedule", check_schedule(self.limit_schedule))
        first = self.fail_first
        if isinstance(first, bool) or not isinstance(first, int) or first < 0:
            raise ValueError(f"fail_first must be an integer >= 0, got {first!r}")
        if self.fail_first_fault not in FAULT_NAMES or self.fail_first_fault in STREAM_FAULTS:
            raise ValueError(
                f"fail_first_fault must be a fault name that is not stream-only, got "
                f"{self.fail_first_fault!r}"
            )
        chunks = self.stream_chunks
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"stream_chunks must be an integer >= 1, got {chunks!r}")
        _check_non_negative("chunk_delay_ms", self.chunk_delay_ms)
        if self.native_stream_error_status not in NATIVE_STREAM_ERROR_MODES:
            raise ValueError(
                "native_stream_error_status must be one of "
                f"{', '.join(NATIVE_STREAM_ERROR_MODES)}, got {self.native_stream_error_status!r}"
            )
        for name in ("rpm", "tpm"):
            if getattr(self, name) is not None:
                check_rate(name, getattr(self, name))
        _check_non_negative("burst_window_s", self.burst_window_s)
        if self.burst_window_s == 0:
            raise ValueError("burst_window_s must be > 0, got 0")
        if self.burst_factor is not None:
            factor = self.burst_factor
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (
                math.isfinite(factor) and factor >= 1
            ):
                raise ValueError(f"burst_factor must be a finite number >= 1, got {factor!r}")
        _check_non_negative("batch_time_scale", self.batch_time_scale)
        if self.batch_time_scale == 0:
            raise ValueError("batch_time_scale must be > 0, got 0")
        _check_non_negative("batch_phase_seconds", self.batch_phase_seconds)
        _check_fraction("batch_line_fault_rate", self.batch_line_fault_rate)
        if self.batch_expire_after_fraction is not None:
            _check_fraction("batch_expire_after_fraction", self.batch_expire_after_fraction)
        for name in ("batch_max_lines", "batch_max_line_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_non_negative(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


__all__ = ["DEFAULT_MODELS", "NATIVE_STREAM_ERROR_MODES", "EmulatorConfig"]
