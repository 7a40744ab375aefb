"""`make provision` (scripts/local.sh up, a host rather than an image) converges, then changes nothing.

It converges inventories/local as shipped (one CPU environment and one instance), with its
sources replaced the way a user behind a firewall replaces them: the preflight's settings in the
inventory (git mirrors, a wheelhouse) and the mirrors brought into the container with MOUNTS. The
sources are the fixtures: the ComfyUI test double and the fixture wheelhouse (CI cannot reach
GitHub or PyTorch's index).

The main job `make up` (scripts/up.sh: bake, run, print where the instances answer) is tested
with the bake, in tests/packer; its preflight in tests/unit/test_preflight.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from harness import wheelhouse

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture
def local_target(
    root: Path, docker_engine: None, ansible_env: dict[str, str], tmp_path: Path
) -> Iterator[dict[str, str]]:
    fixtures = wheelhouse.build(tmp_path / "fixtures")
    inventory = tmp_path / "inventory"
    shutil.copytree(root / "inventories" / "local", inventory)
    (inventory / "host_vars").mkdir(exist_ok=True)
    (inventory / "host_vars" / "comfybake-local.yml").write_text(yaml.safe_dump({
        "comfyui_environments_git_mirrors": {"https://github.com/comfyanonymous/": "file:///srv/mirrors/"},
        "comfyui_environments_wheelhouse": "/srv/wheelhouse",
        "comfyui_environments_torch_flavors": {"cpu": {"index_url": "", "packages": [fixtures["torch"]]}},
    }))  # fmt: skip
    env = {
        **ansible_env,
        "COMFYBAKE_INVENTORY": str(inventory),
        "COMFYBAKE_MOUNTS": f"{fixtures['repos']}:/srv/mirrors:ro {fixtures['wheelhouse']}:/srv/wheelhouse:ro",
    }
    down = [str(root / "scripts" / "local.sh"), "down"]
    subprocess.run(down, env=env, capture_output=True)
    yield env
    subprocess.run(down, env=env, capture_output=True)


# Steps that write a folder, file, link or unit state. On a converged host each role's one read of
# its paths and units finds them as these steps would leave them, so a converge that changes
# nothing skips them rather than asking the host once per path (docs/performance.md).
WRITE_STEPS = (
    "comfyui : Create the directory layout",
    "comfyui_environments : Write each environment's settings for the instances and status tooling",
    "comfyui_instances : Install the instance template unit",
    "comfyui_instances : Install the units that clean old files and retry crash loops",
    "comfyui_instances : Write each instance's drop-in (description, command line, limits, log file)",
    "comfyui_instances : Link each instance to its environment's live release",
    "comfyui_instances : Enable the enabled instances",
    "comfyui_instances : Start the enabled instances that are not running",
    "comfyui_instances : Write the routing file for dispatchers",
    "comfyui_exporter : Install the exporter's unit",
)


def step_results(log: str, step: str) -> list[str]:
    """What each host and item of `step` reported (ok, changed, skipping, ...), from the log."""
    block = log.partition(f"TASK [comfybake.core.{step}]")[2].partition("\nTASK [")[0]
    return re.findall(r"^(\w+): \[", block, re.M)


def up(root: Path, env: dict[str, str]) -> str:
    done = subprocess.run([str(root / "scripts" / "local.sh"), "up"], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-10000:] + done.stderr
    return done.stdout


def test_main_job_converges_one_instance_then_is_idempotent(root: Path, local_target: dict[str, str]) -> None:
    first = up(root, local_target)
    assert "preflight: all 4 sources are reachable" in first
    assert re.search(r"comfybake-local\s+: ok=\d+\s+changed=[1-9]", first)
    assert "local: converged comfybake-local" in first
    assert re.search(r"^main\s+cpu\s+8188\s+cpu\s+active/running\s+yes\b", first, re.M), first[-3000:]
    assert "local: ComfyUI answers inside comfybake-local at http://127.0.0.1:8188" in first
    assert "local: what to do next:" in first
    second = up(root, local_target)
    assert "local: starting" not in second  # the same mounts: the same container
    assert re.search(r"comfybake-local\s+: ok=\d+\s+changed=0\s+unreachable=0\s+failed=0", second), second[-3000:]
    for step in WRITE_STEPS:
        assert set(step_results(second, step)) == {"skipping"}, (step, step_results(second, step))
    layout = subprocess.run(
        ["docker", "exec", "comfybake-local", "stat", "-c", "%U:%G %a", "/srv/comfybake/models"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert layout.stdout.strip() == "root:comfybake 2750"


def test_make_provision_stops_before_the_converge_when_a_source_is_out_of_reach(
    root: Path, docker_engine: None, ansible_env: dict[str, str], tmp_path: Path
) -> None:
    """The shipped inventory's sources, through a git mirror that does not answer: nothing starts."""
    inventory = tmp_path / "inventory"
    shutil.copytree(root / "inventories" / "local", inventory)
    (inventory / "host_vars").mkdir(exist_ok=True)
    (inventory / "host_vars" / "comfybake-local.yml").write_text(yaml.safe_dump({
        "comfyui_environments_git_mirrors": {"https://github.com/comfyanonymous/": "file:///srv/none/"},
        "comfyui_environments_wheelhouse": "/srv/wheelhouse",
    }))  # fmt: skip
    env = {**ansible_env, "COMFYBAKE_INVENTORY": str(inventory), "COMFYBAKE_LOCAL_NAME": "comfybake-local-unused"}
    done = subprocess.run([str(root / "scripts" / "local.sh"), "up"], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "https://github.com/comfyanonymous/ComfyUI.git -> file:///srv/none/ComfyUI.git" in done.stdout
    assert "comfyui_environments_git_mirrors" in done.stdout and "MOUNTS=" in done.stdout
    assert "stopped before the converge" in done.stderr
    inspect = subprocess.run(["docker", "inspect", "comfybake-local-unused"], capture_output=True)
    assert inspect.returncode != 0  # no container was started
