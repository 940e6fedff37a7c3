"""Counters the emulator keeps about what it received and answered.

Mutated only on the server's event loop (no locks on the hot path); other threads read it
through Emulator.stats(), which runs snapshot() on that loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class Series:
    """Counts per whole second since the stats' origin (index = int(now - origin))."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: list[int] = []

    def add(self, second: int) -> None:
        counts = self.counts
        if second >= len(counts):
            counts.extend([0] * (second + 1 - len(counts)))
        counts[second] += 1

    def padded(self, length: int) -> list[int]:
        return self.counts + [0] * (length - len(self.counts))


# What the per-second series and the per-client counters count, in snapshot order:
# arrived: every chat request; admitted: passed the rate limiter; rejected: refused by the rate
# limiter (rpm/tpm/burst: caused by the caller's rate); faulted: a background fault was drawn (or
# fail_first); ok: a full answer was sent (counted in the second it was sent).
SERIES = ("arrived", "admitted", "rejected", "faulted", "ok")


class ClientStats:
    """One API key's share: counters and per-second series (a label stands for the key)."""

    __slots__ = ("totals", "series")

    def __init__(self) -> None:
        self.totals = dict.fromkeys(SERIES, 0)
        self.series = {name: Series() for name in SERIES}

    def view(self, length: int) -> dict[str, Any]:
        data: dict[str, Any] = dict(self.totals)
        data["series"] = {name: self.series[name].padded(length) for name in SERIES}
        return data


def client_label(token: str) -> str:
    """What stands for an API key in the stats: "..." and its last 4 characters (keys of 8
    characters or fewer all share "..."), never the key."""
    return "..." + token[-4:] if len(token) > 8 else "..."


class Stats:
    """Request counters. Per-key data is a two-item list [received, succeeded], so a
    million keys stay affordable.

    Times (origin, last_arrival, the series' seconds, the log) are on the emulator's clock
    (time.monotonic by default, which on Linux is the same clock in every process, so a test can
    compare them with its own time.monotonic()). The origin is the first chat request after start
    or reset; it also starts the limit schedule."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, keep_log: bool = False) -> None:
        self.in_flight = 0
        self.clock = clock
        self.keep_log = keep_log
        # Batches by status now, a view of the batch store (set by EmulatorState).
        self.batch_statuses: Callable[[], dict[str, int]] = dict
        # The rate limits now, a view of the limiter (set by EmulatorState).
        self.limits_view: Callable[[], dict[str, Any]] = dict
        self.reset()

    def reset(self) -> None:
        self.origin: float | None = None
        self.last_arrival: float | None = None
        self.last_ok: float | None = None
        self.series = {name: Series() for name in SERIES}
        self.clients: dict[str, ClientStats] = {}
        # One entry per request when keep_log (see LOG_FIELDS); None otherwise.
        self.log: list[list[Any]] | None = [] if self.keep_log else None
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

    def arrive(self) -> int:
        """Count one chat request arriving now; return its second since the origin."""
        now = self.clock()
        if self.origin is None:
            self.origin = now
        self.last_arrival = now
        self.requests += 1
        second = int(now - self.origin)
        self.series["arrived"].add(second)
        return second

    def client(self, label: str, second: int) -> ClientStats:
        """The counters of the client `label`, counting this request's arrival."""
        client = self.clients.get(label)
        if client is None:
            self.clients[label] = client = ClientStats()
        client.totals["arrived"] += 1
        client.series["arrived"].add(second)
        return client

    def mark(self, name: str, client: ClientStats | None, second: int) -> None:
        """Count `name` (admitted, rejected, faulted, ok) overall and for `client`."""
        self.series[name].add(second)
        if client is not None:
            client.totals[name] += 1
            client.series[name].add(second)

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

    def succeeded(self, key: str, client: ClientStats | None = None) -> None:
        """A full answer was sent: a plain 200, or a stream up to and including its final frame."""
        now = self.last_ok = self.clock()
        self.mark("ok", client, 0 if self.origin is None else max(0, int(now - self.origin)))
        entry = self.keys.get(key)
        if entry is None:  # the key arrived before a reset; count it afresh
            self.keys[key] = entry = [0, 0]
        entry[1] += 1
        if entry[1] == 2:
            self.succeeded_more_than_once += 1

    def snapshot(self, keys: bool = True, log: bool = False) -> dict[str, Any]:
        """The JSON-ready view served at GET /_emulator/stats; `log` adds the request log (when
        EmulatorConfig.request_log keeps one). Without keys and log it costs a few list copies of
        one number per second."""
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
        length = max((len(x.counts) for x in self.series.values()), default=0)
        data["clock"] = {"origin": self.origin, "last_arrival": self.last_arrival, "last_ok": self.last_ok}
        data["series"] = {name: self.series[name].padded(length) for name in SERIES}
        data["clients"] = {label: c.view(length) for label, c in sorted(self.clients.items())}
        data["limits"] = self.limits_view()
        if log and self.log is not None:
            data["log"] = [dict(zip(LOG_FIELDS, entry)) for entry in self.log]
        return data


# One request log entry, a list in this order (filled in as the request is answered).
LOG_FIELDS = ("arrived", "answered", "status", "client", "key", "attempt", "fault")


def bump(counter: dict[Any, int], name: Any) -> None:
    counter[name] = counter.get(name, 0) + 1
