"""A local emulator of the DashScope / Model Studio HTTP API, for tests, rehearsals and benchmarks.

Both dialects on one port: OpenAI-compatible ``/compatible-mode/v1/chat/completions`` and native
``/api/v1/services/aigc/{text,multimodal}-generation/generation``; deterministic answers and
usage; faults injected per attempt from a hash of (seed, row key, attempt); counters at
``GET /_emulator/stats`` (reset with ``POST /_emulator/reset``). Streaming is not emulated yet.
"""

from .config import DEFAULT_MODELS, EmulatorConfig
from .faults import FAULT_NAMES, FaultRates, parse_fault_spec, row_key
from .server import build_app, run_forever, serve
from .thread import Emulator

__all__ = [
    "DEFAULT_MODELS",
    "FAULT_NAMES",
    "Emulator",
    "EmulatorConfig",
    "FaultRates",
    "build_app",
    "parse_fault_spec",
    "row_key",
    "run_forever",
    "serve",
]
