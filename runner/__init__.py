"""Batch runner for DashScope / OpenAI-compatible chat endpoints: a job file in, a Parquet table out.

Library entry points: `load_job(path)` -> JobSpec, `await run_job(spec)` -> RunSummary.
Imports are lazy so that `runner --help` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (AuthError, BadResponse, CallError, EndpointNotFound, Interrupted, InvalidOutput, InvalidRow,
                     NotFound,
                     OutputConflict, PermanentCallError, QuotaExhausted, RunnerError, SinkError, SourceError, SpecError,
                     Throttled, TransientCallError)

if TYPE_CHECKING:
    from .job import run_job
    from .report import RunSummary, summarize_file
    from .spec import JobSpec, load_job

_LAZY = {"run_job": "job", "load_job": "spec", "JobSpec": "spec", "RunSummary": "report",
         "summarize_file": "report"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'runner' has no attribute {name!r}")


__all__ = ["run_job", "load_job", "JobSpec", "RunSummary", "summarize_file", "RunnerError", "SpecError",
           "SourceError", "SinkError", "OutputConflict", "AuthError", "QuotaExhausted", "EndpointNotFound",
           "Interrupted", "CallError", "TransientCallError", "Throttled", "PermanentCallError", "NotFound", "BadResponse", "InvalidRow",
           "InvalidOutput"]
