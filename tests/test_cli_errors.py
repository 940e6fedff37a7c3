"""User mistakes get one clear line naming the file, key, line or column, the right exit code, no traceback."""

from __future__ import annotations

import json

import pytest

from tests.helpers import make_job, run_cli, write_prompts


def _one_line_error(result) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_missing_input_file(tmp_path):
    """A missing input file is a usage error naming the path."""
    job = make_job(tmp_path, input={"path": "nope.jsonl", "prompt_column": "prompt"},
                   endpoint={"base_url": "http://127.0.0.1:9/compatible-mode/v1"})
    for command in ("run", "validate"):
        result = run_cli(command, str(job))
        assert result.code == 2
        assert "nope.jsonl: input file not found" in _one_line_error(result)


def test_missing_job_file(tmp_path):
    """A job file that does not exist is a usage error."""
    result = run_cli("run", str(tmp_path / "absent.toml"))
    assert result.code == 2
    assert "absent.toml: job file not found" in _one_line_error(result)


def test_column_absent_from_whole_file(tmp_path):
    """A prompt column that no row has is a usage error naming the column, for JSONL and Parquet."""
    write_prompts(tmp_path / "prompts.jsonl", 5)
    write_prompts(tmp_path / "prompts.parquet", 5)
    for name in ("prompts.jsonl", "prompts.parquet"):
        job = make_job(tmp_path, input={"path": name, "prompt_column": "question"},
                       endpoint={"base_url": "http://127.0.0.1:9/compatible-mode/v1"})
        result = run_cli("run", str(job))
        assert result.code == 2
        line = _one_line_error(result)
        assert name in line and "'question'" in line


def test_invalid_json_line_reported_by_validate(tmp_path):
    """validate names the line and the reason of an invalid JSON row and counts it; exit 3 (over the error rate)."""
    (tmp_path / "prompts.jsonl").write_text('{"id": 1, "prompt": "ok"}\n{"id": 2, "prompt": "broken\n')
    job = make_job(tmp_path, endpoint={"base_url": "http://127.0.0.1:9/compatible-mode/v1"})
    result = run_cli("validate", str(job))
    assert result.code == 3
    assert "1 valid, 1 invalid" in result.stdout
    assert "prompts.jsonl line 2: invalid JSON" in result.stdout
    assert run_cli("validate", str(job), "--max-error-rate", "0.5").code == 0


@pytest.mark.parametrize("section,key,value,expected", [
    ("run", "concurency", 8, "[run] concurency: unknown key"),
    ("run", "concurrency", "many", "[run] concurrency: expected an integer, got a string"),
    ("run", "concurrency", 0, "[run] concurrency: expected an integer from 1 to 10,000"),
    ("model", "temperature", "hot", "[model] temperature: expected a number"),
    ("endpoint", "dialect", "grpc", "[endpoint] dialect: expected one of openai, dashscope"),
    ("endpoint", "region", "mars", "[endpoint] region: unknown region 'mars'"),
    ("endpoint", "api_key", "sk-oops", "[endpoint] api_key: API keys never go in job files"),
])
def test_bad_job_keys(tmp_path, section, key, value, expected):
    """Unknown keys and wrong types are usage errors naming the file and the key."""
    write_prompts(tmp_path / "prompts.jsonl", 3)
    job = make_job(tmp_path, **{section: {key: value}})
    result = run_cli("run", str(job))
    assert result.code == 2
    line = _one_line_error(result)
    assert str(job) in line and expected in line
    assert "sk-oops" not in result.stderr


def test_invalid_toml(tmp_path):
    """A job file that is not TOML is a usage error with the parser's position."""
    job = tmp_path / "job.toml"
    job.write_text("[input]\npath = \n")
    result = run_cli("validate", str(job))
    assert result.code == 2
    assert "not valid TOML" in _one_line_error(result)


def test_missing_key_env_var(tmp_path):
    """A missing API key variable is a usage error naming the variable, with a hint; validate only warns."""
    write_prompts(tmp_path / "prompts.jsonl", 3)
    job = make_job(tmp_path, endpoint={"api_key_env": "MY_TEAM_KEY"})
    result = run_cli("run", str(job), key=None)
    assert result.code == 2
    assert "MY_TEAM_KEY is not set" in _one_line_error(result)
    assert "hint:" in result.stderr
    validated = run_cli("validate", str(job), key=None)
    assert validated.code == 0 and "MY_TEAM_KEY is not set" in validated.stdout


def test_key_file(tmp_path, emulator):
    """The key can come from a key file named in the job instead of the environment."""
    write_prompts(tmp_path / "prompts.jsonl", 3)
    (tmp_path / "key.txt").write_text("sk-from-file\n")
    job = make_job(tmp_path, emulator, endpoint={"api_key_env": "UNSET_VAR_FOR_TEST", "api_key_file": "key.txt"})
    assert run_cli("run", str(job), key=None).code == 0


def test_unwritable_output_dir(tmp_path):
    """An output path under a regular file (never writable, even for root) is exit 1 naming the folder."""
    write_prompts(tmp_path / "prompts.jsonl", 3)
    (tmp_path / "blocker").write_text("a file, not a folder")
    job = make_job(tmp_path, output={"path": "blocker/sub/result.parquet"},
                   endpoint={"base_url": "http://127.0.0.1:9/compatible-mode/v1"})
    result = run_cli("run", str(job))
    assert result.code == 1
    assert "blocker/sub: output folder is not writable" in _one_line_error(result)


def test_bad_fault_flag():
    """An unknown emulator fault is a usage error (exit 2) listing the valid names."""
    result = run_cli("emulator", "--fault", "teapot=0.5")
    assert result.code == 2
    assert "teapot" in result.stderr and "429" in result.stderr and "Traceback" not in result.stderr


def test_bad_flag_value(tmp_path):
    """A flag value out of range is a usage error naming the flag."""
    write_prompts(tmp_path / "prompts.jsonl", 3)
    job = make_job(tmp_path)
    result = run_cli("run", str(job), "--concurrency", "0")
    assert result.code == 2
    assert "--concurrency: expected an integer from 1 to 10,000" in _one_line_error(result)


def test_debug_shows_traceback(tmp_path):
    """--debug shows the traceback of a user error, for bug reports."""
    result = run_cli("run", str(tmp_path / "absent.toml"), "--debug")
    assert result.code != 0 and "Traceback" in result.stderr


def test_overrides_apply_only_when_given(tmp_path, emulator):
    """--limit, --model and --output override the job; flags not given leave it alone."""
    write_prompts(tmp_path / "prompts.jsonl", 30)
    job = make_job(tmp_path, emulator, model={"max_tokens": 50})
    out = tmp_path / "elsewhere" / "x.parquet"
    result = run_cli("run", str(job), "--limit", "7", "--model", "qwen-turbo", "--output", str(out))
    assert result.code == 0, result.stderr
    import pyarrow.parquet as pq

    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 7 and {r["model"] for r in rows} == {"qwen-turbo"}
    summary = json.loads((tmp_path / "elsewhere" / "x.summary.json").read_text())
    assert summary["rows"] == 7
