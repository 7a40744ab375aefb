"""Shared fixtures: the repository root, the fixture git repositories, the Docker engine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import repos
from harness.tools import BASE_IMAGE, ROOT


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def fixture_repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, repos.Repo]:
    """The ComfyUI test double and the fixture nodes as local bare git repositories."""
    return repos.build(tmp_path_factory.mktemp("repos"))


@pytest.fixture(scope="session")
def docker_engine() -> None:
    """A reachable Docker engine with the local base image; fail (never skip) otherwise."""
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.fail("the Docker engine is not running; start it with scripts/bootstrap.sh")
    if subprocess.run(["docker", "image", "inspect", BASE_IMAGE], capture_output=True).returncode != 0:
        pytest.fail(f"the base image {BASE_IMAGE} is missing; build it with scripts/base-image.sh")


@pytest.fixture
def ansible_env(root: Path) -> dict[str, str]:
    """Environment for ansible-* commands run from the repository root."""
    env = dict(os.environ)
    env.update(
        ANSIBLE_CONFIG=str(root / "ansible.cfg"),
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_NOCOLOR="1",
        PY_COLORS="0",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    return env
