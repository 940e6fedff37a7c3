"""Batch mode's parts: job keys, batch files (split, checks), joining answer lines, the durable state,
a create cut off mid-call, Ctrl-C while batches run."""

from __future__ import annotations

import json
import signal

import anyio
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runner.batch import render
from runner.batch.api import BatchApi
from runner.batch.join import join_batch, parse_line
from runner.batch.render import RowSet, covered_rows, custom_id, plan_batches
from runner.batch.state import BatchRecord, BatchState
from runner.cost import PriceBook
from runner.endpoints import ApiKey, batch_base_url
from runner.job import run_job
from runner.errors import BadResponse, PermanentCallError, SpecError, TransientCallError
from runner.records import Completion, Request
from runner.sink import DoneRows
from runner.spec import EndpointSpec, RunSpec, load_job, parse_job
from tests.helpers import make_job, run_cli, start_cli, wait_until, write_prompts
from tests.test_batch_e2e import ManualClock, state_of

BASE = {"input": {"path": "in.jsonl", "prompt_column": "p"}, "model": {"name": "qwen-plus"},
        "output": {"path": "out.parquet"}}


def job_with_run(**run):
    return parse_job({**BASE, "run": run})


# -- job keys ----------------------------------------------------------------------------------

def test_batch_keys_are_read_and_checked():
    spec = job_with_run(mode="batch", completion_window="2d", batch_fallback_after="90m", batch_poll_seconds=5,
                        batch_max_lines=100, batch_max_bytes=1000, batch_description="nightly")
    run = spec.run
    assert (run.mode, run.completion_window, run.batch_fallback_after) == ("batch", "2d", 5400.0)
    assert (run.batch_poll_seconds, run.batch_max_lines, run.batch_max_bytes) == (5.0, 100, 1000)
    assert job_with_run().run.mode == "online"
    assert spec.override(mode="online").run.mode == "online"


@pytest.mark.parametrize("run, message", [
    ({"mode": "offline"}, "[run] mode: expected one of online, batch"),
    ({"completion_window": "12h"}, "expected from 24h to 336h"),
    ({"completion_window": "1.5d"}, "expected from 24h to 336h"),
    ({"completion_window": "3w"}, "expected a duration such as"),
    ({"batch_fallback_after": "soon"}, "[run] batch_fallback_after: expected a duration such as \"30s\""),
    ({"batch_max_lines": 60000}, "at most 50,000 lines"),
    ({"batch_max_bytes": 600 * 1024 * 1024}, "at most 524,288,000 bytes"),
    ({"batch_description": "x" * 201}, "at most 200 characters"),
])
def test_bad_batch_keys_name_the_key(run, message):
    with pytest.raises(SpecError) as error:
        job_with_run(**run)
    assert message in error.value.message


def test_bad_mode_flag_is_a_usage_error(tmp_path):
    job = make_job(tmp_path)
    result = run_cli("run", str(job), "--mode", "later")
    assert result.code == 2 and "--mode" in result.stderr


def test_batch_endpoint_is_compatible_mode_on_the_jobs_host():
    assert batch_base_url(EndpointSpec()) == "https://dashscope-intl.aliyuncs.com/compatible-mode/v1"
    assert batch_base_url(EndpointSpec(dialect="dashscope", region="beijing")) == \
        "https://dashscope.aliyuncs.com/compatible-mode/v1"
    assert batch_base_url(EndpointSpec(dialect="dashscope", base_url="http://127.0.0.1:9/api/v1/")) == \
        "http://127.0.0.1:9/compatible-mode/v1"


# -- batch files -------------------------------------------------------------------------------

def request(row_id: int, model: str = "qwen-plus", text: str = "hi", **params) -> Request:
    return Request(row_id=row_id, key=f"k{row_id}", model=model, messages=({"role": "user", "content": text},),
                   params=params, kept={"n": row_id})


def plan(tmp_path, requests, *, done=None, covered=(), **run):
    state = BatchState(tmp_path, [])
    unsent = []
    result = plan_batches(requests, done=done or DoneRows(), covered=RowSet(covered), state=state,
                          run=RunSpec(**run), kept_fields=(pa.field("n", pa.int64()),), write_unsent=unsent.append,
                          prices=PriceBook("singapore", job_model="qwen-plus", overrides={}, batch=True))
    return state, unsent, result


def test_rows_are_split_by_model_thinking_mode_and_size(tmp_path):
    requests = [request(i, model="qwen-plus" if i % 3 else "qwen-max") for i in range(10)]
    requests += [request(10, enable_thinking=True), request(11, enable_thinking=False)]
    state, unsent, result = plan(tmp_path, requests, batch_max_lines=4)
    assert not unsent and result.planned == 12 and result.rows_seen == 12
    groups = [(r.model, r.thinking, r.rows) for r in state.records]
    # qwen-plus without enable_thinking: rows 1 2 4 5 | 7 8 (file of 4 lines at most); qwen-max: 0 3 6 9.
    assert sorted(groups, key=str) == sorted([("qwen-plus", None, 4), ("qwen-plus", None, 2), ("qwen-max", None, 4),
                                              ("qwen-plus", True, 1), ("qwen-plus", False, 1)], key=str)
    ids = []
    for record in state.records:
        lines = [json.loads(x) for x in record.input_path(tmp_path).read_text().splitlines()]
        assert {line["body"]["model"] for line in lines} == {record.model}
        assert all(line["url"] == "/v1/chat/completions" and line["method"] == "POST" for line in lines)
        assert all("stream" not in line["body"] for line in lines)
        assert record.bytes == record.input_path(tmp_path).stat().st_size
        rows = pq.read_table(record.rows_path(tmp_path)).to_pylist()
        assert [custom_id(r["row_id"], r["key"]) for r in rows] == [line["custom_id"] for line in lines]
        assert [r["n"] for r in rows] == [r["row_id"] for r in rows]
        ids += [line["custom_id"] for line in lines]
    assert len(ids) == len(set(ids)) == 12
    # The state on disk lists the same files.
    assert [r.seq for r in BatchState.load(tmp_path).records] == [r.seq for r in state.records]

    (tmp_path / "bytes").mkdir()
    state, _, _ = plan(tmp_path / "bytes", [request(i) for i in range(3)], batch_max_bytes=300)
    assert [r.rows for r in state.records] == [1, 1, 1]  # each line is ~150 bytes


def test_rows_done_or_in_a_pending_batch_are_not_planned_and_bad_rows_become_error_rows(tmp_path, monkeypatch):
    done = DoneRows()
    done.add(0, request(0).digest())
    done.add(1, 12345)  # answered for a different request: sent again
    bad = Request(row_id=3, key="k3", model="qwen-plus", problem="line 4: column 'p' is missing")
    monkeypatch.setattr(render, "MAX_LINE_BYTES", 300)
    huge = request(5, text="x" * 400)
    state, unsent, result = plan(tmp_path, [request(0), request(1), request(2), bad, request(4), huge],
                                 done=done, covered={4})
    assert result.planned == 2 and result.changed == 1 and result.rows_seen == 6
    assert [(r.row_id, r.error_code, r.mode) for r in unsent] == [(3, "invalid_row", "batch"),
                                                                  (5, "batch_line_too_large", "batch")]
    assert "row_id 5 (key 'k5')" in unsent[1].error_message and "at most 300" in unsent[1].error_message
    covered = covered_rows(state)
    assert [i for i in range(10) if i in covered] == [1, 2] and len(covered) == 2 and 10**6 not in covered


def test_custom_ids_carry_the_row_id():
    assert custom_id(17, "ticket-0017") == "17-ticket-0017"
    assert custom_id(3, "x" * 500) == "3-" + "x" * 64


# -- answer lines --------------------------------------------------------------------------------

def ok_line(cid: str, text: str = "Hello") -> dict:
    body = {"id": "chatcmpl-rid-1", "object": "chat.completion", "model": "qwen-plus",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29}}
    return {"id": "rid-1", "custom_id": cid, "response": {"status_code": 200, "request_id": "rid-1", "body": body},
            "error": None}


def error_line(cid: str, status: int, code: str, message: str = "bad") -> dict:
    return {"id": "rid-2", "custom_id": cid, "error": {"code": code, "message": message},
            "response": {"status_code": status, "request_id": "rid-2",
                         "body": {"error": {"code": code, "message": message, "type": "invalid_request_error"}}}}


def test_answer_lines_are_parsed_and_classified_as_online():
    answer = parse_line(ok_line("0-a"))
    assert isinstance(answer, Completion) and answer.content == "Hello" and answer.request_id == "rid-1"
    assert answer.usage.total_tokens == 29
    refused = parse_line(error_line("1-b", 400, "invalid_parameter_error", "Range of max_tokens"))
    assert isinstance(refused, PermanentCallError) and refused.code == "invalid_parameter_error"
    assert refused.http_status == 400 and refused.request_id == "rid-2"
    server = parse_line(error_line("2-c", 500, "internal_error"))
    assert type(server) is TransientCallError and server.code == "internal_error"
    expired = parse_line({"id": "x", "custom_id": "3-d", "response": None,
                          "error": {"code": "batch_expired", "message": "window passed"}})
    assert isinstance(expired, TransientCallError) and expired.code == "batch_expired"
    # A bad key for one line fails that row, not the run.
    auth = parse_line(error_line("4-e", 401, "invalid_api_key"))
    assert isinstance(auth, PermanentCallError)
    broken = parse_line({"custom_id": "5-f", "response": {"status_code": 200, "body": {"choices": []}}})
    assert isinstance(broken, BadResponse) and broken.code == "bad_response"  # retried online, like a damaged answer


def test_join_gives_every_row_one_result(tmp_path):
    state, _, _ = plan(tmp_path, [request(i) for i in range(5)])
    record = state.records[0]
    record.status = "expired"
    record.times = {"in_progress_at": 1_700_000_000, "expired_at": 1_700_000_100}
    ids = [custom_id(i, f"k{i}") for i in range(5)]
    lines = [ok_line(ids[0]), ok_line(ids[0], "a second answer is ignored"), error_line(ids[1], 400, "x"),
             ok_line("99-stranger")]
    record.output_path(tmp_path).write_text("".join(json.dumps(x) + "\n" for x in lines) + "not json\n")
    record.errors_path(tmp_path).write_text(json.dumps({"custom_id": ids[2], "response": None,
                                                        "error": {"code": "batch_expired", "message": "late"}}) + "\n")
    prices = PriceBook("singapore", job_model="qwen-plus", overrides={}, batch=True)
    results = join_batch(record, tmp_path, prices)
    assert [r.row_id for r in results] == [0, 1, 2, 3, 4]
    assert [(r.status, r.error_code, r.attempts) for r in results] == [
        ("ok", None, 1), ("error", "x", 1), ("error", "batch_expired", 0), ("error", "batch_expired", 0),
        ("error", "batch_expired", 0)]
    first = results[0]
    assert first.response == "Hello" and first.mode == "batch" and first.kept == {"n": 0}
    online = PriceBook("singapore", job_model="qwen-plus", overrides={})
    assert first.cost == pytest.approx(online.row_cost(request(0), first.usage) / 2)
    assert first.started_at.timestamp() == 1_700_000_000 and first.finished_at.timestamp() == 1_700_000_100

    record.status = "failed"
    record.errors = [{"code": "request_too_large", "message": "too big", "line": 2}]
    record.output_path(tmp_path).unlink()
    record.errors_path(tmp_path).unlink()
    failed = join_batch(record, tmp_path, prices)
    assert [(r.error_type, r.error_code) for r in failed[:3]] == [
        ("TransientCallError", "batch_failed"), ("PermanentCallError", "request_too_large"),
        ("TransientCallError", "batch_failed")]


def test_state_survives_a_reload_and_ignores_unknown_fields(tmp_path):
    state = BatchState(tmp_path, [])
    state.add(BatchRecord(seq=1, model="qwen-plus", thinking=None, rows=3, bytes=10, input_file_id="file-1"))
    record = state.records[0]
    assert record.update({"id": "batch_1", "status": "in_progress", "request_counts": {"total": 3, "completed": 1},
                          "created_at": 5, "in_progress_at": 6})
    assert not record.update({"id": "batch_1", "status": "in_progress", "request_counts": {"total": 3, "completed": 1}})
    state.save()
    data = json.loads((tmp_path / "batch-state.json").read_text())
    data["batches"][0]["from_a_newer_runner"] = True
    (tmp_path / "batch-state.json").write_text(json.dumps(data))
    loaded = BatchState.load(tmp_path).records[0]
    assert (loaded.status, loaded.request_counts, loaded.times) == ("in_progress", {"total": 3, "completed": 1},
                                                                    {"created_at": 5, "in_progress_at": 6})
    assert BatchState.load(tmp_path / "nothing-here").records == []


# -- runs ----------------------------------------------------------------------------------------

def test_a_create_cut_off_mid_call_is_found_not_sent_again(tmp_path, make_emulator):
    """The run died after POST /batches reached the server and before the batch id was recorded."""
    emu = make_emulator(batch_time_scale=100.0, batch_phase_seconds=10.0)
    write_prompts(tmp_path / "prompts.jsonl", 50)
    spec = load_job(make_job(tmp_path, emu, run={"mode": "batch", "batch_poll_seconds": 0.05}))
    parts = spec.output.path.with_name(spec.output.path.name + ".parts")
    key = ApiKey("sk-test")

    async def first_run_that_dies() -> None:
        from runner.executors.batch import batch_metadata
        from runner.job import job_fingerprint
        from runner.records import result_schema
        from runner.sink import ParquetSink
        from runner.sources import open_source

        source = open_source(spec.input, spec.model)
        sink = ParquetSink(spec.output.path, result_schema(source.kept_fields), fingerprint=job_fingerprint(spec))
        state = BatchState(parts, [])
        plan_batches(source, done=DoneRows(), covered=RowSet(), state=state, run=spec.run,
                     kept_fields=source.kept_fields, write_unsent=sink.write,
                     prices=PriceBook("singapore", job_model="qwen-plus", overrides={}, batch=True))
        record = state.records[0]
        async with BatchApi(spec.endpoint, key) as api:
            record.input_file_id = (await api.upload(record.input_path(parts)))["id"]
            record.creating = True
            state.save()
            await api.create(record.input_file_id, "24h", batch_metadata(spec, record))
        sink.close()  # ... and the process is gone before the batch id is saved

    anyio.run(first_run_that_dies)
    assert emu.stats(keys=False)["batches"]["created"] == 1
    summary = anyio.run(lambda: run_job(spec, api_key=key))
    assert summary.ok == 50
    assert emu.stats(keys=False)["batches"]["created"] == 1
    assert emu.stats(keys=False)["files"]["uploaded"] == 1


def test_ctrl_c_leaves_the_batches_running_and_a_rerun_picks_them_up(tmp_path):
    from runner.emulator import Emulator, EmulatorConfig

    clock = ManualClock()
    with Emulator(EmulatorConfig(batch_time_scale=1.0, batch_phase_seconds=100.0), clock=clock) as emu:
        write_prompts(tmp_path / "prompts.jsonl", 100)
        job = make_job(tmp_path, emu, run={"mode": "batch", "batch_poll_seconds": 0.1})
        out = tmp_path / "out" / "result.parquet"
        proc = start_cli("run", str(job))
        wait_until(lambda: any(b["batch_id"] for b in state_of(out)["batches"]), 60, "the batch created")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 130
        assert "keep running on the server" in stderr and "runner status" in stderr and "Traceback" not in stderr
        clock.advance(1000)
        rerun = run_cli("run", str(job), "--quiet")
        assert rerun.code == 0, rerun.stderr
        assert pq.read_table(out).column("status").to_pylist() == ["ok"] * 100
        assert emu.stats(keys=False)["batches"]["created"] == 1


def test_validate_and_dry_run_in_batch_mode(tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", 30)
    job = make_job(tmp_path, run={"batch_max_lines": 12})
    report = run_cli("validate", str(job), "--mode", "batch")
    assert report.code == 0, report.stderr
    assert "batch      3 file(s) for the Batch API: qwen-plus 3; completion window 24h" in report.stdout
    assert "batch prices" in report.stdout
    dry = run_cli("run", str(job), "--mode", "batch", "--dry-run", "--quiet")
    assert dry.code == 0, dry.stderr
    lines = [json.loads(x) for x in (tmp_path / "out" / "result.requests.jsonl").read_text().splitlines()]
    assert [x["custom_id"] for x in lines[:2]] == ["0-row-00000", "1-row-00001"] and len(lines) == 30
    assert set(lines[0]) == {"custom_id", "method", "url", "body"}


def test_batch_prices_are_half_the_online_estimate(tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", 30)
    job = make_job(tmp_path)

    def cost_line(*flags):
        out = run_cli("validate", str(job), *flags).stdout
        low, high = [float(x) for x in out.split("cost       ")[1].split(" USD")[0].split(" - ")]
        return low, high

    online, batch = cost_line(), cost_line("--mode", "batch")
    assert batch == pytest.approx((online[0] / 2, online[1] / 2), rel=0.02)


def test_max_cost_counts_each_batch_worst_case_before_it_is_created(tmp_path, make_emulator):
    emu = make_emulator(batch_time_scale=100.0, batch_phase_seconds=10.0)
    write_prompts(tmp_path / "prompts.jsonl", 300)
    job = make_job(tmp_path, emu, model={"max_tokens": 20}, run={"mode": "batch", "batch_poll_seconds": 0.05})
    spec = load_job(job)
    from runner.sources import open_source

    prices = PriceBook("singapore", job_model="qwen-plus", overrides={}, batch=True)
    worst = [prices.worst_case(r) for r in open_source(spec.input, spec.model)]
    budget = sum(worst[:120]) + worst[120] / 2  # room for the first 120 rows only
    first = run_cli("run", str(job), "--max-cost", repr(budget))
    assert first.code == 1 and "180 rows were not sent" in first.stderr, first.stderr
    assert emu.stats(keys=False)["batches"]["lines"] == 120
    second = run_cli("run", str(job), "--max-cost", "1")
    assert second.code == 0, second.stderr
    table = pq.read_table(tmp_path / "out" / "result.parquet").to_pylist()
    assert [r["row_id"] for r in table] == list(range(300)) and {r["status"] for r in table} == {"ok"}
    assert sum(r["cost"] for r in table[:120]) <= budget
    assert emu.stats(keys=False)["batches"] == {"created": 2, "by_status": {"completed": 2}, "lines": 300}


def test_a_native_dialect_job_uses_the_compatible_batch_endpoints(tmp_path, make_emulator):
    emu = make_emulator(batch_time_scale=100.0, batch_phase_seconds=10.0)
    write_prompts(tmp_path / "prompts.jsonl", 40)
    spec = load_job(make_job(tmp_path, emu, dialect="dashscope", run={"mode": "batch", "batch_poll_seconds": 0.05}))
    summary = anyio.run(lambda: run_job(spec, api_key=ApiKey("sk-test")))
    assert summary.ok == 40 and emu.stats(keys=False)["batches"]["created"] == 1


def test_quickstart_rehearses_batch_mode_on_the_emulator(tmp_path):
    result = run_cli("run", "jobs/quickstart.toml", "--mode", "batch", "--emulator", "--output",
                     str(tmp_path / "qs.parquet"), key=None)
    assert result.code == 0, result.stderr
    assert "created batch_" in result.stderr and "rows       200  ok 200  failed 0" in result.stderr
    assert set(pq.read_table(tmp_path / "qs.parquet").column("mode").to_pylist()) == {"batch"}


def test_a_batch_the_api_refuses_records_its_rows_as_failed(tmp_path, make_emulator):
    emu = make_emulator(batch_time_scale=100.0, batch_phase_seconds=10.0)
    write_prompts(tmp_path / "prompts.jsonl", 20)
    job = make_job(tmp_path, emu, model={"name": "qwen-not-in-batch"},
                   run={"mode": "batch", "batch_poll_seconds": 0.05, "max_error_rate": 1.0})
    result = run_cli("run", str(job))
    assert result.code == 0, result.stderr
    assert "the Batch API refused it" in result.stderr
    rows = pq.read_table(tmp_path / "out" / "result.parquet").to_pylist()
    assert {(r["status"], r["error_type"], r["error_code"]) for r in rows} == {
        ("error", "PermanentCallError", "batch_rejected")}
    assert "not supported by the Batch API" in rows[0]["error_message"]
    assert emu.stats(keys=False)["batches"]["created"] == 0


def test_a_refused_key_in_batch_mode_is_an_error_line_not_a_traceback(tmp_path):
    """A run-level error inside the Batch API polling (a 401 on upload) reaches the CLI as error/hint, exit 1."""
    from runner.emulator import Emulator, EmulatorConfig

    with Emulator(EmulatorConfig(api_keys=("sk-the-right-key-000000",))) as emu:
        write_prompts(tmp_path / "prompts.jsonl", 5)
        job = make_job(tmp_path, emu, run={"mode": "batch"})
        result = run_cli("run", str(job), "--quiet")
    assert result.code == 1, result.stderr
    assert "error: the endpoint refused the credentials" in result.stderr and "hint: " in result.stderr
    assert "Traceback" not in result.stderr and "ExceptionGroup" not in result.stderr
