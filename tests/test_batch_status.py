"""`runner status` / `cancel` tell the truth: they ask the endpoint the run recorded, hints name the flags the
run used (and work when followed literally), `--json` is always JSON, and a failed cancel exits 1."""

from __future__ import annotations

import json
import re
import shlex
import signal

from runner.emulator import Emulator, EmulatorConfig
from tests.helpers import make_job, run_cli, start_cli, wait_until, write_prompts
from tests.test_batch_e2e import BATCH_RUN, ManualClock, state_of

NOWHERE = {"base_url": "http://127.0.0.1:9/compatible-mode/v1"}  # nothing listens there
STILL = EmulatorConfig(batch_time_scale=1.0, batch_phase_seconds=100.0)  # batches move only with the clock


def _start_batches(tmp_path, emu, out, rows=400, lines=250):
    """A batch run against `emu` given by --base-url and --output (the job file names neither), left running
    once its batches exist; returns the job and the process."""
    write_prompts(tmp_path / "prompts.jsonl", rows)
    job = make_job(tmp_path, endpoint=NOWHERE, run={**BATCH_RUN, "batch_max_lines": lines})
    proc = start_cli("run", str(job), "--quiet", "--output", str(out), "--base-url", emu.openai_base_url)
    expected = -(-rows // lines)
    wait_until(lambda: sum(1 for b in state_of(out)["batches"] if b["batch_id"]) == expected
               or proc.poll() is not None, 60, "the batches created and recorded")
    return job, proc


def _hinted(stderr: str, command: str) -> list[str]:
    """The `runner COMMAND ...` a hint names, as arguments for run_cli."""
    found = re.search(rf"`(runner {command} [^`]*)`", stderr)
    assert found, stderr
    return shlex.split(found.group(1))[1:]


def test_interrupt_hint_names_the_runs_flags_and_status_follows_it(tmp_path):
    """SIGINT in batch mode hints `runner status/cancel JOB --output ... --base-url ...`; followed literally they
    show and cancel the run's own batches."""
    clock = ManualClock()
    out = tmp_path / "elsewhere" / "result.parquet"
    with Emulator(STILL, clock=clock) as emu:
        job, proc = _start_batches(tmp_path, emu, out)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr
        status_args = _hinted(stderr, "status")
        assert status_args[status_args.index("--output") + 1] == str(out)
        assert status_args[status_args.index("--base-url") + 1] == emu.openai_base_url
        shown = run_cli(*status_args)
        assert shown.code == 0, shown.stderr
        assert shown.stdout.count("validating") == 2 and "2 batch(es), 2 running" in shown.stdout
        cancelled = run_cli(*_hinted(stderr, "cancel"))
        assert cancelled.code == 0, cancelled.stderr
        assert cancelled.stdout.count("cancelling") == 2
        rerun_args = _hinted(cancelled.stderr, "run")
        assert "--output" in rerun_args and "--base-url" in rerun_args


def test_status_asks_the_endpoint_the_run_recorded(tmp_path):
    """Without --base-url, status and cancel ask the server the run sent the batches to, not the job file's."""
    clock = ManualClock()
    out = tmp_path / "out" / "result.parquet"
    with Emulator(STILL, clock=clock) as emu:
        job, proc = _start_batches(tmp_path, emu, out)
        proc.kill()
        proc.wait(10)
        assert state_of(out)["endpoint"]["base_url"] == emu.openai_base_url
        shown = run_cli("status", str(job), "--output", str(out))
        assert shown.code == 0, shown.stderr
        assert shown.stdout.count("validating") == 2
        clock.advance(150)
        listed = json.loads(run_cli("status", str(job), "--output", str(out), "--json").stdout)
        assert listed["from_server"] and {b["status"] for b in listed["batches"]} == {"in_progress"}
        cancelled = run_cli("cancel", str(job), "--output", str(out))
        assert cancelled.code == 0, cancelled.stderr
        assert emu.stats(keys=False)["batches"]["created"] == 2


def test_status_json_is_json_in_every_state(tmp_path):
    """`status --json` prints one JSON object with no batches, while batches run (online and offline, with and
    without a key) and on a finished output."""
    clock = ManualClock()
    out = tmp_path / "out" / "result.parquet"
    with Emulator(STILL, clock=clock) as emu:
        write_prompts(tmp_path / "prompts.jsonl", 10)
        fresh = make_job(tmp_path, emu, name="fresh", output={"path": "fresh/result.parquet"})
        nothing = run_cli("status", str(fresh), "--json")
        assert nothing.code == 0, nothing.stderr
        assert json.loads(nothing.stdout) == {
            "output": str(tmp_path / "fresh/result.parquet"), "finished": False, "endpoint": emu.openai_base_url,
            "from_server": False, "running": 0, "batches": []}

        job, proc = _start_batches(tmp_path, emu, out)
        proc.kill()
        proc.wait(10)
        base = ("status", str(job), "--output", str(out), "--json")
        for args, key, from_server in [(base, "sk-test-0123456789abcdef", True),
                                       ((*base, "--offline"), "sk-test-0123456789abcdef", False),
                                       (base, None, False)]:
            result = run_cli(*args, key=key)
            assert result.code == 0, result.stderr
            listed = json.loads(result.stdout)
            assert listed["from_server"] is from_server and listed["running"] == 2
            assert [b["rows"] for b in listed["batches"]] == [250, 150] and not listed["finished"]

        clock.advance(1000)
        finished_run = run_cli("run", str(job), "--quiet", "--output", str(out), "--base-url", emu.openai_base_url)
        assert finished_run.code == 0, finished_run.stderr
        done = run_cli(*base)
        assert done.code == 0, done.stderr
        listed = json.loads(done.stdout)
        assert listed["finished"] and listed["running"] == 0
        assert run_cli(*base[:-1]).stdout.startswith("finished: ")



def test_status_json_is_json_when_the_server_cannot_be_asked(tmp_path):
    """`status --json` with the batch server gone prints JSON all the same (what the run recorded, and why the
    server was not asked) and exits 1; without --json it is the usual one-line error."""
    out = tmp_path / "out" / "result.parquet"
    emu = Emulator(STILL, clock=ManualClock()).start()
    try:
        job, proc = _start_batches(tmp_path, emu, out)
        proc.kill()
        proc.wait(10)
    finally:
        emu.stop()
    result = run_cli("status", str(job), "--output", str(out), "--json")
    assert result.code == 1, result.stderr
    listed = json.loads(result.stdout)
    assert listed["from_server"] is False and listed["running"] == 2 and listed["server_error"]
    assert [b["rows"] for b in listed["batches"]] == [250, 150]
    text = run_cli("status", str(job), "--output", str(out))
    assert text.code == 1 and text.stderr.startswith("error: ") and "Traceback" not in text.stderr

def _kill_and_lose_the_second_batch(tmp_path, emu, out):
    """Start the batches, kill the run, and make the state name a second batch the server never had;
    returns the job and the first batch's id."""
    job, proc = _start_batches(tmp_path, emu, out)
    proc.kill()
    proc.wait(10)
    state_path = out.with_name(out.name + ".parts") / "batch-state.json"
    state = json.loads(state_path.read_text())
    state["batches"][1]["batch_id"] = "batch_not_on_this_server"
    state_path.write_text(json.dumps(state))
    return job, state["batches"][0]["batch_id"]


def test_a_failed_cancel_exits_1_and_says_what_was_and_was_not_cancelled(tmp_path):
    """A batch the server will not cancel is named, the cancelled ones too, and the exit code is 1."""
    clock = ManualClock()
    out = tmp_path / "out" / "result.parquet"
    with Emulator(STILL, clock=clock) as emu:
        job, first = _kill_and_lose_the_second_batch(tmp_path, emu, out)
        # The first batch finishes on the server: the state still says it runs, the server refuses to cancel it.
        clock.advance(1000)
        result = run_cli("cancel", str(job), "--output", str(out))
        assert result.code == 1, result.stderr
        assert f"batch-0001: {first} not cancelled" in result.stdout
        assert "batch-0002: batch_not_on_this_server not cancelled" in result.stdout
        assert "error: 2 of 2 batch(es) not cancelled (batch-0001, batch-0002); none was cancelled" in result.stderr
        assert "recorded as cancelled" not in result.stderr


def test_a_partly_failed_cancel_names_both_sides(tmp_path):
    """One batch cancelled and one refused: exit 1, the cancelled one named as cancelled, the other as not."""
    clock = ManualClock()
    out = tmp_path / "out" / "result.parquet"
    with Emulator(STILL, clock=clock) as emu:
        job, _ = _kill_and_lose_the_second_batch(tmp_path, emu, out)
        result = run_cli("cancel", str(job), "--output", str(out))
        assert result.code == 1, result.stderr
        assert "error: 1 of 2 batch(es) not cancelled (batch-0002); cancelled: batch-0001" in result.stderr
        assert "to join what batch-0001 finished" in result.stderr
        assert emu.stats(keys=False)["batches"]["created"] == 2
