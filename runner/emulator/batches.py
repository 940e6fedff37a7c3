"""Files and batches held in memory, and a batch's lifecycle computed from the clock.

A batch moves ``validating -> in_progress -> finalizing -> completed``, each phase lasting
EmulatorConfig.batch_phase_seconds of emulated time (emulated time runs batch_time_scale times
as fast as the injected clock). Nothing runs in the background: a batch's status, timestamps
and counts are a pure function of the emulated time at which it is read. During in_progress its
lines finish evenly, in a shuffled order fixed at creation (batchfile.processing_order). The
output and error files are made once, on the first read that finds the batch completed,
expired or cancelled; every custom_id is in exactly one of them (lines a cancelled or expired
batch never ran are in the error file with code batch_cancelled / batch_expired).

Other ends: validation failure (status failed after the validating phase, errors filled);
cancel in validating or in_progress (cancelling, then cancelled at the next phase boundary,
with the lines finished before the cancel delivered); expiry (at created + window, or after
batch_expire_after_fraction of the lines, with the finished lines delivered).
"""

from __future__ import annotations

import math
from collections import Counter
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .batchfile import (
    Checked,
    LineResult,
    answer_line,
    injected_failure,
    processing_order,
    unfinished_line,
)
from .config import EmulatorConfig

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
CANCELLABLE = frozenset({"validating", "in_progress"})


class BatchClock:
    """Emulated seconds since the emulator started, and their Unix timestamps."""

    def __init__(self, clock: Callable[[], float], scale: float) -> None:
        self.clock = clock
        self.scale = scale
        self.start = clock()
        self.epoch = int(time.time())  # whole seconds, so stamps are epoch + floor(t)

    def now(self) -> float:
        return (self.clock() - self.start) * self.scale

    def stamp(self, t: float | None) -> int | None:
        return None if t is None else int(self.epoch + t)


@dataclass(slots=True)
class StoredFile:
    id: str
    data: bytes
    filename: str
    purpose: str
    created_at: int

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "object": "file",
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


@dataclass(frozen=True, slots=True)
class View:
    """A batch as seen at one moment: status, emulated event times, lines finished."""

    status: str
    done: int  # lines finished (in processing order)
    times: dict[str, float]  # event name ("in_progress", "failed", ...) -> emulated time


@dataclass(slots=True)
class Batch:
    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, Any] | None
    created: float  # emulated seconds
    window: float
    phase: float
    results: list[LineResult]  # in processing order
    ok_prefix: list[int]  # ok_prefix[k]: successes among the first k results
    errors: list[dict[str, Any]] | None  # validation errors: the batch fails
    expire_fraction: float | None
    cancel_at: float | None = None
    files_made: bool = False
    output_file_id: str | None = None
    error_file_id: str | None = None

    @property
    def total(self) -> int:
        return len(self.results)

    def done_by(self, t: float) -> int:
        """Lines finished by emulated time `t` (they finish evenly across in_progress)."""
        start = self.created + self.phase
        if t < start:
            return 0
        if self.phase <= 0:
            return self.total
        return min(self.total, math.floor(self.total * (t - start) / self.phase + 1e-9))

    def expiry(self) -> tuple[float, int] | None:
        """(when, lines finished) if this batch expires before its lines are all done."""
        running = self.created + self.phase
        if self.expire_fraction is not None:
            done = min(self.total, math.floor(self.total * self.expire_fraction + 1e-9))
            return running + self.expire_fraction * self.phase, done
        deadline = self.created + self.window
        if deadline < running + self.phase:
            return deadline, self.done_by(deadline)
        return None

    def view(self, t: float) -> View:
        c, p = self.created, self.phase
        running, finalizing, completed = c + p, c + 2 * p, c + 3 * p
        if self.cancel_at is not None and t >= self.cancel_at:
            tc = self.cancel_at
            times = {"cancelling": tc}
            if tc >= running:
                times["in_progress"] = running
            end = running if tc < running else finalizing
            status = "cancelling"
            if t >= end:
                status = "cancelled"
                times["cancelled"] = end
            return View(status, self.done_by(tc), times)
        if self.errors is not None:
            if t < running:
                return View("validating", 0, {})
            return View("failed", 0, {"failed": running})
        expiry = self.expiry()
        times: dict[str, float] = {}
        if t >= running:
            times["in_progress"] = running
        if expiry is not None and t >= expiry[0]:
            times = {k: v for k, v in times.items() if v <= expiry[0]}
            times["expired"] = expiry[0]
            return View("expired", expiry[1], times)
        if t < running:
            return View("validating", 0, times)
        if t < finalizing:
            return View("in_progress", self.done_by(t), times)
        times["finalizing"] = finalizing
        if t < completed:
            return View("finalizing", self.total, times)
        times["completed"] = completed
        return View("completed", self.total, times)


class BatchStore:
    """Every file and batch of one emulator instance; touched only on the server's loop."""

    def __init__(
        self, config: EmulatorConfig, clock: Callable[[], float], rng: random.Random
    ) -> None:
        self.config = config
        self.time = BatchClock(clock, config.batch_time_scale)
        self.rng = rng
        self.files: dict[str, StoredFile] = {}
        self.batches: dict[str, Batch] = {}
        self.line_attempts: Counter[str] = Counter()  # custom_id -> batches that held it so far

    # -- files ---------------------------------------------------------------------------

    def add_file(self, data: bytes, filename: str, purpose: str, prefix: str = "file-batch-",
                 at: float | None = None) -> StoredFile:
        file_id = prefix + f"{self.rng.getrandbits(96):024x}"
        created = self.time.stamp(self.time.now() if at is None else at)
        stored = StoredFile(file_id, data, filename, purpose, created or 0)
        self.files[file_id] = stored
        return stored

    # -- batches -------------------------------------------------------------------------

    def create(
        self,
        checked: Checked,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        window_seconds: float,
        metadata: dict[str, Any] | None,
    ) -> Batch:
        config = self.config
        now = self.time.now()
        errors: list[dict[str, Any]] | None = None
        if config.batch_fail_validation:
            errors = [injected_failure()]
        elif checked.errors:
            errors = checked.errors
        results: list[LineResult] = []
        ok_prefix = [0]
        if errors is None:
            order = processing_order(checked.lines, config.seed)
            running = now + config.batch_phase_seconds
            n = len(order)
            for i, line in enumerate(order):
                finished = self.time.stamp(running + (i + 1) / n * config.batch_phase_seconds)
                attempt = self.line_attempts[line.custom_id]
                self.line_attempts[line.custom_id] += 1
                results.append(answer_line(line, config, self.rng.getrandbits(128), finished or 0, attempt))
                ok_prefix.append(ok_prefix[-1] + results[-1].ok)
        batch = Batch(
            id=f"batch_{uuid.UUID(int=self.rng.getrandbits(128), version=4)}",
            input_file_id=input_file_id,
            endpoint=endpoint,
            completion_window=completion_window,
            metadata=metadata,
            created=now,
            window=window_seconds,
            phase=config.batch_phase_seconds,
            results=results,
            ok_prefix=ok_prefix,
            errors=errors,
            expire_fraction=config.batch_expire_after_fraction,
        )
        self.batches[batch.id] = batch
        return batch

    def cancel(self, batch: Batch) -> bool:
        """Ask to cancel; False if the batch is past the point where it can be cancelled."""
        now = self.time.now()
        status = batch.view(now).status
        if status in ("cancelling", "cancelled"):
            return True
        if status not in CANCELLABLE:
            return False
        batch.cancel_at = now
        return True

    def describe(self, batch: Batch) -> dict[str, Any]:
        """The batch object (dashscope-api.md 7.4) as of now; makes its files once it ends."""
        view = batch.view(self.time.now())
        if view.status in TERMINAL and view.status != "failed" and not batch.files_made:
            self._make_files(batch, view)
        stamp, times = self.time.stamp, view.times
        ok = batch.ok_prefix[view.done]
        if view.status == "failed":
            counts = {"total": 0, "completed": 0, "failed": 0}
        elif view.status in ("expired", "cancelled"):
            counts = {"total": batch.total, "completed": ok, "failed": batch.total - ok}
        else:
            counts = {"total": batch.total, "completed": ok, "failed": view.done - ok}
        errors = None
        if view.status == "failed" and batch.errors is not None:
            errors = {"object": "list", "data": batch.errors}
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": batch.endpoint,
            "errors": errors,
            "input_file_id": batch.input_file_id,
            "completion_window": batch.completion_window,
            "status": view.status,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "created_at": stamp(batch.created),
            "in_progress_at": stamp(times.get("in_progress")),
            "expires_at": stamp(batch.created + batch.window),
            "finalizing_at": stamp(times.get("finalizing")),
            "completed_at": stamp(times.get("completed")),
            "failed_at": stamp(times.get("failed")),
            "expired_at": stamp(times.get("expired")),
            "cancelling_at": stamp(times.get("cancelling")),
            "cancelled_at": stamp(times.get("cancelled")),
            "request_counts": counts,
            "metadata": batch.metadata,
        }

    def _make_files(self, batch: Batch, view: View) -> None:
        batch.files_made = True
        done = batch.results[: view.done]
        output = [r.line for r in done if r.ok]
        errors = [r.line for r in done if not r.ok]
        code = {"expired": "batch_expired", "cancelled": "batch_cancelled"}.get(view.status)
        if code is not None:
            errors += [
                unfinished_line(r.custom_id, self.rng.getrandbits(128), code)
                for r in batch.results[view.done :]
            ]
        at = view.times.get(view.status)
        if output:
            batch.output_file_id = self.add_file(
                b"\n".join(output) + b"\n", f"{batch.id}_output.jsonl", "batch_output",
                "file-batch_output-", at).id
        if errors:
            batch.error_file_id = self.add_file(
                b"\n".join(errors) + b"\n", f"{batch.id}_error.jsonl", "batch_output",
                "file-batch_error-", at).id

    def status_counts(self) -> dict[str, int]:
        """How many batches are in each status now (a view, not a counter)."""
        now = self.time.now()
        counts: dict[str, int] = {}
        for batch in self.batches.values():
            status = batch.view(now).status
            counts[status] = counts.get(status, 0) + 1
        return counts


__all__ = ["Batch", "BatchClock", "BatchStore", "StoredFile", "View"]
