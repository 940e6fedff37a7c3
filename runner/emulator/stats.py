"""Counters the emulator keeps about what it received and answered.

Mutated only on the server's event loop (no locks on the hot path); other threads read it
through Emulator.stats(), which runs snapshot() on that loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Stats:
    """Request counters. Per-key data is a two-item list [received, succeeded], so a
    million keys stay affordable."""

    def __init__(self) -> None:
        self.in_flight = 0
        # Batches by status now, a view of the batch store (set by EmulatorState).
        self.batch_statuses: Callable[[], dict[str, int]] = dict
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        # Requests to paths the emulator does not serve (answered 404 NotFound; not in `requests`).
        self.unrouted = 0
        self.by_status: dict[int, int] = {}
        self.by_fault: dict[str, int] = {}
        self.by_model: dict[str, int] = {}
        self.by_dialect: dict[str, int] = {}
        self.workspaces: dict[str, int] = {}
        self.keys: dict[str, list[int]] = {}
        self.succeeded_more_than_once = 0
        # Requests whose body parsed, by whether they asked for a stream.
        self.by_stream: dict[str, int] = {"stream": 0, "plain": 0}
        # Rate limiting: rejections by rule; per model, what the limiter let through.
        self.rejected: dict[str, int] = {"rpm": 0, "tpm": 0, "burst": 0}
        self.admitted: dict[str, int] = {}
        self.tokens_admitted: dict[str, int] = {}
        self.by_model_status: dict[str, dict[int, int]] = {}
        # Files and batches API (never counted in `requests`).
        self.batches_created = 0
        self.batch_lines = 0
        self.files_uploaded = 0
        self.file_bytes = 0
        # Requests still in flight across a reset are part of the new peak.
        self.max_in_flight = self.in_flight

    def enter(self) -> None:
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight

    def leave(self) -> None:
        self.in_flight -= 1

    def received(self, key: str) -> int:
        """Count one more request for `key`; return its attempt number (1-based)."""
        entry = self.keys.get(key)
        if entry is None:
            self.keys[key] = entry = [0, 0]
        entry[0] += 1
        return entry[0]

    def admit(self, model: str, tokens: int) -> None:
        """The limiter let a request of `tokens` tokens through for `model`."""
        self.admitted[model] = self.admitted.get(model, 0) + 1
        self.tokens_admitted[model] = self.tokens_admitted.get(model, 0) + tokens

    def succeeded(self, key: str) -> None:
        """A full answer was sent: a plain 200, or a stream up to and including its final frame."""
        entry = self.keys.get(key)
        if entry is None:  # the key arrived before a reset; count it afresh
            self.keys[key] = entry = [0, 0]
        entry[1] += 1
        if entry[1] == 2:
            self.succeeded_more_than_once += 1

    def snapshot(self, keys: bool = True) -> dict[str, Any]:
        """The JSON-ready view served at GET /_emulator/stats."""
        data: dict[str, Any] = {
            "requests": self.requests,
            "unrouted": self.unrouted,
            "by_status": {str(code): n for code, n in sorted(self.by_status.items())},
            "by_fault": dict(self.by_fault),
            "by_model": dict(self.by_model),
            "by_dialect": dict(self.by_dialect),
            "workspaces": dict(self.workspaces),
            "by_stream": dict(self.by_stream),
            "rejected": dict(self.rejected),
            "admitted": dict(self.admitted),
            "tokens_admitted": dict(self.tokens_admitted),
            "by_model_status": {
                model: {str(code): n for code, n in sorted(codes.items())}
                for model, codes in self.by_model_status.items()
            },
        }
        data["batches"] = {
            "created": self.batches_created,
            "by_status": self.batch_statuses(),
            "lines": self.batch_lines,
        }
        data["files"] = {"uploaded": self.files_uploaded, "bytes": self.file_bytes}
        if keys:
            data["keys"] = {k: {"received": r, "succeeded": s} for k, (r, s) in self.keys.items()}
        data["key_count"] = len(self.keys)
        data["succeeded_more_than_once"] = self.succeeded_more_than_once
        data["max_in_flight"] = self.max_in_flight
        data["in_flight"] = self.in_flight
        return data


def bump(counter: dict[Any, int], name: Any) -> None:
    counter[name] = counter.get(name, 0) + 1
