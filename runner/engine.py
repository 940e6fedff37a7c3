"""Kept so `from runner.engine import run_job` goes on working: the orchestrator is `runner.job`, the
worker pool `runner.executors.online`."""

from .job import job_fingerprint, open_sink, run_job

__all__ = ["run_job", "job_fingerprint", "open_sink"]
