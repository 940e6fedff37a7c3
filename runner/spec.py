"""JobSpec: the job file as frozen values. `load_job(path)` reads TOML, checks every key and type.

Every problem is a SpecError naming the file and the key (`[model] temperature`). Paths in the
file are resolved relative to the file's folder. CLI overrides go through `JobSpec.override`,
which changes only what was given.
"""

from __future__ import annotations

import dataclasses
import os
import string
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from .endpoints import resolve_host
from .errors import SpecError
from .records import RESERVED_COLUMNS

DIALECTS = ("openai", "dashscope")
MODES = ("online", "batch")
# Batch API limits (API facts 7.2, 7.3): the defaults, and the ceilings a job may not raise them above.
BATCH_MAX_LINES = 50_000
BATCH_MAX_BYTES = 500 * 1024 * 1024
BATCH_MAX_DESCRIPTION = 200
TRANSPORTS = ("aiohttp", "httpx")


@dataclass(frozen=True)
class InputSpec:
    path: Path
    id_column: str | None = None
    prompt_column: str | None = None
    messages_column: str | None = None
    template: str | None = None
    system_prompt: str | None = None
    keep_columns: tuple[str, ...] = ()
    model_column: str | None = None
    params_column: str | None = None

    @property
    def template_columns(self) -> tuple[str, ...]:
        return template_fields(self.template) if self.template is not None else ()

    def needed_columns(self) -> tuple[str, ...]:
        """Input columns the job reads, in a stable order without repeats."""
        names = [self.id_column, self.prompt_column, self.messages_column, *self.template_columns,
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


@dataclass(frozen=True)
class ModelSpec:
    name: str
    # Generation parameters given in the job, in the provider's names; only those given are sent.
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    stream: str = "auto"  # "auto", "always" or "never" (the job file says "auto", true or false)
    stream_only_models: tuple[str, ...] = ()
    prices: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))  # [model] price_* overrides


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
    mode: str = "online"
    completion_window: str = "24h"
    batch_fallback_after: float | None = None  # seconds after the first batch is created; None: never
    batch_poll_seconds: float = 60.0  # the longest wait between two status checks
    batch_max_lines: int = BATCH_MAX_LINES
    batch_max_bytes: int = BATCH_MAX_BYTES
    batch_description: str | None = None


@dataclass(frozen=True)
class OutputSpec:
    path: Path

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
                    "batch_poll_seconds": "run",
                    "base_url": "endpoint", "dialect": "endpoint", "api_key_env": "endpoint"}
        for name, value in given.items():
            if value is None:
                continue
            if name == "model":
                spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, name=value))
            elif name == "output":
                spec = dataclasses.replace(spec, output=OutputSpec(_parquet_path(Path(value))))
            elif name in sections:
                section = sections[name]
                _check_override(name, value)
                replaced = dataclasses.replace(getattr(spec, section), **{name: value})
                spec = dataclasses.replace(spec, **{section: replaced})
            else:
                raise ValueError(f"unknown override {name!r}")
        return spec


def _check_override(name: str, value: Any) -> None:
    where = f"--{name.replace('_', '-')}"
    if name in ("rpm", "tpm", "max_cost") and value <= 0:
        raise SpecError(f"{where}: expected a number > 0, got {value}")
    if name in ("concurrency", "max_attempts") and value < 1:
        raise SpecError(f"{where}: expected an integer >= 1, got {value}")
    if name == "limit" and value < 0:
        raise SpecError(f"{where}: expected an integer >= 0, got {value}")
    if name == "max_error_rate" and not 0 <= value <= 1:
        raise SpecError(f"{where}: expected a number from 0 to 1, got {value}")
    if name == "mode" and value not in MODES:
        raise SpecError(f"{where}: expected one of {', '.join(MODES)}, got {value!r}")
    if name == "batch_poll_seconds" and value <= 0:
        raise SpecError(f"{where}: expected a number > 0, got {value}")
    if name == "dialect" and value not in DIALECTS:
        raise SpecError(f"{where}: expected one of {', '.join(DIALECTS)}, got {value!r}")


def template_fields(template: str) -> tuple[str, ...]:
    """Column names used as {placeholders}; raises ValueError for a malformed template."""
    names = []
    for _literal, name, _spec, _conv in string.Formatter().parse(template):
        if name is None:
            continue
        if not name or not name.replace("_", "a").replace("-", "a").replace(" ", "a").isalnum():
            raise ValueError(f"placeholder {{{name}}} is not a plain column name (use {{{{ and }}}} for literal braces)")
        names.append(name)
    return tuple(dict.fromkeys(names))


# --- the key table -----------------------------------------------------------------------------

_STR, _INT, _NUM, _BOOL = "a string", "an integer", "a number", "true or false"
_STREAM = 'true, false or "auto"'

# Generation parameters accepted under [model], with the type each must have. They are sent under
# these names (DashScope spells them the same in both dialects).
MODEL_PARAMS: dict[str, str] = {
    "temperature": _NUM, "top_p": _NUM, "top_k": _INT, "max_tokens": _INT,
    "max_completion_tokens": _INT, "seed": _INT, "stop": "a string or a list of strings",
    "enable_thinking": _BOOL, "thinking_budget": _INT, "presence_penalty": _NUM,
    "frequency_penalty": _NUM, "repetition_penalty": _NUM, "response_format": "a table",
    "enable_search": _BOOL, "max_input_tokens": _INT,
}
PRICE_KEYS = ("price_input", "price_output", "price_cached_input", "price_thinking_output")

_SECTIONS: dict[str, dict[str, str]] = {
    "input": {"path": _STR, "id_column": _STR, "prompt_column": _STR, "messages_column": _STR,
              "template": _STR, "system_prompt": _STR, "keep_columns": "a list of strings",
              "model_column": _STR, "params_column": _STR},
    "endpoint": {"dialect": _STR, "region": _STR, "base_url": _STR, "workspace": _STR,
                 "api_key_env": _STR, "api_key_file": _STR, "timeout": _NUM,
                 "connect_timeout": _NUM, "stream_idle_timeout": _NUM, "read_timeout": _NUM, "transport": _STR,
                 "api_key": "never set here"},
    "model": {"name": _STR, **MODEL_PARAMS, "extra": "a table", "stream": _STREAM,
              "stream_only_models": "a list of strings", **{k: _NUM for k in PRICE_KEYS}},
    "run": {"concurrency": _INT, "max_attempts": _INT, "backoff_initial": _NUM, "backoff_max": _NUM,
            "retry_after_max": _NUM, "max_error_rate": _NUM, "limit": _INT, "part_rows": _INT,
            "part_seconds": _NUM, "drain_seconds": _NUM, "rpm": _NUM, "tpm": _NUM, "limits": "a table",
            "adaptive_rate": _BOOL, "expected_output_tokens": _INT, "cooldown_seconds": _NUM,
            "retry_budget": _NUM, "max_cost": _NUM, "mode": _STR, "completion_window": _STR,
            "batch_fallback_after": _STR, "batch_poll_seconds": _NUM, "batch_max_lines": _INT,
            "batch_max_bytes": _INT, "batch_description": _STR},
    "output": {"path": _STR},
}


def _type_ok(expected: str, value: Any) -> bool:
    if expected == _STR:
        return isinstance(value, str)
    if expected == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected == _NUM:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected == _BOOL:
        return isinstance(value, bool)
    if expected == _STREAM:
        return isinstance(value, bool) or value == "auto"
    if expected == "a table":
        return isinstance(value, dict)
    if expected == "a list of strings":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if expected.startswith("a string or a list"):
        return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    return False


def _describe(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} ({text if len(text) <= 40 else text[:37] + '...'})"


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
        at = f"[{section}] {key}" if key else f"[{section}]" if section else ""
        return SpecError(f"{where}: {at}: {message}" if at else f"{where}: {message}")

    for section, body in raw.items():
        if section not in _SECTIONS:
            return _raise(fail(None, None, f"unknown section [{section}]; expected one of "
                               + ", ".join(f"[{s}]" for s in _SECTIONS)))
        if not isinstance(body, dict):
            _raise(fail(section, None, f"expected a table, got {_describe(body)}"))
        for key, value in body.items():
            expected = _SECTIONS[section].get(key)
            if key == "api_key" and section == "endpoint":
                _raise(fail(section, key, "API keys never go in job files; put the key in an environment "
                            "variable and name it with api_key_env (default DASHSCOPE_API_KEY)"))
            if expected is None:
                _raise(fail(section, key, f"unknown key; expected one of {', '.join(_SECTIONS[section])}"))
            if not _type_ok(expected, value):
                _raise(fail(section, key, f"expected {expected}, got {_describe(value)}"))

    def get(section: str, key: str, default: Any = None) -> Any:
        return raw.get(section, {}).get(key, default)

    def require(section: str, key: str) -> Any:
        if key not in raw.get(section, {}):
            _raise(fail(section, key, "missing; this key is required"))
        return raw[section][key]

    def positive(section: str, key: str, default: Any, *, allow_zero: bool = False) -> Any:
        value = get(section, key, default)
        if value is not None and (value != value or value < 0 or (value == 0 and not allow_zero)):  # nan != nan
            _raise(fail(section, key, f"expected a value {'>= 0' if allow_zero else '> 0'}, got {value}"))
        return value

    # [input]
    input_path = _join(base, require("input", "path"))
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
    elif not base_url.startswith(("http://", "https://")):
        _raise(fail("endpoint", "base_url", f"expected an http:// or https:// URL, got {base_url!r}"))
    key_file = get("endpoint", "api_key_file")
    endpoint = EndpointSpec(
        dialect=dialect, region=region, base_url=base_url, workspace=workspace,
        api_key_env=get("endpoint", "api_key_env", "DASHSCOPE_API_KEY"),
        api_key_file=_join(base, key_file) if key_file else None,
        timeout=float(positive("endpoint", "timeout", 300.0)),
        connect_timeout=float(positive("endpoint", "connect_timeout", 10.0)),
        stream_idle_timeout=float(positive("endpoint", "stream_idle_timeout", 60.0)),
        read_timeout=float(positive("endpoint", "read_timeout", 30.0)),
        transport=transport,
    )

    # [model]
    model_raw = raw.get("model", {})
    name = require("model", "name")
    if not name.strip():
        _raise(fail("model", "name", "expected a model name, got an empty string"))
    params = {k: v for k, v in model_raw.items() if k in MODEL_PARAMS}
    params.update(model_raw.get("extra", {}))
    stream = model_raw.get("stream", "auto")
    model = ModelSpec(name=name, params=MappingProxyType(params),
                      stream=stream if stream == "auto" else ("always" if stream else "never"),
                      stream_only_models=tuple(model_raw.get("stream_only_models", ())),
                      prices=MappingProxyType({k: float(model_raw[k]) for k in PRICE_KEYS if k in model_raw}))

    # [run]
    run = RunSpec(
        concurrency=positive("run", "concurrency", 64),
        max_attempts=positive("run", "max_attempts", 6),
        backoff_initial=float(positive("run", "backoff_initial", 1.0, allow_zero=True)),
        backoff_max=float(positive("run", "backoff_max", 60.0, allow_zero=True)),
        retry_after_max=float(positive("run", "retry_after_max", 120.0, allow_zero=True)),
        max_error_rate=float(positive("run", "max_error_rate", 0.0, allow_zero=True)),
        limit=positive("run", "limit", None, allow_zero=True),
        part_rows=positive("run", "part_rows", 1000),
        part_seconds=float(positive("run", "part_seconds", 5.0)),
        drain_seconds=float(positive("run", "drain_seconds", 30.0, allow_zero=True)),
        rpm=positive("run", "rpm", None), tpm=positive("run", "tpm", None),
        limits=MappingProxyType(_model_limits(get("run", "limits", {}), fail)),
        adaptive_rate=get("run", "adaptive_rate", True),
        expected_output_tokens=positive("run", "expected_output_tokens", None),
        cooldown_seconds=float(positive("run", "cooldown_seconds", 0.25, allow_zero=True)),
        retry_budget=float(positive("run", "retry_budget", 1.0)),
        max_cost=positive("run", "max_cost", None),
    )
    run = _batch_settings(run, get, positive, fail)
    if run.max_error_rate > 1:
        _raise(fail("run", "max_error_rate", f"expected a number from 0 to 1, got {run.max_error_rate}"))

    # [output]
    output = OutputSpec(_parquet_path(_join(base, require("output", "path"))))
    return JobSpec(source=source, input=inp, endpoint=endpoint, model=model, run=run, output=output)


def _batch_settings(run: RunSpec, get, positive, fail) -> RunSpec:
    """The [run] keys of batch mode, checked against the Batch API's own limits (API facts 7.2, 7.3)."""
    mode = get("run", "mode", "online")
    if mode not in MODES:
        _raise(fail("run", "mode", f"expected one of {', '.join(MODES)}, got {mode!r}"))
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
    lines = positive("run", "batch_max_lines", BATCH_MAX_LINES)
    if lines > BATCH_MAX_LINES:
        _raise(fail("run", "batch_max_lines", f"the Batch API takes at most {BATCH_MAX_LINES:,} lines a file, got {lines:,}"))
    size = positive("run", "batch_max_bytes", BATCH_MAX_BYTES)
    if size > BATCH_MAX_BYTES:
        _raise(fail("run", "batch_max_bytes", f"the Batch API takes files of at most {BATCH_MAX_BYTES:,} bytes, got {size:,}"))
    description = get("run", "batch_description")
    if description is not None and len(description) > BATCH_MAX_DESCRIPTION:
        _raise(fail("run", "batch_description", f"at most {BATCH_MAX_DESCRIPTION} characters, got {len(description)}"))
    return dataclasses.replace(run, mode=mode, completion_window=window, batch_fallback_after=fallback,
                               batch_poll_seconds=float(positive("run", "batch_poll_seconds", 60.0)),
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
            if not _type_ok(_NUM, number) or number <= 0:
                _raise(fail("run", f"limits.{model}.{key}", f"expected a number > 0, got {_describe(number)}"))
        limits[model] = (value.get("rpm"), value.get("tpm"))
    return limits


def _parquet_path(path: Path) -> Path:
    return path if path.suffix == ".parquet" else path.with_name(path.name + ".parquet")


def _raise(error: SpecError):
    raise error


def _join(base: Path, relative: str) -> Path:
    """`relative` resolved against the job file's folder, written without `..` detours."""
    return Path(os.path.normpath(base / Path(relative).expanduser()))
