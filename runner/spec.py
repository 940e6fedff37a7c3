"""JobSpec: the job file as frozen values. `load_job(path)` reads TOML, checks every key and type.

Every problem is a SpecError naming the file and the key (`[model] temperature`). Paths in the
file are resolved relative to the file's folder. CLI overrides go through `JobSpec.override`,
which changes only what was given.
"""

from __future__ import annotations

import dataclasses
import json
import os
import string
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping
from urllib.parse import urlsplit

from .endpoint_names import key_env_problem, resolve_host
from .errors import SpecError
from .object_store import ADDRESSING, CREDENTIAL_SOURCES, ObjectStoreSettings, ObjectUri, looks_like_uri
from .records import RESERVED_COLUMNS
from .spec_keys import (BATCH_MAX_BYTES, BATCH_MAX_DESCRIPTION, BATCH_MAX_LINES, BOUNDS, FLAG_KEYS, INT,
                        MAX_MODELS, MAX_VARIANTS, MODEL_PARAMS, NUM, PRICE_KEYS, SECRET_NEIGHBOURS, SECTIONS,
                        STR, describe_value, type_ok, unencodable_text, unusable_value)
from .structured import load_schema, property_fields

DIALECTS = ("openai", "dashscope")
MODES = ("online", "batch")
# How a job's rows are sent: [run] executor (or its older name, [run] mode, which stays). "ray" needs the
# runner[ray] extra; it is imported only when a job chooses it.
EXECUTORS = (*MODES, "ray")
TRANSPORTS = ("aiohttp", "httpx")



@dataclass(frozen=True)
class VariantSpec:
    """One [[input.variants]] table: a named way to prompt, sent for every input row.

    `system_prompt` and `template` replace [input]'s own for this variant; `messages` is a prefix put
    before the row's messages (after the system prompt), e.g. few-shot examples."""

    name: str
    system_prompt: str | None = None
    template: str | None = None
    messages: tuple[Mapping[str, Any], ...] = ()

    @property
    def template_columns(self) -> tuple[str, ...]:
        return template_fields(self.template) if self.template is not None else ()


@dataclass(frozen=True)
class InputSpec:
    path: Path | ObjectUri  # a local file, or an object in S3-compatible storage (s3://bucket/key)
    id_column: str | None = None
    prompt_column: str | None = None
    messages_column: str | None = None
    template: str | None = None
    system_prompt: str | None = None
    keep_columns: tuple[str, ...] = ()
    model_column: str | None = None
    params_column: str | None = None
    fail_on_empty: bool = False  # an input with no rows is an error (exit 2), not a warning
    variants: tuple[VariantSpec, ...] = ()  # [[input.variants]]: every row is sent once per variant
    # [input] s3_*: where an s3:// input is read from and how (credentials only from the environment)
    object_store: ObjectStoreSettings = field(default_factory=ObjectStoreSettings)

    @property
    def template_columns(self) -> tuple[str, ...]:
        return template_fields(self.template) if self.template is not None else ()

    def needed_columns(self) -> tuple[str, ...]:
        """Input columns the job reads, in a stable order without repeats."""
        names = [self.id_column, self.prompt_column, self.messages_column, *self.template_columns,
                 *(c for v in self.variants for c in v.template_columns),
                 *self.keep_columns, self.model_column, self.params_column]
        return tuple(dict.fromkeys(n for n in names if n))


@dataclass(frozen=True)
class EndpointSpec:
    dialect: str = "openai"
    region: str = "singapore"
    base_url: str | None = None
    workspace: str | None = None
    api_key_env: str = "DASHSCOPE_API_KEY"
    api_key_file: Path | None = None
    timeout: float = 300.0
    connect_timeout: float = 10.0
    stream_idle_timeout: float = 60.0
    read_timeout: float = 30.0
    transport: str = "aiohttp"
    # Set by `runner run --emulator` (never by a job file): base_url is the built-in emulator's, whose port
    # changes every run, so the job fingerprint names the emulator instead of the URL.
    emulator: bool = False

    def __post_init__(self) -> None:
        # load_job and the flags refuse it with the key's name; this holds for a spec built in code too.
        problem = base_url_syntax_problem(self.base_url) if self.base_url else None
        if problem is not None and problem.credentials:
            raise SpecError(f"EndpointSpec base_url: {problem.message}", hint=problem.hint)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    # Generation parameters given in the job, in the provider's names; only those given are sent.
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    stream: str = "auto"  # "auto", "always" or "never" (the job file says "auto", true or false)
    stream_only_models: tuple[str, ...] = ()
    prices: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))  # [model] price_* overrides
    # Fan-out: [model] names (every row sent to each, in this order; `name` is the first), per-model
    # parameters merged over `params` ([model.params."qwen-max"]), and [model] samples per row.
    names: tuple[str, ...] = ()
    model_params: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: MappingProxyType({}))
    samples: int = 1

    @property
    def all_names(self) -> tuple[str, ...]:
        """The models every row is sent to, in the order listed ([model] names, else just `name`)."""
        return self.names or (self.name,)

    def params_for(self, model: str) -> dict[str, Any]:
        """The job's parameters for one model: [model] keys and [model.extra], then [model.params."<model>"]."""
        own = self.model_params.get(model)
        return {**self.params, **own} if own else dict(self.params)


@dataclass(frozen=True)
class RunSpec:
    concurrency: int = 64
    max_attempts: int = 6
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    retry_after_max: float = 120.0
    max_error_rate: float = 0.0
    limit: int | None = None
    part_rows: int = 1000
    part_seconds: float = 5.0
    drain_seconds: float = 30.0
    rpm: float | None = None
    tpm: float | None = None
    limits: Mapping[str, tuple[float | None, float | None]] = field(default_factory=lambda: MappingProxyType({}))
    adaptive_rate: bool = True
    expected_output_tokens: int | None = None
    cooldown_seconds: float = 0.25
    retry_budget: float = 1.0
    max_cost: float | None = None
    mode: str = "online"  # the executor: "online", "batch" or "ray" ([run] executor or [run] mode)
    ray_address: str | None = None  # executor "ray": None starts a local Ray for the run; "auto" or an address joins one
    # executor "ray", joining by address: Ray's runtime env for the run (None: ship this runner's own package)
    ray_runtime_env: Mapping[str, Any] | None = None
    completion_window: str = "24h"
    batch_fallback_after: float | None = None  # seconds after the first batch is created; None: never
    batch_poll_seconds: float = 60.0  # the longest wait between two status checks
    batch_max_lines: int = BATCH_MAX_LINES
    batch_max_bytes: int = BATCH_MAX_BYTES
    batch_description: str | None = None
    reask_attempts: int = 2  # [output] json_schema: re-asks after an answer that does not validate


@dataclass(frozen=True)
class OutputSpec:
    path: Path
    json_schema: str | None = None  # the output schema as canonical JSON text (runner/structured.py)
    json_schema_name: str = "output"  # its name in a json_schema response_format
    parsed_columns: bool = False  # the schema's top-level properties as typed columns too

    @property
    def summary_path(self) -> Path:
        return self.path.with_name(self.path.stem + ".summary.json")


@dataclass(frozen=True)
class JobSpec:
    source: Path | None
    input: InputSpec
    endpoint: EndpointSpec
    model: ModelSpec
    run: RunSpec
    output: OutputSpec

    @property
    def name(self) -> str:
        return self.source.stem if self.source else "job"

    def override(self, **given: Any) -> "JobSpec":
        """A copy with CLI values applied; keys whose value is None were not given and change nothing."""
        spec = self
        sections = {"concurrency": "run", "limit": "run", "max_error_rate": "run", "max_attempts": "run",
                    "rpm": "run", "tpm": "run", "max_cost": "run", "mode": "run",
                    "batch_poll_seconds": "run", "ray_address": "run",
                    "base_url": "endpoint", "dialect": "endpoint", "api_key_env": "endpoint"}
        if given.get("mode") is not None and given.get("executor") is not None and given["mode"] != given["executor"]:
            raise SpecError(f"--executor {given['executor']} contradicts --mode {given['mode']} (--mode is the older "
                            "name of --executor: give one of them)")
        for name, value in given.items():
            if value is None:
                continue
            if name == "executor":  # the newer name of `mode`
                name = "mode"
            if name == "model":
                _check_override(name, value)
                # --model runs one model: it replaces [model] names too.
                spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, name=value, names=()))
            elif name == "output":
                spec = dataclasses.replace(spec, output=dataclasses.replace(spec.output, path=_parquet_path(Path(value))))
            elif name in sections:
                section = sections[name]
                _check_override(name, value)
                replaced = dataclasses.replace(getattr(spec, section), **{name: value})
                spec = dataclasses.replace(spec, **{section: replaced})
            else:
                raise ValueError(f"unknown override {name!r}")
        return spec


def _check_override(name: str, value: Any) -> None:
    """A flag's value gets the checks of the job-file key it overrides (the same bounds table)."""
    where = f"--{name.replace('_', '-')}"
    if name in FLAG_KEYS:
        problem = BOUNDS[("run", name)].problem(value, integer=SECTIONS["run"][name] == INT)
        if problem:
            raise SpecError(f"{where}: {problem}, got {value}")
    if name == "mode" and value not in EXECUTORS:
        raise SpecError(f"{where}: expected one of {', '.join(EXECUTORS)}, got {value!r}")
    if name == "ray_address" and not value.strip():
        raise SpecError(f"{where}: expected \"auto\" or a Ray address such as head:6379, got an empty string")
    if name == "api_key_env" and key_env_problem(value):
        raise SpecError(f"{where}: {key_env_problem(value)}")  # never echo it: it may be the key itself
    if name == "dialect" and value not in DIALECTS:
        raise SpecError(f"{where}: expected one of {', '.join(DIALECTS)}, got {value!r}")
    if isinstance(value, str):
        bad = unencodable_text(value)
        if bad is not None:
            raise SpecError(f"{where}: not valid UTF-8 text ({bad})")
    if name == "base_url" and (problem := base_url_syntax_problem(value)):
        raise SpecError(f"{where}: {problem.message}", hint=problem.hint)
    if name == "model" and not value.strip():
        raise SpecError(f"{where}: expected a model name, got an empty string")


@dataclass(frozen=True)
class UrlProblem:
    message: str  # never repeats a user name or password the URL holds
    hint: str | None = None
    credentials: bool = False  # the URL holds userinfo


def base_url_syntax_problem(value: str, *, key_env: str = "DASHSCOPE_API_KEY") -> UrlProblem | None:
    """Why `value` cannot be a base_url: not http(s), no host, a bad port, or a user name or password before
    the host. A URL holding credentials is refused and never repeated: it would be printed in progress lines,
    hints and `runner status`, and recorded in the batch state (the runner sends no proxy either: neither
    transport reads HTTP(S)_PROXY)."""
    scheme, sep, rest = value.partition("://")
    authority = (rest if sep else value).split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if "@" in authority:
        shown = f"{scheme}://***@{authority.rpartition('@')[2]}" if sep else "***@" + authority.rpartition("@")[2]
        return UrlProblem(f"it holds a user name or password before the host ({shown}); credentials do not belong "
                          "in a URL, which the runner prints and records",
                          hint=f"remove the user:password@ part; the API key comes from the environment variable "
                               f"{key_env} (or [endpoint] api_key_file); the runner connects to the host directly and reads no "
                               "proxy variables", credentials=True)
    if not value.startswith(("http://", "https://")):
        return UrlProblem(f"expected an http:// or https:// URL, got {value!r}")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number in range
    except ValueError as exc:
        return UrlProblem(f"not a valid URL ({exc}), got {value!r}")
    if not parts.hostname:
        return UrlProblem(f"expected a host after {scheme}://, got {value!r}")
    return None


def template_fields(template: str) -> tuple[str, ...]:
    """Column names used as {placeholders}; raises ValueError for a malformed template."""
    names = []
    for _literal, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not name or not name.replace("_", "a").replace("-", "a").replace(" ", "a").isalnum() or name.isdigit():
            raise ValueError(f"placeholder {{{name}}} is not a plain column name (use {{{{ and }}}} for literal braces)")
        if conversion not in (None, "r", "s", "a"):
            raise ValueError(f"placeholder {{{name}!{conversion}}}: the conversion must be !r, !s or !a")
        if spec and "{" in spec:
            raise ValueError(f"placeholder {{{name}:{spec}}}: a format spec cannot hold another placeholder")
        names.append(name)
    return tuple(dict.fromkeys(names))


def load_job(path: str | Path) -> JobSpec:
    """Read and check a job file. Raises SpecError naming the file and key for any problem."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"{path}: job file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read job file ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}") from None
    return parse_job(raw, source=path)


def parse_job(raw: Mapping[str, Any], *, source: Path | None = None) -> JobSpec:
    """Check a job given as a dict (what the TOML parses to)."""
    where = str(source) if source else "job"
    base = source.parent if source else Path.cwd()

    def fail(section: str | None, key: str | None, message: str) -> SpecError:
        section, key = _unechoed(section), _unechoed(key)
        at = f"[{section}] {key}" if key else f"[{section}]" if section else ""
        return SpecError(f"{where}: {at}: {message}" if at else f"{where}: {message}")

    for section, body in raw.items():
        if section not in SECTIONS:
            return _raise(fail(None, None, f"unknown section [{_unechoed(section)}]; expected one of "
                               + ", ".join(f"[{s}]" for s in SECTIONS)))
        if not isinstance(body, dict):
            _raise(fail(section, None, f"expected a table, got {describe_value(body)}"))
        for key, value in body.items():
            expected = SECTIONS[section].get(key)
            if key == "api_key" and section == "endpoint":
                _raise(fail(section, key, "API keys never go in job files; put the key in an environment "
                            "variable and name it with api_key_env (default DASHSCOPE_API_KEY)"))
            if expected is None:
                _raise(fail(section, key, f"unknown key; expected one of {', '.join(SECTIONS[section])}"))
            if not type_ok(expected, value):
                shown = "another type" if key in SECRET_NEIGHBOURS else describe_value(value)  # may be a pasted key
                _raise(fail(section, key, f"expected {expected}, got {shown}"))
            bound = BOUNDS.get((section, key))
            if bound is not None:
                problem = bound.problem(value, integer=expected == INT)
                if problem:
                    _raise(fail(section, key, f"{problem}, got {describe_value(value)}"))
            unusable = unusable_value(value, key)
            if unusable:
                _raise(fail(section, *unusable))

    def get(section: str, key: str, default: Any = None) -> Any:
        return raw.get(section, {}).get(key, default)

    def require(section: str, key: str) -> Any:
        if key not in raw.get(section, {}):
            _raise(fail(section, key, "missing; this key is required"))
        return raw[section][key]

    # [input]
    input_path = _input_path(base, require("input", "path"), fail)
    sources = [k for k in ("prompt_column", "messages_column", "template") if get("input", k) is not None]
    if len(sources) != 1:
        _raise(fail("input", None, "set exactly one of prompt_column, messages_column or template"
                    + (f" (found {', '.join(sources)})" if sources else "")))
    template = get("input", "template")
    if template is not None:
        try:
            template_fields(template)
        except ValueError as exc:
            _raise(fail("input", "template", str(exc)))
    keep = tuple(get("input", "keep_columns", ()))
    for name in keep:
        if name in RESERVED_COLUMNS:
            _raise(fail("input", "keep_columns", f"{name!r} is also an output column name; "
                        "rename it in the input or leave it out"))
    if len(set(keep)) != len(keep):
        _raise(fail("input", "keep_columns", "lists a column twice"))
    inp = InputSpec(
        path=input_path, id_column=get("input", "id_column"), prompt_column=get("input", "prompt_column"),
        messages_column=get("input", "messages_column"), template=template,
        system_prompt=get("input", "system_prompt"), keep_columns=keep,
        model_column=get("input", "model_column"), params_column=get("input", "params_column"),
        fail_on_empty=get("input", "fail_on_empty", False),
        variants=_variants(get("input", "variants", []), inp_uses_messages=get("input", "messages_column") is not None,
                           fail=fail),
        object_store=_object_store(raw.get("input", {}), isinstance(input_path, ObjectUri), fail),
    )

    # [endpoint]
    dialect = get("endpoint", "dialect", "openai")
    if dialect not in DIALECTS:
        _raise(fail("endpoint", "dialect", f"expected one of {', '.join(DIALECTS)}, got {dialect!r}"))
    transport = get("endpoint", "transport", "aiohttp")
    if transport not in TRANSPORTS:
        _raise(fail("endpoint", "transport", f"expected one of {', '.join(TRANSPORTS)}, got {transport!r}"))
    region = get("endpoint", "region", "singapore")
    base_url = get("endpoint", "base_url")
    workspace = get("endpoint", "workspace")
    if base_url is None:
        try:
            resolve_host(region, workspace)
        except ValueError as exc:
            _raise(fail("endpoint", "region", str(exc)))
    elif (problem := base_url_syntax_problem(base_url, key_env=get("endpoint", "api_key_env", "DASHSCOPE_API_KEY"))):
        error = fail("endpoint", "base_url", problem.message)
        error.hint = problem.hint
        _raise(error)
    key_env = get("endpoint", "api_key_env", "DASHSCOPE_API_KEY")
    if key_env_problem(key_env):
        _raise(fail("endpoint", "api_key_env", key_env_problem(key_env)))
    key_file = get("endpoint", "api_key_file")
    if key_file and Path(key_file.strip()).name[:3].lower() == "sk-":
        _raise(fail("endpoint", "api_key_file", "looks like an API key, not the path of a file; put the key in a "
                    "file (or an environment variable) and name it here"))
    endpoint = EndpointSpec(
        dialect=dialect, region=region, base_url=base_url, workspace=workspace,
        api_key_env=key_env,
        api_key_file=_join(base, key_file) if key_file else None,
        timeout=float(get("endpoint", "timeout", 300.0)),
        connect_timeout=float(get("endpoint", "connect_timeout", 10.0)),
        stream_idle_timeout=float(get("endpoint", "stream_idle_timeout", 60.0)),
        read_timeout=float(get("endpoint", "read_timeout", 30.0)),
        transport=transport,
    )

    # [model]
    model_raw = raw.get("model", {})
    names = _model_names(model_raw, fail)
    name = names[0]
    params = {k: v for k, v in model_raw.items() if k in MODEL_PARAMS}
    params.update(model_raw.get("extra", {}))
    _refuse_n(params, "extra.n" if "n" in model_raw.get("extra", {}) else "n", fail)
    stream = model_raw.get("stream", "auto")
    model = ModelSpec(name=name, params=MappingProxyType(params),
                      stream=stream if stream == "auto" else ("always" if stream else "never"),
                      stream_only_models=tuple(model_raw.get("stream_only_models", ())),
                      prices=MappingProxyType({k: float(model_raw[k]) for k in PRICE_KEYS if k in model_raw}),
                      names=names if "names" in model_raw else (),
                      model_params=MappingProxyType(_per_model_params(model_raw.get("params", {}), names, fail)),
                      samples=model_raw.get("samples", 1))

    # [run]
    run = RunSpec(
        concurrency=get("run", "concurrency", 64),
        max_attempts=get("run", "max_attempts", 6),
        backoff_initial=float(get("run", "backoff_initial", 1.0)),
        backoff_max=float(get("run", "backoff_max", 60.0)),
        retry_after_max=float(get("run", "retry_after_max", 120.0)),
        max_error_rate=float(get("run", "max_error_rate", 0.0)),
        limit=get("run", "limit", None),
        part_rows=get("run", "part_rows", 1000),
        part_seconds=float(get("run", "part_seconds", 5.0)),
        drain_seconds=float(get("run", "drain_seconds", 30.0)),
        rpm=get("run", "rpm", None), tpm=get("run", "tpm", None),
        limits=MappingProxyType(_model_limits(get("run", "limits", {}), fail)),
        adaptive_rate=get("run", "adaptive_rate", True),
        expected_output_tokens=get("run", "expected_output_tokens", None),
        cooldown_seconds=float(get("run", "cooldown_seconds", 0.25)),
        retry_budget=float(get("run", "retry_budget", 1.0)),
        max_cost=get("run", "max_cost", None),
        reask_attempts=get("run", "reask_attempts", 2),
    )
    run = _batch_settings(run, get, fail)

    # [output]
    output = _structured_output(OutputSpec(_parquet_path(_join(base, require("output", "path")))), get, fail,
                                base=base, model=model, keep=keep)
    return JobSpec(source=source, input=inp, endpoint=endpoint, model=model, run=run, output=output)


def _structured_output(output: OutputSpec, get, fail, *, base: Path, model: ModelSpec,
                       keep: tuple[str, ...]) -> OutputSpec:
    """[output] json_schema and parsed_columns, checked (runner/structured.py owns what the schema means)."""
    value = get("output", "json_schema")
    parsed_columns = get("output", "parsed_columns", False)
    if value is None:
        if parsed_columns:
            _raise(fail("output", "parsed_columns", "needs [output] json_schema (the columns are its properties)"))
        return output
    try:
        text, name = load_schema(value, base=base)
    except ValueError as exc:
        _raise(fail("output", "json_schema", str(exc)))
    if parsed_columns:
        for column in property_fields(json.loads(text)):
            if column.name in RESERVED_COLUMNS or column.name in keep:
                _raise(fail("output", "parsed_columns", f"the schema's property {column.name!r} would be a column "
                            "that the output already has; rename the property or leave parsed_columns off"))
    if model.params.get("enable_thinking") is True:
        _raise(fail("model", "enable_thinking", "the API answers JSON only without thinking (400 \"Json mode "
                    "response is not supported when enable_thinking is true\"); set it to false"))
    given = model.params.get("response_format")
    if given is not None and (given.get("type") if isinstance(given, dict) else None) not in ("json_object", "json_schema"):
        _raise(fail("model", "response_format", "with [output] json_schema it must be of type json_object or "
                    "json_schema (or left out: the runner picks one per model)"))
    return dataclasses.replace(output, json_schema=text, json_schema_name=name, parsed_columns=parsed_columns)


def _model_names(model_raw: Mapping[str, Any], fail) -> tuple[str, ...]:
    """[model] name, or [model] names (the models every row is sent to, in order): exactly one of them."""
    if "name" in model_raw and "names" in model_raw:
        _raise(fail("model", None, "set name or names, not both (names = [...] sends every row to each model)"))
    if "names" not in model_raw:
        if "name" not in model_raw:
            _raise(fail("model", "name", "missing; this key is required (or names = [...] for several models)"))
        names = [model_raw["name"]]
    else:
        names = model_raw["names"]
        if not names:
            _raise(fail("model", "names", "expected at least one model name, got an empty list"))
        if len(names) > MAX_MODELS:
            _raise(fail("model", "names", f"expected at most {MAX_MODELS} models, got {len(names)}"))
        if len(set(names)) != len(names):
            _raise(fail("model", "names", "lists a model twice"))
    key = "names" if "names" in model_raw else "name"
    for name in names:
        if not name.strip():
            _raise(fail("model", key, "expected a model name, got an empty string"))
    return tuple(names)


def _per_model_params(table: Mapping[str, Any], names: tuple[str, ...], fail) -> dict[str, Mapping[str, Any]]:
    """[model.params."<model>"]: generation parameters for one model of [model] names, over the job's own."""
    per_model = {}
    for model, value in table.items():
        at = f"params.{_unechoed(model)}"
        if model not in names:
            _raise(fail("model", at, f"not one of the job's models ({', '.join(names)}); [model.params] holds one "
                        'table per model, e.g. [model.params."qwen-max"] temperature = 0'))
        if not isinstance(value, dict):
            _raise(fail("model", at, f"expected a table of parameters, got {describe_value(value)}"))
        params = {}
        for key, item in value.items():
            expected = "a table" if key == "extra" else MODEL_PARAMS.get(key)
            if key == "n":
                _refuse_n(value, f"{at}.n", fail)
            if expected is None:
                _raise(fail("model", f"{at}.{_unechoed(key)}",
                            f"unknown parameter; expected one of {', '.join(MODEL_PARAMS)} or extra"))
            if not type_ok(expected, item):
                _raise(fail("model", f"{at}.{key}", f"expected {expected}, got {describe_value(item)}"))
            if key == "extra":
                params.update(item)
            else:
                params[key] = item
        _refuse_n(params, f"{at}.n", fail)
        per_model[model] = MappingProxyType(params)
    return per_model


def _refuse_n(params: Mapping[str, Any], at: str, fail) -> None:
    """`n` (several answers to one request) is the runner's to set: each answer is its own output row, so a
    job asks for them with [model] samples. Sent as a plain parameter, n - 1 paid answers would be dropped."""
    if "n" in params:
        _raise(fail("model", at, "n is not passed through (only the first answer would be kept); "
                    "set [model] samples = N for N answers per row, each its own output row"))


def _variants(items: list, *, inp_uses_messages: bool, fail) -> tuple[VariantSpec, ...]:
    """[[input.variants]]: each a `name` (unique) and its own system_prompt, template and/or messages prefix."""
    allowed = {"name": STR, "system_prompt": STR, "template": STR, "messages": "a list of tables"}
    variants: list[VariantSpec] = []
    if len(items) > MAX_VARIANTS:
        _raise(fail("input", "variants", f"expected at most {MAX_VARIANTS} variants, got {len(items)}"))
    for index, item in enumerate(items):
        at = f"variants[{index}]"
        for key, value in item.items():
            if key not in allowed:
                _raise(fail("input", f"{at}.{_unechoed(key)}", f"unknown key; expected one of {', '.join(allowed)}"))
            if not type_ok(allowed[key], value):
                _raise(fail("input", f"{at}.{key}", f"expected {allowed[key]}, got {describe_value(value)}"))
        name = item.get("name")
        if name is None or not name.strip():
            _raise(fail("input", f"{at}.name", "missing; every variant needs a name (it is the output's variant)"))
        if any(v.name == name for v in variants):
            _raise(fail("input", f"{at}.name", f"{name!r} is the name of an earlier variant; names must be unique"))
        template = item.get("template")
        if template is not None:
            if inp_uses_messages:
                _raise(fail("input", f"{at}.template", "a template cannot replace a messages_column's messages; "
                            "give this variant a system_prompt or a messages prefix instead"))
            try:
                template_fields(template)
            except ValueError as exc:
                _raise(fail("input", f"{at}.template", str(exc)))
        prefix = []
        for number, message in enumerate(item.get("messages", [])):
            role, content = message.get("role"), message.get("content")
            if role not in ("system", "user", "assistant") or not isinstance(content, str) or not content.strip() \
                    or set(message) - {"role", "content"}:
                _raise(fail("input", f"{at}.messages[{number}]", "expected { role = \"user\" (or system, assistant), "
                            "content = \"...\" }"))
            prefix.append(MappingProxyType(dict(message)))
        variants.append(VariantSpec(name=name, system_prompt=item.get("system_prompt"), template=template,
                                    messages=tuple(prefix)))
    return tuple(variants)


def _batch_settings(run: RunSpec, get, fail) -> RunSpec:
    """The [run] keys of batch mode, checked against the Batch API's own limits (API facts 7.2, 7.3)."""
    mode = get("run", "mode", None)
    executor = get("run", "executor", None)
    for key, value in (("mode", mode), ("executor", executor)):
        if value is not None and value not in EXECUTORS:
            _raise(fail("run", key, f"expected one of {', '.join(EXECUTORS)}, got {value!r}"))
    if mode is not None and executor is not None and mode != executor:
        _raise(fail("run", "executor", f"{executor!r} contradicts [run] mode = {mode!r} (mode is executor's older "
                                       "name: keep one of them)"))
    mode = executor or mode or "online"
    ray_address = get("run", "ray_address", None)
    if ray_address is not None and not ray_address.strip():
        _raise(fail("run", "ray_address", 'expected "auto" or a Ray address such as head:6379, got an empty string'))
    window = get("run", "completion_window", "24h")
    try:
        window_seconds = parse_duration(window, units="hd")
    except ValueError as exc:
        _raise(fail("run", "completion_window", str(exc)))
    if not window[:-1].isdigit() or not 24 * 3600 <= window_seconds <= 336 * 3600:
        _raise(fail("run", "completion_window", f"expected from 24h to 336h (or 1d to 14d), got {window!r}"))
    fallback = get("run", "batch_fallback_after")
    if fallback is not None:
        try:
            fallback = parse_duration(fallback)
        except ValueError as exc:
            _raise(fail("run", "batch_fallback_after", str(exc)))
    lines = get("run", "batch_max_lines", BATCH_MAX_LINES)  # both bounded by the Batch API's caps (BOUNDS)
    size = get("run", "batch_max_bytes", BATCH_MAX_BYTES)
    description = get("run", "batch_description")
    if description is not None and len(description) > BATCH_MAX_DESCRIPTION:
        _raise(fail("run", "batch_description", f"at most {BATCH_MAX_DESCRIPTION} characters, got {len(description)}"))
    runtime_env = get("run", "ray_runtime_env", None)
    return dataclasses.replace(run, mode=mode, ray_address=ray_address,
                               ray_runtime_env=MappingProxyType(runtime_env) if runtime_env is not None else None,
                               completion_window=window, batch_fallback_after=fallback,
                               batch_poll_seconds=float(get("run", "batch_poll_seconds", 60.0)),
                               batch_max_lines=lines, batch_max_bytes=size, batch_description=description)


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, *, units: str = "smhd") -> float:
    """ "90s", "15m", "6h", "1d" (or "1.5h") -> seconds; ValueError naming what is expected."""
    allowed = ", ".join(f'"{n}{u}"' for n, u in zip((30, 15, 6, 1), "smhd") if u in units)
    value = text.strip().lower()
    try:
        if not value or value[-1] not in units:
            raise ValueError
        number = float(value[:-1])
    except ValueError:
        raise ValueError(f"expected a duration such as {allowed}, got {text!r}") from None
    if not number > 0 or number == float("inf"):
        raise ValueError(f"expected a duration > 0, got {text!r}")
    return number * _DURATION_UNITS[value[-1]]


def _model_limits(table: Mapping[str, Any], fail) -> dict[str, tuple[float | None, float | None]]:
    """[run.limits] "model" = { rpm = .., tpm = .. } -> {model: (rpm, tpm)}."""
    limits = {}
    for model, value in table.items():
        if not isinstance(value, dict) or not value or set(value) - {"rpm", "tpm"}:
            _raise(fail("run", f"limits.{model}", "expected a table with rpm and/or tpm, e.g. "
                        '"qwen-max" = { rpm = 600, tpm = 1000000 }'))
        for key, number in value.items():
            if not type_ok(NUM, number):
                _raise(fail("run", f"limits.{model}.{key}", f"expected a number, got {describe_value(number)}"))
            problem = BOUNDS[("run.limits", key)].problem(number, integer=False)
            if problem:
                _raise(fail("run", f"limits.{model}.{key}", f"{problem}, got {describe_value(number)}"))
        limits[model] = (value.get("rpm"), value.get("tpm"))
    return limits


def _parquet_path(path: Path) -> Path:
    return path if path.suffix == ".parquet" else path.with_name(path.name + ".parquet")


def _unechoed(name: str | None) -> str | None:
    """A section or key name as shown in a message: one that looks like a pasted API key is not repeated."""
    return "<a name that looks like an API key>" if name and name.strip()[:3].lower() == "sk-" else name


def _raise(error: SpecError):
    raise error


def _input_path(base: Path, text: str, fail) -> Path | ObjectUri:
    """[input] path: an s3:// URI as it is, anything else a file relative to the job file's folder."""
    if not looks_like_uri(text):
        return _join(base, text)
    try:
        return ObjectUri.parse(text)
    except ValueError as exc:
        _raise(fail("input", "path", str(exc)))


def _object_store(section: Mapping[str, Any], remote: bool, fail) -> ObjectStoreSettings:
    """[input] s3_endpoint, s3_region, s3_anonymous, s3_addressing, s3_credentials: only with an s3:// path."""
    given = [key for key in ("s3_endpoint", "s3_region", "s3_anonymous", "s3_addressing", "s3_credentials")
             if key in section]
    if given and not remote:
        _raise(fail("input", given[0], "only applies to an s3:// path; this input is a local file"))
    endpoint = section.get("s3_endpoint")
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        _raise(fail("input", "s3_endpoint", f"expected an http:// or https:// URL, got {endpoint!r}"))
    addressing = section.get("s3_addressing")
    if addressing is not None and addressing not in ADDRESSING:
        _raise(fail("input", "s3_addressing", f"expected one of {', '.join(ADDRESSING)}, got {addressing!r}"))
    region = section.get("s3_region")
    if region is not None and not region.strip():
        _raise(fail("input", "s3_region", "expected a region name, e.g. us-east-1, got an empty string"))
    credentials = section.get("s3_credentials", "environment")
    if credentials not in CREDENTIAL_SOURCES:
        _raise(fail("input", "s3_credentials", f"expected one of {', '.join(CREDENTIAL_SOURCES)}, got {credentials!r}"))
    if credentials != "environment" and section.get("s3_anonymous"):
        _raise(fail("input", "s3_credentials", "s3_anonymous = true reads without credentials; set one or the other"))
    return ObjectStoreSettings(endpoint=endpoint.rstrip("/") if endpoint else None, region=region,
                               anonymous=section.get("s3_anonymous", False), addressing=addressing,
                               credentials=credentials)


def _join(base: Path, relative: str) -> Path:
    """`relative` resolved against the job file's folder, written without `..` detours."""
    return Path(os.path.normpath(base / Path(relative).expanduser()))
