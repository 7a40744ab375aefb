"""Shared fixtures (the repository root, the fixture git repositories, the Docker engine), the
parallel schedule and the session's summary of molecule times."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from harness import repos
from harness.tools import BASE_IMAGE, LOGS, ROOT

STARTED = pytest.StashKey[float]()


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


# -- running in parallel --------------------------------------------------------------------
# `pytest` runs on several workers (pytest-xdist, `-n auto` in pyproject.toml). Most of the time
# goes to a few long tests that wait on containers, so the order and the grouping matter:
# a test module is one unit (its module and session fixtures are built once, on one worker),
# each molecule scenario is a unit of its own, and the longest units are handed out first.

LONGEST_FIRST = (  # measured on a CI machine; docs/testing.md has the figures
    "tests/packer/test_vm.py",
    "tests/fleet/test_fleet.py",
    "tests/molecule/test_scenarios.py::test_molecule_scenario[comfyui_instances]",
    "tests/packer/test_bake.py",
    "tests/molecule/test_scenarios.py::test_molecule_scenario[comfyui_environments]",
    "tests/molecule/test_scenarios.py::test_molecule_scenario[nvidia_driver]",
    "tests/molecule/test_scenarios.py::test_molecule_scenario[comfyui_models]",
    "tests/molecule/test_scenarios.py::test_molecule_scenario[comfyui_image]",
    "tests/collection/test_collection.py",
    "tests/unit/test_main_job.py",
    "tests/molecule/test_scenarios.py::test_molecule_scenario[comfyui]",
    "tests/environments/",
)


def unit_of(nodeid: str) -> str:
    """What a worker runs together: a molecule scenario on its own, else the whole module."""
    return nodeid if "::test_molecule_scenario[" in nodeid else nodeid.split("::", 1)[0]


def rank(nodeid: str) -> int:
    return next((index for index, prefix in enumerate(LONGEST_FIRST) if nodeid.startswith(prefix)), len(LONGEST_FIRST))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: rank(item.nodeid))  # stable: a module's tests keep their order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: COMFYBAKE_TEST_WORKERS, else two per core (the long tests mostly wait)."""
    return int(os.environ.get("COMFYBAKE_TEST_WORKERS") or 2 * (os.cpu_count() or 1))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class LongestFirst(LoadScopeScheduling):
        """Units as `unit_of` says, in collection order (longest first), one queued per worker.

        A worker runs a test once it holds the next one (or is told to stop), so it holds at
        most two units: the running one and the next. More would tie long units to one worker.
        """

        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

        def _reschedule(self, node: Any) -> None:
            if node.shutting_down:
                return
            if not self.workqueue:
                node.shutdown()
                return
            if self._pending_of(self.assigned_work[node]) < 2:
                self._assign_work_unit(node)

    config.option.loadscopereorder = False  # keep the longest-first order
    return LongestFirst(config, log)


# -- the session's summary ------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.stash[STARTED] = time.time()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """The time of each molecule scenario and each of its actions, from this session's runs."""
    rows = []
    for path in sorted(LOGS.glob("molecule-*.json")):
        if path.stat().st_mtime >= config.stash[STARTED]:
            rows.append(json.loads(path.read_text()))
    if not rows:
        return
    columns = ["create", "prepare", "check", "converge", "idempotence", "verify", "side_effect", "destroy"]
    terminalreporter.section("molecule scenarios (seconds)")
    terminalreporter.write_line(f"{'scenario':22} {'total':>6} " + " ".join(f"{name:>11}" for name in columns))
    for row in sorted(rows, key=lambda row: -row["seconds"]):
        spent: dict[str, float] = {}
        for action, _, seconds in row["actions"]:
            spent[action] = spent.get(action, 0) + seconds
        cells = " ".join(f"{spent[name]:>11.1f}" if name in spent else f"{'-':>11}" for name in columns)
        terminalreporter.write_line(f"{row['scenario']:22} {row['seconds']:>6.0f} {cells}")
