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


@pytest.mark.parametrize(
    ("argv", "offered", "not_offered"),
    [
        (["instances", "start"], ["--timeout", "--no-wait", "--json"], ["--drain"]),
        (["instances", "stop"], ["--drain", "--json"], ["--timeout", "--no-wait", "until they are ready"]),
        (["instances", "restart"], ["--drain", "--timeout", "--no-wait", "--json"], []),
        (["instances", "status"], ["--json"], ["--drain"]),
        (["models", "fetch"], ["--json", "--mode"], []),
        (["models", "lock"], ["--json", "--output"], ["--mode"]),
        (["environments", "list"], ["--json"], ["--to"]),
        (["environments", "rollback"], ["--to", "--no-restart", "--timeout", "--json"], ["--output"]),
        (["environments", "lock"], ["--output", "--git-mirror", "--json"], ["--to"]),
    ],
)
def test_each_command_offers_what_it_does_and_names_its_exit_codes(
    argv: list[str], offered: list[str], not_offered: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main([*argv, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "exit status:\n  0  " in text and "\n  2  " in text
    for option in offered:
        assert option in text, option
    for option in not_offered:
        assert option not in text, option
