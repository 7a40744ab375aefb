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
    # src/comfybake is the controller's package; its engine link is plugins/module_utils, the
    # engines the modules import by their collection path (mypy_path has collections/).
    assert (root / "src/comfybake/engine").resolve() == root / "plugins/module_utils"
    plugins = [str(path.relative_to(root)) for path in sorted((root / "plugins").iterdir()) if path.is_dir()]
    assert {"plugins/modules", "plugins/filter", "plugins/module_utils"} <= set(plugins)
    plugins.remove("plugins/module_utils")  # checked through src/comfybake/engine
    run(root, venv_bin("mypy"), "src/comfybake", *plugins, "scripts/build-cli.py")


PACKER = Path(__file__).resolve().parents[2] / "packer"
TARGETS = sorted(path.name.removesuffix(".pkrvars.hcl") for path in (PACKER / "targets").glob("*.pkrvars.hcl"))


def test_packer_fmt(root: Path) -> None:
    # Packer 1.6 has no `fmt -recursive`: check each folder that holds templates or targets.
    folders = sorted({path.parent for path in PACKER.rglob("*.hcl")})
    assert PACKER in folders and PACKER / "targets" in folders
    for folder in folders:
        run(root, "packer", "fmt", "-check", str(folder.relative_to(root)))


def test_every_flavour_has_a_target() -> None:
    assert {"test", "cpu", "cu128-py312", "cu124-py311"} <= set(TARGETS)


@pytest.mark.parametrize("target", TARGETS)
def test_packer_validate(root: Path, ansible_env: dict[str, str], target: str) -> None:
    # validate checks the ansible provisioner's playbook and inventory too, and needs ansible-playbook.
    run(root, "packer", "validate", f"-var-file=packer/targets/{target}.pkrvars.hcl", "packer", env=ansible_env)


def test_shell_scripts_parse(root: Path) -> None:
    for script in [*root.glob("scripts/*.sh"), root / ".ci" / "run"]:
        run(root, "bash", "-n", str(script))
