"""Prices, cost per row, the hard budget (never crossed, resumable), dry runs and the estimate."""

from __future__ import annotations

import json

import anyio
import pyarrow.parquet as pq
import pytest

from runner.cost import BudgetReached, CostBudget, PriceBook, input_token_bound
from runner.records import Request, Usage
from tests.helpers import make_job, read_output, run_cli, write_prompts

HI = ({"role": "user", "content": "hi"},)


def test_price_lookup_prefixes_regions_and_overrides():
    """Snapshots take their family's price; regions have their currency; overrides apply to the job's model only."""
    book = PriceBook("singapore", job_model="qwen-plus", overrides={"price_output": 2.0})
    assert book.currency == "USD" and book.price("qwen-max").input == 1.60
    assert book.price("qwen-flash-2025-07-28").output == 0.40
    assert book.price("qwen-plus").output == 2.0 and book.price("qwen-plus-latest").output == 1.20
    assert book.price("llama-9000") is None
    assert PriceBook("beijing", job_model="x", overrides={}).price("qwen-plus").input == 0.80
    assert PriceBook("beijing", job_model="x", overrides={}).currency == "CNY"
    assert PriceBook("virginia", job_model="x", overrides={}).currency == "USD"
    custom = PriceBook("singapore", job_model="my-model", overrides={"price_input": 1.0, "price_output": 3.0})
    assert custom.price("my-model").output == 3.0 and custom.price("my-model").cached_input == pytest.approx(0.2)
    assert PriceBook("singapore", job_model="x", overrides={}, batch=True).price("qwen-max").input == 0.80


@pytest.mark.parametrize("usage,params,expected", [
    (Usage(1_000_000, 1_000_000, 2_000_000), {}, 0.40 + 1.20),
    (Usage(1_000_000, 0, 1_000_000, cached_tokens=500_000), {}, 0.20 + 0.5 * 0.40 * 0.2),
    (Usage(0, 1_000_000, 1_000_000, reasoning_tokens=900_000), {}, 4.00),
    (Usage(0, 1_000_000, 1_000_000), {"enable_thinking": True}, 4.00),
    (Usage(None, None, None), {}, None),
], ids=["plain", "cached", "reasoning", "thinking-param", "no-usage"])
def test_cost_per_row_from_usage(usage, params, expected):
    """Input, cached input at 20%, output at the thinking price when the model thought."""
    book = PriceBook("singapore", job_model="qwen-plus", overrides={})
    request = Request(row_id=0, key="k", model="qwen-plus", messages=HI, params=params)
    cost = book.row_cost(request, usage)
    assert cost == (pytest.approx(expected) if expected is not None else None)


def test_worst_case_bounds_input_by_bytes_and_output_by_the_cap():
    """The worst case uses UTF-8 bytes for input and max_tokens (else the model's cap) at the higher output price."""
    book = PriceBook("singapore", job_model="qwen-plus", overrides={})
    with_cap = Request(row_id=0, key="k", model="qwen-plus", messages=HI, params={"max_tokens": 100})
    assert book.worst_case(with_cap) == pytest.approx((input_token_bound(HI) * 0.40 + 100 * 4.00) / 1e6)
    no_cap = Request(row_id=0, key="k", model="qwen-plus", messages=HI)
    assert book.worst_case(no_cap) == pytest.approx((input_token_bound(HI) * 0.40 + 32768 * 4.00) / 1e6)
    assert input_token_bound([{"content": "你好"}]) > 2 * 3  # CJK: 3 bytes a character, each at most a token


def test_budget_reservations_wait_for_settlements_and_never_cross():
    """Reservations that do not fit wait for settlements; one that the spend alone cannot fit raises."""
    async def scenario():
        budget = CostBudget(1.0, "USD")
        await budget.reserve(0.6)
        waiter_done = anyio.Event()

        async def second():
            await budget.reserve(0.6)  # 0.6 + 0.6 > 1.0: waits for the first to settle
            waiter_done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(second)
            await anyio.sleep(0)
            assert not waiter_done.is_set()
            budget.settle(0.6, 0.1)  # the first cost 0.1 in the end
            await waiter_done.wait()
        assert budget.spent == pytest.approx(0.1) and budget.reserved == pytest.approx(0.6)
        budget.settle(0.6, 0.5)
        with pytest.raises(BudgetReached, match="spent 0.6000 USD of max_cost 1"):
            await budget.reserve(0.5)

    anyio.run(scenario)


def _committed_cost(parts_dir) -> float:
    return sum(sum(c for c in pq.read_table(p, columns=["cost"]).column("cost").to_pylist() if c)
               for p in parts_dir.glob("part-*.parquet"))


def test_budget_is_never_crossed_at_concurrency_256_and_a_raised_budget_resumes(tmp_path, make_emulator):
    """With 256 requests in flight the spend stops at or under max_cost (exit 1, naming spend and budget);
    rerun with a higher budget finishes the job without resending the rows already paid for."""
    emu = make_emulator(latency_ms=20)
    write_prompts(tmp_path / "prompts.jsonl", 1500)
    job = make_job(tmp_path, emu, model={"max_tokens": 20}, run={"concurrency": 256, "part_seconds": 0.2})
    budget = 0.0035
    first = run_cli("run", str(job), "--max-cost", str(budget))
    assert first.code == 1, first.stderr
    assert "the budget is reached" in first.stderr and "max_cost 0.0035" in first.stderr
    parts = tmp_path / "out/result.parquet.parts"
    spent = _committed_cost(parts)
    assert 0.8 * budget < spent <= budget
    answered = emu.stats(keys=False)["by_status"]["200"]
    second = run_cli("run", str(job), "--max-cost", "1")
    assert second.code == 0, second.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    assert len(rows) == 1500 and all(r["status"] == "ok" and r["cost"] > 0 for r in rows)
    assert emu.stats()["succeeded_more_than_once"] == 0
    assert emu.stats(keys=False)["by_status"]["200"] == 1500 and answered < 1500
    summary = json.loads((tmp_path / "out/result.summary.json").read_text())
    assert summary["cost"]["spent"] == pytest.approx(sum(r["cost"] for r in rows)) and summary["cost"]["currency"] == "USD"


def test_dry_run_writes_bodies_and_sends_nothing(tmp_path, emulator):
    """--dry-run renders every request (no key) into <output>.requests.jsonl; the emulator sees no request."""
    write_prompts(tmp_path / "prompts.jsonl", 40)
    job = make_job(tmp_path, emulator, model={"temperature": 0.5})
    result = run_cli("run", str(job), "--dry-run", key="sk-secret-dry-run")
    assert result.code == 0, result.stderr
    lines = (tmp_path / "out/result.requests.jsonl").read_text().splitlines()
    assert len(lines) == 40
    first = json.loads(lines[0])
    assert first["body"]["model"] == "qwen-plus" and first["body"]["temperature"] == 0.5
    assert first["url"].endswith("/compatible-mode/v1/chat/completions") and "Authorization" not in first["headers"]
    assert "sk-secret-dry-run" not in "\n".join(lines) + result.stderr
    assert emulator.stats(keys=False)["requests"] == 0
    assert not (tmp_path / "out/result.parquet").exists()


def test_estimate_is_within_25_percent_of_actual_tokens_on_the_sample_job(tmp_path):
    """validate's tokenizer-free input estimate for the quickstart job is within 25% of what a run uses."""
    estimate = run_cli("validate", "jobs/quickstart.toml")
    estimated = int(estimate.stdout.split("tokens     ~")[1].split(" input")[0].replace(",", ""))
    assert "USD estimated" in estimate.stdout
    out = tmp_path / "q.parquet"
    assert run_cli("run", "jobs/quickstart.toml", "--emulator", "--output", str(out), key=None).code == 0
    actual = sum(r["input_tokens"] for r in read_output(out))
    assert abs(estimated - actual) <= 0.25 * actual
