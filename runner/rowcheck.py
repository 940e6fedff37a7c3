"""Checks on the values of an input row that no parser makes for us, and what an error row stores instead.

Valid JSON can hold text that cannot be sent: the escape "\\ud800" is a lone surrogate, which cannot be
encoded as UTF-8 (Parquet string columns can also hold invalid UTF-8; the reader turns its bad bytes
into lone surrogates). And JSON may nest deeper than Python's parsers and encoders recurse. The
checks run on the values of the columns a job reads, cheaply enough for millions of rows: an ASCII
string is known to be ASCII in constant time, and a lone surrogate is never ASCII.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

# A row nested deeper than this is a bad row. Real rows (messages with content parts, parameters) are
# a few levels deep; Python's JSON parser and encoders recurse, and about 1,000 levels crash them.
MAX_NESTING = 200
TOO_DEEP = "nested too deep"  # what nested_problem says of a value nested deeper than that
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class Undecodable:
    """A Parquet value (a list or struct) with invalid UTF-8 text inside."""

    def __repr__(self) -> str:
        return "<undecodable>"


UNDECODABLE = Undecodable()


def value_problem(values: Mapping[str, Any], columns: tuple[str, ...]) -> tuple[str, bool] | None:
    """The first problem among the values of `columns`, and whether the row can still be stored once its
    bad code points are replaced (True: a text problem) or not (False: nesting too deep to handle).

    Cheap for the usual row: an ASCII string is known to be ASCII in constant time (CPython records it)
    and a lone surrogate is never ASCII; other strings are encoded once, lists and objects walked once."""
    for name in columns:
        value = values.get(name)
        cls = value.__class__
        if cls is str:
            if value.isascii():
                continue
            bad = unencodable(value)
        elif cls is list or cls is dict:
            bad = nested_problem(value)
            if bad is TOO_DEEP:
                return f"column {name!r}: nested deeper than {MAX_NESTING} levels", False
        elif value is UNDECODABLE:
            return f"column {name!r}: not valid UTF-8 text (inside a nested value); it cannot be sent", True
        else:
            continue
        if bad is not None:
            return (f"column {name!r}: not valid UTF-8 text: {bad} is a lone surrogate (or an invalid byte "
                    "in the file) and cannot be sent"), True
    return None


def unencodable(text: str) -> str | None:
    """None for text that can be encoded as UTF-8, else its first bad code point, escaped."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return ascii(text[exc.start])
    return None


def nested_problem(value: list | dict) -> str | None:
    """TOO_DEEP when lists and objects nest more than MAX_NESTING levels (the value itself is one), else the
    first code point of its strings (keys too) that cannot be encoded as UTF-8, escaped, else None.
    Iterative: the value may be deeper than Python's recursion limit allows."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_NESTING:
            return TOO_DEEP
        if item.__class__ is dict:
            for key in item:
                if not key.isascii() and unencodable(key) is not None:
                    return unencodable(key)
            children = item.values()
        else:
            children = item
        for child in children:
            cls = child.__class__
            if cls is str:
                if not child.isascii():
                    bad = unencodable(child)
                    if bad is not None:
                        return bad
            elif cls is list or cls is dict:
                stack.append((child, depth + 1))
    return None


def scrubbed(value: Any) -> Any:
    """`value` with U+FFFD in place of every lone surrogate, in nested lists and objects too."""
    if value is UNDECODABLE:
        return None
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {scrubbed(k): scrubbed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrubbed(v) for v in value]
    return value
