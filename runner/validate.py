"""validate_job(): read the whole input, render every request body, report what would go wrong. Sends nothing."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .clients import DIALECTS
from .clients.stream_rules import StreamPolicy
from .cost import PER_TOKENS, PriceBook
from .endpoints import CHAT_PATHS, BaseUrlProblem, base_url_problem, request_headers, resolve_api_key
from .errors import SpecError
from .tokens import estimate_prompt_tokens, output_reserve
from .endpoints import chat_url
from .batch.render import MAX_LINE_BYTES, batch_group, encode_line, fits_in_file
from .files import os_errors
from .fanout import fans_out, provider_n_rule
from .sources import open_source
from . import structured
from .spec import JobSpec


@dataclass
class ValidationReport:
    spec: JobSpec
    format: str = ""
    rows: int = 0                   # output rows: with fan-out, several per input row
    input_rows: int = 0
    requests: int = 0               # requests that would be sent (samples sharing one with `n` count once)
    invalid: int = 0
    problems: list[str] = field(default_factory=list)
    duplicate_keys: int = 0
    first_duplicate: str | None = None
    models: Counter = field(default_factory=Counter)
    largest_body_bytes: int = 0
    streamed: int = 0
    api_key_present: bool = False
    api_key_problem: str | None = None  # why `runner run` would refuse the key found (never the key itself)
    base_url_problem: BaseUrlProblem | None = None
    input_tokens: int = 0           # estimated, tokenizer-free
    output_tokens_max: int = 0      # from max_tokens (or the model's cap)
    output_tokens_expected: int = 0 # from expected_output_tokens (else a quarter of max_tokens)
    cost_low: float | None = None
    cost_high: float | None = None
    currency: str = ""
    prices_as_of: str | None = None
    unpriced_models: set = field(default_factory=set)
    # An unpriced model whose name is close to a listed one: model -> the listed names (a likely typo).
    near_names: dict = field(default_factory=dict)
    output_exists: bool = False
    output_unwritable: str | None = None  # why `runner run` could not write the output folder
    unfinished_run: bool = False
    unfinished_changes: list[str] = field(default_factory=list)  # fingerprint keys an unfinished run differs in
    batch_files: Counter = field(default_factory=Counter)  # batch mode: (model, enable_thinking) -> files

    def render(self) -> str:
        spec = self.spec
        lines = [
            f"job        {spec.source}",
            f"input      {spec.input.path} ({self.format}, {self.input_rows:,} rows"
            + (f", --limit {spec.run.limit}" if spec.run.limit is not None else "") + ")",
            *self._fanout_lines(),
            f"endpoint   {spec.endpoint.dialect}  {chat_url(spec.endpoint)}"
            + (f"  workspace {spec.endpoint.workspace}" if spec.endpoint.workspace else ""),
            *self._base_url_warning(),
            "models     " + ", ".join(f"{name} ({n:,})" for name, n in self.models.most_common(5))
            + (f" and {len(self.models) - 5} more" if len(self.models) > 5 else ""),
            f"rows       {self.rows - self.invalid:,} valid, {self.invalid:,} invalid, {self.streamed:,} streamed"
            + (f"; largest request body {self.largest_body_bytes:,} bytes" if self.largest_body_bytes else ""),
        ]
        lines.append(f"tokens     ~{self.input_tokens:,} input (estimated), {self.output_tokens_expected:,} expected "
                     f"and at most {self.output_tokens_max:,} output")
        if spec.run.mode == "batch":
            lines.append(f"batch      {sum(self.batch_files.values()):,} file(s) for the Batch API: "
                         + ", ".join(f"{model}{' (thinking)' if thinking else ''} {n}"
                                     for (model, thinking), n in sorted(self.batch_files.items(), key=str))
                         + f"; completion window {spec.run.completion_window}")
        if self.cost_low is not None:
            lines.append(f"cost       {self.cost_low:,.4f} - {self.cost_high:,.4f} {self.currency} estimated "
                         f"({spec.endpoint.region} {'batch ' if spec.run.mode == 'batch' else ''}prices as of "
                         f"{self.prices_as_of})"
                         + (f"; budget {spec.run.max_cost:g}" if spec.run.max_cost else ""))
        if self.unpriced_models:
            lines.append(f"warning    no price for {', '.join(sorted(self.unpriced_models))}: not in the estimate "
                         "(set [model] price_input and price_output)")
        for model, near in sorted(self.near_names.items()):
            lines.append(f"warning    model {model!r} is not in the price table: did you mean "
                         f"{' or '.join(repr(n) for n in near)}?")
        if self.duplicate_keys:
            lines.append(f"warning    {self.duplicate_keys:,} rows repeat an earlier id "
                         f"(first: {self.first_duplicate!r}); rows are tracked by position, ids are only copied")
        key_env = spec.endpoint.api_key_env
        if self.api_key_problem and (self.api_key_present or spec.endpoint.api_key_file):
            lines.append(f"warning    {self.api_key_problem}: `runner run` refuses it")
        elif self.api_key_present:
            lines.append(f"api key    {key_env} is set")
        elif spec.endpoint.api_key_file:
            lines.append(f"api key    {key_env} is not set; the key will be read from {spec.endpoint.api_key_file}")
        else:
            lines.append(f"warning    {key_env} is not set: `runner run` needs it (or --emulator to rehearse)")
        out = spec.output.path
        if self.output_unwritable:
            lines.append(f"error      {out.parent}: output folder is not writable ({self.output_unwritable}): "
                         "`runner run` would stop at once")
        if self.output_exists:
            lines.append(f"warning    {out} exists: `runner run` needs --overwrite to replace it")
        elif self.unfinished_run and self.unfinished_changes:
            lines.append(f"warning    {out}: an unfinished run of a different job is there "
                         f"({', '.join(self.unfinished_changes)} changed): `runner run` needs --restart")
        elif self.unfinished_run:
            lines.append(f"output     {out} (an unfinished run is there: `runner run` resumes it)")
        else:
            lines.append(f"output     {out}")
        if self.problems:
            lines.append(f"problems   first {len(self.problems)} of {self.invalid:,}:")
            lines.extend(f"  {p}" for p in self.problems)
        return "\n".join(lines)

    def _fanout_lines(self) -> list[str]:
        """With fan-out: how the input rows expand (models x variants x samples) and the requests they take."""
        spec = self.spec
        if not fans_out(spec.input, spec.model):
            return []
        factors = [f"{len(spec.model.all_names)} model(s)", f"{max(1, len(spec.input.variants))} variant(s)",
                   f"{spec.model.samples} sample(s)"]
        return [f"fan-out    {self.input_rows:,} input rows x " + " x ".join(factors)
                + f" = {self.rows:,} output rows in {self.requests:,} requests"
                + (" (samples share a request with n)" if self.requests < self.rows - self.invalid else "")]

    def _base_url_warning(self) -> list[str]:
        found = self.base_url_problem
        if found is None:
            return []
        refused = "; `runner run` refuses it as it is" if found.certain else ""
        return [f"warning    base_url {self.spec.endpoint.base_url}: {found.problem}{refused}",
                f"           use base_url = \"{found.fixed}\" (the runner appends "
                f"{CHAT_PATHS[self.spec.endpoint.dialect]})"]


def validate_job(spec: JobSpec, *, show: int = 10) -> ValidationReport:
    source = open_source(spec.input, spec.model, limit=spec.run.limit, provider_n=provider_n_rule(spec),
                         decorate=structured.decorator(spec))
    build_payload = DIALECTS[spec.endpoint.dialect].build_payload
    streaming = StreamPolicy(spec.model.stream, spec.model.stream_only_models)
    batch = spec.run.mode == "batch"
    prices = PriceBook(spec.endpoint.region, job_model=spec.model.name, overrides=spec.model.prices, batch=batch)
    files = _BatchFileCount(spec) if batch else None
    report = ValidationReport(spec=spec, format=source.format, currency=prices.currency,
                              prices_as_of=prices.as_of)
    low = high = 0.0
    # Digests, not the keys themselves: 16 bytes a row is fine for a one-off check of a big file.
    seen_keys: set[bytes] = set()
    for request in source:
        answers = len(request.rows)  # a request with `n` answers several output rows
        report.rows += answers
        for row in request.rows:  # by row key: a fanned-out row's key repeats once per model, variant, sample
            digest = hashlib.blake2b(row.row_key.encode(), digest_size=16).digest()
            if digest in seen_keys:
                report.duplicate_keys += 1
                report.first_duplicate = report.first_duplicate or row.key
            seen_keys.add(digest)
        if request.problem is not None:
            report.invalid += 1
            if len(report.problems) < show:
                report.problems.append(request.problem)
            continue
        report.requests += 1
        report.models[request.model] += answers
        price = prices.price(request.model)
        input_tokens = estimate_prompt_tokens(request.messages)
        cap = request.params.get("max_completion_tokens") or request.params.get("max_tokens") or \
            (price.max_output if price else None) or output_reserve({}, None)
        expected = (spec.run.expected_output_tokens or max(1, int(cap) // 4)) * answers
        report.input_tokens += input_tokens
        report.output_tokens_max += int(cap) * answers
        report.output_tokens_expected += expected
        if price is None:
            if request.model not in report.unpriced_models:  # once a model, not once a row: difflib is not free
                near = prices.near_names(request.model)
                if near:
                    report.near_names[request.model] = near
            report.unpriced_models.add(request.model)
        else:
            # The estimate errs by up to ~25% either way on input; output between expected and the cap.
            low += (input_tokens * 0.8 * price.input + expected * price.output) / PER_TOKENS
            high += (input_tokens * 1.25 * price.input + int(cap) * answers * price.output) / PER_TOKENS
        try:
            if files is not None:
                size = len(encode_line(request))
            else:
                stream = streaming.wants_stream(request.model, request.params)
                size = len(json.dumps(build_payload(request, stream=stream), ensure_ascii=False,
                                      allow_nan=False).encode())
                report.streamed += stream
        except (TypeError, ValueError) as exc:
            report.invalid += 1
            if len(report.problems) < show:
                report.problems.append(f"row_id {request.row_id}: the request cannot be sent as JSON ({exc})")
            continue
        if files is not None and size > MAX_LINE_BYTES:
            report.invalid += 1
            if len(report.problems) < show:
                report.problems.append(f"row_id {request.row_id} (key {request.key!r}): its Batch API line is "
                                       f"{size:,} bytes; a line may be at most {MAX_LINE_BYTES:,}")
            continue
        if files is not None:
            files.add(request, size)
        report.largest_body_bytes = max(report.largest_body_bytes, size)
    report.input_rows = source.input_rows_read
    if report.rows > report.invalid and len(report.unpriced_models) < len(report.models):
        report.cost_low, report.cost_high = low, high
    if files is not None:
        report.batch_files = files.files
    report.api_key_present = bool(os.environ.get(spec.endpoint.api_key_env, "").strip())
    try:
        resolve_api_key(spec.endpoint)
    except SpecError as error:
        report.api_key_problem = error.message
    report.base_url_problem = base_url_problem(spec.endpoint)
    report.output_exists = spec.output.path.exists()
    report.output_unwritable = output_folder_problem(spec.output.path)
    parts = spec.output.path.with_name(spec.output.path.name + ".parts")
    report.unfinished_run = parts.exists()
    if report.unfinished_run:
        report.unfinished_changes = _unfinished_changes(spec, parts)
    return report


def output_folder_problem(output: Path) -> str | None:
    """Why `runner run` could not write `output`'s folder, or None; creates nothing. A folder that does not
    exist yet is fine when its nearest existing ancestor is a writable folder (the run creates it)."""
    folder = output.parent
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return "read-only file system" if os.statvfs(folder).f_flag & os.ST_RDONLY else "permission denied"
    return None


def _unfinished_changes(spec: JobSpec, parts: Path) -> list[str]:
    """The fingerprint keys in which the unfinished run in `parts` differs from this job (as `runner run`
    checks them); nothing when it records none (the run starts over or resumes as it finds it)."""
    from .job import job_fingerprint
    from .sink import MANIFEST

    try:
        previous = json.loads((parts / MANIFEST).read_text(encoding="utf-8")).get("fingerprint") or {}
    except (OSError, ValueError, AttributeError):
        return []
    current = job_fingerprint(spec)
    return sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))


class _BatchFileCount:
    """How the batch planner would split the rows into files (same caps, same grouping)."""

    def __init__(self, spec: JobSpec) -> None:
        self.run = spec.run
        self.open: dict[tuple, list[int]] = {}  # group -> [lines, bytes] of its last file
        self.files: Counter = Counter()

    def add(self, request, size: int) -> None:
        group = batch_group(request)
        current = self.open.get(group)
        if current is None or not fits_in_file(current[0], current[1], size, self.run):
            current = self.open[group] = [0, 0]
            self.files[group] += 1
        current[0] += 1
        current[1] += size


def write_dry_run(spec: JobSpec) -> tuple[Path, int]:
    """Render every request and write what would be sent (URL, headers without the key, body) as JSONL.

    Nothing is sent and no key is needed. Returns the file and the number of requests in it."""
    from .endpoints import ApiKey

    source = open_source(spec.input, spec.model, limit=spec.run.limit, provider_n=provider_n_rule(spec),
                         decorate=structured.decorator(spec))
    dialect = DIALECTS[spec.endpoint.dialect]
    streaming = StreamPolicy(spec.model.stream, spec.model.stream_only_models)
    headers = {k: v for k, v in request_headers(spec.endpoint, ApiKey("")).items() if k != "Authorization"}
    path = spec.output.path.with_name(spec.output.path.stem + ".requests.jsonl")
    with os_errors(path, "cannot write the dry run's requests"):
        path.parent.mkdir(parents=True, exist_ok=True)
        count = 0
        url = chat_url(spec.endpoint)
        with open(path, "w", encoding="utf-8") as fh:
            for request in source:
                if request.problem is not None:
                    line = {"row_id": request.row_id, "key": request.key, "problem": request.problem}
                elif spec.run.mode == "batch":  # the Batch JSONL line that would be uploaded
                    try:
                        fh.write(encode_line(request).decode())
                        count += 1
                    except (TypeError, ValueError) as exc:
                        line = {"row_id": request.row_id, "key": request.key, "problem": f"not JSON ({exc})"}
                        fh.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
                    continue
                else:
                    stream = streaming.wants_stream(request.model, request.params)
                    line = {"row_id": request.row_id, "key": request.key, "method": "POST", "url": url,
                            "headers": {**headers, **(dialect.STREAM_HEADERS if stream else {})},
                            "body": dialect.build_payload(request, stream=stream)}
                    count += 1
                fh.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
    return path, count
