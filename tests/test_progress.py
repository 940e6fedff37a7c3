"""Progress on stderr: log lines for cron/CI (text and JSON), the bar at 80 columns, figures that agree."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import replace

import anyio

from runner.progress import Progress, Snapshot, bar_fields
from runner.ratelimit import Limits, LocalRateLimiter, limits_table

from .helpers import ROOT, _cli_env, make_job, read_pty, write_prompts

JSON_KEYS = {"ts", "event", "rows_done", "rows_total", "rows_this_run", "ok_this_run", "failed_this_run",
             "rows_per_second", "requests_per_second", "tokens_per_second", "throttled", "in_flight",
             "oldest_in_flight_seconds", "cost", "projected_cost", "currency", "elapsed_seconds", "eta_seconds", "limit"}


def _run_to_file(tmp_path, *args: str) -> tuple[int, str]:
    """The real CLI with stderr redirected to a file, as cron or CI would (not a terminal)."""
    log = tmp_path / "stderr.log"
    with open(log, "w", encoding="utf-8") as err:
        code = subprocess.run([sys.executable, "-m", "runner", "run", *args], stdout=subprocess.DEVNULL,
                              stderr=err, env=_cli_env("sk-test", None), cwd=ROOT, timeout=120).returncode
    return code, log.read_text(encoding="utf-8")


def _slow_job(tmp_path, make_emulator, rows: int = 80):
    # 8 workers, 300-500 ms a request: 80 rows last about 4-5 s, several --log-every 1 periods.
    emu = make_emulator(latency_ms=300, latency_jitter_ms=200)
    write_prompts(tmp_path / "prompts.jsonl", rows)
    return make_job(tmp_path, emu, run={"concurrency": 8})


def test_log_lines_when_stderr_is_a_file(tmp_path, make_emulator):
    """Piped stderr gets a start line, timed progress lines and an end line with the final counts and cost."""
    job = _slow_job(tmp_path, make_emulator)
    code, err = _run_to_file(tmp_path, str(job), "--log-every", "1")
    assert code == 0, err
    lines = [line for line in err.splitlines() if " rows " in line and " | " in line]
    events = [line.split()[1] for line in lines]
    assert events[0] == "start" and events[-1] == "end"
    assert events.count("progress") >= 2
    assert events.count("end") == 1
    end = lines[-1]
    assert "rows 80/80" in end and "ok 80, failed 0" in end and "cost " in end and "(job ~" in end
    assert " USD (job ~" in end  # the cost names its currency
    assert "eta 0s" in end and "in flight 0" in end
    assert "\r" not in err  # no bar redraws in a log


def test_json_log_lines_parse_with_the_documented_keys(tmp_path, make_emulator):
    """--log-format json: every progress line is one JSON object with the documented keys; the last is final."""
    job = _slow_job(tmp_path, make_emulator)
    code, err = _run_to_file(tmp_path, str(job), "--log-every", "1", "--log-format", "json")
    assert code == 0, err
    objects = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert len([o for o in objects if o["event"] == "progress"]) >= 2
    for obj in objects:
        assert set(obj) == JSON_KEYS
    assert objects[0]["event"] == "start" and objects[-1]["event"] == "end"
    end = objects[-1]
    assert end["rows_done"] == end["rows_total"] == end["rows_this_run"] == end["ok_this_run"] == 80
    assert end["in_flight"] == 0 and end["eta_seconds"] == 0
    assert end["cost"] > 0 and end["projected_cost"] == end["cost"] and end["currency"] == "USD"
    done = [o["rows_done"] for o in objects]
    assert done == sorted(done)


def test_log_lines_keep_coming_while_a_slow_request_holds_the_tail(tmp_path, make_emulator):
    """A request answered only after 4 s: log lines keep coming meanwhile, showing it in flight with its age."""
    emu = make_emulator(fail_first=1, fail_first_fault="slow", slow_ms=4000)
    write_prompts(tmp_path / "prompts.jsonl", 10)
    job = make_job(tmp_path, emu, run={"concurrency": 4})
    code, err = _run_to_file(tmp_path, str(job), "--log-every", "1", "--log-format", "json")
    assert code == 0, err
    objects = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    stalled = [o for o in objects if o["event"] == "progress" and o["rows_done"] == 9 and o["in_flight"] == 1]
    assert len(stalled) >= 2, objects  # nothing finished between them, and they were written anyway
    ages = [o["oldest_in_flight_seconds"] for o in stalled]
    assert ages == sorted(ages) and ages[-1] > ages[0]
    assert objects[-1]["rows_done"] == 10 and objects[-1]["in_flight"] == 0


def test_resumed_run_counts_the_whole_job(tmp_path, make_emulator):
    """After a resume, rows done and the cost include the earlier run's rows; this run's part is labelled."""
    emu = make_emulator()
    write_prompts(tmp_path / "prompts.jsonl", 60)
    job = make_job(tmp_path, emu)
    code, err = _run_to_file(tmp_path, str(job), "--limit", "20", "--log-format", "json")
    assert code == 0, err
    first_cost = [json.loads(line) for line in err.splitlines() if line.startswith("{")][-1]["cost"]
    # The finished output is reopened and the rows past the limit are sent.
    code, err = _run_to_file(tmp_path, str(job), "--retry-failed", "transient", "--log-format", "json")
    assert code == 0, err
    objects = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    start, end = objects[0], objects[-1]
    assert start["rows_done"] == 20 and start["rows_this_run"] == 0 and start["cost"] == first_cost
    assert end["rows_done"] == 60 and end["rows_this_run"] == end["ok_this_run"] == 40
    assert end["cost"] > first_cost and end["projected_cost"] == end["cost"]


def test_bar_at_80_columns_ends_with_the_final_figures(tmp_path, make_emulator):
    """On an 80-column terminal the bar's last line has the final counts, cost and ETA, within 80 columns."""
    import fcntl
    import pty
    import struct
    import termios

    emu = make_emulator(faults={"429": 0.1})
    write_prompts(tmp_path / "prompts.jsonl", 150)
    job = make_job(tmp_path, emu)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "runner", "run", str(job)], cwd=ROOT,
                            env=_cli_env("sk-test", None), stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    output = read_pty(master)
    os.close(master)
    assert proc.wait(timeout=60) == 0
    text = output.decode(errors="replace")
    screens = [s for s in text.replace("\n", "\r").split("\r") if "150/150" in s]
    assert screens, text
    final = screens[-1].strip()
    assert len(final) <= 80, final
    assert "ok=150 failed=0" in final and "cost=" in final and "(job ~" in final and "eta=0s" in final, final
    assert "rows       150  ok 150" in text  # the summary below agrees with the bar


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_tick_reports_a_hung_request_without_any_result():
    """With no result arriving, ticks still write log lines showing the request in flight and its age."""
    clock = _Clock()
    limiter = LocalRateLimiter(limits_table(Limits(None, None), {}), adaptive=False, clock=clock)
    sent = anyio.run(limiter.acquire, "qwen-plus", 10)
    out = io.StringIO()
    progress = Progress("log", log_every=30, stream=out, clock=clock)
    progress.start(10, 0, limiter, 0.0)
    clock.now += 42
    progress.tick()
    clock.now += 10  # less than --log-every since the last line: nothing written
    progress.tick()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and " progress " in lines[1]
    assert "in flight 1 (oldest 42s)" in lines[1] and "eta ?" in lines[1]
    limiter.report_success("qwen-plus", sent)
    assert limiter.in_flight() == (0, None)


def test_bar_fields_keep_cost_and_eta_when_room_is_short():
    """A narrow bar drops the limit, paused time, tok/s first; cost and ETA stay; a hung tail shows its age."""
    snap = Snapshot(event="progress", rows_done=500, rows_total=1000, rows_this_run=300, ok_this_run=290,
                    failed_this_run=10, rows_per_second=12.5, requests_per_second=14.0, tokens_per_second=4567,
                    throttled=12, in_flight=3, oldest_in_flight_seconds=75, cost=1.5, projected_cost=3.0,
                    elapsed_seconds=24, eta_seconds=40, limit="30/s", paused_seconds=3)
    wide = bar_fields(snap, 300, resumed=True)
    assert "limit=30/s" in wide and "tok/s" in wide and "run ok=290" in wide
    narrow = bar_fields(snap, 60, resumed=True)
    assert len(narrow) <= 60
    assert "cost=1.5000 (job ~3.0000)" in narrow and "eta=40s" in narrow and "limit=" not in narrow
    assert "inflight=3 oldest=1m15s" in narrow
    young = bar_fields(replace(snap, oldest_in_flight_seconds=2), 60, resumed=True)
    assert "inflight" not in young and "run ok=290 failed=10" in young


def test_limiter_counts_requests_in_flight_until_any_answer():
    """Every kind of answer (success, 429, other failure) takes a request out of flight; the oldest is first."""
    clock = _Clock()
    limiter = LocalRateLimiter(limits_table(Limits(None, None), {}), adaptive=False, clock=clock)

    async def send_three():
        sent = []
        for _ in range(3):
            sent.append(await limiter.acquire("qwen-plus", 10))
            clock.now += 5
        return sent

    first, second, third = anyio.run(send_three)
    assert limiter.in_flight() == (3, 15)
    limiter.report_throttled("qwen-plus", "limit_requests", None, first)
    assert limiter.in_flight() == (2, 10)
    limiter.report_failure("qwen-plus", third)
    assert limiter.in_flight() == (1, 10)
    limiter.report_success("qwen-plus", second)
    assert limiter.in_flight() == (0, None)
