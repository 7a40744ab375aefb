"""What the comfyui_gateway role hands the module about the exporter's and the job service's routes:
its settings as Ansible templates them from the role's defaults and vars, read by the module's own code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ansible_collections.comfybake.core.plugins.module_utils.gateway import caddy, routes
from harness.tools import ROOT, venv_bin

CASES: dict[str, dict[str, Any]] = {
    "default": {},
    "exporter_off": {"comfyui_exporter_enabled": False},
    "metrics_off": {"comfyui_gateway_metrics": False},
    "moved": {"comfyui_exporter_listen": "0.0.0.0:9800", "comfyui_gateway_metrics_port": "9900"},
    "jobs": {"comfyui_jobs_enabled": True},
    "jobs_moved": {
        "comfyui_jobs_enabled": True,
        "comfyui_jobs_socket_dir": "/run/jobs",
        "comfyui_gateway_jobs_port": "10443",
    },
    # A front that is no fleet host runs no job service.
    "jobs_front": {"comfyui_jobs_enabled": True, "comfyui_gateway_fleet_members": ["gpu-1"]},
}


def rendered(tmp_path: Path, ansible_env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """_comfyui_gateway_settings for each case, from one run of ansible-playbook on localhost."""
    files = [ROOT / "roles" / role / folder / "main.yml" for role, folder in
             (("comfyui", "defaults"), ("comfyui", "vars"), ("comfyui_gateway", "defaults"),
              ("comfyui_gateway", "vars"))]  # fmt: skip
    tasks = [
        {
            "name": f"Write the settings of {case}",
            "ansible.builtin.copy": {
                "content": "{{ _comfyui_gateway_settings | to_json }}",
                "dest": f"{tmp_path}/{case}",
            },
            "vars": given,
        }
        for case, given in CASES.items()
    ]
    play = [{"hosts": "localhost", "gather_facts": False, "vars_files": [str(f) for f in files], "tasks": tasks}]
    (tmp_path / "play.yml").write_text(json.dumps(play))
    done = subprocess.run([venv_bin("ansible-playbook"), "-i", "localhost,", "-c", "local", "-e",
                           f"ansible_python_interpreter={sys.executable}", "play.yml"],
                          cwd=tmp_path, env=ansible_env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return {case: json.loads((tmp_path / case).read_text()) for case in CASES}


def test_the_role_routes_the_exporter_only_when_both_switches_are_on(
    tmp_path: Path, ansible_env: dict[str, str]
) -> None:
    settings = rendered(tmp_path, ansible_env)
    layout = [{"name": "a", "environment": "e", "port": 8188, "url": "http://127.0.0.1:8188"}]
    metrics = {
        case: routes.public_routes(layout, caddy.normalize(found))["metrics"] for case, found in settings.items()
    }
    assert settings["default"]["metrics"] == {"upstream": "127.0.0.1:9721", "port": 9722}
    assert (metrics["default"]["port"], metrics["default"]["upstream"]) == (9722, "127.0.0.1:9721")
    assert (metrics["moved"]["port"], metrics["moved"]["upstream"]) == (9900, "127.0.0.1:9800")
    assert settings["exporter_off"]["metrics"] is None and metrics["exporter_off"] is None
    assert settings["metrics_off"]["metrics"] is None and metrics["metrics_off"] is None


def test_the_role_routes_the_job_service_only_where_it_runs(tmp_path: Path, ansible_env: dict[str, str]) -> None:
    settings = rendered(tmp_path, ansible_env)
    layout = [{"name": "a", "environment": "e", "port": 8188, "url": "http://127.0.0.1:8188"}]
    assert settings["jobs"]["jobs"] == {"socket": "/run/comfybake-jobs/jobs.sock", "port": 9723}
    assert settings["jobs"]["control"] == {"socket": "/run/comfybake-jobs/control.sock", "port": 9724}
    public = routes.public_routes(layout, caddy.normalize(settings["jobs"]))
    assert (public["jobs"]["upstream"], public["control"]["port"]) == ("unix//run/comfybake-jobs/jobs.sock", 9724)
    assert settings["jobs_moved"]["jobs"] == {"socket": "/run/jobs/jobs.sock", "port": 10443}
    assert settings["jobs_moved"]["control"]["socket"] == "/run/jobs/control.sock"
    for case in ("default", "jobs_front"):  # comfyui_jobs_enabled unset (the role not in the play), or a front
        assert (settings[case]["jobs"], settings[case]["control"]) == (None, None), case
