"""Rate limiting end to end against the emulator's per-second RPM/TPM limits (counts, never timings)."""

from __future__ import annotations

import json
import signal
import time


from runner.emulator import Emulator, EmulatorConfig
from tests.helpers import make_job, read_output, sent_inside_a_retry_after_gate, run_cli, start_cli, wait_until, write_prompts


def test_known_rpm_is_respected(tmp_path, make_emulator):
    """With [run] rpm equal to the account's limit, no request is rejected for rate."""
    emu = make_emulator(rpm=3000)
    write_prompts(tmp_path / "prompts.jsonl", 200)
    job = make_job(tmp_path, emu, run={"rpm": 3000, "concurrency": 64, "adaptive_rate": True,
                                       "cooldown_seconds": 0.25})
    result = run_cli("run", str(job))
    assert result.code == 0, result.stderr
    assert all(r["status"] == "ok" for r in read_output(tmp_path / "out/result.parquet"))
    stats = emu.stats(keys=False)
    assert stats["rejected"]["rpm"] <= 2 and stats["requests"] <= 202


def test_known_tpm_paces_long_prompts(tmp_path, make_emulator):
    """With [run] tpm set, long prompts are paced by tokens and the emulator's TPM limiter rejects none."""
    emu = make_emulator(tpm=120_000)
    write_prompts(tmp_path / "prompts.jsonl", 60, extra={"prompt": "long context " * 150})
    job = make_job(tmp_path, emu, model={"max_tokens": 50}, run={"tpm": 120_000, "concurrency": 32})
    result = run_cli("run", str(job))
    assert result.code == 0, result.stderr
    stats = emu.stats(keys=False)
    assert stats["rejected"]["tpm"] <= 1


def test_unknown_limits_are_discovered(tmp_path, make_emulator):
    """Without rpm, the adaptive rate finds the limit: every row ends ok, the one-time slow-start overshoot
    stays bounded (steady-state 429 shares are measured by tests/bench/bench_ratelimit.py), and the
    summary's 429 count is the server's."""
    emu = make_emulator(rpm=3000)
    write_prompts(tmp_path / "prompts.jsonl", 300)
    job = make_job(tmp_path, emu, run={"adaptive_rate": True, "cooldown_seconds": 0.25, "concurrency": 64})
    result = run_cli("run", str(job))
    assert result.code == 0, result.stderr
    assert all(r["status"] == "ok" for r in read_output(tmp_path / "out/result.parquet"))
    stats = emu.stats(keys=False)
    assert 0 < stats["rejected"]["rpm"] < 0.3 * stats["requests"]
    summary = json.loads((tmp_path / "out/result.summary.json").read_text())
    assert summary["throttled"].get("limit_requests", 0) == stats["rejected"]["rpm"]


def test_quota_exhausted_stops_keeps_rows_and_a_rerun_continues(tmp_path):
    """Arrears stop the run (exit 1) without writing any row as failed; after the bill is paid the same
    command sends only the rows that were not answered."""
    write_prompts(tmp_path / "prompts.jsonl", 200)
    with Emulator(EmulatorConfig(faults={"arrearage": 0.05}, latency_ms=5)) as broke:
        port = broke.port
        job = make_job(tmp_path, broke, run={"concurrency": 8, "part_seconds": 0.2})
        first = run_cli("run", str(job))
        answered = broke.stats(keys=False)["by_status"].get("200", 0)
    assert first.code == 1 and "cannot pay" in first.stderr and "Traceback" not in first.stderr
    assert answered > 0
    with Emulator(EmulatorConfig(), port=port) as paid:
        second = run_cli("run", str(job))
        assert second.code == 0, second.stderr
        assert paid.stats(keys=False)["requests"] == 200 - answered
    rows = read_output(tmp_path / "out/result.parquet")
    assert len(rows) == 200 and all(r["status"] == "ok" for r in rows)


def test_retry_budget_stops_hammering_a_broken_endpoint(tmp_path, make_emulator):
    """An endpoint failing every request is not hammered: past the retry budget the run stops, exit 1."""
    emu = make_emulator(faults={"503": 1.0})
    write_prompts(tmp_path / "prompts.jsonl", 1000)
    job = make_job(tmp_path, emu, run={"concurrency": 8, "max_attempts": 10, "retry_budget": 0.5})
    result = run_cli("run", str(job))
    assert result.code == 1
    assert "retry budget" in result.stderr and "ModelUnavailable" in result.stderr
    assert emu.stats(keys=False)["requests"] < 300


# -- issue 14: what the rate control rewrite must guarantee (the emulator's request log and clock) ----


def test_a_retry_after_gate_lets_no_request_start_before_it_opens(tmp_path, make_emulator):
    """A 429 with Retry-After: 2 closes the gate for every worker: no request reaches the server from just
    after that answer until 2 s after it; then the job finishes."""
    emu = make_emulator(fail_first=1, retry_after=2, latency_ms=200, request_log=True)
    write_prompts(tmp_path / "prompts.jsonl", 40)
    job = make_job(tmp_path, emu, run={"concurrency": 8, "adaptive_rate": True, "cooldown_seconds": 0.25})
    result = run_cli("run", str(job))
    assert result.code == 0, result.stderr
    assert sent_inside_a_retry_after_gate(emu, 41) == []
    assert all(r["status"] == "ok" for r in read_output(tmp_path / "out/result.parquet"))


def test_after_sigint_no_new_request_reaches_the_server(tmp_path, make_emulator):
    """After SIGINT the runner starts no request: the emulator sees no arrival after the signal, also from
    workers that were waiting for the rate limiter (rpm 120 paces 8 workers at 2 requests/s)."""
    emu = make_emulator(latency_ms=2000)
    write_prompts(tmp_path / "prompts.jsonl", 200)
    job = make_job(tmp_path, emu, run={"concurrency": 8, "rpm": 120, "adaptive_rate": True,
                                       "cooldown_seconds": 0.25, "drain_seconds": 30})
    proc = start_cli("run", str(job))
    try:
        wait_until(lambda: emu.stats(keys=False)["requests"] >= 3, what="three requests at the emulator")
        # Right after an arrival: the next one is due about 0.5 s later, so nothing is on the wire now.
        signalled = time.monotonic()  # the emulator's clock (system-wide on Linux)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130
    stats = emu.stats(keys=False)
    assert stats["clock"]["last_arrival"] < signalled, f"{stats['requests']} requests arrived"


def test_a_503_with_retry_after_is_honoured(tmp_path, make_emulator):
    """A 503 with Retry-After: 2 is retried no earlier than 2 s after it was answered (the job's backoff is
    5 ms), and the row ends ok."""
    emu = make_emulator(fail_first=1, fail_first_fault="503", retry_after_503=2, request_log=True)
    write_prompts(tmp_path / "prompts.jsonl", 20)
    job = make_job(tmp_path, emu, run={"concurrency": 4})
    result = run_cli("run", str(job))
    assert result.code == 0, result.stderr
    log = emu.stats(keys=False, log=True)["log"]
    (failed,) = [e for e in log if e["status"] == 503]
    (retry,) = [e for e in log if e["key"] == failed["key"] and e["attempt"] == 2]
    assert retry["status"] == 200
    assert retry["arrived"] >= failed["answered"] + 2.0
