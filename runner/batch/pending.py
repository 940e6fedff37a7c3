"""A job's batches as its state file records them: what they forbid (--restart, an online run) and how
`runner status` lists them. Used by the job before any mode runs, and by the status/cancel commands."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RunnerError
from .state import BatchState

if TYPE_CHECKING:
    from ..spec import JobSpec


def parts_dir_of(spec: JobSpec) -> Path:
    return spec.output.path.with_name(spec.output.path.name + ".parts")


def load_state(spec: JobSpec) -> BatchState:
    return BatchState.load(parts_dir_of(spec))


def guard_pending_batches(spec: JobSpec, *, restart: bool, online: bool) -> None:
    """Refuse what would pay for rows twice or lose batches: --restart while batches run, and an online
    run while batches of this job have answers not joined yet."""
    state = load_state(spec)
    job = spec.source or "JOB"
    if restart and state.live:
        live = state.live
        raise RunnerError(f"{spec.output.path}: {len(live)} batch(es) of this job are still running "
                          f"({', '.join(r.batch_id or '' for r in live)}); --restart would lose them",
                          hint=f"cancel them first with `runner cancel {job}`, or let them finish")
    if online and not restart and state.pending:
        raise RunnerError(f"{spec.output.path}: {len(state.pending)} batch(es) of this job are not joined yet; "
                          "sending their rows online would pay for them twice",
                          hint=f"run `runner run {job} --mode batch` to pick them up (or `runner cancel {job}` first), "
                               "then --mode online with --retry-failed for what they did not answer")


def describe_batches(state: BatchState) -> list[dict[str, Any]]:
    return [{"name": r.name, "batch_id": r.batch_id, "model": r.model, "rows": r.rows, "status": r.status,
             "request_counts": r.request_counts, "joined": r.joined} for r in state.records]
