"""validate_job(): read the whole input, render every request body, report what would go wrong. Sends nothing."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field

from .clients import DIALECTS
from .clients.stream_rules import StreamPolicy
from .endpoints import chat_url
from .sources import open_source
from .spec import JobSpec


@dataclass
class ValidationReport:
    spec: JobSpec
    format: str = ""
    rows: int = 0
    invalid: int = 0
    problems: list[str] = field(default_factory=list)
    duplicate_keys: int = 0
    first_duplicate: str | None = None
    models: Counter = field(default_factory=Counter)
    largest_body_bytes: int = 0
    streamed: int = 0
    api_key_present: bool = False
    output_exists: bool = False
    unfinished_run: bool = False

    def render(self) -> str:
        spec = self.spec
        lines = [
            f"job        {spec.source}",
            f"input      {spec.input.path} ({self.format}, {self.rows:,} rows"
            + (f", --limit {spec.run.limit}" if spec.run.limit is not None else "") + ")",
            f"endpoint   {spec.endpoint.dialect}  {chat_url(spec.endpoint)}"
            + (f"  workspace {spec.endpoint.workspace}" if spec.endpoint.workspace else ""),
            "models     " + ", ".join(f"{name} ({n:,})" for name, n in self.models.most_common(5))
            + (f" and {len(self.models) - 5} more" if len(self.models) > 5 else ""),
            f"rows       {self.rows - self.invalid:,} valid, {self.invalid:,} invalid, {self.streamed:,} streamed"
            + (f"; largest request body {self.largest_body_bytes:,} bytes" if self.largest_body_bytes else ""),
        ]
        if self.duplicate_keys:
            lines.append(f"warning    {self.duplicate_keys:,} rows repeat an earlier id "
                         f"(first: {self.first_duplicate!r}); rows are tracked by position, ids are only copied")
        key_env = spec.endpoint.api_key_env
        if self.api_key_present:
            lines.append(f"api key    {key_env} is set")
        elif spec.endpoint.api_key_file:
            lines.append(f"api key    {key_env} is not set; the key will be read from {spec.endpoint.api_key_file}")
        else:
            lines.append(f"warning    {key_env} is not set: `runner run` needs it (or --emulator to rehearse)")
        out = spec.output.path
        if self.output_exists:
            lines.append(f"warning    {out} exists: `runner run` needs --overwrite to replace it")
        elif self.unfinished_run:
            lines.append(f"output     {out} (an unfinished run is there: `runner run` resumes it)")
        else:
            lines.append(f"output     {out}")
        if self.problems:
            lines.append(f"problems   first {len(self.problems)} of {self.invalid:,}:")
            lines.extend(f"  {p}" for p in self.problems)
        return "\n".join(lines)


def validate_job(spec: JobSpec, *, show: int = 10) -> ValidationReport:
    source = open_source(spec.input, spec.model, limit=spec.run.limit)
    build_payload = DIALECTS[spec.endpoint.dialect].build_payload
    streaming = StreamPolicy(spec.model.stream, spec.model.stream_only_models)
    report = ValidationReport(spec=spec, format=source.format)
    # Digests, not the keys themselves: 16 bytes a row is fine for a one-off check of a big file.
    seen_keys: set[bytes] = set()
    for request in source:
        report.rows += 1
        digest = hashlib.blake2b(request.key.encode(), digest_size=16).digest()
        if digest in seen_keys:
            report.duplicate_keys += 1
            report.first_duplicate = report.first_duplicate or request.key
        seen_keys.add(digest)
        if request.problem is not None:
            report.invalid += 1
            if len(report.problems) < show:
                report.problems.append(request.problem)
            continue
        report.models[request.model] += 1
        try:
            size = len(json.dumps(build_payload(request, stream=streaming.wants_stream(request.model, request.params)),
                                  ensure_ascii=False, allow_nan=False).encode())
            if streaming.wants_stream(request.model, request.params):
                report.streamed += 1
        except (TypeError, ValueError) as exc:
            report.invalid += 1
            if len(report.problems) < show:
                report.problems.append(f"row_id {request.row_id}: the request cannot be sent as JSON ({exc})")
            continue
        report.largest_body_bytes = max(report.largest_body_bytes, size)
    report.api_key_present = bool(os.environ.get(spec.endpoint.api_key_env, "").strip())
    report.output_exists = spec.output.path.exists()
    report.unfinished_run = spec.output.path.with_name(spec.output.path.name + ".parts").exists()
    return report
