"""The local base image: built by scripts/base-image.sh, cached by its recipe label."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from harness.tools import BASE_IMAGE

pytestmark = pytest.mark.docker


def test_base_image_is_labelled_and_cached(root: Path, docker_engine: None) -> None:
    label = subprocess.run(
        ["docker", "image", "inspect", "--format", '{{ index .Config.Labels "org.comfybake.recipe" }}', BASE_IMAGE],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert len(label) == 16
    again = subprocess.run(
        [str(root / "scripts" / "base-image.sh"), "--tag", BASE_IMAGE], capture_output=True, text=True, check=True
    )
    assert again.stdout.strip() == f"base-image: {BASE_IMAGE} is up to date (recipe {label})"


def test_base_image_boots_systemd_without_privileges(docker_engine: None) -> None:
    started = subprocess.run(
        ["docker", "run", "--detach", "--rm", "--cap-add", "SYS_ADMIN", "--security-opt", "seccomp=unconfined",
         "--tmpfs", "/run", "--tmpfs", "/run/lock", "--cgroupns=host", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw",
         BASE_IMAGE],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    container = started.stdout.strip()
    try:
        state = ""
        for _ in range(60):
            probe = ["docker", "exec", container, "systemctl", "is-system-running", "--wait"]
            state = subprocess.run(probe, capture_output=True, text=True).stdout.strip()
            if state:
                break
            subprocess.run(["sleep", "1"], check=True)
        assert state == "running"
        pid1 = subprocess.run(["docker", "exec", container, "cat", "/proc/1/comm"], capture_output=True, text=True)
        assert pid1.stdout.strip() == "systemd"
    finally:
        subprocess.run(["docker", "rm", "-f", container], capture_output=True)
