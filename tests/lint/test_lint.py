"""The lint gates: each linter is one test, run over the whole repository."""

from __future__ import annotations

import re
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


# Packer fetches a `file:` checksum (the qemu base disk's default: Ubuntu's SHA256SUMS) while it
# validates, and CI reaches no such server: the checks give a checksum itself instead.
OFFLINE_CHECKSUM = "-var=qemu_base_disk_checksum=sha256:" + "0" * 64


@pytest.mark.parametrize("target", TARGETS)
def test_packer_validate(root: Path, ansible_env: dict[str, str], target: str) -> None:
    # validate checks the ansible provisioner's playbook and inventory too, and needs ansible-playbook.
    var_file = f"-var-file=packer/targets/{target}.pkrvars.hcl"
    run(root, "packer", "validate", var_file, OFFLINE_CHECKSUM, "packer", env=ansible_env)


@pytest.mark.parametrize("checksum", ["none", "", "sha256:", "md5:0123", "0" * 64])
def test_an_unchecked_qemu_base_disk_is_refused(root: Path, ansible_env: dict[str, str], checksum: str) -> None:
    var = f"-var=qemu_base_disk_checksum={checksum}"
    argv = ["packer", "validate", "-var-file=packer/targets/test.pkrvars.hcl", var, "packer"]
    done = subprocess.run(argv, cwd=root, capture_output=True, text=True, env=ansible_env)
    assert done.returncode != 0
    assert "The qemu_base_disk_checksum must be sha256:<hex>" in " ".join((done.stdout + done.stderr).split())


def test_the_vm_sources_take_packers_key_out_of_the_image() -> None:
    sources = (PACKER / "sources.pkr.hcl").read_text()
    blocks = dict(re.findall(r'source "([a-z-]+)" "comfybake" \{(.*?)\n\}', sources, re.S))
    assert {"amazon-ebs", "googlecompute", "qemu"} <= set(blocks)
    for name in ("amazon-ebs", "googlecompute"):
        assert re.search(r"^\s*ssh_clear_authorized_keys\s*=\s*true$", blocks[name], re.M), name
    variables = (PACKER / "variables.pkr.hcl").read_text()
    default = re.search(r'variable "qemu_base_disk_checksum" \{.*?default\s*=\s*"([^"]*)"', variables, re.S)
    disk = re.search(r'variable "qemu_base_disk" \{.*?default\s*=\s*"([^"]*)"', variables, re.S)
    assert default and disk and default.group(1) == "file:" + disk.group(1).rsplit("/", 1)[0] + "/SHA256SUMS"


def test_one_build_runs_every_source() -> None:
    # The cloud sources share the pipeline of the tested ones: one build lists every source, and
    # test_packer_validate gives no -only, so each target is validated with all of them.
    sources = set(re.findall(r'^source "([a-z-]+)" "comfybake" \{', (PACKER / "sources.pkr.hcl").read_text(), re.M))
    assert {"docker", "amazon-ebs", "googlecompute", "qemu"} <= sources
    templates = "\n".join(path.read_text() for path in sorted(PACKER.glob("*.pkr.hcl")))
    builds = re.findall(r"^build \{\n(.*?)^\}", templates, re.M | re.S)
    assert len(builds) == 1
    listed = re.search(r"^  sources = \[(.*?)\]", builds[0], re.M | re.S)
    assert listed is not None
    assert set(re.findall(r'"source\.([a-z-]+)\.comfybake"', listed.group(1))) == sources


def test_shell_scripts_parse(root: Path) -> None:
    for script in [*root.glob("scripts/*.sh"), root / ".ci" / "run"]:
        run(root, "bash", "-n", str(script))
