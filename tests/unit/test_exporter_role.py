"""The comfyui_exporter role's logic, run by a real ansible-playbook on localhost from the roles'
own defaults, vars, tasks and templates: the unit's NVIDIA devices, its IPAddressAllow=, the
clients the preflight refuses, the restart when the host command changed, and the Prometheus
rules folder left as its server has it."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness.tools import ROOT, venv_bin

ROLE = ROOT / "roles" / "comfyui_exporter"
VARS_FILES = [ROOT / "roles" / role / folder / "main.yml" for role, folder in
              (("comfyui", "defaults"), ("comfyui", "vars"), ("comfyui_exporter", "defaults"),
               ("comfyui_exporter", "vars"))]  # fmt: skip
UNITS = {"nvml": {"comfyui_exporter_nvml": True}, "plain": {}}
ALLOW = {
    "loopback": {"comfyui_exporter_allowed_clients": ["10.0.0.0/24"]},
    "beyond": {"comfyui_exporter_listen": "10.0.0.5:9721", "comfyui_exporter_allowed_clients": ["10.0.0.0/24"]},
}
CHANGED = {
    "nothing": {"__comfyui_exporter_unit": {"changed": False}, "__comfyui_cli": {"changed": False}},
    "cli": {"__comfyui_exporter_unit": {"changed": False}, "__comfyui_cli": {"changed": True}},
    "unit": {"__comfyui_exporter_unit": {"changed": True}},
}
CLIENTS = {
    "good": ["10.0.0.7", "10.0.0.0/24", "fd00::/8"],
    "five_parts": ["10.0.0.7", "1.2.3.4.5"],
    "bad_prefix": ["10.0.0.0/40"],
}


def run(tmp_path: Path, ansible_env: dict[str, str], tasks: list[dict[str, Any]]) -> None:
    play = [{"hosts": "localhost", "gather_facts": False, "vars_files": [str(f) for f in VARS_FILES], "tasks": tasks}]
    (tmp_path / "play.yml").write_text(json.dumps(play))
    done = subprocess.run([venv_bin("ansible-playbook"), "-i", "localhost,", "-c", "local", "-e",
                           f"ansible_python_interpreter={sys.executable}", "play.yml"],
                          cwd=tmp_path, env=ansible_env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def caught(name: str, tasks: list[dict[str, Any]], out: Path, given: dict[str, Any]) -> dict[str, Any]:
    """A block that writes "ok" to `out`, or the failed task's message."""
    return {
        "name": name,
        "vars": given,
        "block": [*tasks, {"ansible.builtin.copy": {"content": "ok", "dest": str(out)}}],
        "rescue": [{"ansible.builtin.copy": {"content": "{{ ansible_failed_result.msg }}", "dest": str(out)}}],
    }


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One playbook run: the unit per case, IPAddressAllow=, the restart decision and the preflight
    per case."""
    tmp_path = tmp_path_factory.mktemp("exporter-role")
    ansible_env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    tasks: list[dict[str, Any]] = [
        {
            "name": f"Render the unit of {case}",
            "ansible.builtin.template": {
                "src": str(ROLE / "templates" / "comfybake-exporter.service.j2"),
                "dest": f"{tmp_path}/unit-{case}",
            },
            "vars": given,
        }
        for case, given in UNITS.items()
    ]
    tasks += [
        {
            "name": f"Write IPAddressAllow of {case}",
            "ansible.builtin.copy": {
                "content": "{{ _comfyui_exporter_ip_allow | to_json }}",
                "dest": f"{tmp_path}/allow-{case}",
            },
            "vars": given,
        }
        for case, given in ALLOW.items()
    ]
    tasks += [
        {
            "name": f"Write whether {case} restarts the exporter",
            "ansible.builtin.copy": {
                "content": "{{ _comfyui_exporter_changed | bool | to_json }}",
                "dest": f"{tmp_path}/changed-{case}",
            },
            "vars": given,
        }
        for case, given in CHANGED.items()
    ]
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "instances.json").write_text("{}")
    tasks += [
        caught(
            f"Run the preflight with the clients of {case}",
            [{"ansible.builtin.include_tasks": str(ROLE / "tasks" / "preflight.yml")}],
            tmp_path / f"clients-{case}",
            {"comfyui_exporter_allowed_clients": clients, "comfyui_config_root": str(tmp_path / "etc")},
        )
        for case, clients in CLIENTS.items()
    ]
    run(tmp_path, ansible_env, tasks)
    return tmp_path


def test_with_nvml_the_unit_allows_the_drivers_device_names_and_all_of_proc(rendered: Path) -> None:
    """Since driver 550 major 195 is "nvidiactl" in /proc/devices, no longer "nvidia-frontend"; NVML
    reads /proc/driver/nvidia, which ProcSubset=pid hides."""
    nvml = (rendered / "unit-nvml").read_text().splitlines()
    allowed = [line for line in nvml if line.startswith("DeviceAllow=")]
    assert allowed == [
        "DeviceAllow=char-nvidiactl rw",
        "DeviceAllow=char-nvidia-frontend rw",
        "DeviceAllow=char-nvidia-uvm rw",
        "DeviceAllow=char-nvidia-caps rw",
    ]
    assert "ProcSubset=all" in nvml and "ProtectProc=invisible" in nvml and "DevicePolicy=closed" in nvml
    plain = (rendered / "unit-plain").read_text().splitlines()
    assert "ProcSubset=pid" in plain and "PrivateDevices=yes" in plain
    assert not [line for line in plain if line.startswith("DeviceAllow=")]


def test_allowed_clients_reach_the_unit_only_when_the_exporter_listens_beyond_loopback(rendered: Path) -> None:
    assert json.loads((rendered / "allow-loopback").read_text()) == ["localhost"]
    assert json.loads((rendered / "allow-beyond").read_text()) == ["localhost", "10.0.0.0/24", "10.0.0.5"]


def test_the_exporter_restarts_when_the_host_command_changed(rendered: Path) -> None:
    changed = {case: json.loads((rendered / f"changed-{case}").read_text()) for case in CHANGED}
    assert changed == {"nothing": False, "cli": True, "unit": True}
    start = yaml.safe_load((ROLE / "tasks" / "systemd.yml").read_text())[1]["ansible.builtin.systemd_service"]
    assert "_comfyui_exporter_changed" in start["state"]
    configure = yaml.safe_load((ROOT / "roles" / "comfyui" / "tasks" / "configure.yml").read_text())
    (install,) = [task for task in configure if task["name"] == "Install the comfybake command"]
    assert install["register"] == "__comfyui_cli"


def test_the_wait_for_metrics_goes_straight_to_loopback() -> None:
    wait = yaml.safe_load((ROLE / "tasks" / "systemd.yml").read_text())[2]["ansible.builtin.uri"]
    assert wait["use_proxy"] is False


def test_the_preflight_names_a_client_systemd_cannot_parse(rendered: Path) -> None:
    assert (rendered / "clients-good").read_text() == "ok"
    message = (rendered / "clients-five_parts").read_text()
    assert "comfyui_exporter_allowed_clients[1] '1.2.3.4.5' must be one IP address or network" in message, message
    assert "[0]" not in message
    message = (rendered / "clients-bad_prefix").read_text()
    assert "comfyui_exporter_allowed_clients[0] '10.0.0.0/40'" in message, message


def test_the_rules_folder_keeps_the_owner_and_mode_the_prometheus_server_gave_it(
    tmp_path: Path, ansible_env: dict[str, str]
) -> None:
    rules = tmp_path / "rules.d"
    rules.mkdir(mode=0o750)
    rules.chmod(0o750)
    os.chown(rules, 65534, 65534)  # nobody, as a Prometheus package's own account would
    (tmp_path / "files" / "prometheus").mkdir(parents=True)  # the play's files/, where copy looks
    shutil.copy(ROLE / "files" / "prometheus" / "comfybake-rules.yml", tmp_path / "files" / "prometheus")
    missing = tmp_path / "missing" / "rules.d"
    given = {"_comfyui_exporter_account": "root", "_comfyui_exporter_state": str(tmp_path / "state")}
    tasks = [
        {
            "name": f"Run the configure phase with {folder.name}",
            "ansible.builtin.include_tasks": str(ROLE / "tasks" / "configure.yml"),
            "vars": {**given, "comfyui_exporter_rules_dir": str(folder)},
        }
        for folder in (rules, missing)
    ]
    run(tmp_path, ansible_env, tasks)
    found = rules.stat()
    assert (stat.S_IMODE(found.st_mode), found.st_uid, found.st_gid) == (0o750, 65534, 65534)
    assert (rules / "comfybake-rules.yml").is_file()
    assert stat.S_IMODE(missing.stat().st_mode) == 0o755 and (missing / "comfybake-rules.yml").is_file()


def test_the_gateways_probe_of_the_exporter_ignores_the_environments_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """`comfybake gateway status` asks the exporter's /metrics on loopback: a proxy named by
    http_proxy (a corporate one cannot reach this host's loopback) must not carry the request."""
    from comfybake import gateway

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/metrics" else 404)
            self.end_headers()
            self.wfile.write(b"comfybake_up 1\n")

        def log_message(self, *args: Any) -> None:
            pass

    with socket.socket() as closed:  # a port nothing listens on, as the proxy
        closed.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{closed.getsockname()[1]}"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for name in ("http_proxy", "HTTP_PROXY"):
            monkeypatch.setenv(name, proxy)
        for name in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        assert gateway.probe(f"127.0.0.1:{server.server_address[1]}", "/metrics") == "ok"
    finally:
        server.shutdown()
        server.server_close()


def test_setting_problems_network_takes_what_ipaddress_parses() -> None:
    from ansible_collections.comfybake.core.plugins.filter.settings import setting_problems

    assert setting_problems({"c": ["10.0.0.7", "10.0.0.0/24", "::1", "fd00::/8"]}, "network") == []
    for bad in ("1.2.3.4.5", "10.0.0.0/33", "localhost", "10.0.0.7 10.0.0.8", "10.0.0.7\n"):
        (problem,) = setting_problems({"c": [bad]}, "network")
        assert problem.startswith(f"c[0] {bad!r} must be one IP address or network"), problem
