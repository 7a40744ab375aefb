"""Every molecule scenario runs its whole test sequence against a real systemd container."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
from harness.tools import venv_bin

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = sorted(p.parent.name for p in (ROOT / "molecule").glob("*/molecule.yml"))

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def test_there_are_scenarios() -> None:
    assert "comfyui" in SCENARIOS


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_molecule_scenario(scenario: str, docker_engine: None, ansible_env: dict[str, str]) -> None:
    # A token handed to scenarios that use one (the model origin requires it); it must never print.
    canary = f"hf_CANARY_{uuid.uuid4().hex}"
    env = {**ansible_env, "MOLECULE_NO_LOG": "false", "COMFYBAKE_CANARY": canary}
    env.setdefault("COMFYBAKE_EXTRA_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    done = subprocess.run(
        [venv_bin("molecule"), "test", "--scenario-name", scenario],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.fail(
            f"molecule test -s {scenario} failed:\n{done.stdout[-20000:]}\n{done.stderr[-5000:]}", pytrace=False
        )
    report = done.stdout + done.stderr
    assert canary not in report, "the canary token appeared in molecule's output"
    for action in ("check", "converge", "idempotence", "verify", "side_effect"):
        assert f"{scenario} > {action}: Executed: Successful" in report, f"{action} did not run successfully"
