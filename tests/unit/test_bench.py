"""The benchmarks still run: the models benchmark drives comfybake's front ends (a rename once broke it
unseen), the gateway benchmark its rendered configuration.

A tiny S5 runs the engine, the module through `ansible` by its FQCN, and get_url side by side;
nothing here looks at the figures.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_models_benchmark_runs_the_engine_the_module_and_get_url(root: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "bench/models.py", "S5", "--s5-total", "0.01", "--work", str(tmp_path)],
        cwd=root, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for row in ("comfybake engine, warm", "comfybake.core.models via `ansible`", "get_url checksum:, 1 file"):
        assert row in done.stdout, done.stdout


def test_gateway_benchmark_measures_both_sides(root: Path) -> None:
    done = subprocess.run(
        [sys.executable, "bench/gateway.py", "--requests", "30", "--clients", "2", "--seconds", "0.5"],
        cwd=root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for row in ("latency median (ms)", "requests per second", "WebSocket open + status (ms)", "added latency"):
        assert row in done.stdout, done.stdout


def test_fleet_roll_benchmark_names_a_wrong_mode_or_size_before_it_starts_a_host(root: Path) -> None:
    """`bench/fleet.py roll` checks its options before it builds or starts anything (the fleet
    it rolls over is a docker test: tests/fleet); each refusal names the value at fault."""
    for options, expected in (
        (["--modes", "rolling-1,rolling-3"], "unknown ['rolling-3']; the modes are rolling-1, rolling-2, naive-1, all"),
        (["--sizes", "2,7"], "--sizes 2,7: each size must be 1 to 6"),
    ):
        done = subprocess.run(
            [sys.executable, "bench/fleet.py", "roll", *options], cwd=root, capture_output=True, text=True, timeout=60
        )
        assert done.returncode != 0 and expected in done.stderr, done.stdout[-2000:] + done.stderr[-2000:]
        assert "work in" not in done.stdout, done.stdout
