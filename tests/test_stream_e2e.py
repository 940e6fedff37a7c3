"""Streaming end to end: the real CLI against the emulator's SSE over loopback, faults included."""

from __future__ import annotations

import pytest

from tests.helpers import make_job, read_output, run_cli, write_prompts

STREAM_FAULTS = {"stream_drop": 0.05, "stream_truncate": 0.05, "stream_malformed": 0.05, "stream_error": 0.05}


@pytest.mark.parametrize("dialect,rows", [("openai", 1000), ("dashscope", 300)])
def test_streamed_rows_with_broken_streams_each_once_and_complete(tmp_path, make_emulator, dialect, rows):
    """Streams that drop, end early, carry a malformed frame or an in-band error are retried from scratch:
    every row once, complete, with usage, request id and time to first token; nothing partial."""
    emu = make_emulator(faults=STREAM_FAULTS, stream_chunks=6, seed=3)
    records = write_prompts(tmp_path / "prompts.jsonl", rows)
    job = make_job(tmp_path, emu, dialect=dialect, model={"stream": True}, run={"concurrency": 64})
    result = run_cli("run", str(job))
    assert result.code == 0, result.stderr
    out = read_output(tmp_path / "out/result.parquet")
    assert [r["key"] for r in out] == [r["id"] for r in records]
    for row, record in zip(out, records):
        assert row["status"] == "ok", row
        assert row["response"] == f"Echo: {record['prompt']}"  # the whole answer, never a piece of it
        assert row["request_id"] and row["input_tokens"] and row["output_tokens"] and row["finish_reason"] == "stop"
        assert row["time_to_first_token_ms"] is not None and row["time_to_first_token_ms"] <= row["latency_ms"]
    stats = emu.stats()
    assert stats["succeeded_more_than_once"] == 0
    assert sum(stats["by_fault"].get(name, 0) for name in STREAM_FAULTS) > rows * 0.1
    assert stats["by_stream"]["plain"] == 0
    assert any(r["attempts"] > 1 for r in out)


def test_streamed_and_plain_answers_are_the_same_table(tmp_path, emulator):
    """Streaming changes the transport, not the table: responses and usage equal the non-streamed run."""
    write_prompts(tmp_path / "prompts.jsonl", 30)
    columns = ["key", "response", "finish_reason", "input_tokens", "output_tokens", "total_tokens"]
    tables = []
    for name, stream in (("plain", False), ("streamed", True)):
        job = make_job(tmp_path, emulator, dialect="dashscope", name=name, model={"stream": stream},
                       output={"path": f"out/{name}.parquet"})
        assert run_cli("run", str(job)).code == 0
        tables.append([{c: r[c] for c in columns} for r in read_output(tmp_path / f"out/{name}.parquet")])
    assert tables[0] == tables[1]


@pytest.mark.parametrize("dialect", ["openai", "dashscope"])
def test_stream_only_models_stream_in_auto_mode(tmp_path, emulator, dialect):
    """qwq-plus answers only streamed and qwen-plus thinks only streamed: auto streams them unasked,
    with the reasoning kept; other rows are not streamed."""
    lines = [{"id": "a", "prompt": "think hard", "model": "qwq-plus"},
             {"id": "b", "prompt": "think too", "params": {"enable_thinking": True}},
             {"id": "c", "prompt": "no thinking"}]
    (tmp_path / "prompts.jsonl").write_text("".join(__import__("json").dumps(x) + "\n" for x in lines))
    job = make_job(tmp_path, emulator, dialect=dialect,
                   input={"path": "prompts.jsonl", "id_column": "id", "prompt_column": "prompt",
                          "model_column": "model", "params_column": "params"})
    result = run_cli("run", str(job))
    assert result.code == 0, result.stderr
    rows = {r["key"]: r for r in read_output(tmp_path / "out/result.parquet")}
    assert all(r["status"] == "ok" for r in rows.values())
    assert rows["a"]["reasoning"] and rows["b"]["reasoning"] and rows["b"]["reasoning_tokens"]
    assert rows["c"]["reasoning"] is None and rows["c"]["time_to_first_token_ms"] is None
    assert emulator.stats()["by_stream"] == {"stream": 2, "plain": 1}


@pytest.mark.parametrize("mode", ["200", "4xx"])
def test_native_errors_before_the_first_frame_in_both_shapes(tmp_path, make_emulator, mode):
    """A native stream error before any frame, as HTTP 200 + event:error or as a 4xx with an SSE body, is
    classified the same: permanent InvalidParameter rows, throttling retried."""
    emu = make_emulator(faults={"400": 0.2, "429": 0.2}, native_stream_error_status=mode, seed=11)
    write_prompts(tmp_path / "prompts.jsonl", 100)
    job = make_job(tmp_path, emu, dialect="dashscope", model={"stream": True})
    result = run_cli("run", str(job), "--max-error-rate", "1")
    assert result.code == 0, result.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    failed = [r for r in rows if r["status"] == "error"]
    assert failed and all(r["error_code"] == "InvalidParameter" and r["error_type"] == "PermanentCallError"
                          for r in failed)
    assert all(r["status"] == "ok" or r["error_code"] == "InvalidParameter" for r in rows)
    assert any(r["attempts"] > 1 and r["status"] == "ok" for r in rows)  # the 429s were retried
