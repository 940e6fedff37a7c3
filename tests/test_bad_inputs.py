"""A corpus of bad inputs and bad settings: each gives the right exit code and one line naming the file, line,
column, key or flag, never a traceback; bad rows become InvalidRow error rows while the good rows are answered.

Job and flag errors run the click command in-process (CliRunner: fast, and an escaping exception would be seen
as one); bad rows and disk errors run the real CLI in subprocesses, a few jobs with many bad rows each.
"""

from __future__ import annotations

import ctypes
import gzip
import json
import os
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from runner.cli import main
from runner.emulator import Emulator, EmulatorConfig
from runner.rowcheck import MAX_NESTING
from runner.sources import MAX_LINE_BYTES
from tests.helpers import ROOT, TEST_KEY, make_job, read_output, run_cli, to_toml, write_prompts

NOWHERE = {"base_url": "http://127.0.0.1:9/compatible-mode/v1"}  # nothing listens: nothing may be sent


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), env={"DASHSCOPE_API_KEY": TEST_KEY})


def _one_error_line(result, code: int) -> str:
    """The single `error:` line of an in-process CLI result, after checking the exit code and that no
    exception escaped the funnel (no traceback)."""
    detail = f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        "".join(traceback.format_exception(result.exception))
    assert result.exit_code == code, detail
    assert "Traceback" not in result.stdout + result.stderr, detail
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, detail
    return errors[0]


# -- job-file keys and flags ----------------------------------------------------------------------------

@dataclass
class Setting:
    name: str
    sections: dict = field(default_factory=dict)  # merged into the test job's sections
    args: tuple[str, ...] = ()                    # flags after `runner run JOB`
    expected: str = ""                            # in the error line (with the job file's path, for keys)


SETTINGS = [
    Setting("unknown key", {"run": {"concurency": 8}}, expected="[run] concurency: unknown key"),
    Setting("unknown section", {"extra": {"x": 1}}, expected="unknown section [extra]"),
    Setting("wrong type", {"run": {"concurrency": "many"}}, expected="[run] concurrency: expected an integer, got a string"),
    Setting("float for an integer", {"run": {"max_attempts": 2.5}}, expected="[run] max_attempts: expected an integer"),
    Setting("concurrency zero", {"run": {"concurrency": 0}},
            expected="[run] concurrency: expected an integer from 1 to 10,000"),
    Setting("concurrency negative", {"run": {"concurrency": -5}},
            expected="[run] concurrency: expected an integer from 1 to 10,000"),
    Setting("concurrency a billion", {"run": {"concurrency": 1_000_000_000}},
            expected="[run] concurrency: expected an integer from 1 to 10,000 (each request in flight holds"),
    Setting("max_attempts zero", {"run": {"max_attempts": 0}}, expected="[run] max_attempts: expected an integer from 1 to 100"),
    Setting("max_attempts huge", {"run": {"max_attempts": 10_000}}, expected="[run] max_attempts: expected an integer from 1 to 100"),
    Setting("timeout nan", {"endpoint": {"timeout": float("nan")}},
            expected="[endpoint] timeout: expected a number > 0 and at most 86,400, got a number (nan)"),
    Setting("connect_timeout nan", {"endpoint": {"connect_timeout": float("nan")}},
            expected="[endpoint] connect_timeout: expected a number > 0 and at most 86,400, got a number (nan)"),
    Setting("stream_idle_timeout inf", {"endpoint": {"stream_idle_timeout": float("inf")}},
            expected="[endpoint] stream_idle_timeout: expected a number > 0 and at most 86,400, got a number (inf)"),
    Setting("timeout negative", {"endpoint": {"timeout": -1}}, expected="[endpoint] timeout: expected a number > 0"),
    Setting("timeout too large for a float", {"endpoint": {"timeout": 10**400}}, expected="[endpoint] timeout: expected"),
    Setting("rpm zero", {"run": {"rpm": 0}}, expected="[run] rpm: expected a number > 0 and at most 100,000,000"),
    Setting("rpm negative", {"run": {"rpm": -10}}, expected="[run] rpm: expected a number > 0"),
    Setting("rpm inf", {"run": {"rpm": float("inf")}}, expected="[run] rpm: expected a number > 0 and at most 100,000,000, got a number (inf)"),
    Setting("tpm nan", {"run": {"tpm": float("nan")}}, expected="[run] tpm: expected a number > 0"),
    Setting("per-model rpm zero", {"run": {"limits": {"qwen-max": {"rpm": 0}}}},
            expected="[run] limits.qwen-max.rpm: expected a number > 0"),
    Setting("per-model tpm nan", {"run": {"limits": {"qwen-max": {"tpm": float("nan")}}}},
            expected="[run] limits.qwen-max.tpm: expected a finite number, got nan"),
    Setting("part_rows zero", {"run": {"part_rows": 0}}, expected="[run] part_rows: expected an integer from 1 to 1,000,000"),
    Setting("part_seconds zero", {"run": {"part_seconds": 0}}, expected="[run] part_seconds: expected a number > 0"),
    Setting("drain_seconds negative", {"run": {"drain_seconds": -1}}, expected="[run] drain_seconds: expected a number from 0"),
    Setting("max_error_rate above one", {"run": {"max_error_rate": 2}}, expected="[run] max_error_rate: expected a number from 0 to 1"),
    Setting("retry_budget zero", {"run": {"retry_budget": 0}}, expected="[run] retry_budget: expected a number > 0"),
    Setting("backoff_max inf", {"run": {"backoff_max": float("inf")}}, expected="[run] backoff_max: expected a number from 0 to 3,600"),
    Setting("cooldown negative", {"run": {"cooldown_seconds": -0.5}}, expected="[run] cooldown_seconds: expected a number from 0"),
    Setting("retry_after_max nan", {"run": {"retry_after_max": float("nan")}}, expected="[run] retry_after_max: expected"),
    Setting("max_cost negative", {"run": {"max_cost": -1}}, expected="[run] max_cost: expected a number > 0"),
    Setting("expected_output_tokens zero", {"run": {"expected_output_tokens": 0}},
            expected="[run] expected_output_tokens: expected an integer from 1 to 1,000,000"),
    Setting("limit negative", {"run": {"limit": -1}}, expected="[run] limit: expected an integer >= 0"),
    Setting("batch_max_lines above the API's cap", {"run": {"batch_max_lines": 60_000}},
            expected="[run] batch_max_lines: expected an integer from 1 to 50,000 (the Batch API takes at most 50,000 lines"),
    Setting("batch_poll_seconds zero", {"run": {"batch_poll_seconds": 0}}, expected="[run] batch_poll_seconds: expected a number > 0"),
    Setting("completion window too short", {"run": {"completion_window": "2h"}}, expected="[run] completion_window: expected from 24h"),
    Setting("batch_fallback_after not a duration", {"run": {"batch_fallback_after": "soon"}},
            expected="[run] batch_fallback_after: expected a duration"),
    Setting("temperature nan", {"model": {"temperature": float("nan")}}, expected="[model] temperature: expected a finite number, got nan"),
    Setting("nested extra inf", {"model": {"extra": {"penalties": [1.0, float("inf")]}}},
            expected="[model] extra.penalties[1]: expected a finite number, got inf"),
    Setting("negative price", {"model": {"price_input": -1}}, expected="[model] price_input: expected a number from 0"),
    Setting("empty model name", {"model": {"name": " "}}, expected="[model] name: expected a model name"),
    Setting("bad region", {"endpoint": {"region": "mars", "base_url": None}}, expected="[endpoint] region: unknown region 'mars'"),
    Setting("bad base_url scheme", {"endpoint": {"base_url": "ftp://example.com/v1"}},
            expected="[endpoint] base_url: expected an http:// or https:// URL"),
    Setting("bad dialect", {"endpoint": {"dialect": "grpc"}}, expected="[endpoint] dialect: expected one of openai, dashscope"),
    Setting("bad transport", {"endpoint": {"transport": "curl"}}, expected="[endpoint] transport: expected one of aiohttp, httpx"),
    Setting("api key in the job file", {"endpoint": {"api_key": "sk-oops-secret"}},
            expected="[endpoint] api_key: API keys never go in job files"),
    Setting("template with a dotted placeholder", {"input": {"prompt_column": None, "template": "Say {a.b}"}},
            expected="[input] template: placeholder {a.b} is not a plain column name"),
    Setting("template with a positional placeholder", {"input": {"prompt_column": None, "template": "Say {0}"}},
            expected="[input] template: placeholder {0} is not a plain column name"),
    Setting("template with a bad conversion", {"input": {"prompt_column": None, "template": "Say {a!x}"}},
            expected="[input] template: placeholder {a!x}: the conversion must be"),
    Setting("two prompt sources", {"input": {"template": "Say {prompt}"}},
            expected="set exactly one of prompt_column, messages_column or template"),
    Setting("keep_columns reserved name", {"input": {"keep_columns": ["status"]}},
            expected="[input] keep_columns: 'status' is also an output column name"),
    Setting("keep_columns duplicate", {"input": {"keep_columns": ["n", "n"]}}, expected="[input] keep_columns: lists a column twice"),
    # Flags get the job file's bounds (one table), and name the flag.
    Setting("--concurrency 0", args=("--concurrency", "0"), expected="--concurrency: expected an integer from 1 to 10,000 ("),
    Setting("--concurrency a billion", args=("--concurrency", "1000000000"), expected="--concurrency: expected an integer from 1 to 10,000"),
    Setting("--max-attempts 0", args=("--max-attempts", "0"), expected="--max-attempts: expected an integer from 1 to 100, got 0"),
    Setting("--rpm 0", args=("--rpm", "0"), expected="--rpm: expected a number > 0 and at most 100,000,000, got 0.0"),
    Setting("--rpm nan", args=("--rpm", "nan"), expected="--rpm: expected a number > 0 and at most 100,000,000, got nan"),
    Setting("--tpm inf", args=("--tpm", "inf"), expected="--tpm: expected a number > 0"),
    Setting("--max-cost 0", args=("--max-cost", "0"), expected="--max-cost: expected a number > 0"),
    Setting("--limit -1", args=("--limit", "-1"), expected="--limit: expected an integer >= 0, got -1"),
    Setting("--max-error-rate 2", args=("--max-error-rate", "2"), expected="--max-error-rate: expected a number from 0 to 1, got 2.0"),
    Setting("--max-error-rate nan", args=("--max-error-rate", "nan"), expected="--max-error-rate: expected a number from 0 to 1"),
    Setting("--base-url without a scheme", args=("--base-url", "127.0.0.1:8000/v1"),
            expected="--base-url: expected an http:// or https:// URL"),
    Setting("--model empty", args=("--model", ""), expected="--model: expected a model name, got an empty string"),
]


@pytest.mark.parametrize("case", SETTINGS, ids=[case.name for case in SETTINGS])
def test_bad_setting_is_one_line_naming_the_key_or_flag(tmp_path, case):
    """A bad job-file key or flag is exit 2 with one line naming the file and key (or the flag) and what is allowed."""
    write_prompts(tmp_path / "prompts.jsonl", 3)
    sections = {name: dict(body) for name, body in case.sections.items()}
    endpoint = {**NOWHERE, **sections.pop("endpoint", {})}
    inp = {"path": "prompts.jsonl", "id_column": "id", "prompt_column": "prompt", **sections.pop("input", {})}
    unknown = {name: sections.pop(name) for name in list(sections) if name not in ("model", "run", "output")}
    job = make_job(tmp_path, input=_present(inp), endpoint=_present(endpoint), **sections)
    if unknown:  # a section the helper does not know
        job.write_text(job.read_text() + to_toml(unknown))
    line = _one_error_line(_invoke("run", str(job), *case.args), 2)
    assert case.expected in line
    if not case.args:
        assert str(job) in line
    assert "sk-oops-secret" not in line


def _present(section: dict) -> dict:
    return {k: v for k, v in section.items() if v is not None}


@pytest.mark.parametrize("args,expected", [
    (("--concurency", "5"), "No such option '--concurency'"),
    (("--concurrency", "many"), "'many' is not a valid integer"),
    (("--mode", "fast"), "'fast' is not one of 'online', 'batch'"),
])
def test_bad_flag_is_a_usage_error(tmp_path, args, expected):
    """An unknown flag or a flag value of the wrong type is click's usage error: exit 2, the flag named."""
    write_prompts(tmp_path / "prompts.jsonl", 3)
    result = _invoke("run", str(make_job(tmp_path, endpoint=NOWHERE)), *args)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert expected in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("name,content,expected", [
    ("empty job file", b"", "[input] path: missing; this key is required"),
    ("TOML syntax error", b"[input]\npath = \n", "not valid TOML"),
    ("surrogate escape in the system prompt", b'[input]\npath = "p.jsonl"\nsystem_prompt = "\\ud800"\n', "not valid TOML"),
    ("surrogate bytes in the system prompt", b'[input]\npath = "p.jsonl"\nsystem_prompt = "\xed\xa0\x80"\n',
     "cannot read job file ('utf-8' codec can't decode byte 0xed"),
    ("a table where a value goes", b'input = 3\n', "[input]: expected a table"),
])
def test_bad_job_file(tmp_path, name, content, expected):
    """A job file that is empty, not TOML, or not UTF-8 (a lone surrogate cannot be written in TOML) is exit 2
    naming the file."""
    job = tmp_path / "job.toml"
    job.write_bytes(content)
    line = _one_error_line(_invoke("validate", str(job)), 2)
    assert str(job) in line and expected in line


def test_missing_job_file(tmp_path):
    """A job file that does not exist is exit 2 naming it."""
    line = _one_error_line(_invoke("validate", str(tmp_path / "absent.toml")), 2)
    assert "absent.toml: job file not found" in line


# -- input files ------------------------------------------------------------------------------------------

def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _device(path: Path) -> None:
    path.symlink_to("/dev/zero")  # reading it would never end


def _array_file(path: Path) -> None:
    path.write_text(json.dumps([{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}], indent=1))


def _truncated_gzip(path: Path) -> None:
    data = gzip.compress("".join(json.dumps({"id": str(i), "prompt": "p"}) + "\n" for i in range(50)).encode())
    path.write_bytes(data[: len(data) // 2])


def _parquet_without_prompt(path: Path) -> None:
    pq.write_table(pa.table({"id": ["a"], "text": ["x"]}), path)


INPUTS = [
    # name, input file name, how to make it (None: leave it missing), exit code, expected in the error line
    ("missing input file", "nope.jsonl", None, "nope.jsonl: input file not found"),
    ("input is a directory", "folder.jsonl", lambda p: p.mkdir(), "folder.jsonl: input file is a directory, not a file"),
    ("input is a named pipe", "pipe.jsonl", _fifo, "pipe.jsonl: input is a named pipe (FIFO), not a regular file"),
    ("input is a device", "zero.jsonl", _device, "zero.jsonl: input is a device, not a regular file"),
    ("unsupported format", "table.xlsx", lambda p: p.write_text("id,prompt\n"), "expected .jsonl, .csv, .tsv, .json (each also .gz) or .parquet"),
    ("binary file as parquet", "blob.parquet", lambda p: p.write_bytes(os.urandom(256)), "not a readable Parquet file"),
    ("parquet missing the prompt column", "t.parquet", _parquet_without_prompt,
     "t.parquet: no column 'prompt' in the input; it has id, text"),
    ("no row has the prompt column", "p.jsonl", lambda p: p.write_text('{"id": "a", "question": "x"}\n'),
     "p.jsonl: no column 'prompt' in any of the first 1 rows"),
    ("JSON array saved as .jsonl", "arr.jsonl", _array_file,
     "arr.jsonl: line 1 is a JSON array, not an object; JSON Lines has one object per line"),
    ("one-line JSON array saved as .jsonl", "one.jsonl", lambda p: p.write_text('[{"id": "a", "prompt": "x"}]\n'),
     "one.jsonl: line 1 is a JSON array, not an object"),
    ("malformed CSV", "bad.csv", lambda p: p.write_text('id,prompt\na,"two\nlines"\nb,x,extra\nc,y\n'),
     "bad.csv: data row 2 (line 4) has 3 field(s); the header has 2"),
    ("CSV without the prompt column", "t.csv", lambda p: p.write_text("id,text\na,x\n"),
     "t.csv: no column 'prompt' in the header; it has id, text"),
    ("JSON file holding an object", "obj.json", lambda p: p.write_text('{"id": "a", "prompt": "x"}\n'),
     "obj.json: expected a JSON array of objects, the file holds an object"),
    ("JSON array with a syntax error", "cut.json", lambda p: p.write_text('[{"id": "a", "prompt": "x"},\n {"id": }]'),
     "cut.json: array element 1: invalid JSON (Expecting value)"),
    ("binary file as .jsonl", "bin.jsonl", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe\n"),
     "bin.jsonl: none of the first 3 lines is a JSON object (line 1: not valid UTF-8 (byte 0x89 at byte 1))"),
    ("truncated gzip", "cut.jsonl.gz", _truncated_gzip,
     "cut.jsonl.gz: input became unreadable while reading (Compressed file ended before the end-of-stream marker"),
]


@pytest.mark.parametrize("name,filename,make,expected", INPUTS, ids=[case[0] for case in INPUTS])
def test_bad_input_file_is_one_line(tmp_path, name, filename, make, expected):
    """An input that is missing, not a regular file, not a supported format, unreadable or without the named
    columns is exit 2 naming the file, in both run and validate, and never blocks on a pipe or device."""
    if make is not None:
        make(tmp_path / filename)
    job = make_job(tmp_path, input={"path": filename, "id_column": "id", "prompt_column": "prompt"}, endpoint=NOWHERE)
    for command in ("validate", "run"):
        assert expected in _one_error_line(_invoke(command, str(job)), 2)


# -- output paths -----------------------------------------------------------------------------------------

def test_output_under_a_regular_file_is_one_line(tmp_path):
    """An output whose parent is a regular file (ENOTDIR: refused even for root) is exit 1 naming the folder;
    the same for the --dry-run file."""
    write_prompts(tmp_path / "prompts.jsonl", 3)
    (tmp_path / "blocker").write_text("a file, not a folder")
    job = make_job(tmp_path, output={"path": "blocker/sub/result.parquet"}, endpoint=NOWHERE)
    assert "blocker/sub: output folder is not writable" in _one_error_line(_invoke("run", str(job)), 1)
    line = _one_error_line(_invoke("run", str(job), "--dry-run"), 1)
    assert "blocker/sub: cannot write the dry run's requests (Not a directory)" in line


def test_finished_output_is_not_overwritten(tmp_path):
    """An output left by a finished run is exit 2 (nothing was run) with a hint, not replaced."""
    write_prompts(tmp_path / "prompts.jsonl", 3)
    job = make_job(tmp_path, endpoint=NOWHERE)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "result.parquet").write_bytes(b"finished earlier")
    result = _invoke("run", str(job))
    assert "output already exists" in _one_error_line(result, 2) and "--overwrite" in result.stderr


# -- bad rows: error rows, the good rows answered, nothing bad sent --------------------------------------

SURROGATE = "\\ud800"  # as written in a JSON file: a valid escape of a code point that is not valid text


@dataclass
class Rows:
    """One input file of good and bad rows, run once for all its cases."""

    name: str
    input: dict  # the [input] section
    lines: list  # a JSON line (str or bytes) or a dict, each with the fragment its error must hold (None: good)
    make: Callable[[Path, list], None] | None = None  # writes a non-JSONL input


def _good(i: int) -> dict:
    return {"id": f"good-{i}", "prompt": f"question {i}", "topic": "t", "n": i}


PROMPT_ROWS = Rows("prompts", {"path": "rows.jsonl", "id_column": "id", "prompt_column": "prompt",
                               "keep_columns": ["topic"], "params_column": "params", "model_column": "model"}, [
    (_good(0), None),
    ('{"id": "p1", "prompt": "bad ' + SURROGATE + ' text", "topic": "t"}', "column 'prompt': not valid UTF-8 text: '\\ud800'"),
    ('{"id": "k1' + SURROGATE + '", "prompt": "fine", "topic": "t"}', "column 'id': not valid UTF-8 text: '\\ud800'"),
    ('{"id": "c1", "prompt": "fine", "topic": "t' + SURROGATE + '"}', "column 'topic': not valid UTF-8 text: '\\ud800'"),
    ('{"id": "m1", "prompt": "fine", "model": "qwen' + SURROGATE + '"}', "column 'model': not valid UTF-8 text"),
    ('{"id": "q1", "prompt": "fine", "params": {"stop": ["' + SURROGATE + '"]}}', "column 'params': not valid UTF-8 text"),
    ('{"id": "q2", "prompt": "fine", "params": "{\\"stop\\": \\"\\\\udc00\\"}"}', "column 'params': not valid UTF-8 text: '\\udc00'"),
    (b'{"id": "raw", "prompt": "encoded surrogate \xed\xa0\x80"}', "not valid UTF-8 (byte 0xed at byte 44)"),
    (b'{"id": "latin", "prompt": "caf\xe9"}', "not valid UTF-8 (byte 0xe9 at byte 31)"),
    (_good(1), None),
    ("[" * 10_000 + "]" * 10_000, f"nested deeper than {MAX_NESTING} levels"),
    ('{"id": "d1", "prompt": "fine", "params": {"x": ' + "[" * 300 + "]" * 300 + "}}",
     f"column 'params': nested deeper than {MAX_NESTING} levels"),
    ('{"id": "d2", "prompt": "fine", "params": "' + "[" * 5000 + "]" * 5000 + '"}',
     f"column 'params': nested deeper than {MAX_NESTING} levels"),
    ('{"id": "huge", "prompt": "' + "x" * (MAX_LINE_BYTES + 10) + '"}', f"longer than {MAX_LINE_BYTES:,} bytes"),
    ('{"id": "broken", "prompt": "no end', "invalid JSON"),
    ('[{"id": "a", "prompt": "x"}]', "expected a JSON object, got a list (JSON Lines has one object per line"),
    ("42", "expected a JSON object, got int"),
    ('{"id": "e1", "prompt": "   "}', "column 'prompt': expected a non-empty string, got an empty string"),
    ('{"id": "e2", "topic": "no prompt"}', "column 'prompt': expected a non-empty string, got nothing (missing or null)"),
    ('{"id": "e3", "prompt": 17}', "column 'prompt': expected a non-empty string, got int 17"),
    ('{"prompt": "no id"}', "column 'id': expected an id, got nothing"),
    ('{"id": "e4", "prompt": "fine", "params": [1, 2]}', "column 'params': expected a JSON object, got list"),
    ('{"id": "e5", "prompt": "fine", "model": 5}', "column 'model': expected a model name, got int 5"),
    (_good(2), None),
])

MESSAGE_ROWS = Rows("messages", {"path": "chats.jsonl", "id_column": "id", "messages_column": "m"}, [
    ({"id": "good-m", "m": [{"role": "user", "content": "hi"}]}, None),
    ({"id": "w1", "m": 5}, "column 'm': expected a non-empty list of {role, content} messages, got int 5"),
    ({"id": "w2", "m": []}, "column 'm': expected a non-empty list"),
    ({"id": "w3", "m": [{"role": "robot", "content": "x"}]}, "column 'm': message 0: expected role one of"),
    ({"id": "w4", "m": "not json"}, "column 'm': invalid JSON"),
    ('{"id": "s1", "m": [{"role": "user", "content": "' + SURROGATE + '"}]}', "column 'm': not valid UTF-8 text: '\\ud800'"),
    ('{"id": "s2", "m": [{"role": "user", "content": [{"type": "text", "text": "' + SURROGATE + '"}]}]}',
     "column 'm': not valid UTF-8 text"),
    ('{"id": "s3", "m": "[{\\"role\\": \\"user\\", \\"content\\": \\"\\\\ud800\\"}]"}', "column 'm': not valid UTF-8 text"),
    ({"id": "good-m2", "m": json.dumps([{"role": "user", "content": "hello"}])}, None),
])

TEMPLATE_ROWS = Rows("template", {"path": "fill.jsonl", "id_column": "id", "template": "Rate {text} with {score:.1f}",
                                  "system_prompt": "Be brief."}, [
    ({"id": "good-t", "text": "this", "score": 2}, None),
    ('{"id": "t1", "text": "bad ' + SURROGATE + '", "score": 1}', "column 'text': not valid UTF-8 text: '\\ud800'"),
    ({"id": "t2", "text": "x"}, "column 'score': template needs a value, got nothing"),
    ({"id": "t3", "text": "x", "score": "high"}, "template cannot be filled in with this row's values (Unknown format code 'f'"),
])


def _write_bad_parquet(path: Path, lines: list) -> None:
    """Invalid UTF-8 in string columns, which pyarrow writes without checking when given raw bytes."""
    ids = pa.array([b"good-pq", b"bad-id-\xff", b"pq-2", b"pq-3", b"good-pq2"]).view(pa.string())
    prompts = pa.array([b"fine", b"fine", b"bad \xed\xa0\x80 prompt", b"fine", b"fine"]).view(pa.string())
    tags = pa.ListArray.from_arrays(pa.array([0, 1, 2, 3, 4, 5], pa.int32()),
                                    pa.array([b"a", b"b", b"c", b"\xfe", b"e"]).view(pa.string()))
    pq.write_table(pa.table({"id": ids, "prompt": prompts, "tags": tags}), path)


PARQUET_ROWS = Rows("parquet", {"path": "table.parquet", "id_column": "id", "prompt_column": "prompt",
                                "keep_columns": ["tags"]}, [
    (None, None),
    (None, "column 'id': not valid UTF-8 text: '\\udcff'"),
    (None, "column 'prompt': not valid UTF-8 text"),
    (None, "column 'tags': not valid UTF-8 text (inside a nested value)"),
    (None, None),
], make=_write_bad_parquet)

ROW_FILES = [PROMPT_ROWS, MESSAGE_ROWS, TEMPLATE_ROWS, PARQUET_ROWS]


def _write_rows(path: Path, rows: Rows) -> None:
    if rows.make is not None:
        rows.make(path, rows.lines)
        return
    with open(path, "wb") as fh:
        for line, _expected in rows.lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            fh.write((line.encode() if isinstance(line, str) else line) + b"\n")


@dataclass
class RowRun:
    rows: Rows
    run: object
    validate: object
    output: list[dict]
    requests: int


@pytest.fixture(scope="module")
def row_runs(tmp_path_factory) -> dict[str, RowRun]:
    """Each bad-rows file through `runner run` (against an emulator on loopback) and `runner validate`, once."""
    runs = {}
    with Emulator(EmulatorConfig()) as emu:
        for rows in ROW_FILES:
            folder = tmp_path_factory.mktemp(rows.name)
            _write_rows(folder / rows.input["path"], rows)
            job = make_job(folder, emu, input=rows.input)
            emu.reset()
            ran = run_cli("run", str(job))
            requests = emu.stats(keys=False)["requests"]
            checked = run_cli("validate", str(job), "--problems", "100")
            runs[rows.name] = RowRun(rows, ran, checked, read_output(folder / "out" / "result.parquet"), requests)
    return runs


ROW_CASES = [(rows.name, index) for rows in ROW_FILES for index, (_line, expected) in enumerate(rows.lines)
             if expected is not None]


@pytest.mark.parametrize("name,index", ROW_CASES, ids=[f"{name}-row{index}" for name, index in ROW_CASES])
def test_bad_row_is_an_invalid_row(row_runs, name, index):
    """A bad row is an InvalidRow error row naming the line (or Parquet row) and the column, in run and validate;
    its key and kept columns are stored (bad code points as U+FFFD)."""
    result = row_runs[name]
    expected = result.rows.lines[index][1]
    row = result.output[index]
    where = f"row {index}" if result.rows.make else f"line {index + 1}"
    assert row["status"] == "error" and row["error_type"] == "InvalidRow" and row["attempts"] == 0
    assert f"{result.rows.input['path']} {where}: " in row["error_message"] and expected in row["error_message"], row
    assert f"{result.rows.input['path']} {where}: " in result.validate.stdout
    assert expected in result.validate.stdout


@pytest.mark.parametrize("rows", ROW_FILES, ids=[rows.name for rows in ROW_FILES])
def test_bad_rows_do_not_stop_the_job(row_runs, rows):
    """The run completes: every good row is answered, only good rows were sent, the exit code is 3 (over
    max_error_rate 0), validate counts the same rows, and no traceback is shown."""
    result = row_runs[rows.name]
    good = [i for i, (_line, expected) in enumerate(rows.lines) if expected is None]
    assert result.run.code == 3, result.run.stderr
    assert "Traceback" not in result.run.stderr + result.validate.stderr
    assert len(result.output) == len(rows.lines)
    assert [i for i, row in enumerate(result.output) if row["status"] == "ok"] == good
    assert result.requests == len(good)
    assert result.validate.code == 3
    assert f"{len(good)} valid, {len(rows.lines) - len(good)} invalid" in result.validate.stdout


def test_stored_key_of_a_bad_id_is_stable(row_runs):
    """A surrogate in the id column is stored as U+FFFD, the same on every read, so the row keeps its identity."""
    output = row_runs["prompts"].output
    assert output[2]["key"] == "k1\ufffd" and output[3]["topic"] == "t\ufffd"
    assert row_runs["parquet"].output[1]["key"] == "bad-id-\ufffd" and row_runs["parquet"].output[3]["tags"] is None


def test_bad_rows_have_the_same_digest_on_every_read(tmp_path):
    """Resume compares request digests: reading the bad rows twice gives the same digests (and computing them
    does not fail), so a rerun skips rows it already recorded as invalid."""
    from runner.sources import open_source
    from runner.spec import load_job

    _write_rows(tmp_path / "rows.jsonl", PROMPT_ROWS)
    spec = load_job(make_job(tmp_path, input=PROMPT_ROWS.input, endpoint=NOWHERE))
    first = [(r.key, r.digest()) for r in open_source(spec.input, spec.model)]
    assert first == [(r.key, r.digest()) for r in open_source(spec.input, spec.model)]
    assert len(first) == len(PROMPT_ROWS.lines)


# -- a real full disk and a real read-only folder (a small tmpfs in a private mount namespace) ------------

def _can_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount(), reason="needs root and `unshare -m` with tmpfs mounts (a private mount namespace)")
def test_full_and_read_only_disk_are_one_line_stops_and_the_job_resumes(tmp_path, emulator):
    """On a real full disk (a 64 KB tmpfs) the run stops with one line naming the path and "No space left on
    device", exit 1; a rerun while it is still full stops the same way; on the disk remounted read-only,
    "Read-only file system"; once there is room, the rerun resumes and finishes every row exactly once."""
    write_prompts(tmp_path / "prompts.jsonl", 400, extra={"pad": "p" * 200})
    disk = tmp_path / "disk"
    disk.mkdir()
    job = make_job(tmp_path, emulator, input={"path": "prompts.jsonl", "id_column": "id", "prompt_column": "prompt",
                                    "keep_columns": ["pad"]}, output={"path": "disk/out/result.parquet"},
                   run={"part_rows": 50})
    runner = f"DASHSCOPE_API_KEY={TEST_KEY} {sys.executable} -m runner run {job} --quiet"
    script = "; ".join([
        f"mount -t tmpfs -o size=64k tmpfs {disk}",
        f"{runner} 2>{tmp_path}/err1; echo $? >{tmp_path}/rc1",
        f"{runner} 2>{tmp_path}/err2; echo $? >{tmp_path}/rc2",
        f"mount -o remount,ro {disk}",
        f"{runner} 2>{tmp_path}/err3; echo $? >{tmp_path}/rc3",
        f"mount -o remount,rw,size=64m {disk}",
        f"{runner} 2>{tmp_path}/err4; echo $? >{tmp_path}/rc4",
        f"cp {disk}/out/result.parquet {tmp_path}/final.parquet",
    ])
    subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, timeout=300, check=True)
    for step, reason in ((1, "No space left on device"), (2, "No space left on device"), (3, "Read-only file system")):
        err = (tmp_path / f"err{step}").read_text()
        assert (tmp_path / f"rc{step}").read_text().strip() == "1", err
        assert "Traceback" not in err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and str(disk) in errors[0] and reason in errors[0], err
    assert (tmp_path / "rc4").read_text().strip() == "0", (tmp_path / "err4").read_text()
    rows = read_output(tmp_path / "final.parquet")
    assert [r["row_id"] for r in rows] == list(range(400)) and {r["status"] for r in rows} == {"ok"}


# -- a real permission error for root: the same process without CAP_DAC_OVERRIDE ------------------------

def _without_file_capabilities() -> None:
    """In the child before exec: drop the capabilities that let root ignore file permissions."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _run_bound_by_permissions(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASHSCOPE")}
    env["DASHSCOPE_API_KEY"] = TEST_KEY
    return subprocess.run([sys.executable, "-m", "runner", *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=120, preexec_fn=_without_file_capabilities if os.geteuid() == 0 else None)


def _permissions_bind() -> bool:
    try:
        probe = subprocess.run(["true"], preexec_fn=_without_file_capabilities if os.geteuid() == 0 else None)
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


@pytest.mark.skipif(not _permissions_bind(), reason="root cannot drop CAP_DAC_OVERRIDE here, so chmod would not bind")
def test_permission_errors_are_one_line(tmp_path):
    """An unreadable input is exit 2 and a read-only output folder exit 1 (first run) or a read-only parts folder
    exit 1 (rerun), each one line naming the path and "Permission denied"."""
    write_prompts(tmp_path / "prompts.jsonl", 20)
    secret = tmp_path / "secret.jsonl"
    write_prompts(secret, 3)
    secret.chmod(0)
    job = make_job(tmp_path, input={"path": "secret.jsonl", "id_column": "id", "prompt_column": "prompt"},
                   endpoint=NOWHERE, name="unreadable")
    result = _run_bound_by_permissions("validate", str(job))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "secret.jsonl: cannot read input file (Permission denied)" in result.stderr

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    job = make_job(tmp_path, endpoint=NOWHERE, output={"path": "locked/result.parquet"}, name="readonly")
    result = _run_bound_by_permissions("run", str(job))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"{locked}: output folder is not writable (Permission denied)" in result.stderr

    job = make_job(tmp_path, output={"path": "out/result.parquet"}, name="rerun")
    parts = tmp_path / "out" / "result.parquet.parts"  # left by an earlier run, now read-only
    parts.mkdir(parents=True)
    parts.chmod(0o555)
    result = _run_bound_by_permissions("run", str(job), "--emulator", "--quiet")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(parts) in errors[0] and "Permission denied" in errors[0], result.stderr
