"""Fan-out: one input row -> its output rows, one per (model, variant, sample), made lazily.

    for each input row, in file order:
        for each model of [model] names, in the order listed (a row's model_column value, if any, instead)
            for each [[input.variants]] table, in the order listed (or the job's own prompt)
                for each sample 0 .. [model] samples - 1

Each output row is a Request of its own: its own row_id (the output position: a running count over the
expanded rows, so the output is dense and in this order), its input row's key, and a digest that names its
model, variant and sample, so resume, changed-row detection and --retry-failed work row by row. Only one
input row's requests exist at a time: the product is never held in memory.

Samples: where the provider's `n` may be used (`provider_n_rule`), the samples of one (row, model, variant)
go out as one request with `n` (at most N_MAX each) whose Request lists its output rows in `members`;
otherwise each sample is its own request with `seed` = the job's seed (0 unless given) + sample_index.
Every sample row carries its own seed either way, so a row's digest does not depend on how it is sent
(online with `n`, one by one, or in a batch file) and a batch job's online finish resumes it.
"""

from __future__ import annotations

import dataclasses
from fnmatch import fnmatchcase
from typing import Any, Callable, Iterator, Mapping

from .clients.stream_rules import StreamPolicy
from .records import Request
from .spec import InputSpec, JobSpec, ModelSpec, VariantSpec

# The provider's `n` (several answers to one request): compatible mode only, 1..4, qwen-plus and Qwen3 in
# non-thinking mode, never with tools (API facts 2.1 and the 2026-11 additions). Names or fnmatch patterns.
N_MODELS = ("qwen-plus", "qwen-plus-*", "qwen3-*")
N_MAX = 4
SEED_MODULUS = 2**31  # seeds are 0 .. 2^31 - 1 (facts 2.1): seed + sample_index wraps around

BuildRequest = Callable[..., Request]


def provider_n_rule(spec: JobSpec) -> Callable[[str, Mapping[str, Any]], bool]:
    """Whether a request to `model` with `params` may ask for several answers at once with `n`.

    Never in batch mode (each batch line is one answer, so a batch file stays one line per output row), never
    on the native dialect, and never for a request that streams (thinking, stream-only models, [model] stream =
    true), thinks, or carries tools. `uses_provider_n` is the job-level part."""
    streaming = StreamPolicy(spec.model.stream, spec.model.stream_only_models)

    def allowed(model: str, params: Mapping[str, Any]) -> bool:
        return (uses_provider_n(spec, model) and not params.get("tools") and params.get("enable_thinking") is not True
                and not streaming.wants_stream(model, params))

    return allowed


def uses_provider_n(spec: JobSpec, model: str) -> bool:
    """The job-level half of the `n` decision. Structured output (a json_schema the answers are validated
    against, each sample re-asked on its own) must return False here, so each sample is its own request."""
    return (spec.endpoint.dialect == "openai" and spec.run.mode != "batch" and spec.output.json_schema is None
            and any(fnmatchcase(model.lower(), pattern) for pattern in N_MODELS))


def never_n(model: str, params: Mapping[str, Any]) -> bool:
    return False


def rows_per_input_row(inp: InputSpec, model: ModelSpec) -> int:
    """Output rows for each input row that does not name its own model (a model_column value)."""
    return len(model.all_names) * max(1, len(inp.variants)) * model.samples


def fans_out(inp: InputSpec, model: ModelSpec) -> bool:
    return len(model.all_names) > 1 or bool(inp.variants) or model.samples > 1


def expanded_total(inp: InputSpec, model: ModelSpec, input_rows: int | None) -> int | None:
    """The output rows of `input_rows` input rows; None when it cannot be known without reading every row
    (a model_column with several [model] names: a row naming its own model is sent to it alone)."""
    if input_rows is None:
        return None
    if inp.model_column and len(model.all_names) > 1:
        return None
    return input_rows * rows_per_input_row(inp, model)


class Expander:
    """Turns input rows into their output rows' Requests (see the module docstring), numbering them."""

    def __init__(self, inp: InputSpec, model: ModelSpec, build: BuildRequest,
                 provider_n: Callable[[str, Mapping[str, Any]], bool] = never_n) -> None:
        self.inp = inp
        self.model = model
        self._build = build
        self._provider_n = provider_n
        self.fanned = fans_out(inp, model)
        self.next_row_id = 0
        # One ModelSpec per model, its parameters merged once, not per row.
        self._views = {name: dataclasses.replace(model, name=name, params=model.params_for(name))
                       for name in model.all_names}
        # One InputSpec per variant (its prompt replaces the job's own) and its messages prefix.
        self._variants: tuple[tuple[VariantSpec | None, InputSpec], ...] = \
            tuple((v, _variant_input(inp, v)) for v in inp.variants) or ((None, inp),)

    def expand(self, values: Any, *, where: str, **build_options: Any) -> Iterator[Request]:
        """The Requests of one input row, in the documented order; a request with `n` stands for several."""
        if not self.fanned:
            request = self._build(values, row_id=self.next_row_id, where=where, spec=self.inp, model=self.model,
                                  **build_options)
            self.next_row_id += 1
            yield request
            return
        for model in self._models_of(values):
            view = self._views.get(model) or self._views[self.model.all_names[0]]
            for variant, inp in self._variants:
                base = self._build(values, row_id=self.next_row_id, where=where, spec=inp, model=view, **build_options)
                if variant is not None and variant.messages and base.problem is None:
                    base = _with_prefix(base, variant.messages)
                yield from self._samples(base, variant.name if variant is not None else None)

    def _models_of(self, values: Any) -> tuple[str, ...]:
        """The job's models, or the one this row names in its model_column (which wins: one model, not each)."""
        column = self.inp.model_column
        if column and isinstance(values, dict):
            own = values.get(column)
            if isinstance(own, str) and own:
                return (own,)
        return self.model.all_names

    def _samples(self, base: Request, variant: str | None) -> Iterator[Request]:
        count = self.model.samples
        seed = base.params.get("seed", 0)
        seeded = count > 1 and isinstance(seed, int) and not isinstance(seed, bool)
        rows = []
        for index in range(count):
            params = {**base.params, "seed": (seed + index) % SEED_MODULUS} if seeded else base.params
            rows.append(dataclasses.replace(base, row_id=self.next_row_id, variant=variant, sample_index=index,
                                            params=params))
            self.next_row_id += 1
        if count == 1 or base.problem is not None or not self._provider_n(base.model, base.params):
            yield from rows
            return
        for start in range(0, count, N_MAX):
            yield grouped(rows[start:start + N_MAX])


def grouped(rows: list[Request]) -> Request:
    """One request for the given sample rows of one (row, model, variant): the first row's request asking
    for len(rows) answers with `n`; a single row stays itself."""
    if len(rows) == 1:
        return rows[0]
    first = rows[0]
    return dataclasses.replace(first, params={**first.params, "n": len(rows)}, members=tuple(rows))


def pending(request: Request, done) -> tuple[Request | None, int]:
    """A request with members, less the rows an earlier run already answered for the same request (`done`,
    the sink's DoneRows), so a resumed row pays only for its missing samples; and how many of its rows were
    answered for a different request (changed since). None when every row is done."""
    todo, changed = [], 0
    for row in request.members:
        if row.row_id in done:
            if done.matches(row.row_id, row.digest()):
                continue
            changed += 1
        todo.append(row)
    if len(todo) == len(request.members):
        return request, changed
    return (grouped(todo) if todo else None), changed


def _variant_input(inp: InputSpec, variant: VariantSpec) -> InputSpec:
    """The job's [input] with this variant's prompt: its template replaces the prompt (a prompt_column or the
    job's template) and its system prompt the job's."""
    changes: dict[str, Any] = {"variants": ()}
    if variant.template is not None:
        changes.update(template=variant.template, prompt_column=None)
    if variant.system_prompt is not None:
        changes["system_prompt"] = variant.system_prompt
    return dataclasses.replace(inp, **changes)


def _with_prefix(request: Request, prefix) -> Request:
    """The request with a variant's messages prefix after its system messages, before the row's own."""
    messages = list(request.messages)
    at = next((i for i, m in enumerate(messages) if m.get("role") != "system"), len(messages))
    messages[at:at] = [dict(m) for m in prefix]
    return dataclasses.replace(request, messages=tuple(messages))
