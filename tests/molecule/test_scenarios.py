"""Every molecule scenario runs its whole test sequence against a real systemd container.

Each run's output goes to build/test-logs/molecule-<scenario>.log (with per-task times from
ansible.posix.profile_tasks) and the time of each action to molecule-<scenario>.json, which
the session's summary prints as one table. A failed run says why in one line, with the failing
task's lines below it and the path of the whole log.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from harness.tools import LOGS, failure_excerpt, failure_reason, venv_bin

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = sorted(p.parent.name for p in (ROOT / "molecule").glob("*/molecule.yml"))
# molecule's "INFO     [comfyui > converge] Executing" and "... Executed: Successful" lines
# ("comfyui ➜ converge:" on a terminal)
ACTION = re.compile(r"^[A-Z]+\s+\[?\S+ (?:>|➜) (?P<action>\w+)\]?:? (?:Executing|Executed: (?P<result>\w+))")
# A scenario that runs this long has hung: end it, so one hang cannot use up the whole CI run.
# Far above what any scenario takes on 2 cores beside the others (docs/testing.md).
TIMEOUT = 3000

pytestmark = [pytest.mark.docker, pytest.mark.slow]

# Steps that the idempotence run (a converge that changes nothing) must skip: each role's one read
# of its packages, accounts, units and files finds them as these steps would leave them, so it
# asks the host nothing more (docs/performance.md, "Fleet: the cost of doing nothing").
SKIPPED_WHEN_CONVERGED = {
    "comfyui_gateway": (
        "comfyui_gateway : Mask the units of Debian's caddy package",
        "comfyui_gateway : Stop the units of Debian's caddy package that run",
        "comfyui_gateway : Install Caddy and bcrypt",
        "comfyui_gateway : Create the gateway's group",
        "comfyui_gateway : Create the gateway's account",
        "comfyui_gateway : Create the gateway's folders",
        "comfyui_gateway : Install the gateway's unit",
        "comfyui_gateway : Start the gateway and enable it at boot",
        "comfyui_gateway : Wait until the gateway listens on its ports",
        "comfyui_gateway : Publish the root certificate of the gateway's internal CA for clients",
        "comfyui_exporter : Install the system bus the exporter asks systemd through",
        "comfyui_exporter : Create the exporter's group",
        "comfyui_exporter : Create the exporter's account",
        "comfyui_exporter : Create the exporter's state folder",
        "comfyui_exporter : Create the folder of the host's Prometheus rules",
        "comfyui_exporter : Install comfybake's alert rules for the host's Prometheus",
        "comfyui_exporter : Install the exporter's unit",
        "comfyui_exporter : Start the exporter and enable it at boot",
        "comfyui_exporter : Wait until the exporter answers /metrics",
    ),
}


def test_there_are_scenarios() -> None:
    assert "comfyui" in SCENARIOS


def run_molecule(scenario: str, env: dict[str, str], log_path: Path) -> tuple[int, list[tuple[str, str, float]], str]:
    """`molecule test`, its output to `log_path`; returns its exit code, (action, result, seconds)
    in order, and the action that was still running when it ended ("" if none)."""
    actions: list[tuple[str, str, float]] = []
    started: dict[str, float] = {}
    with (
        log_path.open("w") as log,
        subprocess.Popen(
            [venv_bin("molecule"), "test", "--scenario-name", scenario],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ) as process,
    ):  # fmt: skip
        timer = threading.Timer(TIMEOUT, process.kill)
        timer.start()
        try:
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
                if found := ACTION.match(line):
                    if found["result"] is None:
                        started[found["action"]] = time.monotonic()
                    else:
                        took = time.monotonic() - started.pop(found["action"], time.monotonic())
                        actions.append((found["action"], found["result"], round(took, 1)))
        finally:
            timer.cancel()
    running = next(iter(started), "")
    if process.returncode < 0:
        with log_path.open("a") as log:
            log.write(f"\nkilled after {TIMEOUT} s, in {running or 'no action'}\n")
    return process.returncode, actions, running


def not_skipped_when_converged(scenario: str, report: str) -> dict[str, list[str]]:
    """Each step of SKIPPED_WHEN_CONVERGED[scenario] that the idempotence run did not only skip,
    with what its host and items reported (ok, changed, skipping; nothing: the step never ran)."""
    action = f"[{scenario} > idempotence] Execut"
    run = report.partition(action + "ing")[2].partition(action + "ed")[0]
    found: dict[str, list[str]] = {}
    for step in SKIPPED_WHEN_CONVERGED.get(scenario, ()):
        block = run.partition(f"TASK [comfybake.core.{step}]")[2].partition("\nTASK [")[0]
        results = re.findall(r"^(\w+): \[", block, re.M)
        if set(results) != {"skipping"}:
            found[step] = results
    return found


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_molecule_scenario(scenario: str, docker_engine: None, ansible_env: dict[str, str]) -> None:
    # A token handed to scenarios that use one (the model origin requires it); it must never print.
    canary = f"hf_CANARY_{uuid.uuid4().hex}"
    env = {**ansible_env, "MOLECULE_NO_LOG": "false", "COMFYBAKE_CANARY": canary, "COLUMNS": "160"}
    env.setdefault("COMFYBAKE_EXTRA_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    LOGS.mkdir(parents=True, exist_ok=True)
    log_path = LOGS / f"molecule-{scenario}.log"
    started = time.monotonic()
    returncode, actions, running = run_molecule(scenario, env, log_path)
    timing = {"scenario": scenario, "seconds": round(time.monotonic() - started, 1), "actions": actions}
    (LOGS / f"molecule-{scenario}.json").write_text(json.dumps(timing) + "\n")
    report = log_path.read_text()
    if returncode < 0:
        pytest.fail(f"molecule test -s {scenario} was killed after {TIMEOUT} s in {running} (full log: {log_path})")
    if returncode != 0:
        failed = running or next((action for action, result, _ in actions if result != "Successful"), "an action")
        pytest.fail(
            f"molecule test -s {scenario} failed in {failed}: {failure_reason(report)} (full log: {log_path})\n"
            + failure_excerpt(report),
            pytrace=False,
        )
    assert canary not in report, "the canary token appeared in molecule's output"
    succeeded = {action for action, result, _ in actions if result == "Successful"}
    for action in ("check", "converge", "idempotence", "verify", "side_effect"):
        assert action in succeeded, f"{action} did not run successfully (see {log_path})"
    assert not_skipped_when_converged(scenario, report) == {}, f"steps a converged host should skip (see {log_path})"
