"""The README stays true: two quickstart commands that CI runs, every job key and every flag documented."""

from __future__ import annotations

import re

import click

from runner.cli import main
from runner.spec_keys import SECTIONS
from tests.helpers import ROOT


def _quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1]
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", section, re.S).group(1)
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_quickstart_has_two_commands_and_ci_runs_the_second():
    """The Quickstart block holds exactly two commands; .ci/run runs the second one verbatim."""
    commands = _quickstart_commands()
    assert len(commands) == 2
    assert "--emulator" in commands[0] and "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_every_job_key_is_documented():
    """Every key the job file accepts is in jobs/README.md."""
    doc = (ROOT / "jobs" / "README.md").read_text()
    for section, keys in SECTIONS.items():
        assert f"`[{section}]`" in doc
        for key in keys:
            if key != "api_key":
                assert f"`{key}`" in doc, f"[{section}] {key} is not documented in jobs/README.md"


def test_every_cli_flag_is_documented():
    """Every option of every command appears in the README."""
    doc = (ROOT / "README.md").read_text()
    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param, click.Option):
                assert any(opt in doc for opt in param.opts), f"runner {name} {param.opts} is not in the README"
