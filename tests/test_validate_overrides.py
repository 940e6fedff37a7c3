"""`runner validate` takes the run's override flags, checks the output folder like `runner run` would, and exits
with the README's codes."""

from __future__ import annotations

import json

import pytest

from runner.job import job_fingerprint
from runner.spec import load_job
from tests.helpers import make_job, run_cli, write_prompts
from tests.test_bad_inputs import _permissions_bind, _run_bound_by_permissions

NOWHERE = {"base_url": "http://127.0.0.1:9/compatible-mode/v1"}  # nothing listens: nothing may be sent


@pytest.mark.parametrize("flag, value, shown", [("--max-cost", "12.5", "budget 12.5")])
def test_validate_applies_the_budget_flag(tmp_path, flag, value, shown):
    """`validate --max-cost X` prices the job against that budget, as `run --max-cost X` would spend it."""
    write_prompts(tmp_path / "prompts.jsonl", 5)
    job = make_job(tmp_path, endpoint=NOWHERE)
    result = run_cli("validate", str(job), flag, value)
    assert result.code == 0, result.stderr
    assert shown in result.stdout


@pytest.mark.parametrize("flag", ["--max-cost", "--rpm", "--tpm", "--max-attempts"])
def test_validate_takes_every_override_of_run_with_its_range(tmp_path, flag):
    """Each override `run` takes is accepted by `validate` and range-checked the same way (exit 2 on -1)."""
    write_prompts(tmp_path / "prompts.jsonl", 3)
    job = make_job(tmp_path, endpoint=NOWHERE)
    good = run_cli("validate", str(job), flag, "100")
    assert good.code == 0, good.stderr
    bad_validate = run_cli("validate", str(job), flag, "-1")
    bad_run = run_cli("run", str(job), flag, "-1")
    assert bad_validate.code == bad_run.code == 2, bad_validate.stderr
    assert f"error: {flag}" in bad_validate.stderr and "Traceback" not in bad_validate.stderr


def test_validate_and_run_list_the_same_overrides():
    """`validate --help` names every override flag `run --help` names (all but run's own actions and its
    progress display)."""
    run_only = {"--dry-run", "--overwrite", "--restart", "--retry-failed", "--emulator", "--quiet",
                "--progress", "--log-every", "--log-format"}
    run_help, validate_help = run_cli("run", "--help").stdout, run_cli("validate", "--help").stdout
    run_flags = {word.rstrip(",") for word in run_help.split() if word.startswith("--")} - run_only
    validate_flags = {word.rstrip(",") for word in validate_help.split() if word.startswith("--")}
    assert {"--max-cost", "--rpm", "--tpm", "--max-attempts"} <= run_flags
    assert run_flags <= validate_flags


def test_validate_refuses_an_output_under_a_file_and_creates_nothing(tmp_path):
    """An output whose folder cannot exist (a file is in its path) is exit 1 from validate, as from run; nothing
    is created."""
    write_prompts(tmp_path / "prompts.jsonl", 3)
    (tmp_path / "blocker").write_text("a file, not a folder")
    job = make_job(tmp_path, output={"path": "blocker/sub/result.parquet"}, endpoint=NOWHERE)
    result = run_cli("validate", str(job))
    assert result.code == 1, result.stderr
    assert "output folder is not writable" in result.stderr and "blocker is not a folder" in result.stderr
    assert "Traceback" not in result.stderr
    assert run_cli("run", str(job)).code == 1


def test_validate_does_not_create_a_missing_output_folder(tmp_path):
    """A missing output folder under a writable one is fine (the run creates it), and validate leaves it absent."""
    write_prompts(tmp_path / "prompts.jsonl", 3)
    job = make_job(tmp_path, output={"path": "new/deeper/result.parquet"}, endpoint=NOWHERE)
    result = run_cli("validate", str(job))
    assert result.code == 0, result.stderr
    assert "not writable" not in result.stdout + result.stderr
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(not _permissions_bind(), reason="root cannot drop CAP_DAC_OVERRIDE here, so chmod would not bind")
def test_validate_reports_a_read_only_output_folder(tmp_path):
    """A read-only output folder is exit 1 from validate, naming the folder, before any run is tried."""
    write_prompts(tmp_path / "prompts.jsonl", 3)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    job = make_job(tmp_path, endpoint=NOWHERE, output={"path": "locked/result.parquet"})
    result = _run_bound_by_permissions("validate", str(job))
    assert result.returncode == 1, result.stderr
    assert f"{locked}: output folder is not writable (permission denied)" in result.stderr


def test_validate_warns_about_an_unfinished_run_of_a_different_job(tmp_path, emulator):
    """An unfinished run of another job in the output's parts is named in the report, with what changed."""
    write_prompts(tmp_path / "prompts.jsonl", 3)
    job = make_job(tmp_path, emulator)
    parts = tmp_path / "out/result.parquet.parts"
    assert run_cli("run", str(job), "--model", "qwen-max").code == 0
    (tmp_path / "out/result.parquet").rename(tmp_path / "kept.parquet")
    # What an unfinished run of the qwen-max job leaves: its manifest and a committed part.
    fingerprint = job_fingerprint(load_job(job).override(model="qwen-max"))
    parts.mkdir(exist_ok=True)
    (parts / "manifest.json").write_text(json.dumps({"fingerprint": fingerprint}))
    (parts / "part-000001.parquet").write_bytes((tmp_path / "kept.parquet").read_bytes())
    result = run_cli("validate", str(job))
    assert result.code == 0, result.stderr
    assert "an unfinished run of a different job is there (model changed)" in result.stdout
    assert run_cli("run", str(job)).code == 2
