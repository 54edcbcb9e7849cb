"""docs/cli.md is the generator's output for today's command line, and the generator misses nothing."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import typer

from mixtral_export.cli import app
from mixtral_export.cli_reference import REGENERATE, reference

CLI_MD = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def test_docs_cli_md_is_current():
    written = CLI_MD.read_text(encoding="utf-8") if CLI_MD.exists() else ""
    assert written == reference(app), f"docs/cli.md is stale: regenerate it with `{REGENERATE}`"


def _sections(text: str) -> dict[str, str]:
    """The reference cut at its `## command` headings."""
    parts = text.split("\n## ")[1:]
    return {part.split("\n", 1)[0]: part for part in parts}


def test_every_command_and_flag_is_documented():
    """Each visible command has a section holding its usage line, its help and every flag and argument."""
    group = typer.main.get_command(app)
    sections = _sections(reference(app))
    visible = {name: command for name, command in group.commands.items() if not command.hidden}
    assert set(sections) == set(visible)
    for name, command in visible.items():
        section = sections[name]
        assert f"```\nmixtral-export {name}" in section
        assert " ".join(command.help.split()[:6]) in " ".join(section.split())
        for param in command.params:
            if param.hidden:
                continue
            names = [param.metavar or param.name.upper()] if param.param_type_name == "argument" else \
                list(param.opts) + list(param.secondary_opts)
            for flag in names:
                assert f"`{flag}`" in section, f"{name}: {flag} missing from its section"


def test_output_does_not_depend_on_the_terminal():
    """Run as the regenerate command runs it, in a narrow terminal: the same bytes as in process."""
    env = dict(os.environ, COLUMNS="30", LINES="10", TERM="dumb")
    run = subprocess.run([sys.executable, "-m", "mixtral_export.cli_reference"], capture_output=True, text=True,
                         env=env, check=True, timeout=120)
    assert run.stdout == reference(app)
