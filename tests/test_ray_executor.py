"""The Ray executor end to end: the real CLI joins one local Ray (num_cpus=2, started once for the module)
and runs jobs against the emulator over loopback.

What is pinned here is counted, never timed: the table equals the online executor's, the 429 share under
a shared RPM limit, every row once after a kill -9 of the driver or of an actor. The accepted rate under
the limit (a timing) is measured by tests/bench/bench_ray.py, which prints it against the limit.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.helpers import TEST_KEY, make_job, read_output, sent_inside_a_retry_after_gate, run_cli, start_cli, wait_until, write_prompts
from tests.test_cost import _committed_cost

# Ray binds loopback only, as every test server here (its default on Linux is the machine's address);
# the CLI runs inherit the setting.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray", reason="the Ray executor needs the runner[ray] extra: pip install -e '.[test,ray]'")

# One worker runs them all (xdist_group): each worker that took one would start a Ray of its own.
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.xdist_group("ray")]

# Timings and per-attempt ids differ from run to run; everything else must be equal.
IGNORED = {"started_at", "finished_at", "latency_ms", "duration_ms", "request_id", "time_to_first_token_ms"}
FAULTS = {"429": 0.03, "500": 0.05, "503": 0.03, "400": 0.02, "drop": 0.02}


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray for the module (ray.init takes seconds); each CLI run joins it by address."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _job(tmp_path, emu, **kwargs):
    """A job for the fixture's Ray, whose workers import this checkout's runner: no code to ship."""
    return make_job(tmp_path, emu, **{**kwargs, "run": {"ray_runtime_env": {}, **kwargs.get("run", {})}})


def _comparable(path) -> list[dict]:
    table = pq.read_table(path)
    return table.drop_columns([c for c in table.schema.names if c in IGNORED]).to_pylist()


def _row_actor_pids() -> list[int]:
    """Processes of live row actors (Ray names a worker's process after its actor class)."""
    listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in listing.splitlines() if "ray::RowActor" in line]


def test_faulty_job_gives_the_online_table(tmp_path, make_emulator, ray_address):
    """2,000 rows through throttling, 5xx, dropped connections and permanent 400s: executor ray writes the
    same table as online (the emulator's faults are fixed per row and attempt), every row once, in order."""
    records = write_prompts(tmp_path / "prompts.parquet", 2000)
    tables = {}
    for executor in ("online", "ray"):
        emu = make_emulator(faults=FAULTS, seed=11)
        job = _job(tmp_path, emu, name=executor, output={"path": f"out/{executor}.parquet"},
                       input={"path": "prompts.parquet", "id_column": "id", "prompt_column": "prompt",
                              "keep_columns": ["n"]},
                       run={"concurrency": 32, "executor": executor, "max_error_rate": 0.1})
        result = run_cli("run", str(job), "--ray-address", ray_address)
        assert result.code == 0, result.stderr
        stats = emu.stats()
        assert stats["succeeded_more_than_once"] == 0
        rows = read_output(tmp_path / f"out/{executor}.parquet")
        assert [r["key"] for r in rows] == [r["id"] for r in records]
        assert sum(r["attempts"] for r in rows) == stats["requests"]
        tables[executor] = _comparable(tmp_path / f"out/{executor}.parquet")
    failed = [r for r in tables["ray"] if r["status"] == "error"]
    assert 10 < len(failed) < 100 and {r["error_type"] for r in failed} == {"PermanentCallError"}
    assert sum(r["attempts"] > 1 for r in tables["ray"]) > 150
    assert tables["ray"] == tables["online"]



def test_fanout_and_structured_output_give_the_online_table(tmp_path, make_emulator, ray_address):
    """Fan-out (two variants x two samples, which qwen-plus answers in one request with `n`) and, in a second
    job, a json_schema with invalid answers re-asked: executor ray writes the same table as online for both."""
    write_prompts(tmp_path / "prompts.jsonl", 40)
    (tmp_path / "label.json").write_text(json.dumps({
        "type": "object", "properties": {"label": {"type": "string", "enum": ["a", "b"]}}, "required": ["label"]}))
    prompts = {"path": "prompts.jsonl", "id_column": "id", "prompt_column": "prompt"}
    variants = [{"name": "plain"}, {"name": "terse", "system_prompt": "Answer in one word."}]
    jobs = {"fanout": ({"samples": 2}, {**prompts, "variants": variants}, {}),
            "schema": ({}, prompts, {"json_schema": "label.json"})}
    for name, (model, inp, output) in jobs.items():
        tables = {}
        for executor in ("online", "ray"):
            emu = make_emulator(faults={"bad_json": 0.3, "500": 0.05}, seed=5)
            job = _job(tmp_path, emu, name=f"{name}-{executor}", model=model, input=inp,
                       output={"path": f"out/{name}-{executor}.parquet", **output},
                       run={"concurrency": 16, "executor": executor, "max_error_rate": 1.0})
            result = run_cli("run", str(job), "--ray-address", ray_address)
            assert result.code == 0, result.stderr
            assert emu.stats()["succeeded_more_than_once"] == 0
            tables[executor] = _comparable(tmp_path / f"out/{name}-{executor}.parquet")
        assert len(tables["ray"]) == (160 if name == "fanout" else 40)
        assert tables["ray"] == tables["online"], name
        if name == "schema":
            assert any(r["error_type"] == "InvalidOutput" for r in tables["ray"])
            assert any(r["status"] == "ok" and r["attempts"] > 1 for r in tables["ray"])

def test_two_actors_share_one_rpm_limit(tmp_path, make_emulator, ray_address):
    """The emulator enforces RPM 3,000 (50/s); two row actors, each able to send far faster, share the one
    limit through the limiter actor: fewer than 1% of requests are answered 429, every row once, and
    both actors sent rows. (The accepted rate against the limit is a timing: bench_ray.py prints it.)"""
    emu = make_emulator(rpm=3000, latency_ms=20, request_log=True)
    write_prompts(tmp_path / "prompts.jsonl", 400)
    job = _job(tmp_path, emu, run={"rpm": 3000, "concurrency": 64, "executor": "ray", "adaptive_rate": True,
                                       "cooldown_seconds": 0.25})
    result = run_cli("run", str(job), "--ray-address", ray_address)
    assert result.code == 0, result.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    assert len(rows) == 400 and all(r["status"] == "ok" for r in rows)
    stats = emu.stats(log=True)
    assert stats["succeeded_more_than_once"] == 0
    assert stats["rejected"]["rpm"] < 0.01 * stats["requests"], stats["rejected"]
    found = re.search(r"ray: (\d+) row actors; ([\d,]+) requests took ([\d,]+) leases", result.stderr)
    assert found, result.stderr
    actors, slots, leases = (int(g.replace(",", "")) for g in found.groups())
    assert actors == 2 and slots >= stats["requests"] and leases < slots / 2  # leased in chunks


def test_a_retry_after_seen_by_one_actor_pauses_every_actor(tmp_path, make_emulator, ray_address):
    """A 429 with Retry-After: 2 answered to one actor closes the shared gate for both actors: no request from
    either reaches the server from just after that answer until 2 s after it; the summary counts the 429 and
    the pause."""
    emu = make_emulator(fail_first=1, retry_after=2, latency_ms=200, request_log=True)
    write_prompts(tmp_path / "prompts.jsonl", 40)
    job = _job(tmp_path, emu, run={"concurrency": 16, "executor": "ray", "adaptive_rate": True,
                                   "cooldown_seconds": 0.25})
    result = run_cli("run", str(job), "--ray-address", ray_address)
    assert result.code == 0, result.stderr
    assert "ray: 2 row actors" in result.stderr
    assert sent_inside_a_retry_after_gate(emu, 41) == []
    summary = json.loads((tmp_path / "out/result.summary.json").read_text())
    assert sum(summary["throttled"].values()) == 1 and summary["paused_seconds"] >= 1.9


def test_kill_9_of_the_driver_then_a_rerun_sends_only_what_is_missing(tmp_path, make_emulator, ray_address):
    """kill -9 of the driver mid-run: the rerun resumes from the committed rows, every row is in the output
    once and in order, and no more rows were paid twice than were in flight (the concurrency)."""
    concurrency = 16
    emu = make_emulator(latency_ms=20, latency_jitter_ms=20)
    records = write_prompts(tmp_path / "prompts.jsonl", 1000)
    job = _job(tmp_path, emu, run={"concurrency": concurrency, "executor": "ray", "part_rows": 100,
                                       "part_seconds": 0.5})
    proc = start_cli("run", str(job), "--ray-address", ray_address)
    try:
        wait_until(lambda: emu.stats(keys=False)["requests"] >= 300 or proc.poll() is not None,
                   timeout=120, what="300 requests")
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert not (tmp_path / "out/result.parquet").exists()
    # The killed driver's actors die with it (Ray ends the actors a dead driver owned).
    wait_until(lambda: not _row_actor_pids(), timeout=60, what="the killed driver's actors to end")
    answered_before = emu.stats(keys=False)["by_status"]["200"]
    result = run_cli("run", str(job), "--ray-address", ray_address)
    assert result.code == 0, result.stderr
    assert "resuming:" in result.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    assert [r["key"] for r in rows] == [r["id"] for r in records]
    stats = emu.stats()
    assert len(stats["keys"]) == 1000 and all(v["succeeded"] >= 1 for v in stats["keys"].values())
    assert stats["succeeded_more_than_once"] <= concurrency
    assert stats["by_status"]["200"] - answered_before < 1000  # the rerun did not send everything again


def test_a_lost_actor_is_restarted_and_its_rows_are_sent_once(tmp_path, make_emulator, ray_address):
    """kill -9 of a row actor mid-run: Ray restarts it, the driver sends the rows it had not answered again,
    the run ends ok with every row once, and at most that actor's share of rows was paid twice."""
    concurrency = 16
    # 150 ms answers: every actor always holds rows in flight, so the kill always loses some (with 30 ms
    # answers a kill could land between an actor's batches, and Ray restarted it with nothing lost to report).
    emu = make_emulator(latency_ms=150, latency_jitter_ms=50)
    records = write_prompts(tmp_path / "prompts.jsonl", 600)
    job = _job(tmp_path, emu, run={"concurrency": concurrency, "executor": "ray"})
    proc = start_cli("run", str(job), "--ray-address", ray_address)
    try:
        wait_until(lambda: emu.stats(keys=False)["requests"] >= 200 or proc.poll() is not None,
                   timeout=120, what="200 requests")
        pids = _row_actor_pids()
        assert pids and proc.poll() is None
        os.kill(pids[0], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert "Ray row actor was lost" in stderr
    rows = read_output(tmp_path / "out/result.parquet")
    assert [r["key"] for r in rows] == [r["id"] for r in records] and all(r["status"] == "ok" for r in rows)
    assert emu.stats()["succeeded_more_than_once"] <= concurrency


def test_sigint_drains_and_sends_nothing_new(tmp_path, make_emulator, ray_address):
    """The first SIGINT: no request reaches the server after it (actors waiting for the shared limiter send
    nothing), requests in flight are committed, exit 130; the rerun finishes with nothing paid twice."""
    emu = make_emulator(latency_ms=1500, request_log=True)
    write_prompts(tmp_path / "prompts.jsonl", 100)
    job = _job(tmp_path, emu, run={"concurrency": 8, "rpm": 120, "executor": "ray", "adaptive_rate": True,
                                       "cooldown_seconds": 0.25, "drain_seconds": 30})
    proc = start_cli("run", str(job), "--ray-address", ray_address)
    try:
        wait_until(lambda: emu.stats(keys=False)["requests"] >= 3 or proc.poll() is not None,
                   timeout=120, what="three requests")
        # Right after an arrival: the next one is due about 0.5 s later, so nothing is on the wire now.
        signalled = time.monotonic()  # the emulator's clock (system-wide on Linux)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "run the same command again" in stderr and "Traceback" not in stderr
    stats = emu.stats(keys=False, log=True)
    # The signal is sent at `signalled` and handled a moment later; on a loaded machine a request paced
    # before it was handled (one slot at 2 requests/s, leased by an actor) may still arrive after `signalled`.
    # Without the stop reaching the actors, requests kept arriving every 0.5 s until the drain ended.
    late = [entry for entry in stats["log"] if entry["arrived"] >= signalled]
    assert len(late) <= 1, f"{len(late)} requests arrived after the signal"
    answered = stats["by_status"]["200"]
    assert 3 <= answered < 100
    # The rest at full speed: rpm and concurrency are not part of the job's identity.
    result = run_cli("run", str(job), "--ray-address", ray_address, "--rpm", "60000", "--concurrency", "64")
    assert result.code == 0, result.stderr
    assert f"resuming: {answered} rows already done" in result.stderr
    assert len(read_output(tmp_path / "out/result.parquet")) == 100
    assert emu.stats()["succeeded_more_than_once"] == 0


def test_the_budget_is_reserved_through_the_shared_actor(tmp_path, make_emulator, ray_address):
    """[run] max_cost under Ray: every actor reserves through the limiter actor, so the spend of all of them
    stops at or under the budget (exit 1 naming it); a rerun with a higher budget sends only the rest."""
    emu = make_emulator(latency_ms=20)
    write_prompts(tmp_path / "prompts.jsonl", 1000)
    job = _job(tmp_path, emu, model={"max_tokens": 20}, run={"concurrency": 64, "executor": "ray",
                                                             "part_seconds": 0.2})
    budget = 0.0015
    first = run_cli("run", str(job), "--max-cost", str(budget), "--ray-address", ray_address)
    assert first.code == 1, first.stderr
    assert "the budget is reached" in first.stderr and "max_cost 0.0015" in first.stderr
    spent = _committed_cost(tmp_path / "out/result.parquet.parts")
    assert 0.5 * budget < spent <= budget
    answered = emu.stats(keys=False)["by_status"]["200"]
    second = run_cli("run", str(job), "--max-cost", "1", "--ray-address", ray_address)
    assert second.code == 0, second.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    assert len(rows) == 1000 and all(r["status"] == "ok" for r in rows)
    assert emu.stats()["succeeded_more_than_once"] == 0 and answered < 1000



def test_input_on_object_storage_gives_the_online_table(tmp_path, make_emulator, ray_address, monkeypatch):
    """A Parquet input on (loopback) S3 run with executor ray gives the table the local file gives online: the
    driver reads the object with the credentials of its environment, the actors get rows, never credentials."""
    from tests.s3_server import S3Server
    from tests.test_object_storage import KEY_ID, SECRET

    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    records = write_prompts(tmp_path / "prompts.parquet", 300)
    tables = {}
    with S3Server({KEY_ID: SECRET}) as store:
        uri = store.put("data", "prompts.parquet", (tmp_path / "prompts.parquet").read_bytes())
        inputs = {"online": {"path": "prompts.parquet"}, "ray": {"path": uri, "s3_endpoint": store.endpoint}}
        for executor, where in inputs.items():
            emu = make_emulator(faults={"500": 0.05}, seed=3)
            job = _job(tmp_path, emu, name=executor, output={"path": f"out/{executor}.parquet"},
                       input={**where, "id_column": "id", "prompt_column": "prompt"},
                       run={"concurrency": 16, "executor": executor})
            result = run_cli("run", str(job), "--ray-address", ray_address)
            assert result.code == 0, result.stderr
            assert SECRET not in result.stdout + result.stderr
            tables[executor] = _comparable(tmp_path / f"out/{executor}.parquet")
    assert [r["key"] for r in tables["ray"]] == [r["id"] for r in records]
    assert tables["ray"] == tables["online"]

def test_the_key_is_in_no_file_ray_wrote(ray_address):
    """After the runs above, the API key the drivers handed to their actors appears in none of the files of the
    Ray session (logs, spilled objects): it travels as an actor argument only. Nor does the object store's
    secret, which only the driver reads."""
    session = Path(ray._private.worker._global_node.get_session_dir_path())  # no public API names it
    assert session.is_dir()
    from tests.test_object_storage import SECRET

    secrets = (TEST_KEY.encode(), SECRET.encode())  # the API key; the object store's secret of the test above
    leaked = [path for path in session.rglob("*") if path.is_file() and any(s in path.read_bytes() for s in secrets)]
    assert leaked == []
