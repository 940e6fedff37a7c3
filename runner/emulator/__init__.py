"""A local emulator of the DashScope / Model Studio HTTP API, for tests, rehearsals and benchmarks.

Both dialects on one port: OpenAI-compatible ``/compatible-mode/v1/chat/completions`` and native
``/api/v1/services/aigc/{text,multimodal}-generation/generation``; deterministic answers and
usage; SSE streams in both dialects (compat ``"stream": true``, native ``X-DashScope-SSE``);
faults injected per attempt from a hash of (seed, row key, attempt), stream faults included;
per-model RPM/TPM limits enforced per second, and burst detection; limits that move at run
time (a schedule, or ``POST /_emulator/limits``); the OpenAI-compatible files and batches API
(``/compatible-mode/v1/files``, ``/batches``) with a clock-driven lifecycle; counters, per-second
series and per-client shares at ``GET /_emulator/stats`` (reset with ``POST /_emulator/reset``).
"""

from .config import DEFAULT_MODELS, NATIVE_STREAM_ERROR_MODES, EmulatorConfig
from .faults import FAULT_NAMES, STREAM_FAULTS, FaultRates, parse_fault_spec, row_key
from .limits import UNCHANGED, LimitTable, RateLimits, parse_limit_spec
from .schedule import parse_limit_schedule
from .server import build_app, run_forever, serve
from .thread import Emulator

__all__ = [
    "DEFAULT_MODELS",
    "FAULT_NAMES",
    "NATIVE_STREAM_ERROR_MODES",
    "STREAM_FAULTS",
    "Emulator",
    "EmulatorConfig",
    "FaultRates",
    "LimitTable",
    "RateLimits",
    "build_app",
    "UNCHANGED",
    "parse_fault_spec",
    "parse_limit_schedule",
    "parse_limit_spec",
    "row_key",
    "run_forever",
    "serve",
]
