"""Files beside the output: written whole or not at all, and every OS error as a one-line SinkError.

A full disk, a read-only folder or a permission problem stops a run with "<path>: <what was being
done> (<the OS's reason>)" and a hint chosen by the error, never a traceback. `os_errors` is the one
place that translation happens; the sink, the summary and validate's --dry-run file all use it.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import SinkError


def os_reason(exc: OSError) -> str:
    """The OS's words for an error, on one line ("No space left on device")."""
    return " ".join(str(exc.strerror or exc).split())


def os_hint(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free disk space, then run the same command again: it resumes from the rows committed so far"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the output folder writable (or choose another --output), then run the same command again"
    return "fix the cause, then run the same command again: it resumes from the rows committed so far"


def sink_error(path: Path, action: str, exc: OSError) -> SinkError:
    """A SinkError for an OS error: the file it happened on, what was being done, and the OS's reason."""
    return SinkError(f"{exc.filename or path}: {action} ({os_reason(exc)})", hint=os_hint(exc))


@contextmanager
def os_errors(path: Path, action: str) -> Iterator[None]:
    """Turn an OSError inside the block into a SinkError (see sink_error)."""
    try:
        yield
    except OSError as exc:
        raise sink_error(path, action, exc) from exc


def remove_quietly(path: Path) -> None:
    """Remove a temporary file if it is there; a failure changes nothing the caller can act on."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def write_file_atomic(path: Path, text: str) -> None:
    """Write a text file (the summary, the manifest) whole or not at all; OS errors are SinkErrors."""
    tmp = path.with_name("." + path.name + ".tmp")
    with os_errors(path, "cannot write"):
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        except BaseException:
            remove_quietly(tmp)  # a half-written file only takes space a full disk does not have
            raise
