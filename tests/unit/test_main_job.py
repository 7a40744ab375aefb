"""`make provision` (scripts/local.sh up, a host rather than an image) converges, then changes nothing.

The main job `make up` (scripts/up.sh: bake, run, print where the instances answer) is tested
with the bake, in tests/packer.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture
def local_target(root: Path, docker_engine: None, ansible_env: dict[str, str]) -> Iterator[dict[str, str]]:
    down = [str(root / "scripts" / "local.sh"), "down"]
    subprocess.run(down, env=ansible_env, capture_output=True)
    yield ansible_env
    subprocess.run(down, env=ansible_env, capture_output=True)


def up(root: Path, env: dict[str, str]) -> str:
    done = subprocess.run([str(root / "scripts" / "local.sh"), "up"], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-10000:] + done.stderr
    return done.stdout


def test_main_job_converges_then_is_idempotent(root: Path, local_target: dict[str, str]) -> None:
    first = up(root, local_target)
    assert re.search(r"comfybake-local\s+: ok=\d+\s+changed=[1-9]", first)
    assert "local: converged comfybake-local" in first
    second = up(root, local_target)
    assert re.search(r"comfybake-local\s+: ok=\d+\s+changed=0\s+unreachable=0\s+failed=0", second), second[-3000:]
    layout = subprocess.run(
        ["docker", "exec", "comfybake-local", "stat", "-c", "%U:%G %a", "/srv/comfybake/models"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert layout.stdout.strip() == "root:comfybake 2750"
