"""Builds that are killed, that hang, or that run at the same time as another converge.

Each test runs real builds (in-process, or the real `environment` module in a subprocess, as
Ansible runs it) whose import gate imports a fixture node that sleeps at import and starts a
helper process, as a node that downloads or serves something at import does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ansible_collections.comfybake.core.plugins.module_utils.converge_lock import converge_lock
from harness.environments import engine, live, node_repo, releases

BASIC = ("ComfyUI-Comfybake-Basic", "initial")
MODULE = "from ansible_collections.comfybake.core.plugins.modules.{} import main; main()"


def sleeper(flag: Path, seconds: int) -> str:
    """A node that starts a helper (`sleep`), says so in `flag` (`<pid> <helper pid>`), then sleeps."""
    return (
        "import os, subprocess, time\n"
        "helper = subprocess.Popen(['sleep', '300'])\n"
        f"with open({str(flag) + '.tmp'!r}, 'w') as handle:\n"
        "    handle.write(f'{os.getpid()} {helper.pid}')\n"
        f"os.rename({str(flag) + '.tmp'!r}, {str(flag)!r})\n"
        f"time.sleep({seconds})\n"
        "NODE_CLASS_MAPPINGS = {}\n"
    )


def with_node(spec: engine.Spec, tmp_path: Path, name: str, source: str) -> engine.Spec:
    url, commit = node_repo(tmp_path / "repos", name, {"__init__.py": source})
    spec.custom_nodes.append(engine.Source(name, url, commit))
    return spec


def module_args(spec: engine.Spec, **options: Any) -> dict[str, Any]:
    """The `environment` module's arguments for a Spec, as the role writes them."""
    written = {
        "comfyui_repo": spec.comfyui.repo,
        "comfyui_version": spec.comfyui.version,
        "torch_packages": spec.torch_packages,
        "custom_nodes": [{"repo": node.repo, "version": node.version, "name": node.name} for node in spec.custom_nodes],
    }
    site = {
        key: getattr(spec, key)
        for key in ("root", "uv", "wheelhouse", "cache_dir", "git_cache", "git_mirrors", "python", "gate_timeout")
    }
    return {"name": spec.name, "environment": written, **site, **options}


def start_module(args: dict[str, Any], tmp_path: Path, module: str = "environment") -> subprocess.Popen[str]:
    """A module in a process of its own, as Ansible runs it on the host."""
    path = tmp_path / f"{module}-{args.get('name', '')}-{time.monotonic_ns()}.json"
    path.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(
        [sys.executable, "-c", MODULE.format(module), str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def result(process: subprocess.Popen[str]) -> dict[str, Any]:
    stdout, stderr = process.communicate(timeout=300)
    assert stdout.strip(), f"the module printed nothing; stderr: {stderr}"
    outcome: dict[str, Any] = json.loads(stdout)
    return outcome


def running(pid: int) -> bool:
    """Whether a process runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stopped(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not running(pid)


def wait_for(flag: Path, process: subprocess.Popen[str] | None = None, within: float = 120) -> list[int]:
    deadline = time.monotonic() + within
    while not flag.exists():
        assert process is None or process.poll() is None, f"the build ended first: {process.communicate()}"
        assert time.monotonic() < deadline, f"the import gate did not reach the node within {within} s"
        time.sleep(0.1)
    return [int(pid) for pid in flag.read_text().split()]


@pytest.fixture
def leftovers() -> Iterator[list[int]]:
    """Pids a test started indirectly, killed at its end whatever happened."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if running(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_build_killed_during_the_import_gate_leaves_nothing_running_and_the_next_run_sweeps_it(
    make_spec: Any, tmp_path: Path, leftovers: list[int]
) -> None:
    good = make_spec(BASIC)
    built = engine.Builder(good).run()
    flag = tmp_path / "gate-started"
    slow = with_node(make_spec(BASIC), tmp_path, "Sleeper", sleeper(flag, 300))
    build = start_module(module_args(slow), tmp_path)
    gate, helper = wait_for(flag, build)
    leftovers += [gate, helper]
    build.kill()  # SIGKILL: no handler, no finally runs in the build
    build.wait()
    assert stopped(gate, within=10), "the import gate (ComfyUI) died with the build that started it"
    assert running(helper), "what the node started outlives the gate; the next run stops it"
    [partial] = [name for name in releases(good) if name != Path(built.release).name]
    assert (Path(good.root) / "releases" / partial / ".comfybake-building").is_file()

    again = engine.Builder(good).run()  # a converged run: nothing to build, the sweep still runs
    assert not again.changed and live(good) == built.release
    assert releases(good) == [Path(built.release).name], "the half-built release is removed"
    assert stopped(helper, within=10), "the run stopped what the killed build left running"
    [note] = [warning for warning in again.warnings if "half-built" in warning]
    assert note.startswith(f"removed the half-built release {Path(good.root) / 'releases' / partial} of a build")
    assert f"(pid {build.pid} started " in note and f"pid {helper}" in note


def test_an_import_gate_that_hangs_is_stopped_at_its_time_limit(
    make_spec: Any, tmp_path: Path, leftovers: list[int]
) -> None:
    flag = tmp_path / "gate-started"
    spec = with_node(make_spec(BASIC, gate_timeout=8), tmp_path, "Sleeper", sleeper(flag, 300))
    with pytest.raises(engine.EnvError) as failure:
        engine.Builder(spec).run()
    gate, helper = wait_for(flag, within=0)
    leftovers += [gate, helper]
    message = str(failure.value)
    assert message.startswith(
        "environment comm: the import gate (main.py --quick-test-for-ci --cpu) did not finish within 8 s"
        " (gate_timeout: the role's comfyui_environments_gate_timeout)"
    )
    assert "raise comfyui_environments_gate_timeout" in message and "live release is untouched" in message
    assert stopped(gate, within=5) and stopped(helper, within=5), "the gate is stopped with what it started"
    assert releases(spec) == []


def test_two_converges_at_once_take_turns_and_the_second_names_the_first(
    make_spec: Any, tmp_path: Path, leftovers: list[int]
) -> None:
    """Two environments of one host built at once (same git cache, uv cache and converge lock)."""
    lock = tmp_path / "state" / "converge.lock"
    flag = tmp_path / "gate-started"
    first = with_node(make_spec(BASIC, name="first"), tmp_path, "Slow", sleeper(flag, 4))
    second = make_spec(BASIC, name="second")
    one = start_module(module_args(first, converge_lock=str(lock)), tmp_path)
    leftovers.extend(wait_for(flag, one))  # the first is in its import gate, holding the lock
    assert lock.read_text().startswith(f"{one.pid} comfybake.core.environment: building environment first since ")
    two = start_module(module_args(second, converge_lock=str(lock)), tmp_path)
    done_one, done_two = result(one), result(two)

    assert done_one["changed"] and done_two["changed"], (done_one, done_two)
    assert "converge_lock_waited" not in done_one
    waited = done_two["converge_lock_waited"]
    assert waited.startswith("waited ") and waited.endswith(f"to release the converge lock {lock}")
    assert f" s for {one.pid} (comfybake.core.environment: building environment first since " in waited
    assert waited in json.dumps(done_two["warnings"]), "and says so in a warning"
    # The second built only once the first was done, and both are whole.
    finished = (Path(done_one["release"]) / "comfybake.lock.json").stat().st_mtime
    assert Path(done_two["release"]).stat().st_mtime >= finished
    for spec, done in ((first, done_one), (second, done_two)):
        assert live(spec) == done["release"] and releases(spec) == [Path(done["release"]).name]
        assert json.loads((Path(done["release"]) / "comfybake.lock.json").read_text())["environment"] == spec.name
    assert lock.read_text() == "", "no holder once both are done"


def test_a_converge_that_waits_too_long_names_the_holder_and_the_setting(make_spec: Any, tmp_path: Path) -> None:
    lock = tmp_path / "state" / "converge.lock"
    spec = make_spec(BASIC)
    with converge_lock(str(lock), "comfybake.core.instances: restarting instances", timeout=0):
        done = result(start_module(module_args(spec, converge_lock=str(lock), converge_lock_timeout=1), tmp_path))
    assert done["failed"] and not done["changed"]
    assert done["msg"].startswith(
        f"gave up after 1 s waiting for {os.getpid()} (comfybake.core.instances: restarting instances since "
    )
    assert done["msg"].endswith("Let it finish (stop it if it hangs), or raise comfyui_converge_lock_timeout")
    assert releases(spec) == [], "nothing was built"


def test_the_lock_module_holds_the_lock_across_tasks_until_the_play_releases_it(
    make_spec: Any, tmp_path: Path, leftovers: list[int]
) -> None:
    """The instances role's block: the lock taken in one task, released in another; a build waits."""
    lock = tmp_path / "state" / "converge.lock"
    purpose = "comfyui_instances: units, files and restarts"
    taken = result(start_module({"path": str(lock), "purpose": purpose}, tmp_path, "converge_lock"))
    holder = taken["holder"]
    leftovers.append(holder)
    assert not taken["changed"] and running(holder), "the lock outlives the task that took it"
    assert lock.read_text().startswith(f"{holder} comfybake.core.converge_lock: {purpose} (held across tasks")

    spec = make_spec(BASIC, import_gate=False)
    build = start_module(module_args(spec, converge_lock=str(lock)), tmp_path)
    time.sleep(2)
    assert build.poll() is None and releases(spec) == [], "the build waits for the play that holds the lock"
    args = {"path": str(lock), "state": "released", "holder": holder}
    assert result(start_module(args, tmp_path, "converge_lock"))["holder"] == holder
    assert stopped(holder, within=5)
    built = result(build)
    assert built["changed"], built
    assert f" s for {holder} (comfybake.core.converge_lock: {purpose} (held across" in built["converge_lock_waited"]

    # A play killed before it released the lock: the holder ends after `timeout` seconds.
    short = result(start_module({"path": str(lock), "timeout": 1}, tmp_path, "converge_lock"))
    leftovers.append(short["holder"])
    assert stopped(short["holder"], within=10)
    with converge_lock(str(lock), "the next converge", timeout=0) as held:
        assert held.waited < 1
