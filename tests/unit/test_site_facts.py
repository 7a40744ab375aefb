"""site.yml gathers only some fact subsets: every fact that a role of its host play reads must be
among them (gathered here, on this machine, with the play's own gather_subset)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml
from harness.tools import venv_bin

# Roles that site.yml does not run (bake's image role gathers its own facts), and facts that
# modules set, not the setup step (getent, service_facts).
NOT_IN_SITE = {"comfyui_image"}
SET_BY_MODULES = re.compile(r"getent_|services$")


def test_site_gathers_every_fact_its_roles_read(root: Path, ansible_env: dict[str, str]) -> None:
    play = yaml.safe_load((root / "playbooks" / "site.yml").read_text())[0]
    setup = next(task for task in play["pre_tasks"] if "ansible.builtin.setup" in task)
    subset = setup["ansible.builtin.setup"]["gather_subset"]
    read = {
        name
        for path in (root / "roles").glob("*/**/*.yml")
        if path.relative_to(root / "roles").parts[0] not in NOT_IN_SITE
        for pair in re.findall(r"ansible_facts(?:\[['\"](\w+)['\"]\]|\.(\w+))", path.read_text())
        for name in pair
        if name and not SET_BY_MODULES.match(name)
    }
    assert {"os_family", "distribution", "kernel", "fqdn", "default_ipv4"} <= read
    done = subprocess.run(
        [venv_bin("ansible"), "localhost", "-m", "ansible.builtin.setup", "-a", json.dumps({"gather_subset": subset})],
        env={**ansible_env, "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.json", "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1"},
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    facts = json.loads(done.stdout)["plays"][0]["tasks"][0]["hosts"]["localhost"]["ansible_facts"]
    assert read - {name.removeprefix("ansible_") for name in facts} == set()
    assert "ansible_mounts" not in facts  # the hardware subset, which no role reads
