"""A job's batches as its state file records them: what they forbid (--restart, an online run) and how
`runner status` lists them. Used by the job before any mode runs, and by the status/cancel commands."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..endpoints import base_url
from ..errors import OutputConflict, RunnerError
from .state import BatchState

if TYPE_CHECKING:
    from ..spec import JobSpec


def parts_dir_of(spec: JobSpec) -> Path:
    return spec.output.path.with_name(spec.output.path.name + ".parts")


def load_state(spec: JobSpec) -> BatchState:
    return BatchState.load(parts_dir_of(spec))


def recorded_endpoint(spec: JobSpec) -> dict[str, Any]:
    """What the batch state records about where a run's batches live."""
    return {"dialect": spec.endpoint.dialect, "base_url": base_url(spec.endpoint), "emulator": spec.endpoint.emulator}


def job_command(spec: JobSpec, command: str, *extra: str) -> str:
    """`runner COMMAND JOB` with the flags that point it at this run's output and endpoint, for a hint to be
    followed literally: --output and --base-url where they differ from the job file (or always, without one),
    --emulator for a rehearsal's `run`."""
    written = _as_written(spec)
    words = ["runner", command, str(spec.source or "JOB")]
    if written is None or written.output.path != spec.output.path:
        words += ["--output", str(spec.output.path)]
    if spec.endpoint.emulator:
        if command == "run":
            words.append("--emulator")
    elif written is None or base_url(written.endpoint) != base_url(spec.endpoint):
        words += ["--base-url", base_url(spec.endpoint)]
    words += extra
    return " ".join(shlex.quote(word) for word in words)


def status_and_cancel_hint(spec: JobSpec) -> str:
    if spec.endpoint.emulator:  # its batches died with the emulator of that run
        return f"`{job_command(spec, 'status', '--offline')}` shows what this run recorded"
    return f"`{job_command(spec, 'status')}` shows them, `{job_command(spec, 'cancel')}` cancels them"


def _as_written(spec: JobSpec) -> JobSpec | None:
    """The job as its file says, to tell which flags a run was given; None without a readable file."""
    if spec.source is None:
        return None
    from ..spec import load_job

    try:
        return load_job(spec.source)
    except RunnerError:
        return None


def died_with_their_emulator(spec: JobSpec, state: BatchState) -> bool:
    """A `--emulator` rerun of a rehearsal whose batches lived in the emulator of an earlier process: they are
    gone with it, so nothing can be paid twice or lost, and their rows must be planned again."""
    return spec.endpoint.emulator and bool((state.endpoint or {}).get("emulator"))


def forget_emulator_batches(spec: JobSpec, state: BatchState) -> int:
    """Drop the batches an earlier rehearsal's emulator took with it (their answers never came down), so this
    run plans their rows into new batches; returns how many rows that frees."""
    if not died_with_their_emulator(spec, state):
        return 0
    gone = [r for r in state.records if not r.joined and not r.downloaded]
    for record in gone:
        for path in (record.input_path(state.folder), record.rows_path(state.folder)):
            path.unlink(missing_ok=True)
    state.records = [r for r in state.records if r not in gone]
    state.save()
    return sum(r.rows for r in gone)


def guard_pending_batches(spec: JobSpec, *, restart: bool, online: bool) -> None:
    """Refuse what would pay for rows twice or lose batches: --restart while batches run, and an online
    run while batches of this job have answers not joined yet."""
    state = load_state(spec)
    if died_with_their_emulator(spec, state):
        return
    if restart and state.live:
        live = state.live
        raise OutputConflict(f"{spec.output.path}: {len(live)} batch(es) of this job are still running "
                             f"({', '.join(r.batch_id or '' for r in live)}); --restart would lose them",
                             hint=f"cancel them first with `{job_command(spec, 'cancel')}`, or let them finish")
    if online and not restart and state.pending:
        raise OutputConflict(f"{spec.output.path}: {len(state.pending)} batch(es) of this job are not joined yet; "
                             "sending their rows online would pay for them twice",
                             hint=f"run `{job_command(spec, 'run', '--mode', 'batch')}` to pick them up (or "
                                  f"`{job_command(spec, 'cancel')}` first), then --mode online with --retry-failed "
                                  "for what they did not answer")


def describe_batches(state: BatchState) -> list[dict[str, Any]]:
    return [{"name": r.name, "batch_id": r.batch_id, "model": r.model, "rows": r.rows, "status": r.status,
             "request_counts": r.request_counts, "joined": r.joined} for r in state.records]
