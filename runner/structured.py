"""Structured output: the job's JSON Schema, requests that ask for JSON, answers checked against it.

    [output] json_schema --load_schema--> checked schema (SpecError: the file and what is wrong)
    source:     StructuredOutput.decorate(request)  response_format (+ the schema in the prompt)
    row sender: StructuredOutput.check(answer)      the parsed JSON as text, or why it is not valid
                StructuredOutput.reask(...)         the request again, with the answer and the error
    sink:       output_fields()                     `parsed`, `parse_error`, typed property columns

Which JSON mode a request uses (API facts 2.1 and Model Studio's structured-output page, medium
confidence, they change with each model generation):

    json_schema  JSON_SCHEMA_MODELS below: the schema goes in `response_format` and the model is held
                 to it. No prompt change is needed.
    json_object  every other model: `response_format = {"type": "json_object"}` only asks for a JSON
                 object, and the API answers 400 unless a message contains the word "json". The
                 schema is added to the system prompt (with the word), so the model knows the shape.

A `response_format` of a JSON type given by the job ([model] or a params column) is sent as given:
that is the way out when the table is wrong for a model. Either way the answer is validated here,
since json_object never promises the shape and json_schema may be served by a model that ignores it.

An answer is accepted when it is a JSON document, optionally inside one ```json fenced block that is
the whole answer (models asked for JSON in the prompt often fence it; the fence is not the data), and
valid against the schema. Text around the JSON is not searched for it: that would hide real failures.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import pyarrow as pa

from .errors import InvalidOutput
from .records import PARSED_COLUMN_META, PARSED_FIELDS, STATUS_ERROR, Request, Result

if TYPE_CHECKING:
    from .spec import JobSpec

JSON_MODES = ("json_object", "json_schema")
# Models served with `response_format` json_schema: family -> the first dated snapshot that has it (None:
# the undated names only). The family name and its "-latest" alias are in. Others get json_object.
JSON_SCHEMA_MODELS: dict[str, str | None] = {
    "qwen3-max": "2025-09-23",
    "qwen-plus": "2025-07-28",
    "qwen-flash": "2025-07-28",
    "deepseek-v3.2": None,
}
_SNAPSHOT = re.compile(r"\d{4}-\d{2}-\d{2}")
_FENCED = re.compile(r"```(?:json|JSON)?[ \t]*\n(.*?)\n?[ \t]*```", re.S)
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
MAX_SHOWN_ERRORS = 5  # validation errors named in parse_error and in the re-ask message
MAX_ERROR_CHARS = 240  # per error: jsonschema quotes the offending value, which may be the whole answer


def json_mode(model: str) -> str:
    """ "json_schema" for the models of JSON_SCHEMA_MODELS (and their snapshots from the listed date),
    else "json_object"."""
    for family, first in JSON_SCHEMA_MODELS.items():
        if model in (family, f"{family}-latest"):
            return "json_schema"
        snapshot = model.removeprefix(family + "-")
        if snapshot != model and first is not None and _SNAPSHOT.fullmatch(snapshot) and snapshot >= first:
            return "json_schema"
    return "json_object"


# --- loading and checking the schema -------------------------------------------------------------

def load_schema(value: str | Mapping[str, Any], *, base: Path) -> tuple[str, str]:
    """[output] json_schema (a path relative to `base`, the job file's folder, or an inline table) ->
    (the schema as compact JSON text, a name for it). ValueError with a one-line message naming the file
    and what is wrong: missing, not JSON, not a valid JSON Schema, not an object schema, a remote $ref."""
    if isinstance(value, str):
        path = Path(value).expanduser()
        path = path if path.is_absolute() else base / path
        where = f"{value}: "
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ValueError(f"{value}: no such file (paths are relative to the job file's folder)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{value}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
        try:
            schema = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{value}: not valid JSON ({exc})") from None
        name = path.stem
    else:
        schema, where, name = dict(value), "", "output"
    problem = schema_problem(schema)
    if problem:
        raise ValueError(where + problem)
    if isinstance(schema.get("title"), str) and schema["title"].strip():
        name = schema["title"]
    name = _NAME_CHARS.sub("_", name).strip("_")[:64] or "output"
    try:
        # Key order kept: the typed columns follow the order of the properties in the file.
        text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:  # an inline TOML table may hold a date, which JSON has no word for
        raise ValueError(f"{where}the schema holds a value JSON cannot express ({exc})") from None
    return text, name


def schema_problem(schema: Any) -> str | None:
    """Why `schema` cannot be the job's output schema, or None."""
    from jsonschema import exceptions, validators

    if not isinstance(schema, dict):
        return f"expected a JSON Schema object, got {type(schema).__name__}"
    cls = validators.validator_for(schema, default=validators.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except exceptions.SchemaError as exc:
        at = "/".join(str(p) for p in exc.path)
        return f"not a valid JSON Schema: {_short(exc.message)}" + (f" (at {at})" if at else "")
    if schema.get("type") != "object":
        return 'the top level must be {"type": "object", ...}: both JSON modes of the API answer an object'
    remote = _remote_ref(schema)
    if remote is not None:
        return f"$ref {remote!r} points outside the schema; put what it names under $defs and use \"#/$defs/...\""
    return None


def _remote_ref(node: Any) -> str | None:
    """The first $ref that does not point into the schema itself (resolving it would need the network)."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            return ref
        return next((found for v in node.values() if (found := _remote_ref(v)) is not None), None)
    if isinstance(node, list):
        return next((found for v in node if (found := _remote_ref(v)) is not None), None)
    return None


# --- typed columns -------------------------------------------------------------------------------

_SCALAR_TYPES = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}


def property_fields(schema: Mapping[str, Any]) -> tuple[pa.Field, ...]:
    """The schema's top-level properties as typed Arrow columns, in the schema's order. string, integer,
    number and boolean map to string, int64, float64 and bool; an array of those to a list of it; anything
    else (objects, mixed types, anyOf) to its JSON text. A type list with "null" maps like the other type."""
    return tuple(pa.field(name, arrow_type(schema, prop), metadata=PARSED_COLUMN_META)
                 for name, prop in (schema.get("properties") or {}).items())


def arrow_type(root: Mapping[str, Any], prop: Any) -> pa.DataType:
    prop = _resolved(root, prop)
    scalar = _scalar_type(prop)
    if scalar is not None:
        return scalar
    if _json_type(prop) == "array":
        item = _scalar_type(_resolved(root, prop.get("items")))
        if item is not None:
            return pa.list_(item)
    return pa.string()


def _scalar_type(prop: Any) -> pa.DataType | None:
    kind = _json_type(prop)
    if kind in _SCALAR_TYPES:
        return _SCALAR_TYPES[kind]
    if kind is None and isinstance(prop, dict):  # an enum or const without a type: the type of its values
        values = prop.get("enum") if isinstance(prop.get("enum"), list) else [prop["const"]] if "const" in prop else []
        kinds = {_value_type(v) for v in values if v is not None}
        if len(kinds) == 1:
            return _SCALAR_TYPES.get(kinds.pop())
    return None


def _json_type(prop: Any) -> str | None:
    kind = prop.get("type") if isinstance(prop, dict) else None
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    return kind if isinstance(kind, str) else None


def _value_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string" if isinstance(value, str) else "other"


def _resolved(root: Mapping[str, Any], prop: Any) -> Any:
    """A property that is only a local "$ref" ("#/$defs/x"), looked up once."""
    ref = prop.get("$ref") if isinstance(prop, dict) else None
    if not isinstance(ref, str) or not ref.startswith("#/"):
        return prop
    node: Any = root
    for part in ref[2:].split("/"):
        node = node.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else prop


def output_fields(spec: JobSpec) -> tuple[pa.Field, ...]:
    """The columns structured output adds to the job's output table (none without [output] json_schema):
    `parsed` and `parse_error`, then with parsed_columns the schema's top-level properties."""
    if spec.output.json_schema is None:
        return ()
    typed = property_fields(json.loads(spec.output.json_schema)) if spec.output.parsed_columns else ()
    return PARSED_FIELDS + typed


def fingerprint(spec: JobSpec) -> dict[str, str]:
    """What structured output adds to the job fingerprint (nothing without it, so older runs still resume):
    the schema shapes every request and the output's columns."""
    if spec.output.json_schema is None:
        return {}
    digest = hashlib.sha256(spec.output.json_schema.encode()).hexdigest()[:16]
    return {"json_schema": f"{digest} parsed_columns={spec.output.parsed_columns}"}


# --- requests and answers ------------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    """What checking one answer found: the valid JSON (as compact text), or why it is not valid, worded to
    follow "it is": "an empty answer", "not valid JSON (...)", "not valid against the JSON Schema: at $.x: ..."."""

    parsed: str | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


class StructuredOutput:
    """The job's output schema at work: decorating requests, checking answers, building re-asks.
    Built from plain values, so it pickles (the validator is made again on first use)."""

    def __init__(self, schema_text: str, name: str, reask_attempts: int) -> None:
        self.schema_text = schema_text
        self.name = name
        self.reask_attempts = reask_attempts
        self.schema = json.loads(schema_text)
        self._validator = None
        self.instruction = ("Answer with one JSON object and nothing else. It must be valid against this JSON "
                            f"Schema: {schema_text}")

    def __reduce__(self):
        return StructuredOutput, (self.schema_text, self.name, self.reask_attempts)

    @property
    def validator(self):
        if self._validator is None:
            from jsonschema import validators

            cls = validators.validator_for(self.schema, default=validators.Draft202012Validator)
            self._validator = cls(self.schema)
        return self._validator

    def response_format(self, mode: str) -> dict[str, Any]:
        if mode == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": self.name, "strict": True, "schema": self.schema}}
        return {"type": "json_object"}

    def decorate(self, request: Request) -> Request:
        """The request asking for JSON (see the module docstring); a row that could not be rendered is kept."""
        if request.problem is not None:
            return request
        params = dict(request.params)
        given = params.get("response_format")
        if isinstance(given, Mapping) and given.get("type") in JSON_MODES:
            mode = given["type"]
        else:
            mode = json_mode(request.model)
            params["response_format"] = self.response_format(mode)
        messages = request.messages
        if mode == "json_object":
            messages = _with_instruction(messages, self.instruction)
        return dataclasses.replace(request, params=params, messages=messages)

    def check(self, answer: str | None) -> Verdict:
        """The answer as valid JSON text, or why it is not: not JSON, or what the schema rejects."""
        if answer is None or not answer.strip():
            return Verdict(None, "an empty answer")
        text = answer.strip()
        fenced = _FENCED.fullmatch(text)
        if fenced:
            text = fenced.group(1)
        try:
            value = json.loads(text, parse_constant=_not_json)
        except ValueError as exc:
            return Verdict(None, f"not valid JSON ({exc})")
        errors = list(self.validator.iter_errors(value))
        if errors:
            shown = "; ".join(f"at {e.json_path}: {_short(e.message)}" for e in errors[:MAX_SHOWN_ERRORS])
            more = f" (and {len(errors) - MAX_SHOWN_ERRORS} more)" if len(errors) > MAX_SHOWN_ERRORS else ""
            return Verdict(None, f"not valid against the JSON Schema: {shown}{more}")
        return Verdict(json.dumps(value, ensure_ascii=False, separators=(",", ":")), None)

    def reask(self, request: Request, answer: str | None, error: str, number: int) -> Request:
        """Re-ask `number` (1-based): the original messages, the rejected answer, and what was wrong with it.
        The key gets a "#reask<number>" suffix: the header that names the row to a proxy or the emulator
        tells a re-ask from a paid duplicate."""
        messages = request.messages + (
            {"role": "assistant", "content": answer or ""},
            {"role": "user", "content": f"That answer was rejected: it is {error}. Reply again with only the "
                                        "corrected JSON object."},
        )
        return dataclasses.replace(request, key=f"{request.key}#reask{number}", messages=messages)

    def invalid_output(self, verdict: Verdict, answers: int) -> InvalidOutput:
        tries = "1 try" if answers == 1 else f"{answers} tries"
        return InvalidOutput(f"no valid answer in {tries}: the last one is {verdict.error}",
                             code="invalid_output")


def check_batch_results(results: list[Result], output: StructuredOutput) -> list[Result]:
    """A joined batch's rows, checked like online answers. The Batch API answers once and cannot be re-asked
    within the batch, so an answer that does not validate makes its row InvalidOutput at once (its answer,
    tokens and cost kept); `runner run JOB --mode online --retry-failed all` sends such rows again online,
    where they are re-asked."""
    for result in results:
        if not result.ok:
            continue
        verdict = output.check(result.response)
        if verdict.ok:
            result.parsed = verdict.parsed
            continue
        error = output.invalid_output(verdict, 1)
        result.status, result.error_type, result.error_code = STATUS_ERROR, error.error_type, error.code
        result.error_message, result.parse_error = error.message, verdict.error
    return results


def for_job(spec: JobSpec) -> StructuredOutput | None:
    """The job's StructuredOutput, or None without [output] json_schema."""
    if spec.output.json_schema is None:
        return None
    return StructuredOutput(spec.output.json_schema, spec.output.json_schema_name, spec.run.reask_attempts)


def decorator(spec: JobSpec):
    """What the job's source applies to every request: StructuredOutput.decorate, or None."""
    output = for_job(spec)
    return None if output is None else output.decorate


def _with_instruction(messages: tuple[Mapping[str, Any], ...], instruction: str) -> tuple[Mapping[str, Any], ...]:
    """The instruction added to the first system message (a string, or a list of text parts), or as a new
    system message in front."""
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        content = first.get("content")
        if isinstance(content, str):
            first["content"] = f"{content}\n\n{instruction}" if content.strip() else instruction
            return (first, *messages[1:])
        if isinstance(content, list):  # text parts: compatible mode's carry a "type", native ones do not
            typed = any(isinstance(part, dict) and "type" in part for part in content)
            first["content"] = [*content, {"type": "text", "text": instruction} if typed else {"text": instruction}]
            return (first, *messages[1:])
    return ({"role": "system", "content": instruction}, *messages)


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _short(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 3] + "..."
