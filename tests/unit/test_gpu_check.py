"""scripts/gpu-check.sh on a machine without a GPU: its refusals, and what it would run (--dry-run).

The checks themselves need an NVIDIA GPU (docs/gpu.md); these tests show that the script starts
nothing where there is none, and that the playbooks it writes are sound: every one passes
`ansible-playbook --syntax-check`, and the driver check's playbook runs the nvidia_driver role's
verify step here for real, which fails on this machine naming nvidia-smi.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from ansible_collections.comfybake.core.plugins.filter.instances import instance_layout
from harness.tools import venv_bin

SCRIPT = "scripts/gpu-check.sh"
PLAYBOOKS = ("driver", "environment", "instances", "cleanup")


def gpu_check(
    root: Path, *args: str, env: dict[str, str] | None = None, user: str = ""
) -> subprocess.CompletedProcess[str]:
    argv = [str(root / SCRIPT), *args]
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    return subprocess.run(argv, cwd=root, capture_output=True, text=True, env=env, timeout=120)


def test_help_exits_0(root: Path) -> None:
    done = gpu_check(root, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: sudo scripts/gpu-check.sh")
    for option in ("--only", "--extra-vars", "--keep", "--workdir", "--dry-run"):
        assert option in done.stdout


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--bogus"], "unknown option '--bogus'"),
        (["--only", "5"], "--only '5': '5' is not a check"),
        (["--only", "1,x"], "'x' is not a check"),
        (["--only"], "option --only needs a value"),
        (["--only="], "--only '' names no check"),
        (["--extra-vars", "/nonexistent/vars.yml"], "--extra-vars '/nonexistent/vars.yml' is not a readable file"),
    ],
)
def test_a_bad_option_exits_2_naming_it(root: Path, args: list[str], named: str) -> None:
    done = gpu_check(root, *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert named in done.stderr
    assert done.stdout == ""


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
@pytest.mark.skipif(os.geteuid() != 0, reason="the refusal for want of a GPU comes after the one for want of root")
def test_a_machine_without_nvidia_smi_is_refused(root: Path) -> None:
    done = gpu_check(root)
    assert done.returncode == 2
    assert done.stderr.startswith("gpu-check: no NVIDIA GPU here: nvidia-smi is not installed;")
    assert len(done.stderr.splitlines()) == 1
    assert done.stdout == ""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run it as another user")
def test_a_user_other_than_root_is_refused(root: Path) -> None:
    done = gpu_check(root, "--only", "2", user="nobody")
    assert done.returncode == 2
    assert done.stderr.startswith("gpu-check: run as root (sudo scripts/gpu-check.sh ...)")


@pytest.mark.skipif(os.geteuid() != 0, reason="the refusal for want of a GPU comes after the one for want of root")
def test_a_driver_that_lists_no_gpu_is_refused(root: Path, tmp_path: Path) -> None:
    # What nvidia-smi says where the driver is installed but no GPU is (or none it can reach).
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
    smi.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    done = gpu_check(root, env=env)
    assert done.returncode == 2
    assert "nvidia-smi -L exited 6 and listed none (No devices were found)" in done.stderr


@pytest.fixture(scope="module")
def dry_run(root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi: the dry run would write the files for its GPUs")
    workdir = tmp_path_factory.mktemp("gpu-check")
    done = gpu_check(root, "--dry-run", "--workdir", str(workdir))
    assert done.returncode == 0, done.stdout + done.stderr
    return workdir, done.stdout


def test_a_dry_run_writes_the_checks_for_two_gpus_and_runs_nothing(dry_run: tuple[Path, str]) -> None:
    workdir, printed = dry_run
    assert sorted(path.name for path in workdir.iterdir()) == sorted(
        ["group_vars", "inventory.yml", "vars.yml", *(f"{name}.yml" for name in PLAYBOOKS)]
    )
    commands = [line for line in printed.splitlines() if "ansible-playbook" in line]
    assert [re.sub(r".*/", "", line) for line in commands] == [f"{name}.yml" for name in PLAYBOOKS]
    assert not list(workdir.glob("*.log"))
    settings = yaml.safe_load((workdir / "vars.yml").read_text())
    assert settings["comfyui_instances_gpu_devices"] is True
    assert settings["comfyui_environments_default_torch_flavor"].startswith("cu")
    by_gpu: dict[str, list[dict[str, object]]] = {}
    for instance in settings["gpu_check_instances"]:
        by_gpu.setdefault(",".join(map(str, instance["gpus"])), []).append(instance)
    assert sorted(by_gpu) == ["0", "1"]
    assert [instance.get("share_gpus") for instance in by_gpu["0"]] == [True, True]
    assert [instance.get("share_gpus", False) for instance in by_gpu["1"]] == [False]


@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_the_playbooks_pass_syntax_check(
    root: Path, ansible_env: dict[str, str], dry_run: tuple[Path, str], playbook: str
) -> None:
    workdir, _ = dry_run
    argv = [venv_bin("ansible-playbook"), "--syntax-check", "-i", str(workdir / "inventory.yml")]
    argv += ["-e", f"@{workdir / 'vars.yml'}", str(workdir / f"{playbook}.yml")]
    done = subprocess.run(argv, cwd=root, capture_output=True, text=True, env=ansible_env)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_driver_check_runs_the_roles_verify_step(
    root: Path, ansible_env: dict[str, str], dry_run: tuple[Path, str]
) -> None:
    # Only nvidia-smi runs (the verify step changes nothing): here it is missing, and the role's
    # assert says so, which shows the playbook reaches the role's verify step and its variables.
    workdir, _ = dry_run
    argv = [venv_bin("ansible-playbook"), "-i", str(workdir / "inventory.yml"), "-e", f"@{workdir / 'vars.yml'}"]
    done = subprocess.run(
        [*argv, str(workdir / "driver.yml")], cwd=root, capture_output=True, text=True, env=ansible_env
    )
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2, output
    assert "TASK [comfybake.core.nvidia_driver : Assert that every GPU runs the pinned driver branch]" in output
    assert "nvidia-smi --query-gpu=name,driver_version --format=csv,noheader should list every GPU" in output
    assert "changed=0" in output


def test_the_instances_pass_the_roles_layout_with_the_gpus_check_3_expects(dry_run: tuple[Path, str]) -> None:
    # The instances role's own validation (names, ports, GPUs shared only with share_gpus), and
    # the CUDA_VISIBLE_DEVICES each instance's unit gets, which check 3 compares with its GPU.
    workdir, _ = dry_run
    settings = yaml.safe_load((workdir / "vars.yml").read_text())
    paths = {"state_root": "/var/lib/comfybake", "cache_root": "/var/cache/comfybake", "config_root": "/etc/comfybake"}
    options = {"listen": "127.0.0.1", "code_root": "/opt/comfybake", "extra_args": [], "allowed_clients": []}
    layout = instance_layout(
        settings["gpu_check_instances"],
        settings["comfyui_environments"],
        {**paths, **options, "reserved_ports": [], "busy_ports": {}, "log_dir": ""},
    )
    visible = {record["name"]: record["env"]["CUDA_VISIBLE_DEVICES"] for record in layout}
    assert visible == {"gpucheck-shared-a": "0", "gpucheck-shared-b": "0", "gpucheck-alone": "1"}
    assert all("--cpu" not in record["argv"] for record in layout)


def test_the_instance_check_is_valid_python(root: Path) -> None:
    script = (root / SCRIPT).read_text()
    code = re.search(r"<<'PYTHON'\n(.*?)\nPYTHON\n", script, re.S)
    assert code is not None
    compile(code.group(1), "gpu-check instance check", "exec")


@pytest.mark.skipif(
    shutil.which("shellcheck") is None, reason="shellcheck is not installed (Debian: apt-get install shellcheck)"
)
def test_shellcheck(root: Path) -> None:
    done = subprocess.run(["shellcheck", SCRIPT], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
