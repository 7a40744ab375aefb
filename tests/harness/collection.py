"""The checkout as a user gets it: the collection built and installed, and ansible-test on it."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from harness.tools import ROOT, failure_excerpt, save_log, venv_bin

NAMESPACE, NAME = "comfybake", "core"
# ansible-test bootstraps pip in its venvs with a get-pip script from a host that machines
# without general internet access cannot reach; it names the path where the script may be put.
_GET_PIP_WANTED = re.compile(r"The bootstrap script can be manually downloaded and saved to: (?P<path>\S+)")
# The stand-in: the interpreter's own pip (ensurepip), then the pinned packages from the
# package index pip is configured with. It takes get-pip's arguments.
_GET_PIP_STAND_IN = """\
import subprocess, sys
args = [arg for arg in sys.argv[1:] if arg not in ("--no-setuptools", "--no-wheel")]
subprocess.check_call([sys.executable, "-m", "ensurepip", "--default-pip"])
subprocess.check_call([sys.executable, "-m", "pip", "install", *args])
"""


def run(*argv: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 900) -> str:
    """Run a command; on failure, fail with its last lines and keep the whole output in a file."""
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        log = save_log(f"{Path(argv[0]).name}-{argv[1]}", output)
        command = " ".join(argv[:3])
        pytest.fail(f"{command} exited {done.returncode} (log: {log}):\n{failure_excerpt(output)}", pytrace=False)
    return output


def build(output: Path) -> Path:
    """`ansible-galaxy collection build` of the checkout, with the host command built first."""
    run(venv_bin("python"), "scripts/build-cli.py", cwd=ROOT)
    run(venv_bin("ansible-galaxy"), "collection", "build", "--output-path", str(output), cwd=ROOT)
    (artifact,) = output.glob(f"{NAMESPACE}-{NAME}-*.tar.gz")
    return artifact


def install(artifact: Path, collections: Path) -> Path:
    """`ansible-galaxy collection install` of the artifact; returns the installed collection's root."""
    argv = ("collection", "install", "--collections-path", str(collections), str(artifact))
    run(venv_bin("ansible-galaxy"), *argv, cwd=collections.parent)
    return collections / "ansible_collections" / NAMESPACE / NAME


def sanity(collection: Path, home: Path) -> str:
    """`ansible-test sanity` in the installed collection, with the checkout's ignore file.

    ansible-test keeps its venvs under $HOME/.ansible/test; `home` keeps them between runs
    without touching the user's own.
    """
    ignores = ROOT / "tests" / "sanity"
    if ignores.is_dir():
        (collection / "tests" / "sanity").mkdir(parents=True, exist_ok=True)
        for path in ignores.glob("ignore-*.txt"):
            (collection / "tests" / "sanity" / path.name).write_text(path.read_text())
    # ansible-test looks for the collection's git root to decide what belongs to it.
    subprocess.run(["git", "init", "--quiet", str(collection)], check=True)
    env = {**os.environ, "HOME": str(home)}
    argv = (venv_bin("ansible-test"), "sanity", "--python", "3.11", "--color", "no")
    done = subprocess.run(argv, cwd=collection, env=env, capture_output=True, text=True, timeout=1800)
    wanted = _GET_PIP_WANTED.search(done.stdout + done.stderr)
    if done.returncode != 0 and wanted:
        Path(wanted["path"]).parent.mkdir(parents=True, exist_ok=True)
        Path(wanted["path"]).write_text(_GET_PIP_STAND_IN)
        done = subprocess.run(argv, cwd=collection, env=env, capture_output=True, text=True, timeout=1800)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        log = save_log("ansible-test-sanity", output)
        errors = [line for line in output.splitlines() if line.startswith(("ERROR:", "FATAL:"))]
        pytest.fail(f"ansible-test sanity failed (log: {log}):\n" + "\n".join(errors[-40:]), pytrace=False)
    return output
