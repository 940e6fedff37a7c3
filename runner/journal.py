"""The open part's journal: every result is appended and handed to the OS as soon as it is written.

Part files are committed every few seconds; between commits a kill -9 would lose the results of
requests that were already paid for. The journal closes that gap: one line per result, written
and flushed (not fsynced: the OS keeps it through a process crash) before the next result is
taken. A journal whose part was committed is deleted; one without its part is replayed on the next
run. Each line carries a CRC so a torn last line is detected and dropped, never trusted.
"""

from __future__ import annotations

import base64
import json
import zlib
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterator

from .records import Result, Usage

_USAGE = ("input_tokens", "output_tokens", "total_tokens", "cached_tokens", "reasoning_tokens")
_SCALARS = ("row_id", "key", "model", "status", "mode", "response", "reasoning", "finish_reason", "cost", "request_id",
            "error_type", "error_code", "error_message", "http_status", "attempts", "latency_ms", "duration_ms",
            "time_to_first_token_ms", "request_hash", "parsed", "parse_error", "variant", "sample_index")


def _encode_value(value: Any) -> Any:
    """JSON for the types pyarrow hands back from Parquet (kept columns), tagged so they come back typed."""
    if isinstance(value, datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, date):
        return {"$date": value.isoformat()}
    if isinstance(value, time):
        return {"$time": value.isoformat()}
    if isinstance(value, timedelta):
        return {"$timedelta": value.total_seconds()}
    if isinstance(value, Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(value).decode()}
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot journal a {type(value).__name__}")


_DECODERS = {
    "$datetime": datetime.fromisoformat, "$date": date.fromisoformat, "$time": time.fromisoformat,
    "$timedelta": lambda s: timedelta(seconds=s), "$decimal": Decimal, "$bytes": base64.b64decode,
}


def _decode_object(obj: dict) -> Any:
    if len(obj) == 1:
        (tag, value), = obj.items()
        decoder = _DECODERS.get(tag)
        if decoder is not None:
            return decoder(value)
    return obj


def encode(result: Result) -> bytes:
    """One journal line: `crc32 json\\n`."""
    data = {name: getattr(result, name) for name in _SCALARS}
    data["usage"] = [getattr(result.usage, name) for name in _USAGE]
    data["kept"] = dict(result.kept)
    data["started_at"] = result.started_at
    data["finished_at"] = result.finished_at
    payload = json.dumps(data, default=_encode_value, ensure_ascii=False, separators=(",", ":")).encode()
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def decode(line: bytes) -> Result | None:
    """The result on a journal line, or None for a torn or corrupt line."""
    if not line.endswith(b"\n") or len(line) < 10 or line[8:9] != b" ":
        return None
    payload = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(payload):
            return None
        data = json.loads(payload, object_hook=_decode_object)
    except ValueError:
        return None
    return Result(usage=Usage(*data.pop("usage")), **data)


def replay(path: Path) -> Iterator[Result]:
    """The results of a journal, up to its first bad line (a crash can only tear the last one)."""
    with open(path, "rb") as fh:
        for line in fh:
            result = decode(line)
            if result is None:
                return
            yield result


class Journal:
    """An append-only file of encoded results, flushed to the OS on every write."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = open(path, "ab", buffering=0)

    def append(self, result: Result) -> None:
        self._fh.write(encode(result))

    def close(self) -> None:
        self._fh.close()

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
