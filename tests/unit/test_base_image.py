"""The local base image: built by scripts/base-image.sh, cached by its recipe label."""

from __future__ import annotations

import os
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


def test_base_image_boots_systemd_without_privileges(root: Path, docker_engine: None) -> None:
    # The container the main job runs (scripts/local.sh holds the one copy of its flags), under a
    # name of its own: test_main_job converges comfybake-local at the same time on another worker.
    local = str(root / "scripts" / "local.sh")
    name = "comfybake-base-image-test"
    env = {**os.environ, "COMFYBAKE_LOCAL_NAME": name}
    subprocess.run([local, "down"], env=env, capture_output=True)
    try:
        started = subprocess.run([local, "start"], env=env, capture_output=True, text=True)
        assert started.returncode == 0, started.stdout + started.stderr
        probe = ["docker", "exec", name, "systemctl", "is-system-running"]
        assert subprocess.run(probe, capture_output=True, text=True).stdout.strip() == "running"
        pid1 = ["docker", "exec", name, "cat", "/proc/1/comm"]
        assert subprocess.run(pid1, capture_output=True, text=True).stdout.strip() == "systemd"
        privileged = ["docker", "inspect", "--format", "{{.HostConfig.Privileged}}", name]
        assert subprocess.run(privileged, capture_output=True, text=True).stdout.strip() == "false"
    finally:
        subprocess.run([local, "down"], env=env, capture_output=True)


def test_a_user_without_root_gets_an_up_to_date_image_and_is_told_why_a_build_needs_root(
    root: Path, docker_engine: None
) -> None:
    """Only a build needs root (debootstrap): an unprivileged member of the socket's group may check the cache."""
    script = str(root / "scripts" / "base-image.sh")
    unprivileged = [
        "setpriv",
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--groups",
        str(os.stat("/var/run/docker.sock").st_gid),
    ]
    env = {"PATH": os.environ["PATH"], "HOME": "/tmp"}
    cached = subprocess.run([*unprivileged, script, "--tag", BASE_IMAGE], env=env, capture_output=True, text=True)
    assert cached.returncode == 0 and "is up to date" in cached.stdout, cached.stdout + cached.stderr
    missing = subprocess.run(
        [*unprivileged, script, "--tag", "comfybake/test-missing:never"], env=env, capture_output=True, text=True
    )
    assert missing.returncode == 1
    assert "comfybake/test-missing:never must be built and debootstrap needs root" in missing.stderr
