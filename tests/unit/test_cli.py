"""The `comfybake` console entry point."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import comfybake
from comfybake import cli


def test_version_is_the_installed_distribution(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"comfybake {comfybake.__version__}"
    assert comfybake.__version__ != "0+unknown"


def test_no_command_prints_usage_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "usage: comfybake" in capsys.readouterr().err


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "comfybake"
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert done.returncode == 0
    assert done.stdout.startswith("comfybake ")
