"""JSON answers for requests that ask for JSON: an instance that follows the requested schema, and the
broken answers of the `bad_json` fault.

The schema is the one in `response_format` (json_schema mode) or, in json_object mode, the first JSON
Schema object the messages quote (a prompt that wants a shape has to show it). Values are derived
from a hash of the row's last user text and the property's path, so the same request always gets the
same answer. What is honoured: type (and type lists), properties, required, enum, const, local $ref,
anyOf/oneOf (the first), allOf (merged), items, minItems/maxItems, minLength/maxLength,
minimum/maximum (and exclusive ones), multipleOf for integers. Not honoured: pattern, format,
patternProperties, dependent schemas: an answer to such a schema may not validate, as a real model's
might not.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

MAX_DEPTH = 12  # recursive schemas ($ref to an ancestor) stop here with the smallest value
MAX_BRACES_TRIED = 50  # per message, when looking for a quoted schema


def _unit(text: str, path: str) -> float:
    """A uniform number in [0, 1) fixed by the text and the path."""
    digest = hashlib.blake2b(f"{text}\x1f{path}".encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _resolve(root: dict[str, Any], node: Any) -> Any:
    """A node that is a local "$ref" ("#/..."), looked up; anything else as it is."""
    seen = 0
    while isinstance(node, dict) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#") and seen < 32:
        target: Any = root
        for part in node["$ref"][1:].lstrip("/").split("/") if node["$ref"] != "#" else []:
            target = target.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(target, dict) else None
        rest = {k: v for k, v in node.items() if k != "$ref"}
        node = {**target, **rest} if isinstance(target, dict) else rest
        seen += 1
    return node


def _merged(root: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """allOf folded into one schema: properties and required united, other keys from the later part."""
    parts = [_resolve(root, part) for part in node.get("allOf") or () if isinstance(part, dict)]
    if not parts:
        return node
    merged: dict[str, Any] = {k: v for k, v in node.items() if k != "allOf"}
    for part in parts:
        part = _merged(root, part)
        for key, value in part.items():
            if key == "properties" and isinstance(value, dict):
                merged["properties"] = {**merged.get("properties", {}), **value}
            elif key == "required" and isinstance(value, list):
                merged["required"] = list(dict.fromkeys([*merged.get("required", []), *value]))
            else:
                merged.setdefault(key, value)
    return merged


def instance(schema: dict[str, Any], text: str) -> Any:
    """A value that is valid against `schema` (within what the module docstring lists), fixed by `text`."""
    return _value(schema, schema, text, "$", 0)


def _type_of(node: dict[str, Any]) -> str:
    kind = node.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"] or ["null"]
        kind = kinds[0]
    if isinstance(kind, str):
        return kind
    if "properties" in node or "required" in node:
        return "object"
    if "items" in node:
        return "array"
    return "string"


def _value(root: dict[str, Any], node: Any, text: str, path: str, depth: int) -> Any:
    node = _resolve(root, node)
    if not isinstance(node, dict):
        return text[:20] if node is not False else None  # `true` (or a non-schema): anything; `false`: nothing fits
    node = _merged(root, node)
    if "const" in node:
        return node["const"]
    if isinstance(node.get("enum"), list) and node["enum"]:
        choices = node["enum"]
        return choices[int(_unit(text, path) * len(choices))]
    for key in ("anyOf", "oneOf"):
        if isinstance(node.get(key), list) and node[key]:
            return _value(root, node[key][0], text, path, depth + 1)
    kind = _type_of(node)
    if kind == "object":
        return _object(root, node, text, path, depth)
    if kind == "array":
        return _array(root, node, text, path, depth)
    if kind == "integer":
        return _integer(node, _unit(text, path))
    if kind == "number":
        return _number(node, _unit(text, path))
    if kind == "boolean":
        return _unit(text, path) < 0.5
    if kind == "null":
        return None
    return _string(node, text)


def _object(root: dict[str, Any], node: dict[str, Any], text: str, path: str, depth: int) -> dict[str, Any]:
    properties = node.get("properties") if isinstance(node.get("properties"), dict) else {}
    required = [name for name in node.get("required") or () if isinstance(name, str)]
    if depth >= MAX_DEPTH:  # only what must be there
        properties = {name: properties.get(name, {}) for name in required}
    value = {name: _value(root, prop, text, f"{path}.{name}", depth + 1) for name, prop in properties.items()}
    for name in required:
        value.setdefault(name, _value(root, {}, text, f"{path}.{name}", depth + 1))
    return value


def _array(root: dict[str, Any], node: dict[str, Any], text: str, path: str, depth: int) -> list[Any]:
    low = node.get("minItems") if isinstance(node.get("minItems"), int) else 0
    high = node.get("maxItems") if isinstance(node.get("maxItems"), int) else None
    count = max(low, 0 if depth >= MAX_DEPTH else 1)
    if high is not None:
        count = min(count, high)
    items = node.get("items", {})
    if isinstance(items, list):  # draft 4-7 tuple form
        return [_value(root, item, text, f"{path}[{i}]", depth + 1) for i, item in enumerate(items[:max(count, len(items))])]
    values = [_value(root, items, text, f"{path}[{i}]", depth + 1) for i in range(count)]
    resolved = _resolve(root, items)
    if node.get("uniqueItems") and isinstance(resolved, dict) and isinstance(resolved.get("enum"), list):
        values = list(resolved["enum"][:count]) if len(resolved["enum"]) >= count else values
    return values


def _string(node: dict[str, Any], text: str) -> str:
    low = node.get("minLength") if isinstance(node.get("minLength"), int) else 0
    high = node.get("maxLength") if isinstance(node.get("maxLength"), int) else 40
    value = " ".join(text.split())[:max(high, 0)]
    return value + "x" * max(0, low - len(value))


def _bounds(node: dict[str, Any]) -> tuple[float, float, bool, bool]:
    low, high = node.get("minimum"), node.get("maximum")
    low_open = high_open = False
    exclusive_low, exclusive_high = node.get("exclusiveMinimum"), node.get("exclusiveMaximum")
    if isinstance(exclusive_low, (int, float)) and not isinstance(exclusive_low, bool):
        low, low_open = exclusive_low, True
    elif exclusive_low is True:  # draft 4: a flag on minimum
        low_open = True
    if isinstance(exclusive_high, (int, float)) and not isinstance(exclusive_high, bool):
        high, high_open = exclusive_high, True
    elif exclusive_high is True:
        high_open = True
    low = low if isinstance(low, (int, float)) and not isinstance(low, bool) else None
    high = high if isinstance(high, (int, float)) and not isinstance(high, bool) else None
    if low is None and high is None:
        low, high = 0, 100
    elif low is None:
        low = high - 100
    elif high is None:
        high = low + 100
    return float(low), float(high), low_open, high_open


def _integer(node: dict[str, Any], unit: float) -> int:
    low, high, low_open, high_open = _bounds(node)
    first = math.floor(low) + 1 if low_open or low != math.floor(low) else int(low)
    last = math.ceil(high) - 1 if high_open or high != math.ceil(high) else int(high)
    step = node.get("multipleOf") if isinstance(node.get("multipleOf"), int) and node["multipleOf"] > 0 else 1
    first = -(-first // step) * step
    choices = max((last - first) // step + 1, 1)
    return first + step * int(unit * choices)


def _number(node: dict[str, Any], unit: float) -> float:
    low, high, low_open, high_open = _bounds(node)
    value = round(low + (high - low) * (0.1 + 0.8 * unit), 3)  # strictly inside when the range allows
    return value if low < value < high or (value == low and not low_open) or (value == high and not high_open) \
        else (low + high) / 2


def quoted_schema(messages: list[dict[str, Any]], texts: list[str]) -> dict[str, Any] | None:
    """The first JSON Schema object (a dict with "type": "object" and "properties") a message quotes."""
    decoder = json.JSONDecoder()
    for message, text in zip(messages, texts):
        if message.get("role") not in ("system", "user"):
            continue
        start = text.find("{")
        tried = 0
        while start >= 0 and tried < MAX_BRACES_TRIED:
            tried += 1
            try:
                found, _end = decoder.raw_decode(text, start)
            except ValueError:
                found = None
            if isinstance(found, dict) and found.get("type") == "object" and isinstance(found.get("properties"), dict):
                return found
            start = text.find("{", start + 1)
    return None


def bad_answer(schema: dict[str, Any] | None, good: str, unit: float) -> str:
    """An answer the runner must reject, chosen by `unit` in [0, 1): text that is not JSON (cut short, or
    prose around the JSON) half the time, else JSON that breaks the schema (a required property left out, a
    property of the wrong type, or not an object at all). Without a schema only the first kind."""
    if schema is None or unit < 0.5:
        return good[: max(1, len(good) // 2)] if unit < 0.25 else f"Sure! Here is the JSON you asked for: {good}"
    try:
        value = json.loads(good)
    except ValueError:  # already cut short by max_tokens
        return good[: max(1, len(good) // 2)]
    required = [name for name in schema.get("required") or () if isinstance(name, str)]
    if isinstance(value, dict) and required:
        value.pop(required[0], None)
        return json.dumps(value, ensure_ascii=False)
    properties = schema.get("properties") or {}
    for name, prop in properties.items():
        kind = _type_of(_resolve(schema, prop)) if isinstance(prop, dict) else None
        if isinstance(value, dict) and kind in _WRONG:
            value[name] = _WRONG[kind]
            return json.dumps(value, ensure_ascii=False)
    return json.dumps(["not", "an", "object"])


_WRONG = {"string": 12345, "integer": "not a number", "number": "not a number", "boolean": "yes",
          "array": "not a list", "object": "not an object"}
