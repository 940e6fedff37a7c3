"""Job files -> JobSpec, and input rows -> Requests."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runner.endpoints import ApiKey, chat_url, resolve_api_key
from runner.errors import SourceError, SpecError
from runner.sources import open_source
from runner.spec import parse_job

BASE = {"input": {"path": "in.jsonl", "prompt_column": "prompt"}, "model": {"name": "qwen-plus"},
        "output": {"path": "out/x"}}


def _spec(tmp_path: Path, **sections):
    raw = {k: dict(v) for k, v in BASE.items()}
    for name, body in sections.items():
        raw.setdefault(name, {}).update(body)
        raw[name] = {k: v for k, v in raw[name].items() if v is not None}  # None: leave the key out
    return parse_job(raw, source=tmp_path / "jobs" / "j.toml")


def test_paths_are_relative_to_the_job_file(tmp_path):
    """Input and output paths resolve against the job's folder; .parquet is added to the output name."""
    spec = _spec(tmp_path, input={"path": "../data/in.jsonl"})
    assert spec.input.path == tmp_path / "data" / "in.jsonl"
    assert spec.output.path == tmp_path / "jobs" / "out" / "x.parquet"
    assert spec.output.summary_path.name == "x.summary.json"


def test_defaults_and_model_params(tmp_path):
    """Defaults fill what is not given; generation parameters and extra fields are kept as given."""
    spec = _spec(tmp_path, model={"temperature": 0.1, "stop": ["\n"], "extra": {"top_k": 5, "foo": True}})
    assert spec.run.concurrency == 64 and spec.endpoint.dialect == "openai"
    assert dict(spec.model.params) == {"temperature": 0.1, "stop": ["\n"], "top_k": 5, "foo": True}
    assert chat_url(spec.endpoint) == "https://dashscope-intl.aliyuncs.com/compatible-mode/v1/chat/completions"


@pytest.mark.parametrize("endpoint,url", [
    ({"dialect": "dashscope", "region": "beijing"},
     "https://dashscope.aliyuncs.com/api/v1/services/aigc/text-generation/generation"),
    ({"region": "virginia"}, "https://dashscope-us.aliyuncs.com/compatible-mode/v1/chat/completions"),
    ({"region": "frankfurt", "workspace": "ws1"},
     "https://ws1.eu-central-1.maas.aliyuncs.com/compatible-mode/v1/chat/completions"),
    ({"base_url": "http://127.0.0.1:8000/compatible-mode/v1/"},
     "http://127.0.0.1:8000/compatible-mode/v1/chat/completions"),
])
def test_region_and_base_url(tmp_path, endpoint, url):
    """Regions map to the documented hosts; base_url is taken as the SDKs take it."""
    assert chat_url(_spec(tmp_path, endpoint=endpoint).endpoint) == url


@pytest.mark.parametrize("sections,message", [
    ({"input": {"template": "{a}"}}, "exactly one of prompt_column, messages_column or template"),
    ({"input": {"prompt_column": None, "template": "x {a.b}"}}, "not a plain column name"),
    ({"input": {"keep_columns": ["status"]}}, "also an output column name"),
    ({"endpoint": {"region": "frankfurt"}}, "no shared host"),
    ({"run": {"max_error_rate": 2}}, "from 0 to 1"),
    ({"extra": {"x": 1}}, "unknown section [extra]"),
])
def test_invalid_specs(tmp_path, sections, message):
    """Contradictory or malformed jobs are SpecErrors saying what is wrong."""
    raw = {k: dict(v) for k, v in BASE.items()}
    for name, body in sections.items():
        raw.setdefault(name, {}).update(body)
        raw[name] = {k: v for k, v in raw[name].items() if v is not None}
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace(".", r"\.")):
        parse_job(raw, source=tmp_path / "j.toml")


def test_overrides_change_only_what_is_given(tmp_path):
    """CLI overrides replace given values; None means not given."""
    spec = _spec(tmp_path, run={"concurrency": 8})
    same = spec.override(concurrency=None, model=None)
    assert same == spec
    changed = spec.override(concurrency=3, model="qwen-max", base_url="http://127.0.0.1:1/api/v1")
    assert changed.run.concurrency == 3 and changed.model.name == "qwen-max"
    assert changed.endpoint.base_url == "http://127.0.0.1:1/api/v1" and changed.run.max_attempts == spec.run.max_attempts


def test_api_key_is_masked_and_read_from_env_or_file(tmp_path):
    """The key never shows in repr/str/format and comes from the named variable, then the key file."""
    spec = _spec(tmp_path, endpoint={"api_key_env": "K"})
    key = resolve_api_key(spec.endpoint, {"K": "sk-secret-1"})
    assert key.reveal() == "sk-secret-1" and "sk-secret" not in f"{key} {key!r} {str(key)}"
    with pytest.raises(SpecError, match="K is not set"):
        resolve_api_key(spec.endpoint, {})
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "key").write_text("sk-file\n")
    spec = _spec(tmp_path, endpoint={"api_key_env": "K", "api_key_file": "key"})
    assert resolve_api_key(spec.endpoint, {}).reveal() == "sk-file"
    assert isinstance(key, ApiKey)


def _requests(tmp_path, name: str, rows, **input_keys):
    path = tmp_path / "jobs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        data = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()
        path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    spec = _spec(tmp_path, input={"path": name, **input_keys})
    source = open_source(spec.input, spec.model, limit=spec.run.limit)
    return source, list(source)


def test_gzip_jsonl_with_system_prompt(tmp_path):
    """.jsonl.gz is read; the system prompt comes first; the id column is the key."""
    _, reqs = _requests(tmp_path, "in.jsonl.gz", [{"id": 5, "prompt": "a"}, {"id": "x", "prompt": "b"}],
                        id_column="id", system_prompt="Be brief.")
    assert [r.key for r in reqs] == ["5", "x"]
    assert reqs[0].messages == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"})


def test_messages_column_from_parquet(tmp_path):
    """A list<struct<role, content>> column becomes the messages; bad messages become row problems."""
    rows = [{"m": [{"role": "user", "content": "hi"}]}, {"m": [{"role": "robot", "content": "x"}]}, {"m": []}]
    source, reqs = _requests(tmp_path, "in.parquet", rows, prompt_column=None, messages_column="m")
    assert source.total == 3
    assert reqs[0].messages == ({"role": "user", "content": "hi"},) and reqs[0].problem is None
    assert "row 1" in reqs[1].problem and "role" in reqs[1].problem
    assert "row 2" in reqs[2].problem and "non-empty list" in reqs[2].problem


def test_template_rows(tmp_path):
    """Template placeholders are filled per row; a null value is a problem naming the column."""
    _, reqs = _requests(tmp_path, "in.jsonl", [{"a": "x", "b": 2}, {"a": None, "b": 1}],
                        prompt_column=None, template="{a} and {b} {{literal}}")
    assert reqs[0].messages[-1]["content"] == "x and 2 {literal}"
    assert "line 2" in reqs[1].problem and "'a'" in reqs[1].problem


def test_limit_and_blank_lines(tmp_path):
    """Blank lines are not rows; --limit stops after N rows and bounds the total."""
    source, reqs = _requests(tmp_path, "in.jsonl", [{"prompt": "a"}, "", {"prompt": "b"}, {"prompt": "c"}])
    assert source.total == 3 and [r.row_id for r in reqs] == [0, 1, 2]
    spec = _spec(tmp_path, run={"limit": 2})
    limited = open_source(spec.input, spec.model, limit=2)
    assert limited.total == 2 and len(list(limited)) == 2


def test_unsupported_format(tmp_path):
    """An input of no supported format is a SourceError naming the accepted formats."""
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "in.xlsx").write_text("a,b\n")
    spec = _spec(tmp_path, input={"path": "in.xlsx"})
    with pytest.raises(SourceError, match=r"expected .jsonl, .csv, .tsv, .json \(each also .gz\) or .parquet"):
        open_source(spec.input, spec.model)


def test_corrupt_parquet(tmp_path):
    """A file that is not Parquet is a SourceError, not a traceback."""
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "in.parquet").write_bytes(b"not parquet at all")
    spec = _spec(tmp_path, input={"path": "in.parquet"})
    with pytest.raises(SourceError, match="not a readable Parquet file"):
        open_source(spec.input, spec.model)


def test_every_numeric_key_has_a_bound_and_flags_share_them():
    """Every integer or number key of the job file (generation parameters aside) has a range in BOUNDS, and every
    flag that overrides one is checked against the same entry."""
    from runner.spec_keys import BOUNDS, FLAG_KEYS, INT, MODEL_PARAMS, NUM, SECTIONS

    numeric = {(section, key) for section, keys in SECTIONS.items() for key, kind in keys.items()
               if kind in (INT, NUM) and key not in MODEL_PARAMS}
    assert numeric - set(BOUNDS) == set()
    assert {("run", key) for key in FLAG_KEYS} <= set(BOUNDS)


@pytest.mark.parametrize("key,value", [("concurrency", 10_001), ("rpm", float("nan")), ("max_attempts", 0),
                                       ("max_error_rate", 1.5), ("limit", -3)])
def test_file_and_flag_refuse_the_same_values(tmp_path, key, value):
    """The job file and the flag that overrides a key refuse the same out-of-range value with the same words."""
    with pytest.raises(SpecError) as from_file:
        _spec(tmp_path, run={key: value})
    with pytest.raises(SpecError) as from_flag:
        _spec(tmp_path).override(**{key: value})
    expected = from_flag.value.message.split(": ", 1)[1].rsplit(", got", 1)[0]
    assert expected.startswith("expected") and expected in from_file.value.message


@pytest.mark.parametrize("sections,message", [
    ({"input": {"system_prompt": "be \ud800 brief"}}, r"\[input\] system_prompt: not valid UTF-8 text \(character 3: '\\ud800'\)"),
    ({"model": {"stop": ["ok", "\udcff"]}}, r"\[model\] stop\[1\]: not valid UTF-8 text"),
    ({"model": {"extra": {"a": {"b": float("inf")}}}}, r"\[model\] extra\.a\.b: expected a finite number, got inf"),
    ({"model": {"temperature": float("nan")}}, r"\[model\] temperature: expected a finite number, got nan"),
])
def test_job_given_as_a_dict_refuses_unsendable_values(tmp_path, sections, message):
    """A job built in Python (not read from TOML, which cannot hold them) refuses lone surrogates and nan/inf anywhere."""
    with pytest.raises(SpecError, match=message):
        _spec(tmp_path, **sections)


def test_flag_text_that_is_not_utf8_is_refused(tmp_path):
    """A --model or --base-url with an undecodable byte (a lone surrogate once Python decodes argv) is a SpecError."""
    with pytest.raises(SpecError, match=r"--model: not valid UTF-8 text \(character 4: '\\udcff'\)"):
        _spec(tmp_path).override(model="qwen\udcff")
    with pytest.raises(SpecError, match="--base-url: not valid UTF-8 text"):
        _spec(tmp_path).override(base_url="http://h\udcff/v1")


def test_fifo_input_is_refused_without_blocking(tmp_path):
    """A named pipe as input is a SourceError saying a regular file is expected (opening it would wait for a writer)."""
    import os

    (tmp_path / "jobs").mkdir()
    os.mkfifo(tmp_path / "jobs" / "in.jsonl")
    spec = _spec(tmp_path)
    with pytest.raises(SourceError, match=r"input is a named pipe \(FIFO\), not a regular file"):
        open_source(spec.input, spec.model)


def test_lines_are_read_in_pieces_and_a_bom_is_dropped(tmp_path, monkeypatch):
    """A line longer than MAX_LINE_BYTES is one bad row (counted in the total) and the next line is read normally;
    a byte order mark before the first line is ignored."""
    import runner.sources as sources

    monkeypatch.setattr(sources, "MAX_LINE_BYTES", 64)
    source, reqs = _requests(tmp_path, "in.jsonl", ['\ufeff{"prompt": "first"}', {"prompt": "x" * 200},
                                                    {"prompt": "after"}])
    assert source.total == 3
    assert reqs[0].problem is None and reqs[0].messages[-1]["content"] == "first"
    assert "line 2: longer than 64 bytes" in reqs[1].problem
    assert reqs[2].problem is None and reqs[2].messages[-1]["content"] == "after"
    exactly = '{"prompt": "' + "y" * 50 + '"}'  # 64 bytes before its newline: the longest line allowed
    _, reqs = _requests(tmp_path, "in.jsonl", [exactly, exactly[:-2] + 'y"}'])
    assert len(exactly) == 64 and reqs[0].problem is None and "longer than 64 bytes" in reqs[1].problem
