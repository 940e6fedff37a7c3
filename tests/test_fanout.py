"""Fan-out (issue 16): models x prompt variants x samples from one job file, expanded lazily, each output row
once and in the documented order, resumable, the same in batch mode, with per-model reports and gates."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from runner.clients import openai_compat
from runner.errors import BadResponse, SpecError
from runner.fanout import pending, provider_n_rule
from runner.sink import DoneRows
from runner.sources import open_source
from runner.spec import parse_job
from tests.helpers import TEST_KEY, run_cli, start_cli, to_toml, wait_until, write_prompts

MODELS = ["qwen-plus", "qwen-max", "qwen-flash"]
VARIANTS = [{"name": "plain"}, {"name": "terse", "system_prompt": "Answer in one word."}]
FAST = {"concurrency": 8, "max_attempts": 10, "backoff_initial": 0.005, "backoff_max": 0.05, "part_rows": 200,
        "adaptive_rate": False, "cooldown_seconds": 0.0}
# What differs between two runs of the same job by design: ids, times, how the row was sent, its price.
IGNORED = {"request_id", "started_at", "finished_at", "latency_ms", "duration_ms", "time_to_first_token_ms", "mode",
           "cost"}
# Where one request answers several samples (n) online, its usage and attempts are on its first row only.
PER_REQUEST = {"input_tokens", "output_tokens", "total_tokens", "cached_tokens", "reasoning_tokens", "attempts"}


def fanout_job(tmp_path: Path, emu, *, name: str = "job", model: dict | None = None, input: dict | None = None,
               run: dict | None = None, output: str = "out/result.parquet") -> Path:
    sections = {
        "input": {"path": "prompts.jsonl", "id_column": "id", "prompt_column": "prompt", "variants": VARIANTS,
                  **(input or {})},
        "endpoint": {"dialect": "openai", "base_url": emu.openai_base_url} if emu is not None else {},
        "model": {"names": MODELS, "samples": 2, **(model or {})},
        "run": {**FAST, **(run or {})},
        "output": {"path": output},
    }
    path = tmp_path / f"{name}.toml"
    path.write_text(to_toml(sections), encoding="utf-8")
    return path


def expected_identity(row_id: int) -> tuple[str, str, str, int]:
    """(key, model, variant, sample) of output row `row_id` for 3 models x 2 variants x 2 samples: input rows
    in order, then models in the order listed, then variants, then samples."""
    row, rest = divmod(row_id, 12)
    return f"row-{row:05d}", MODELS[rest // 4], VARIANTS[(rest % 4) // 2]["name"], rest % 2


def identities(table: list[dict]) -> list[tuple]:
    return [(r["key"], r["model"], r["variant"], r["sample_index"]) for r in table]


def test_expansion_order_row_ids_and_model_column_wins(tmp_path):
    """Each input row expands to models x variants x samples in the documented order with dense row ids; a row
    naming its own model (model_column) is sent to that model alone, not multiplied by [model] names."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "a", "prompt": "one"}, {"id": "b", "prompt": "two", "m": "qwen-turbo"}, {"id": "c", "prompt": "three"}]))
    spec = parse_job({"input": {"path": str(path), "id_column": "id", "prompt_column": "prompt", "model_column": "m",
                                "variants": VARIANTS},
                      "model": {"names": ["qwen-max", "qwen-flash"], "samples": 2},
                      "output": {"path": str(tmp_path / "o.parquet")}})
    source = open_source(spec.input, spec.model, provider_n=provider_n_rule(spec))
    assert source.total is None  # unknown until read: a row may name its own model
    rows = [(r.row_id, r.key, r.model, r.variant, r.sample_index, r.params.get("seed")) for r in source]
    a = [(m, v, s) for m in ("qwen-max", "qwen-flash") for v in ("plain", "terse") for s in (0, 1)]
    expected = [("a", *x) for x in a] + [("b", "qwen-turbo", v, s) for v in ("plain", "terse") for s in (0, 1)] + \
        [("c", *x) for x in a]
    assert [r[1:5] for r in rows] == expected
    assert [r[0] for r in rows] == list(range(len(expected)))
    assert [r[5] for r in rows[:4]] == [0, 1, 0, 1]  # samples sent one by one: seed + sample_index
    terse = next(r for r in open_source(spec.input, spec.model) if r.variant == "terse")
    assert terse.messages[0] == {"role": "system", "content": "Answer in one word."}


def test_samples_share_one_request_with_n_only_where_the_api_allows(tmp_path):
    """qwen-plus in compatible mode gets one request with n for its samples; qwen-max, the native dialect, batch
    mode and thinking requests get one request per sample."""
    write_prompts(tmp_path / "prompts.jsonl", 2)

    def requests(**changes):
        raw = {"input": {"path": str(tmp_path / "prompts.jsonl"), "prompt_column": "prompt"},
               "model": {"names": ["qwen-plus", "qwen-max"], "samples": 3}, "output": {"path": "o.parquet"}}
        for section, body in changes.items():
            raw[section] = {**raw.get(section, {}), **body}
        spec = parse_job(raw, source=tmp_path / "j.toml")
        return [(r.model, len(r.members), r.params.get("n")) for r in
                open_source(spec.input, spec.model, provider_n=provider_n_rule(spec))]

    online = requests()
    assert online.count(("qwen-plus", 3, 3)) == 2 and online.count(("qwen-max", 0, None)) == 6
    assert all(n is None for _, _, n in requests(endpoint={"dialect": "dashscope"}))
    assert all(n is None for _, _, n in requests(run={"mode": "batch"}))
    assert all(n is None for _, _, n in requests(model={"enable_thinking": True}))


def test_pending_sends_only_the_samples_not_done():
    """A resumed request with n asks only for its missing samples (so done ones are not paid again)."""
    from runner.fanout import grouped
    from runner.records import Request

    rows = [Request(row_id=10 + s, key="k", model="qwen-plus", params={"seed": s}, sample_index=s) for s in range(3)]
    request = grouped(rows)
    assert request.params["n"] == 3
    done = DoneRows()
    done.add(11, rows[1].digest())
    left, changed = pending(request, done)
    assert [m.row_id for m in left.members] == [10, 12] and left.params["n"] == 2 and changed == 0
    done.add(10, rows[0].digest())
    left, _ = pending(request, done)
    assert left is rows[2]  # one row left: a plain request without n
    done.add(12, 12345)  # answered for another request: sent again, counted as changed
    left, changed = pending(request, done)
    assert left is rows[2] and changed == 1
    done.add(12, rows[2].digest())
    assert pending(request, done) == (None, 0)


def test_client_parses_every_choice_in_index_order():
    """An answer with several choices keeps each (by `index`); a choice without a message is a BadResponse."""
    body = {"choices": [{"index": 1, "message": {"content": "b"}, "finish_reason": "stop"},
                        {"index": 0, "message": {"content": "a"}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
    completion = openai_compat.parse_success(json.dumps(body).encode(), {})
    assert [(c.content, c.finish_reason) for c in completion.all_choices] == [("a", "length"), ("b", "stop")]
    body["choices"][1]["message"] = None
    with pytest.raises(BadResponse):
        openai_compat.parse_success(json.dumps(body).encode(), {})


@pytest.mark.parametrize("model, message", [
    ({"name": "qwen-plus", "names": ["qwen-max"]}, "set name or names, not both"),
    ({"names": []}, "at least one model name"),
    ({"names": ["qwen-max", "qwen-max"]}, "lists a model twice"),
    ({"name": "qwen-max", "extra": {"n": 3}}, "[model] extra.n: n is not passed through"),
    ({"names": ["qwen-max"], "params": {"qwen-plus": {"temperature": 0}}}, "not one of the job's models"),
    ({"names": ["qwen-max"], "params": {"qwen-max": {"n": 2}}}, "n is not passed through"),
    ({"name": "qwen-max", "samples": 0}, "[model] samples: expected an integer from 1 to 100"),
])
def test_fanout_keys_are_checked(model, message):
    """Each wrong fan-out key is a one-line SpecError naming the key."""
    with pytest.raises(SpecError) as caught:
        parse_job({"input": {"path": "x.jsonl", "prompt_column": "p"}, "model": model, "output": {"path": "o"}})
    assert message in caught.value.message and "\n" not in caught.value.message


@pytest.mark.parametrize("variants, message", [
    ([{"system_prompt": "x"}], "variants[0].name: missing"),
    ([{"name": "a"}, {"name": "a"}], "names must be unique"),
    ([{"name": "a", "shots": 3}], "variants[0].shots: unknown key"),
    ([{"name": "a", "messages": [{"role": "robot", "content": "x"}]}], "variants[0].messages[0]"),
])
def test_variant_tables_are_checked(variants, message):
    """A variant without a name, a repeated name, an unknown key or a bad message prefix is a SpecError."""
    with pytest.raises(SpecError) as caught:
        parse_job({"input": {"path": "x.jsonl", "prompt_column": "p", "variants": variants},
                   "model": {"name": "qwen-max"}, "output": {"path": "o"}})
    assert message in caught.value.message


def test_name_and_names_together_exit_2(tmp_path):
    """`runner validate` with both [model] name and names exits 2 with a one-line error."""
    job = tmp_path / "job.toml"
    job.write_text(to_toml({"input": {"path": "p.jsonl", "prompt_column": "prompt"},
                            "model": {"name": "qwen-plus", "names": ["qwen-max"]}, "output": {"path": "o.parquet"}}))
    result = run_cli("validate", str(job))
    assert result.code == 2 and "error:" in result.stderr and "set name or names, not both" in result.stderr
    assert "Traceback" not in result.stderr


def test_samples_with_n_cost_one_request_per_row(tmp_path, make_emulator):
    """samples = 3 on qwen-plus: one request per input row, three ok rows each; the request's usage is on its
    first row, so the table's tokens are exactly what the emulator counted."""
    emu = make_emulator()
    write_prompts(tmp_path / "prompts.jsonl", 20)
    job = fanout_job(tmp_path, emu, model={"names": ["qwen-plus"], "samples": 3}, input={"variants": []})
    result = run_cli("run", str(job), "--quiet")
    assert result.code == 0, result.stderr
    stats = emu.stats(keys=False)
    assert stats["requests"] == 20
    table = pq.read_table(tmp_path / "out" / "result.parquet").to_pylist()
    assert len(table) == 60 and {r["status"] for r in table} == {"ok"}
    assert [r["sample_index"] for r in table] == [0, 1, 2] * 20
    assert all(r["response"] == f"Echo: Question number {i // 3}: what is {i // 3} squared?"
               for i, r in enumerate(table))
    assert sum(r["total_tokens"] or 0 for r in table) == stats["tokens_admitted"]["qwen-plus"]
    assert sum(r["attempts"] for r in table) == 20 and all(r["total_tokens"] is None for r in table[1::3])
    summary = json.loads((tmp_path / "out" / "result.summary.json").read_text())
    assert summary["requests_sent"] == 20 and summary["rows"] == 60


def test_params_column_n_is_an_invalid_row(tmp_path, make_emulator):
    """n in a row's params column is refused for that row (InvalidRow), never sent and dropped."""
    emu = make_emulator()
    write_prompts(tmp_path / "prompts.jsonl", 3, extra={"params": {"n": 2}})
    job = fanout_job(tmp_path, emu, model={"names": ["qwen-max"], "samples": 1},
                     input={"variants": [], "params_column": "params"}, run={"max_error_rate": 1.0})
    assert run_cli("run", str(job), "--quiet").code == 0
    table = pq.read_table(tmp_path / "out" / "result.parquet").to_pylist()
    assert {r["error_type"] for r in table} == {"InvalidRow"} and "set [model] samples" in table[0]["error_message"]
    assert emu.stats(keys=False)["requests"] == 0


def test_1200_rows_each_once_in_order_after_sigkill_and_rerun(tmp_path, make_emulator):
    """100 rows x 3 models x 2 variants x 2 samples: killed mid-run and rerun, every (row, model, variant,
    sample) is in the output once and in the documented order, and no answer was paid twice beyond the
    requests in flight at the kill."""
    emu = make_emulator(latency_ms=3.0, latency_jitter_ms=2.0)
    write_prompts(tmp_path / "prompts.jsonl", 100)
    job = fanout_job(tmp_path, emu)
    out = tmp_path / "out" / "result.parquet"
    proc = start_cli("run", str(job), "--quiet")
    try:
        wait_until(lambda: emu.stats(keys=False)["by_status"].get("200", 0) >= 250, 60, "a quarter of the answers")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert not out.exists()
    rerun = run_cli("run", str(job), "--quiet")
    assert rerun.code == 0, rerun.stderr
    table = pq.read_table(out).to_pylist()
    assert len(table) == 1200 and {r["status"] for r in table} == {"ok"}
    assert [r["row_id"] for r in table] == list(range(1200))
    resumed = json.loads((tmp_path / "out" / "result.summary.json").read_text())["this_run"]
    assert 0 < resumed["rows"] < 1200  # the rerun sent only what the killed run had not committed
    assert identities(table) == [expected_identity(i) for i in range(1200)]
    # qwen-plus answers its 2 samples with one request (n = 2): 200 requests for its 400 rows, 400 each for
    # the other two models; a kill loses at most the answers in flight (one a worker).
    stats = emu.stats()
    needed = 200 + 400 + 400
    assert needed <= stats["by_status"]["200"] <= needed + FAST["concurrency"]
    assert stats["succeeded_more_than_once"] <= FAST["concurrency"]


@pytest.mark.slow
def test_batch_mode_gives_the_online_table(tmp_path, make_emulator):
    """The same fanned-out job in batch mode (one batch file per model) gives the online run's table; only the
    usage and attempts of samples that shared a request online (n) are spread differently."""
    write_prompts(tmp_path / "prompts.jsonl", 100)
    online = fanout_job(tmp_path, make_emulator(), name="online", output="out/online.parquet")
    assert run_cli("run", str(online), "--quiet").code == 0
    emu = make_emulator(batch_time_scale=100.0, batch_phase_seconds=50.0)
    batch = fanout_job(tmp_path, emu, name="batch", run={"mode": "batch", "batch_poll_seconds": 0.1},
                       output="out/batch.parquet")
    result = run_cli("run", str(batch), "--quiet")
    assert result.code == 0, result.stderr
    assert emu.stats(keys=False)["batches"]["created"] == 3 and emu.stats(keys=False)["requests"] == 0
    online_rows = pq.read_table(tmp_path / "out" / "online.parquet").to_pylist()
    batch_rows = pq.read_table(tmp_path / "out" / "batch.parquet").to_pylist()
    assert len(online_rows) == len(batch_rows) == 1200
    for mine, theirs in zip(online_rows, batch_rows):
        ignored = IGNORED | (PER_REQUEST if mine["model"] == "qwen-plus" else set())
        assert {k: v for k, v in mine.items() if k not in ignored} == \
            {k: v for k, v in theirs.items() if k not in ignored}
    assert {r["mode"] for r in batch_rows} == {"batch"}


def test_error_rate_gate_is_per_model_and_names_the_model(tmp_path, make_emulator):
    """One model failing every row (qwq-plus answers only streamed requests, and the job turns streaming
    off) fails --max-error-rate 0.5 though the run as a whole is at 33%; the message names that model, and
    the summary reports each model and variant."""
    emu = make_emulator()
    write_prompts(tmp_path / "prompts.jsonl", 10)
    job = fanout_job(tmp_path, emu, model={"names": ["qwen-plus", "qwen-max", "qwq-plus"], "samples": 1,
                                           "stream": False, "stream_only_models": []},
                     run={"max_error_rate": 0.5})
    result = run_cli("run", str(job))
    assert result.code == 3, result.stderr
    assert "error: model qwq-plus: 20 of 20 rows failed (100.00%)" in result.stderr
    assert "model qwen-plus" not in result.stderr.replace("model      qwen-plus", "")
    assert "variant    terse: 30 rows  ok 20  failed 10" in result.stderr
    summary = json.loads((tmp_path / "out" / "result.summary.json").read_text())
    assert summary["models"]["qwq-plus"]["failed"] == 20 and summary["models"]["qwen-max"]["failed"] == 0
    assert set(summary["models"]["qwen-max"]["latency_ms"]) == {"p50", "p90", "p99"}
    assert summary["variants"]["plain"]["rows"] == 30
    text = run_cli("summary", str(tmp_path / "out" / "result.parquet"))
    assert "variant    plain: 30 rows" in text.stdout + text.stderr


def test_validate_prints_the_expanded_rows_and_their_cost(tmp_path):
    """validate shows input rows x models x variants x samples, the requests they take and the cost of all."""
    write_prompts(tmp_path / "prompts.jsonl", 10)
    job = fanout_job(tmp_path, None)
    result = run_cli("validate", str(job))
    assert result.code == 0, result.stderr
    assert ("fan-out    10 input rows x 3 model(s) x 2 variant(s) x 2 sample(s) = 120 output rows in 100 requests"
            in result.stdout)
    assert "qwen-plus (40), qwen-max (40), qwen-flash (40)" in result.stdout
    assert "USD estimated" in result.stdout


def test_validate_names_the_model_a_typo_probably_meant(tmp_path):
    """A model in [model] names that the price table does not list but one it lists is close to: validate
    asks whether that one was meant; a model far from every listed name gets only the no-price warning."""
    write_prompts(tmp_path / "prompts.jsonl", 5)
    job = fanout_job(tmp_path, None, model={"names": ["qwen-plus", "qwen-plux", "my-own-model"], "samples": 1})
    result = run_cli("validate", str(job))
    assert result.code == 0, result.stderr
    assert "model 'qwen-plux' is not in the price table: did you mean 'qwen-plus'?" in result.stdout
    assert "no price for my-own-model, qwen-plux" in result.stdout
    assert "'my-own-model' is not in the price table" not in result.stdout

def test_emulator_answers_n_choices_and_counts_their_tokens(emulator):
    """The emulator answers n = 3 with three choices and usage for all of them; n = 5 is a 400."""
    url = emulator.openai_base_url + "/chat/completions"
    headers = {"Authorization": f"Bearer {TEST_KEY}"}
    body = {"model": "qwen-plus", "messages": [{"role": "user", "content": "hello"}]}
    one = httpx.post(url, json=body, headers=headers).json()
    three = httpx.post(url, json={**body, "n": 3}, headers=headers).json()
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    assert three["usage"]["completion_tokens"] == 3 * one["usage"]["completion_tokens"]
    assert three["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
    assert httpx.post(url, json={**body, "n": 5}, headers=headers).status_code == 400


def test_samples_with_a_json_schema_are_checked_and_reasked_one_by_one(tmp_path, make_emulator):
    """Fan-out with [output] json_schema: qwen-plus samples are separate requests (no `n`: each answer is checked
    on its own), every (row, model, variant, sample) is once, every ok row's `parsed` validates, and the
    requests the emulator saw are the rows plus the re-asks counted in `attempts`."""
    import jsonschema

    schema = json.loads(Path("jobs/schemas/qa_pair.json").read_text())
    (tmp_path / "qa.json").write_text(json.dumps(schema))
    emu = make_emulator(faults={"bad_json": 0.3})
    write_prompts(tmp_path / "prompts.jsonl", 15)
    job = fanout_job(tmp_path, emu, model={"names": ["qwen-plus", "qwen-max"], "samples": 2})
    job.write_text(job.read_text().replace('[output]\npath = "out/result.parquet"',
                                           '[output]\npath = "out/result.parquet"\njson_schema = "qa.json"'))
    assert 'json_schema = "qa.json"' in job.read_text()
    result = run_cli("run", str(job), "--quiet", "--max-error-rate", "1")
    assert result.code == 0, result.stderr
    table = pq.read_table(tmp_path / "out" / "result.parquet").to_pylist()
    assert len(table) == 15 * 2 * 2 * 2
    assert len(set(identities(table))) == len(table)
    ok = [r for r in table if r["status"] == "ok"]
    invalid = [r for r in table if r["error_type"] == "InvalidOutput"]
    assert ok and invalid and len(ok) + len(invalid) == len(table)
    for row in ok:
        jsonschema.validate(json.loads(row["parsed"]), schema)
    assert any(r["attempts"] > 1 for r in ok)  # some rows validated only after a re-ask
    assert all(r["attempts"] == 3 for r in invalid)  # reask_attempts = 2: three answers, none valid
    assert emu.stats(keys=False)["requests"] == sum(r["attempts"] for r in table)
