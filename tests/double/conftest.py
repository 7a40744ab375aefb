"""Fixtures for the double's own tests: start it as a real process, import its modules."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness.double import DOUBLE, Double, free_port

# The double's modules (main, folder_paths, utils.extra_config) are imported by some tests.
sys.path.insert(0, str(DOUBLE))

StartDouble = Callable[..., Double]


@pytest.fixture(scope="session")
def double_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the double's source to run: ComfyUI writes its default database into its code tree,
    and the source tree must stay as committed (the fixture repositories are built from it)."""
    tree = tmp_path_factory.mktemp("double") / "ComfyUI"
    shutil.copytree(DOUBLE, tree, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return tree


@pytest.fixture
def start_double(tmp_path: Path, double_tree: Path) -> Iterator[StartDouble]:
    """Start main.py from a code tree (default: a copy of the double's source) and wait for its port."""
    started: list[Double] = []

    def start(*args: str, code: Path | None = None, port: int | None = None, host: str = "127.0.0.1") -> Double:
        port = port or free_port()
        log = tmp_path / f"double-{port}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [sys.executable, "-s", str((code or double_tree) / "main.py"), "--port", str(port), *args],
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        double = Double(process, port, log)
        started.append(double)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"the double exited with {process.returncode}:\n{log.read_text()}")
            try:
                with socket.create_connection((host, port), timeout=0.2):
                    return double
            except OSError:
                time.sleep(0.05)
        pytest.fail(f"the double did not open port {port}:\n{log.read_text()}")

    yield start
    for double in started:
        double.stop()
