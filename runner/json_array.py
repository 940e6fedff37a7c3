"""`.json` inputs: one JSON array of objects, parsed element by element (never the whole file at once).

Element N of the array is row_id N, as line N+1 of a JSON Lines file would be; an element that is not
an object is a bad row. A file that is not one JSON array (bad syntax, an object at the top, text after
the closing bracket, an element longer than the limit) is a SourceError: unlike JSON Lines, the rest of
the file cannot be trusted after a syntax error. The counting pass finds it before anything is sent.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any, Iterator

from .errors import SourceError
from .object_store import ObjectInput, open_bytes

_CHUNK_CHARS = 1 << 20
_SPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
_HINT = "a .json input is one array of objects, e.g. [{\"prompt\": \"...\"}, ...]; JSON Lines (one object per " \
        "line) is read from .jsonl"


class JsonArrayReader:
    """Iterates the elements of the array in `path`; `max_element_chars` bounds the memory one element takes."""

    def __init__(self, path: Path, *, gzipped: bool, max_element_chars: int, store: ObjectInput | None = None) -> None:
        self.path = path
        self.store = store  # the object in S3-compatible storage the input is, else None (a local file)
        self.gzipped = gzipped
        self.max_element_chars = max_element_chars

    def __iter__(self) -> Iterator[Any]:
        raw = open_bytes(self.path, self.store, gzipped=self.gzipped)
        with io.TextIOWrapper(raw, encoding="utf-8-sig", errors="strict") as fh:
            try:
                yield from _Parser(fh, self).elements()
            except UnicodeDecodeError as exc:
                raise SourceError(f"{self.path}: not valid UTF-8 ({exc.reason})", hint=_HINT) from None

    def count(self) -> int:
        return sum(1 for _ in self)

    def has_elements(self) -> bool:
        for _ in self:
            return True
        return False


class _Parser:
    def __init__(self, fh: io.TextIOBase, source: JsonArrayReader) -> None:
        self.fh = fh
        self.source = source
        self.buf = ""
        self.pos = 0
        self.offset = 0  # characters of the file before buf[0], for messages
        self.eof = False

    def _fill(self) -> None:
        """Read more, at least as much as is unparsed, so a large element takes O(size) in all."""
        rest = self.buf[self.pos:]
        chunk = self.fh.read(max(_CHUNK_CHARS, len(rest)))
        self.offset += self.pos
        self.buf, self.pos = rest + chunk, 0
        self.eof = not chunk

    def _peek(self) -> str:
        """The next character that is not white space ("" at the end of the file)."""
        while True:
            self.pos = _SPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if self.eof:
                return ""
            self._fill()

    def _fail(self, message: str) -> SourceError:
        return SourceError(f"{self.source.path}: {message} (character {self.offset + self.pos + 1:,})", hint=_HINT)

    def elements(self) -> Iterator[Any]:
        first = self._peek()
        if first == "":
            return  # an empty file: no rows
        if first != "[":
            raise self._fail("expected a JSON array of objects, the file holds an object; if it has one object "
                             "a line, name it .jsonl" if first == "{" else "expected a JSON array of objects")
        self.pos += 1
        index = 0
        if self._peek() == "]":
            self.pos += 1
        else:
            while True:
                yield self._element(index)
                index += 1
                following = self._peek()
                self.pos += 1
                if following == "]":
                    break
                if following != ",":
                    self.pos -= 1
                    raise self._fail(f"after array element {index - 1}: expected ',' or ']'")
        if self._peek() != "":
            raise self._fail("text after the array's closing ']'")

    def _element(self, index: int) -> Any:
        self._peek()  # raw_decode starts at a value, not at white space
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except RecursionError:
                raise self._fail(f"array element {index}: nested too deeply") from None
            except json.JSONDecodeError as exc:
                # An error well before the end of what was read is in the text itself; one at the end (or an
                # unterminated string) may only mean the element goes on past the buffer.
                cut = exc.pos >= len(self.buf) - 16 or exc.msg.startswith("Unterminated")
                if not cut or self.eof or len(self.buf) - self.pos > self.source.max_element_chars:
                    too_long = cut and not self.eof and len(self.buf) - self.pos > self.source.max_element_chars
                    reason = (f"longer than {self.source.max_element_chars:,} characters" if too_long
                              else f"invalid JSON ({exc.msg})")
                    raise self._fail(f"array element {index}: {reason}") from None
                self._fill()
                continue
            if end == len(self.buf) and not self.eof:  # a number cut by the buffer's end may go on
                self._fill()
                continue
            self.pos = end
            return value
