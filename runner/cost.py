"""What a run costs: prices per model and region, cost per row from usage, and a hard budget.

The price table is data (`prices.json`, with its date and source), overridable per job. The budget
is never crossed: before a request is sent its worst case is reserved (input bounded by its UTF-8
bytes, since a byte-level BPE token covers at least one byte, plus template overhead; output by its
max_tokens, else the model's output cap); after it returns the reservation is replaced by the real
cost from usage. When the next reservation would cross the budget, the run stops taking rows.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any, Iterable, Mapping

import anyio

from .errors import RunnerError
from .records import Request, Usage

PER_TOKENS = 1_000_000
TEMPLATE_TOKENS_PER_MESSAGE = 10
TEMPLATE_TOKENS_PER_REQUEST = 20


class BudgetReached(RunnerError):
    """The next request's worst case would cross [run] max_cost."""

    exit_code = 1


class NoPrice(RunnerError):
    """A budget was set but a model has no price to bound its cost."""

    exit_code = 2


@dataclass(frozen=True)
class Price:
    """Per 1,000,000 tokens, in `currency`."""

    input: float
    output: float
    cached_input: float
    thinking_output: float
    max_output: int | None
    currency: str

    def cost(self, usage: Usage, *, thinking: bool) -> float | None:
        if usage.input_tokens is None or usage.output_tokens is None:
            return None
        cached = min(usage.cached_tokens or 0, usage.input_tokens)
        output_price = self.thinking_output if thinking else self.output
        return ((usage.input_tokens - cached) * self.input + cached * self.cached_input
                + usage.output_tokens * output_price) / PER_TOKENS


def _load_table() -> dict[str, Any]:
    return json.loads(resources.files("runner").joinpath("prices.json").read_text(encoding="utf-8"))


OVERRIDE_KEYS = ("price_input", "price_output", "price_cached_input", "price_thinking_output")


class PriceBook:
    """Prices for one region; `overrides` ([model] price_* keys) apply to the job's own model."""

    def __init__(self, region: str, *, job_model: str, overrides: Mapping[str, float], batch: bool = False,
                 table: Mapping[str, Any] | None = None) -> None:
        table = table if table is not None else _load_table()
        region = table.get("aliases", {}).get(region, region)
        section = table["regions"].get(region) or table["regions"]["singapore"]
        self.region = region if region in table["regions"] else "singapore"
        self.currency = section["currency"]
        self.as_of = table.get("as_of")
        self._models = section["models"]
        self._cached_factor = table.get("cached_input_factor", 0.2)
        self._factor = table.get("batch_factor", 0.5) if batch else 1.0
        self._job_model = job_model
        self._overrides = dict(overrides)
        self._cache: dict[str, Price | None] = {}

    def price(self, model: str) -> Price | None:
        if model not in self._cache:
            self._cache[model] = self._lookup(model)
        return self._cache[model]

    def near_names(self, model: str) -> list[str]:
        """Listed models whose names are close to `model` (a typo's likely meaning), best first."""
        return difflib.get_close_matches(model, list(self._models), n=2, cutoff=0.8)

    def _lookup(self, model: str) -> Price | None:
        # Snapshots and aliases (qwen-plus-latest, qwen-plus-2025-07-28) take the longest listed prefix.
        names = sorted((n for n in self._models if model == n or model.startswith(n + "-")), key=len, reverse=True)
        row = dict(self._models[names[0]]) if names else {}
        if model == self._job_model:
            for key in OVERRIDE_KEYS:
                if key in self._overrides:
                    row[key.removeprefix("price_")] = self._overrides[key]
        if "input" not in row or "output" not in row:
            return None
        f = self._factor
        return Price(input=row["input"] * f, output=row["output"] * f,
                     cached_input=row.get("cached_input", row["input"] * self._cached_factor) * f,
                     thinking_output=row.get("thinking_output", row["output"]) * f,
                     max_output=row.get("max_output"), currency=self.currency)

    def row_cost(self, request: Request, usage: Usage) -> float | None:
        price = self.price(request.model)
        if price is None:
            return None
        thinking = bool(usage.reasoning_tokens) or request.params.get("enable_thinking") is True
        return price.cost(usage, thinking=thinking)

    def worst_case(self, request: Request) -> float:
        """An upper bound on what `request` can cost; NoPrice when the model has no price or output cap."""
        price = self.price(request.model)
        if price is None:
            raise NoPrice(f"no price for model {request.model!r} in {self.region}, so [run] max_cost cannot be "
                          "guaranteed", hint="set [model] price_input and price_output (per 1M tokens) for it")
        cap = request.params.get("max_completion_tokens") or request.params.get("max_tokens") or price.max_output
        if not cap:
            raise NoPrice(f"model {request.model!r} has no known output cap, so [run] max_cost cannot be guaranteed",
                          hint="set [model] max_tokens")
        output_price = max(price.output, price.thinking_output)
        answers = len(request.members) or 1  # a request with `n` pays for n answers
        return (input_token_bound(request.messages) * price.input + int(cap) * answers * output_price) / PER_TOKENS


def input_token_bound(messages: Iterable[Mapping[str, Any]]) -> int:
    total = TEMPLATE_TOKENS_PER_REQUEST
    for message in messages:
        total += TEMPLATE_TOKENS_PER_MESSAGE + len(json.dumps(message.get("content"), ensure_ascii=False).encode())
    return total


class CostBudget:
    """Spend plus outstanding reservations never pass `limit` (one event loop: check and add are atomic).

    A reservation that does not fit waits while requests in flight may settle below their worst case;
    it fails only when the spend alone leaves no room for it."""

    def __init__(self, limit: float, currency: str) -> None:
        self.limit = limit
        self.currency = currency
        self.spent = 0.0
        self.reserved = 0.0
        self._settled: anyio.Event | None = None

    async def reserve(self, amount: float) -> None:
        while self.spent + self.reserved + amount > self.limit and self.spent + amount <= self.limit:
            if self._settled is None:
                self._settled = anyio.Event()
            await self._settled.wait()
        if self.spent + amount > self.limit:
            raise BudgetReached(
                f"the budget is reached: spent {self.spent:.4f} {self.currency} of max_cost {self.limit:g} "
                f"(the next request could cost up to {amount:.4f})",
                hint="raise [run] max_cost or --max-cost and run the same command again to resume")
        self.reserved += amount

    def settle(self, reserved: float, actual: float | None) -> None:
        """Replace a reservation by the real cost (a request that failed costs nothing: actual None or 0)."""
        self.reserved = max(0.0, self.reserved - reserved)
        self.spent += actual or 0.0
        if self._settled is not None:
            self._settled.set()
            self._settled = None
