"""Choosing the executor: [run] executor (and its older name mode), --executor, --ray-address, and a Ray run
without the extra installed. None of these needs Ray."""

from __future__ import annotations

import subprocess
import sys

import pytest

from runner.errors import SpecError
from runner.spec import load_job
from tests.helpers import ROOT, TEST_KEY, make_job, run_cli, write_prompts

NOWHERE = {"base_url": "http://127.0.0.1:9/compatible-mode/v1"}  # nothing listens: nothing may be sent


@pytest.mark.parametrize("run, expected", [
    ({}, "online"),
    ({"executor": "ray"}, "ray"),
    ({"mode": "batch"}, "batch"),
    ({"mode": "ray", "executor": "ray"}, "ray"),
])
def test_executor_key_and_its_older_name(tmp_path, run, expected):
    """[run] executor picks the executor; [run] mode, its older name, still does; both agreeing is fine."""
    spec = load_job(make_job(tmp_path, endpoint=NOWHERE, run=run))
    assert spec.run.mode == expected


@pytest.mark.parametrize("run, needle", [
    ({"mode": "batch", "executor": "ray"}, "[run] executor: 'ray' contradicts [run] mode = 'batch'"),
    ({"executor": "spark"}, "[run] executor: expected one of online, batch, ray, got 'spark'"),
    ({"executor": "ray", "ray_address": " "}, "[run] ray_address: expected \"auto\" or a Ray address"),
    ({"executor": "ray", "ray_runtime_env": "pip"}, "[run] ray_runtime_env: expected a table"),
])
def test_bad_executor_settings_name_the_key(tmp_path, run, needle):
    """A contradiction between executor and mode, an unknown executor, an empty address or a runtime env that is
    not a table is a SpecError naming the key."""
    with pytest.raises(SpecError) as caught:
        load_job(make_job(tmp_path, endpoint=NOWHERE, run=run))
    assert needle in caught.value.message


def test_flags_override_the_executor_and_the_address(tmp_path):
    """--executor and --ray-address override the job file; --mode with a different value is refused."""
    spec = load_job(make_job(tmp_path, endpoint=NOWHERE, run={"mode": "batch"}))
    overridden = spec.override(executor="ray", ray_address="ray://head:10001")
    assert overridden.run.mode == "ray" and overridden.run.ray_address == "ray://head:10001"
    assert spec.override(mode="online", executor="online").run.mode == "online"
    with pytest.raises(SpecError, match="--executor ray contradicts --mode batch"):
        spec.override(mode="batch", executor="ray")
    write_prompts(tmp_path / "prompts.jsonl", 3)
    result = run_cli("validate", str(make_job(tmp_path, endpoint=NOWHERE)), "--executor", "ray", "--mode", "batch")
    assert result.code == 2 and "contradicts" in result.stderr


def test_ray_executor_without_ray_installed_says_how_to_get_it(tmp_path):
    """executor = "ray" where Ray cannot be imported: exit 2 before anything is sent, with the pip command as
    the hint and no traceback."""
    write_prompts(tmp_path / "prompts.jsonl", 3)
    job = make_job(tmp_path, endpoint=NOWHERE, run={"executor": "ray"})
    # sys.modules["ray"] = None makes every `import ray` fail as if Ray were not installed.
    blocked = "import sys; sys.modules['ray'] = None; sys.argv = ['runner', 'run', sys.argv[1]]; " \
              "from runner.cli import main; main()"
    done = subprocess.run([sys.executable, "-c", blocked, str(job)], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env={"PATH": "/usr/bin:/bin", "DASHSCOPE_API_KEY": TEST_KEY})
    assert done.returncode == 2, done.stderr
    assert 'error: [run] executor = "ray" needs Ray, which is not installed' in done.stderr
    assert "hint: pip install 'dashscope-batch-runner[ray]'" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
