"""End to end: the real CLI in a subprocess against the emulator over loopback sockets."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import ROOT, make_job, read_output, read_pty, run_cli, write_prompts

FAULTS = {"429": 0.05, "429burst": 0.05, "500": 0.05, "503": 0.05}  # 10% throttling, 10% 5xx


def _assert_complete(rows: list[dict], records: list[dict], stats: dict) -> None:
    assert len(rows) == len(records)
    assert [r["row_id"] for r in rows] == list(range(len(records)))
    assert [r["key"] for r in rows] == [rec["id"] for rec in records]
    for row in rows:
        assert row["status"] == "ok", row
        assert row["request_id"] and row["input_tokens"] and row["output_tokens"] and row["total_tokens"]
        assert row["response"] and row["finish_reason"] == "stop"
        assert row["latency_ms"] is not None and row["started_at"] <= row["finished_at"]
    assert stats["succeeded_more_than_once"] == 0
    assert all(v["succeeded"] == 1 for v in stats["keys"].values())


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_faulty_endpoint_every_row_once_in_order(tmp_path, make_emulator, fmt):
    """2,000 rows through 10% throttling and 10% 5xx: every row once, in order, retries in `attempts`."""
    emu = make_emulator(faults=FAULTS, seed=7)
    records = write_prompts(tmp_path / f"prompts.{fmt}", 2000)
    job = make_job(tmp_path, emu, input={"path": f"prompts.{fmt}", "id_column": "id", "prompt_column": "prompt",
                                         "keep_columns": ["n"]}, run={"concurrency": 64})
    result = run_cli("run", str(job))
    assert result.code == 0, result.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    stats = emu.stats()
    _assert_complete(rows, records, stats)
    assert [r["n"] for r in rows] == [str(i) if fmt == "jsonl" else i for i in range(2000)]
    retried = [r for r in rows if r["attempts"] > 1]
    assert len(retried) > 200  # ~20% of first attempts fail
    assert sum(r["attempts"] for r in rows) == stats["requests"]
    assert not (tmp_path / "out/result.parquet.parts").exists()
    summary = json.loads((tmp_path / "out/result.summary.json").read_text())
    assert summary["rows"] == 2000 and summary["ok"] == 2000 and summary["requests_sent"] == stats["requests"]


@pytest.mark.parametrize("dialect", ["openai", "dashscope"])
def test_both_dialects_with_workspace(tmp_path, emulator, dialect):
    """The same job runs against either dialect by changing one key; the workspace header reaches the server."""
    records = write_prompts(tmp_path / "prompts.jsonl", 50)
    job = make_job(tmp_path, emulator, dialect=dialect, endpoint={"workspace": "ws-test-42"},
                   model={"temperature": 0.3, "max_tokens": 64, "seed": 1})
    result = run_cli("run", str(job))
    assert result.code == 0, result.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    _assert_complete(rows, records, emulator.stats())
    stats = emulator.stats()
    assert stats["workspaces"] == {"ws-test-42": 50}
    assert stats["by_dialect"] == {dialect: 50}


def test_dialects_give_the_same_table(tmp_path, emulator):
    """Switching the dialect changes transport, not the table: responses and tokens are equal."""
    write_prompts(tmp_path / "prompts.jsonl", 20)
    tables = []
    for dialect in ("openai", "dashscope"):
        job = make_job(tmp_path, emulator, dialect=dialect, name=dialect, output={"path": f"out/{dialect}.parquet"})
        assert run_cli("run", str(job)).code == 0
        tables.append(pq.read_table(tmp_path / f"out/{dialect}.parquet",
                                    columns=["key", "response", "input_tokens", "output_tokens", "status"]))
    assert tables[0].equals(tables[1])


def test_per_row_model_and_params_override(tmp_path, emulator):
    """A model column and a JSON params column override the job's model and parameters per row."""
    lines = [{"id": "a", "prompt": "first question", "model": "qwen-flash"},
             {"id": "b", "prompt": "second question", "params": json.dumps({"max_tokens": 2})},
             {"id": "c", "prompt": "third question", "model": None}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    job = make_job(tmp_path, emulator, input={"path": "prompts.jsonl", "id_column": "id", "prompt_column": "prompt",
                                              "model_column": "model", "params_column": "params"})
    assert run_cli("run", str(job)).code == 0
    rows = {r["key"]: r for r in read_output(tmp_path / "out/result.parquet")}
    assert rows["a"]["model"] == "qwen-flash" and rows["c"]["model"] == "qwen-plus"
    assert rows["b"]["finish_reason"] == "length" and rows["b"]["output_tokens"] == 2
    assert emulator.stats()["by_model"] == {"qwen-flash": 1, "qwen-plus": 2}


def test_template_job_over_parquet(tmp_path, emulator):
    """A template fills {column} placeholders from each row; kept columns keep their Parquet types."""
    table = pa.table({"ticket": [7, 8], "product": ["router", "phone"], "text": ["no light", "cracked"]})
    pq.write_table(table, tmp_path / "tickets.parquet")
    job = make_job(tmp_path, emulator, input={"path": "tickets.parquet", "id_column": "ticket",
                                              "template": "Product {product}: {text}. Category?",
                                              "keep_columns": ["ticket", "product"]})
    assert run_cli("run", str(job)).code == 0
    out = pq.read_table(tmp_path / "out/result.parquet")
    assert out.schema.field("ticket").type == pa.int64()
    rows = out.to_pylist()
    assert [r["key"] for r in rows] == ["7", "8"]
    assert rows[0]["response"] == "Echo: Product router: no light. Category?"


def test_empty_input_gives_valid_empty_table(tmp_path, emulator):
    """An empty input still yields a Parquet file with every output column and zero rows."""
    (tmp_path / "prompts.jsonl").write_text("")
    job = make_job(tmp_path, emulator)
    result = run_cli("run", str(job))
    assert result.code == 0, result.stderr
    table = pq.read_table(tmp_path / "out/result.parquet")
    assert table.num_rows == 0
    assert {"row_id", "key", "response", "status", "error_type", "attempts", "latency_ms"} <= set(table.schema.names)
    assert emulator.stats()["requests"] == 0


def test_bad_rows_become_error_rows(tmp_path, emulator):
    """Invalid JSON, a missing column and an empty prompt become error rows naming line and column; others succeed."""
    text = ('{"id": "a", "prompt": "fine"}\n'
            '{"id": "b", "prompt": \n'
            '{"id": "c"}\n'
            '\n'
            '{"id": "d", "prompt": "   "}\n'
            '{"id": "e", "prompt": "also fine"}\n')
    (tmp_path / "prompts.jsonl").write_text(text)
    job = make_job(tmp_path, emulator)
    result = run_cli("run", str(job), "--max-error-rate", "0.9")
    assert result.code == 0, result.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    assert [r["status"] for r in rows] == ["ok", "error", "error", "error", "ok"]
    messages = [r["error_message"] for r in rows if r["status"] == "error"]
    assert "line 2" in messages[0] and "invalid JSON" in messages[0]
    assert "line 3" in messages[1] and "'prompt'" in messages[1]
    assert "line 5" in messages[2] and "'prompt'" in messages[2] and "non-empty string" in messages[2]
    assert {r["error_type"] for r in rows if r["status"] == "error"} == {"InvalidRow"}
    assert emulator.stats()["requests"] == 2


def test_permanent_failures_exit_3_unless_allowed(tmp_path, make_emulator):
    """Permanent errors are recorded, not retried; more failed rows than --max-error-rate allows exits 3."""
    emu = make_emulator(faults={"400": 0.2, "moderation": 0.1})
    write_prompts(tmp_path / "prompts.jsonl", 200)
    job = make_job(tmp_path, emu)
    result = run_cli("run", str(job))
    assert result.code == 3, result.stderr
    assert "more than --max-error-rate" in result.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    failed = [r for r in rows if r["status"] == "error"]
    assert 20 < len(failed) < 100
    assert all(r["attempts"] == 1 and r["error_type"] == "PermanentCallError" for r in failed)
    assert {r["error_code"] for r in failed} == {"InvalidParameter", "DataInspectionFailed"} or \
        {r["error_code"] for r in failed} == {"invalid_parameter_error", "data_inspection_failed"}
    assert all(r["http_status"] == 400 and r["request_id"] for r in failed)
    again = run_cli("run", str(job), "--overwrite", "--max-error-rate", "0.5")
    assert again.code == 0, again.stderr


def test_retries_exhausted_are_recorded(tmp_path, make_emulator):
    """A row that stays throttled through every attempt is an error row with its class, code and attempts."""
    emu = make_emulator(faults={"429": 1.0})
    write_prompts(tmp_path / "prompts.jsonl", 5)
    job = make_job(tmp_path, emu, run={"max_attempts": 3})
    result = run_cli("run", str(job), "--max-error-rate", "1")
    assert result.code == 0, result.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    assert all(r["error_type"] == "Throttled" and r["error_code"] == "limit_requests" and r["attempts"] == 3
               and r["http_status"] == 429 for r in rows)
    assert "5 x Throttled limit_requests" in result.stderr


@pytest.mark.parametrize("fault,needle", [("arrearage", "cannot pay"), ("401", "refused the credentials")])
def test_account_level_errors_stop_the_run(tmp_path, make_emulator, fault, needle):
    """Arrears or a rejected key stop the run with one message (exit 1) instead of failing every row."""
    emu = make_emulator(faults={fault: 1.0}) if fault != "401" else make_emulator(api_keys=("sk-someone-else",))
    write_prompts(tmp_path / "prompts.jsonl", 300)
    job = make_job(tmp_path, emu, run={"concurrency": 4})
    result = run_cli("run", str(job))
    assert result.code == 1
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert emu.stats()["requests"] < 50
    assert not (tmp_path / "out/result.parquet").exists()


def test_timeouts_and_dropped_connections_are_retried(tmp_path, make_emulator):
    """Hung requests time out, dropped connections and malformed bodies are retried; every row ends ok."""
    emu = make_emulator(faults={"hang": 0.03, "drop": 0.05, "malformed": 0.05, "502": 0.03}, hang_seconds=30)
    records = write_prompts(tmp_path / "prompts.jsonl", 300)
    job = make_job(tmp_path, emu, endpoint={"timeout": 1.5}, run={"concurrency": 32})
    result = run_cli("run", str(job))
    assert result.code == 0, result.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    stats = emu.stats()
    _assert_complete(rows, records, stats)
    assert stats["by_fault"].get("hang", 0) > 0 and stats["by_fault"].get("drop", 0) > 0


def test_summary_command(tmp_path, emulator):
    """`runner summary` reads an output file: counts, tokens, latency percentiles and throughput."""
    write_prompts(tmp_path / "prompts.jsonl", 40)
    job = make_job(tmp_path, emulator)
    assert run_cli("run", str(job)).code == 0
    result = run_cli("summary", str(tmp_path / "out/result.parquet"))
    assert result.code == 0
    assert "rows       40  ok 40  failed 0" in result.stdout
    assert "p50" in result.stdout and "p99" in result.stdout and "rows/s" in result.stdout
    as_json = json.loads(run_cli("summary", str(tmp_path / "out/result.parquet"), "--json").stdout)
    assert as_json["rows"] == 40 and as_json["tokens"]["total"] > 0


def test_quickstart_job_with_built_in_emulator(tmp_path):
    """The README's quickstart job runs against the built-in emulator with no key and no network."""
    out = tmp_path / "quickstart.parquet"
    result = run_cli("run", "jobs/quickstart.toml", "--emulator", "--output", str(out), key=None)
    assert result.code == 0, result.stderr
    rows = read_output(out)
    assert len(rows) == 200 and all(r["status"] == "ok" for r in rows)
    assert "rows       200  ok 200  failed 0" in result.stderr


@pytest.mark.parametrize("job", sorted(p.name for p in (ROOT / "jobs").glob("*.toml")))
def test_shipped_jobs_validate(job):
    """Every job shipped in jobs/ loads, reads its sample input and renders every request."""
    result = run_cli("validate", f"jobs/{job}")
    assert result.code == 0, result.stdout + result.stderr
    assert "0 invalid" in result.stdout


def test_secret_never_leaks(tmp_path, make_emulator):
    """A canary key appears in no output, summary, part, log line or error message, on success or failure."""
    canary = "sk-canary-7f3a9c2e5d1b4e8f"
    emu = make_emulator(api_keys=(canary,), faults={"500": 0.1, "400": 0.1})
    write_prompts(tmp_path / "prompts.jsonl", 100)
    job = make_job(tmp_path, emu)
    first = run_cli("run", str(job), "--max-error-rate", "1", "--debug", key=canary)
    assert first.code == 0, first.stderr
    rejected = make_emulator(api_keys=("sk-other",))
    job2 = make_job(tmp_path, rejected, name="job2", output={"path": "out/rejected.parquet"})
    second = run_cli("run", str(job2), key=canary)
    third = run_cli("run", str(job2), "--debug", key=canary)
    assert second.code == 1 and third.code == 1
    texts = [first.stdout, first.stderr, second.stdout, second.stderr, third.stdout, third.stderr]
    for path in tmp_path.rglob("*"):
        if path.is_file():
            texts.append(path.read_bytes().decode("latin-1"))
    assert not [t for t in texts if canary in t]
    assert emu.stats()["requests"] > 100  # the canary key really was sent and accepted


def test_progress_bar_on_a_terminal_only(tmp_path, make_emulator):
    """On a terminal stderr shows a progress bar with rows, ok/failed, rates and 429s; piped, log lines instead."""
    import os
    import pty
    import subprocess
    import sys

    emu = make_emulator(faults={"429": 0.2})
    write_prompts(tmp_path / "prompts.jsonl", 100)
    job = make_job(tmp_path, emu)
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASHSCOPE")}
    env["DASHSCOPE_API_KEY"] = "sk-test"
    proc = subprocess.Popen([sys.executable, "-m", "runner", "run", str(job)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    output = read_pty(master)
    os.close(master)
    assert proc.wait(timeout=60) == 0
    text = output.decode(errors="replace")
    assert "100/100" in text and "row/s" in text and "429s=" in text and "ok=" in text
    assert "cost=" in text and "(job ~" in text
    piped = run_cli("run", str(job), "--overwrite")
    assert "row/s" not in piped.stderr and "\r" not in piped.stderr and "rows       100" in piped.stderr
    assert " end      rows 100/100 " in piped.stderr
