"""What the comfyui_instances role's preflight refuses about the exporter, run by a real
ansible-playbook on localhost from the roles' own defaults and vars: a port the exporter listens on
taken by an instance or by the gateway's one port, and a container image whose supervisord would
run the exporter without the role that creates its account."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from harness.tools import ROOT, venv_bin

ENVIRONMENTS = {"comm": {}}
A = {"name": "a", "environment": "comm", "port": 8188, "gpus": []}
ON_EXPORTER = {"name": "b", "environment": "comm", "port": 9721, "gpus": []}
# Case: (the play has the exporter role, the variables given).
CASES: dict[str, tuple[bool, dict[str, Any]]] = {
    "systemd": (False, {"comfyui_instances": [A]}),
    "instance_on_exporter": (False, {"comfyui_instances": [A, ON_EXPORTER]}),
    "exporter_off": (False, {"comfyui_instances": [A, ON_EXPORTER], "comfyui_exporter_enabled": False}),
    "gateway_on_exporter": (
        False,
        {"comfyui_instances": [A], "comfyui_gateway_mode": "paths", "comfyui_gateway_port": 9721},
    ),
    "gateway_ports_mode": (False, {"comfyui_instances": [A], "comfyui_gateway_port": 9721}),
    "image_without_role": (False, {"comfyui_instances": [A], "comfyui_service_manager": "supervisor"}),
    "image_with_role": (True, {"comfyui_instances": [A], "comfyui_service_manager": "supervisor"}),
}


def outcomes(tmp_path: Path, ansible_env: dict[str, str]) -> dict[str, str]:
    """Each case's outcome: "ok", or the failed assertion's message."""
    files = [ROOT / "roles" / role / folder / "main.yml" for role, folder in
             (("comfyui", "defaults"), ("comfyui", "vars"), ("comfyui_instances", "defaults"),
              ("comfyui_instances", "vars"))]  # fmt: skip
    preflight = ROOT / "roles" / "comfyui_instances" / "tasks" / "preflight.yml"
    plays = []
    for with_role in (False, True):
        tasks = [
            {
                "name": f"Run the preflight of {case}",
                "vars": {"comfyui_environments": ENVIRONMENTS, **given},
                "block": [
                    {"ansible.builtin.include_tasks": str(preflight)},
                    {"ansible.builtin.copy": {"content": "ok", "dest": f"{tmp_path}/{case}"}},
                ],
                "rescue": [
                    {
                        "ansible.builtin.copy": {
                            "content": "{{ ansible_failed_result.msg }}",
                            "dest": f"{tmp_path}/{case}",
                        }
                    }
                ],
            }
            for case, (role, given) in CASES.items()
            if role is with_role
        ]
        play: dict[str, Any] = {"hosts": "localhost", "gather_facts": False, "vars_files": [str(f) for f in files]}
        # The role is in the play (as playbooks/site.yml has it) but does not run here.
        play |= (
            {"pre_tasks": tasks, "roles": [{"role": "comfybake.core.comfyui_exporter", "when": False}]}
            if with_role
            else {"tasks": tasks}
        )
        plays.append(play)
    (tmp_path / "play.yml").write_text(json.dumps(plays))
    done = subprocess.run([venv_bin("ansible-playbook"), "-i", "localhost,", "-c", "local", "-e",
                           f"ansible_python_interpreter={sys.executable}", "play.yml"],
                          cwd=tmp_path, env=ansible_env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return {case: (tmp_path / case).read_text() for case in CASES}


def test_the_preflight_refuses_the_exporters_port_and_an_image_without_the_exporter_role(
    tmp_path: Path, ansible_env: dict[str, str]
) -> None:
    found = outcomes(tmp_path, ansible_env)
    assert found["systemd"] == "ok"
    assert found["exporter_off"] == "ok"
    assert found["gateway_ports_mode"] == "ok"  # the gateway's routes count the exporter's port there
    assert found["image_with_role"] == "ok"
    message = found["instance_on_exporter"]
    assert 'instance "b" would take the exporter\'s port 9721' in message, message
    assert 'comfyui_exporter_listen "127.0.0.1:9721"' in message and "comfyui_exporter_enabled false" in message
    message = found["gateway_on_exporter"]
    assert "comfyui_gateway_port 9721 (comfyui_gateway_mode paths)" in message, message
    assert "give the gateway another port" in message, message
    message = found["image_without_role"]
    assert "comfybake.core.comfyui_exporter" in message and "comfyui_exporter_enabled" in message, message
