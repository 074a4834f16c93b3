"""The CLI shell: every command has help text with an example, and `medaug --help` stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from medaug_cli.app import app

runner = CliRunner()
COMMANDS = ["phantoms", "prepare", "merge", "inspect"]


def test_root_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output or "example" in result.output


def test_help_does_not_import_heavy_modules():
    code = "import sys; from medaug_cli.app import app; print(sorted(m for m in ('torch', 'SimpleITK', 'pydicom', 'monai', 'pandas') if m in sys.modules))"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert output == "[]"


def test_version():
    from medaug import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == __version__
