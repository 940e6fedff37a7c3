"""Batch mode: a job through DashScope's Batch API (API facts 7) at batch prices, into the same output.

`run_batch_job` drives a run; `state` records what was sent beside the output; `render` writes
the batch files, `api` talks to the files and batches endpoints, `join` reads the answers back.
"""

from .driver import run_batch_job

__all__ = ["run_batch_job"]
