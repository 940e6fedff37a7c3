"""Structured output ([output] json_schema): the schema's checks, the requests that ask for JSON, answers
validated and re-asked, the columns, the budget, reruns, batch mode, and the emulator's JSON answers.

End-to-end tests run the real CLI against the emulator over loopback. What the emulator will answer is
predicted from its own deterministic fault draw (FaultRates.pick on the row key and attempt), so the
expected row outcomes are computed, not written down.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runner.emulator.faults import FaultRates
from runner.emulator.instance import bad_answer, instance, quoted_schema
from runner.errors import SpecError
from runner.records import Request
from runner.spec import parse_job
from runner.structured import StructuredOutput, json_mode, load_schema, property_fields
from tests.helpers import make_job, read_output, run_cli, start_cli, wait_until, write_prompts

LABEL_SCHEMA = {
    "title": "ticket label",
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["billing", "bug", "other"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "urgent": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "priority": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["label", "confidence", "urgent"],
    "additionalProperties": False,
}
PRICE_IN, PRICE_OUT = 0.4, 1.2  # qwen-plus, singapore, per 1M tokens (runner/prices.json)


def write_schema(folder: Path, schema: dict | str = LABEL_SCHEMA, name: str = "label.json") -> str:
    (folder / "schemas").mkdir(exist_ok=True)
    (folder / "schemas" / name).write_text(schema if isinstance(schema, str) else json.dumps(schema))
    return f"schemas/{name}"


def output_of(folder: Path) -> dict:
    return {"path": "out/result.parquet", "json_schema": write_schema(folder), "parsed_columns": True}


def structured(schema: dict = LABEL_SCHEMA, reask_attempts: int = 2) -> StructuredOutput:
    text, name = load_schema(schema, base=Path("."))
    return StructuredOutput(text, name, reask_attempts)


# --- the schema and the job file ---------------------------------------------------------------

@pytest.mark.parametrize("model, mode", [
    ("qwen-plus", "json_schema"), ("qwen-plus-latest", "json_schema"), ("qwen-plus-2025-09-11", "json_schema"),
    ("qwen-plus-2025-04-28", "json_object"), ("qwen-flash", "json_schema"), ("qwen3-max", "json_schema"),
    ("qwen3-max-preview", "json_object"), ("qwen-max", "json_object"), ("qwen-turbo", "json_object"),
    ("qwen-plus-character", "json_object"),
])
def test_json_mode_table(model, mode):
    """json_schema goes to the listed families and their snapshots from the listed date; json_object to the rest."""
    assert json_mode(model) == mode


@pytest.mark.parametrize("content, expected", [
    ("schemas/missing.json", "schemas/missing.json: no such file"),
    ('{"type": ', "not valid JSON"),
    ('{"type": "objet"}', "not a valid JSON Schema: 'objet' is not valid under any of the given schemas (at type)"),
    ('{"type": "array", "items": {"type": "string"}}', 'the top level must be {"type": "object"'),
    ('{"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}}', "points outside the schema"),
])
def test_a_bad_schema_is_a_one_line_usage_error_naming_the_file(tmp_path, content, expected):
    """runner validate and runner run exit 2 with one error line naming the job, the key and the schema file."""
    write_prompts(tmp_path / "prompts.jsonl", 3)
    path = "schemas/missing.json" if content.endswith(".json") else write_schema(tmp_path, content, "bad.json")
    job = make_job(tmp_path, output={"path": "out/r.parquet", "json_schema": path})
    for command in ("validate", "run"):
        result = run_cli(command, str(job))
        assert result.code == 2, result.stderr
        error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and "Traceback" not in result.stderr
        assert f"[output] json_schema: {path}" in error[0] and expected in error[0]


def _job(output: dict, model: dict | None = None, keep: list[str] | None = None) -> dict:
    return {"input": {"path": "x.jsonl", "prompt_column": "p", "keep_columns": keep or []},
            "model": {"name": "qwen-plus", **(model or {})}, "output": {"path": "o.parquet", **output}}


@pytest.mark.parametrize("output, model, keep, expected", [
    ({"parsed_columns": True}, None, None, "[output] parsed_columns: needs [output] json_schema"),
    ({"json_schema": {"type": "object", "properties": {"status": {"type": "string"}}}, "parsed_columns": True},
     None, None, "property 'status' would be a column"),
    ({"json_schema": {"type": "object", "properties": {"topic": {"type": "string"}}}, "parsed_columns": True},
     None, ["topic"], "property 'topic' would be a column"),
    ({"json_schema": {"type": "object"}}, {"enable_thinking": True}, None, "[model] enable_thinking"),
    ({"json_schema": {"type": "object"}}, {"response_format": {"type": "text"}}, None, "[model] response_format"),
    ({"json_schema": 3}, None, None, "[output] json_schema: expected a path (a string) or an inline table"),
])
def test_structured_output_keys_are_checked(output, model, keep, expected):
    """parsed_columns needs a schema and clashes with no column; thinking and a text response_format are refused."""
    with pytest.raises(SpecError) as caught:
        parse_job(_job(output, model, keep))
    assert expected in caught.value.message


@pytest.mark.parametrize("value, expected", [(-1, "expected an integer from 0 to 10"), (11, "from 0 to 10"),
                                             (2.5, "expected an integer, got a number")])
def test_reask_attempts_is_bounded(value, expected):
    """[run] reask_attempts is an integer from 0 to 10 (the bounds table)."""
    with pytest.raises(SpecError, match=r"\[run\] reask_attempts: ") as caught:
        parse_job({**_job({"json_schema": {"type": "object"}}), "run": {"reask_attempts": value}})
    assert expected in caught.value.message


def test_inline_schema_and_output_override_keep_the_schema():
    """An inline table is a schema like a file's; --output replaces only the path."""
    spec = parse_job(_job({"json_schema": LABEL_SCHEMA, "parsed_columns": True}))
    assert json.loads(spec.output.json_schema) == LABEL_SCHEMA and spec.output.json_schema_name == "ticket_label"
    moved = spec.override(output="elsewhere/x.parquet")
    assert moved.output.json_schema == spec.output.json_schema and moved.output.parsed_columns
    assert moved.output.path.name == "x.parquet"


def test_property_columns_map_json_types_to_arrow():
    """string/integer/number/boolean, nullable types, enums, arrays of scalars, $refs; the rest is JSON text."""
    schema = {"type": "object", "$defs": {"n": {"type": "integer"}}, "properties": {
        "s": {"type": "string"}, "i": {"type": "integer"}, "f": {"type": ["number", "null"]}, "b": {"type": "boolean"},
        "e": {"enum": [1, 2]}, "tags": {"type": "array", "items": {"type": "string"}}, "ref": {"$ref": "#/$defs/n"},
        "obj": {"type": "object"}, "mixed": {"type": ["string", "integer"]}, "any": {"anyOf": [{"type": "string"}]},
        "nested": {"type": "array", "items": {"type": "object"}}}}
    types = {f.name: f.type for f in property_fields(schema)}
    assert types == {"s": pa.string(), "i": pa.int64(), "f": pa.float64(), "b": pa.bool_(), "e": pa.int64(),
                     "tags": pa.list_(pa.string()), "ref": pa.int64(), "obj": pa.string(), "mixed": pa.string(),
                     "any": pa.string(), "nested": pa.string()}


# --- requests and answers --------------------------------------------------------------------------

def _request(model: str, messages=({"role": "user", "content": "Classify: my invoice is wrong"},), params=None):
    return Request(row_id=0, key="k", model=model, messages=tuple(messages), params=params or {"max_tokens": 50})


def test_json_schema_models_get_the_schema_in_response_format_and_an_untouched_prompt():
    """qwen-plus: response_format json_schema (strict, named, the schema itself); the messages are unchanged."""
    request = _request("qwen-plus")
    decorated = structured().decorate(request)
    assert decorated.messages == request.messages and decorated.params["max_tokens"] == 50
    assert decorated.params["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "ticket_label", "strict": True, "schema": LABEL_SCHEMA}}


def test_json_object_models_get_the_schema_and_the_word_json_in_the_system_prompt():
    """qwen-max: json_object, and the schema is added to the system prompt (new or existing), which names JSON."""
    output = structured()
    alone = output.decorate(_request("qwen-max"))
    assert alone.params["response_format"] == {"type": "json_object"}
    assert alone.messages[0]["role"] == "system" and "JSON" in alone.messages[0]["content"]
    assert json.loads(alone.messages[0]["content"].split("Schema: ", 1)[1]) == LABEL_SCHEMA
    system = ({"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"})
    joined = output.decorate(_request("qwen-max", system))
    assert len(joined.messages) == 2 and joined.messages[0]["content"].startswith("You are terse.\n\nAnswer with")


def test_an_explicit_json_response_format_is_sent_as_given():
    """A JSON response_format from the job or a params column wins over the table (the way out when it is wrong)."""
    given = {"type": "json_object"}
    decorated = structured().decorate(_request("qwen-plus", params={"response_format": given}))
    assert decorated.params["response_format"] == given and "JSON" in decorated.messages[0]["content"]


@pytest.mark.parametrize("answer, parsed, error", [
    ('{"label": "bug", "confidence": 0.5, "urgent": true}', '{"label":"bug","confidence":0.5,"urgent":true}', None),
    ('```json\n{"label": "bug", "confidence": 1, "urgent": false}\n```', '{"label":"bug","confidence":1,"urgent":false}',
     None),
    ('Here it is: {"label": "bug", "confidence": 1, "urgent": false}', None, "not valid JSON (Expecting value"),
    ('{"label": "bug", "confidence": NaN, "urgent": false}', None, "not valid JSON (NaN is not JSON)"),
    ('{"label": "maybe", "urgent": "no"}', None,
     "not valid against the JSON Schema: |at $: 'confidence' is a required property|at $.label: 'maybe' is not one of"
     "|at $.urgent: 'no' is not of type 'boolean'"),
    ("", None, "an empty answer"),
])
def test_answers_are_checked_against_the_schema(answer, parsed, error):
    """Valid JSON (one whole-answer fence allowed) becomes compact text; anything else names what is wrong."""
    verdict = structured().check(answer)
    assert verdict.parsed == parsed
    if error is None:
        assert verdict.error is None
    else:  # the kind of problem first, then every schema error (in any order), each with its path
        first, *parts = error.split("|")
        assert verdict.error.startswith(first) and all(part in verdict.error for part in parts)


def test_a_reask_carries_the_answer_and_the_error_under_its_own_key():
    """The re-ask is the original messages, the rejected answer, then the error; its key is suffixed #reaskN."""
    request = structured().decorate(_request("qwen-plus"))
    reask = structured().reask(request, "{oops", "not valid JSON (x)", 2)
    assert reask.messages[:-2] == request.messages and reask.params == request.params
    assert reask.messages[-2] == {"role": "assistant", "content": "{oops"}
    assert reask.messages[-1]["role"] == "user" and "not valid JSON (x)" in reask.messages[-1]["content"]
    assert reask.key == "k#reask2" and reask.row_id == request.row_id


# --- the emulator's JSON -------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["my invoice is wrong", "", "x" * 500, "ünïcödé ✓"])
def test_emulator_instances_follow_the_schema(text):
    """The emulator's answer for a schema validates against it, whatever the prompt text."""
    schema = {"type": "object", "$defs": {"p": {"type": "integer", "minimum": 3, "exclusiveMaximum": 9,
                                                  "multipleOf": 2}},
              "properties": {**LABEL_SCHEMA["properties"], "p": {"$ref": "#/$defs/p"},
                             "short": {"type": "string", "minLength": 5, "maxLength": 6},
                             "pair": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 2, "uniqueItems": True},
                             "maybe": {"type": ["null", "number"], "exclusiveMinimum": 0, "maximum": 0.001},
                             "both": {"allOf": [{"properties": {"x": {"const": 1}}, "required": ["x"]},
                                                {"required": ["y"]}]}},
              "required": ["label", "p", "both"]}
    jsonschema.validate(instance(schema, text), schema)


def test_emulator_bad_answers_break_the_schema():
    """bad_json answers are never valid against the schema: not JSON, or JSON it rejects."""
    good = json.dumps(instance(LABEL_SCHEMA, "my invoice"))
    validator = jsonschema.Draft202012Validator(LABEL_SCHEMA)
    kinds = set()
    for unit in [i / 20 for i in range(20)]:
        bad = bad_answer(LABEL_SCHEMA, good, unit)
        try:
            value = json.loads(bad)
        except ValueError:
            kinds.add("not json")
            continue
        kinds.add("breaks the schema")
        assert not validator.is_valid(value)
    assert kinds == {"not json", "breaks the schema"}


def test_emulator_finds_the_schema_a_json_object_prompt_quotes():
    """In json_object mode the emulator answers to the schema the prompt quotes (as the runner's does)."""
    decorated = structured().decorate(_request("qwen-max"))
    texts = [m["content"] for m in decorated.messages]
    assert quoted_schema(list(decorated.messages), texts) == LABEL_SCHEMA


def test_emulator_refuses_json_object_without_the_word_json(emulator):
    """A json_object request whose messages never say "json" gets the real 400."""
    import httpx

    body = {"model": "qwen-max", "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_object"}}
    answer = httpx.post(emulator.openai_base_url + "/chat/completions", json=body,
                        headers={"Authorization": "Bearer sk-x"})
    assert answer.status_code == 400 and "must contain the word 'json'" in answer.json()["error"]["message"]


# --- end to end ----------------------------------------------------------------------------------

def expected_outcomes(rows: list[dict], rates: FaultRates, reask_attempts: int, seed: int = 0) -> dict[str, int]:
    """Per row key, how many answers the emulator's own draw says the row takes (a negative count: it never
    validates). A row's first request is drawn as (key, 1), its n-th re-ask as (key#reaskn, 1)."""
    outcomes = {}
    for row in rows:
        key, answers = row["id"], 0
        while answers <= reask_attempts:
            request_key = key if answers == 0 else f"{key}#reask{answers}"
            answers += 1
            if rates.pick(seed, request_key, 1) != "bad_json":
                break
        else:
            answers = -answers
        outcomes[key] = answers
    return outcomes


@pytest.mark.parametrize("dialect, stream", [("openai", False), ("openai", True), ("dashscope", False),
                                             ("dashscope", True)])
def test_invalid_answers_are_reasked_until_valid_or_invalid_output(tmp_path, make_emulator, dialect, stream):
    """20% invalid answers: ok rows hold valid `parsed` and typed columns; rows out of re-asks are
    InvalidOutput; re-asks show in attempts; tokens and cost are summed over every answer (both dialects,
    streamed or not)."""
    faults = {"bad_json": 0.2}
    emu = make_emulator(faults=faults, latency_ms=1)
    rows = write_prompts(tmp_path / "prompts.jsonl", 120)
    job = make_job(tmp_path, emu, dialect=dialect, model={"stream": stream}, run={"reask_attempts": 1},
                   output=output_of(tmp_path))
    result = run_cli("run", str(job), "--max-error-rate", "0.2")
    assert result.code == 0, result.stderr
    out = read_output(tmp_path / "out" / "result.parquet")
    expected = expected_outcomes(rows, FaultRates(faults), reask_attempts=1)
    assert any(n == 2 for n in expected.values()) and any(n < 0 for n in expected.values())  # the draw covers both

    validator = jsonschema.Draft202012Validator(LABEL_SCHEMA)
    for row in out:
        answers = expected[row["key"]]
        assert row["attempts"] == abs(answers)
        if answers > 0:
            assert row["status"] == "ok" and row["parse_error"] is None
            parsed = json.loads(row["parsed"])
            assert validator.is_valid(parsed)
            assert {name: row[name] for name in LABEL_SCHEMA["properties"]} == \
                {name: parsed.get(name) for name in LABEL_SCHEMA["properties"]}
        else:
            assert row["status"] == "error" and row["error_type"] == "InvalidOutput" and row["parsed"] is None
            assert row["parse_error"] and row["parse_error"] in row["error_message"] and row["response"]
            assert all(row[name] is None for name in LABEL_SCHEMA["properties"])
        # Every answer of the row is paid for, re-asks included.
        assert row["cost"] == pytest.approx((row["input_tokens"] * PRICE_IN + row["output_tokens"] * PRICE_OUT) / 1e6)

    stats = emu.stats()
    assert stats["requests"] == sum(r["attempts"] for r in out)
    assert stats["tokens_admitted"]["qwen-plus"] == sum(r["total_tokens"] for r in out)
    assert stats["succeeded_more_than_once"] == 0  # a re-ask is not a paid duplicate: it has its own key
    assert stats["by_stream"].get("stream" if stream else "plain") == stats["requests"]
    summary = json.loads((tmp_path / "out" / "result.summary.json").read_text())
    invalid = sum(n < 0 for n in expected.values())
    assert summary["failed"] == invalid and summary["requests_sent"] == stats["requests"]
    assert summary["errors"] == [{"error_type": "InvalidOutput", "error_code": "invalid_output", "http_status": None,
                                  "rows": invalid}]


def test_the_budget_counts_reasks(tmp_path, make_emulator):
    """--max-cost stops the run before re-asks push the recorded spend past it (they are reserved and settled)."""
    emu = make_emulator(faults={"bad_json": 0.5})
    write_prompts(tmp_path / "prompts.jsonl", 600)
    job = make_job(tmp_path, emu, model={"max_tokens": 64}, run={"concurrency": 2, "reask_attempts": 2},
                   output=output_of(tmp_path))
    max_cost = 0.004
    result = run_cli("run", str(job), "--max-cost", str(max_cost))
    assert result.code == 1 and "budget" in result.stderr, result.stderr
    parts = (tmp_path / "out" / "result.parquet.parts")
    rows = pa.concat_tables([pq.read_table(p) for p in sorted(parts.glob("part-*.parquet"))]).to_pylist()
    reasked = [r for r in rows if r["attempts"] > 1]
    assert len(rows) > 20 and len(reasked) > len(rows) // 4
    spent = sum(r["cost"] for r in rows)
    assert spent <= max_cost
    # Re-asks are a large share of what was spent: left out of the budget, the spend would cross it.
    first_answers = sum(r["cost"] / r["attempts"] for r in rows)
    assert spent - first_answers > max_cost - spent


def test_a_rerun_keeps_invalid_output_rows_unless_asked_for_all(tmp_path, make_emulator):
    """--retry-failed transient (the default) leaves InvalidOutput rows; --retry-failed all re-asks them afresh."""
    faults = {"bad_json": 0.3}
    emu = make_emulator(faults=faults)
    rows = write_prompts(tmp_path / "prompts.jsonl", 60)
    job = make_job(tmp_path, emu, run={"reask_attempts": 0}, output=output_of(tmp_path))
    assert run_cli("run", str(job), "--max-error-rate", "1").code == 0
    invalid = {k for k, n in expected_outcomes(rows, FaultRates(faults), 0).items() if n < 0}
    out = tmp_path / "out" / "result.parquet"
    assert {r["key"] for r in read_output(out) if r["status"] == "error"} == invalid and invalid
    sent = emu.stats(keys=False)["requests"]

    again = run_cli("run", str(job), "--retry-failed", "transient", "--max-error-rate", "1")
    assert again.code == 0, again.stderr
    assert emu.stats(keys=False)["requests"] == sent
    everything = run_cli("run", str(job), "--retry-failed", "all", "--max-error-rate", "1")
    assert everything.code == 0, everything.stderr
    keys = emu.stats()["keys"]
    assert {key for key, seen in keys.items() if seen["received"] == 2} == invalid
    assert emu.stats(keys=False)["requests"] == sent + len(invalid)


def test_batch_answers_that_do_not_validate_are_invalid_output(tmp_path, make_emulator):
    """Batch mode checks every answer; one that does not validate is InvalidOutput at once (no re-ask in a
    batch), with its answer, tokens and cost kept."""
    emu = make_emulator(batch_time_scale=100.0, batch_phase_seconds=50.0)
    # The emulator does not honour "pattern": its answer echoes the prompt, so only prompts that match pass.
    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}},
              "required": ["code"]}
    prompts = ["ABC", "hello there", "XYZ", "not a code"]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "prompt": p}) + "\n"
                                                    for i, p in enumerate(prompts)))
    job = make_job(tmp_path, emu, run={"mode": "batch", "batch_poll_seconds": 0.1},
                   output={"path": "out/result.parquet", "json_schema": write_schema(tmp_path, schema, "code.json"),
                           "parsed_columns": True})
    result = run_cli("run", str(job), "--max-error-rate", "1")
    assert result.code == 0, result.stderr
    out = read_output(tmp_path / "out" / "result.parquet")
    assert [r["mode"] for r in out] == ["batch"] * 4 and emu.stats(keys=False)["requests"] == 0
    assert [(r["status"], r["code"]) for r in out] == [("ok", "ABC"), ("error", None), ("ok", "XYZ"), ("error", None)]
    for row in out[1::2]:
        assert row["error_type"] == "InvalidOutput" and "does not match '^[A-Z]{3}$'" in row["parse_error"]
        assert row["response"] and row["attempts"] == 1 and row["cost"] > 0 and row["total_tokens"] > 0


def test_the_dry_run_shows_the_json_request(tmp_path):
    """runner run --dry-run writes the bodies as sent: response_format json_schema for qwen-plus."""
    write_prompts(tmp_path / "prompts.jsonl", 2)
    job = make_job(tmp_path, output=output_of(tmp_path))
    result = run_cli("run", str(job), "--dry-run")
    assert result.code == 0, result.stderr
    lines = (tmp_path / "out" / "result.requests.jsonl").read_text().splitlines()
    bodies = [json.loads(line)["body"] for line in lines]
    assert [b["response_format"]["json_schema"]["schema"] for b in bodies] == [LABEL_SCHEMA] * 2


def test_kill_9_and_resume_keep_parsed_values(tmp_path, make_emulator):
    """kill -9 before any part is committed: the rerun recovers the journal (parsed and parse_error
    included) and finishes with every row once, every ok row's parsed valid and its typed columns filled."""
    emu = make_emulator(faults={"bad_json": 0.2}, latency_ms=5)
    rows = write_prompts(tmp_path / "prompts.jsonl", 400)
    job = make_job(tmp_path, emu, run={"concurrency": 4, "part_rows": 100_000, "part_seconds": 3600},
                   output=output_of(tmp_path))
    proc = start_cli("run", str(job))
    wait_until(lambda: emu.stats(keys=False)["requests"] >= 100 or proc.poll() is not None, what="100 requests")
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.kill()
    proc.wait(timeout=30)
    parts = tmp_path / "out" / "result.parquet.parts"
    assert not list(parts.glob("part-*.parquet")) and list(parts.glob("journal-*.jsonl"))

    final = run_cli("run", str(job), "--max-error-rate", "0.1")
    assert final.code == 0, final.stderr
    assert "recovered from the journal" in final.stderr
    out = read_output(tmp_path / "out" / "result.parquet")
    assert [r["key"] for r in out] == [r["id"] for r in rows]
    validator = jsonschema.Draft202012Validator(LABEL_SCHEMA)
    for row in out:
        if row["status"] == "ok":
            parsed = json.loads(row["parsed"])
            assert validator.is_valid(parsed) and row["label"] == parsed["label"]
        else:
            assert row["error_type"] == "InvalidOutput" and row["parse_error"]
