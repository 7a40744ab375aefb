"""The lint gates: each linter is one test, run over the whole repository."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from harness.tools import venv_bin


def run(root: Path, *argv: str, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(argv, cwd=root, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}", pytrace=False)


def test_ansible_lint(root: Path, ansible_env: dict[str, str]) -> None:
    run(root, venv_bin("ansible-lint"), "--nocolor", env=ansible_env)


def test_yamllint(root: Path) -> None:
    run(root, venv_bin("yamllint"), "--strict", ".")


def test_ruff_check(root: Path) -> None:
    run(root, venv_bin("ruff"), "check", ".")


def test_ruff_format(root: Path) -> None:
    run(root, venv_bin("ruff"), "format", "--check", ".")


def test_mypy(root: Path) -> None:
    # module_utils is the shared engine of modules and CLI; src/comfybake is the controller.
    targets = [d for d in ("plugins/module_utils", "src/comfybake") if list((root / d).glob("*.py"))]
    assert "src/comfybake" in targets
    run(root, venv_bin("mypy"), *targets)


def test_packer_fmt(root: Path) -> None:
    if not list((root / "packer").rglob("*.pkr.hcl")):
        pytest.skip("no Packer templates yet")
    run(root, "packer", "fmt", "-check", "-recursive", "packer")


def test_shell_scripts_parse(root: Path) -> None:
    for script in [*root.glob("scripts/*.sh"), root / ".ci" / "run"]:
        run(root, "bash", "-n", str(script))
