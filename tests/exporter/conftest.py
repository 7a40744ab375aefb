"""Fixtures for the exporter's tests: test-double instances as real processes on loopback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness.double import DOUBLE, Double, free_port
from harness.exporter import port_open

Start = Callable[..., dict[str, Any]]


@pytest.fixture(scope="module")
def double_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the double to run (ComfyUI writes into its code tree)."""
    tree = tmp_path_factory.mktemp("double") / "ComfyUI"
    shutil.copytree(DOUBLE, tree, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return tree


@pytest.fixture
def start(double_tree: Path, tmp_path: Path) -> Iterator[Start]:
    """Start an instance (two stand-in GPUs); returns its record as instances.json holds it, with the
    running double under `double` (removed before the record is written)."""
    started: list[Double] = []

    def run(name: str, environment: str = "comm", **record: Any) -> dict[str, Any]:
        port = free_port()
        state = tmp_path / "state" / name
        (state / "user").mkdir(parents=True)
        args = [
            "--listen", "127.0.0.1", "--port", str(port),
            "--user-directory", str(state / "user"), "--output-directory", str(state / "output"),
            "--database-url", f"sqlite:///{state}/comfyui.db",
        ]  # fmt: skip
        log = tmp_path / f"{name}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [sys.executable, "-s", str(double_tree / "main.py"), *args],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env={**os.environ, "CUDA_VISIBLE_DEVICES": "0,1"},
            )
        double = Double(process, port, log)
        started.append(double)
        deadline = time.monotonic() + 20
        while not (port_open(port) and double.get("/system_stats")[0] == 200):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the double did not start:\n{log.read_text()}")
            time.sleep(0.05)
        return {"name": name, "environment": environment, "port": port, "args": args, "double": double, **record}

    yield run
    for double in started:
        double.stop()
