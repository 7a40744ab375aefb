"""The comfyui_gateway role's fleet mode, run by a real ansible-playbook: its preflight reads each
member's instances.json on the member (delegate_to), its configure phase runs the real module and
Caddy's validation. The members are inventory hosts with a local connection, each with its own
config root; their addresses come from the inventory as on a real fleet."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from harness.tools import ROOT, venv_bin

from comfybake.engine.gateway import apply, front
from comfybake.engine.gateway.errors import GatewayError

ROLE_FILES = [ROOT / "roles" / role / folder / "main.yml" for role, folder in
              (("comfyui", "defaults"), ("comfyui", "vars"), ("comfyui_gateway", "defaults"),
               ("comfyui_gateway", "vars"))]  # fmt: skip


def layout(*instances: tuple[str, str, int]) -> str:
    return json.dumps({"instances": [{"name": n, "environment": e, "port": p, "url": f"http://127.0.0.1:{p}"}
                                     for n, e, p in instances]})  # fmt: skip


def setup(tmp_path: Path) -> Path:
    """An inventory of a front and four fleet hosts; gpu-b-1 was never converged, gpu-c-1 is
    unreachable (ssh to a closed port)."""
    for name, text in (("gpu-a-1", layout(("a", "prod", 8188), ("b", "dev", 8189))),
                       ("gpu-a-2", layout(("a", "prod", 8188)))):  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / "instances.json").write_text(text)
    (tmp_path / "gpu-b-1").mkdir()
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    inventory = {"all": {"hosts": {
        "front": local,
        "gpu-a-1": {**local, "ansible_host": "10.0.0.11", "comfyui_config_root": str(tmp_path / "gpu-a-1")},
        "gpu-a-2": {**local, "ansible_host": "192.0.2.1", "comfybake_fleet_address": "10.0.0.12",
                    "comfyui_config_root": str(tmp_path / "gpu-a-2")},
        "gpu-b-1": {**local, "comfyui_config_root": str(tmp_path / "gpu-b-1")},
        "gpu-c-1": {"ansible_connection": "ssh", "ansible_host": "127.0.0.1", "ansible_port": 1,
                    "ansible_ssh_common_args": "-o ConnectTimeout=3 -o BatchMode=yes"},
    }}}  # fmt: skip
    (tmp_path / "inventory.json").write_text(json.dumps(inventory))
    # The front's own files under tmp_path (a later vars file overrides the roles' defaults and vars).
    (tmp_path / "front.json").write_text(json.dumps({
        "comfyui_config_root": str(tmp_path / "front"), "_comfyui_gateway_account": "root",
        "_comfyui_gateway_storage": str(tmp_path / "storage"), "_comfyui_gateway_socket": str(tmp_path / "admin.sock"),
        "comfyui_gateway_names": ["front.example.com"], "comfyui_gateway_metrics": False}))  # fmt: skip
    front_vars = json.loads((tmp_path / "front.json").read_text())
    (tmp_path / "front-role-vars.json").write_text(json.dumps({k: v for k, v in front_vars.items() if k[0] == "_"}))
    tasks = [
        {"name": "Preflight", "ansible.builtin.include_tasks": str(ROOT / "roles/comfyui_gateway/tasks/preflight.yml")},
        {"name": "Configure", "ansible.builtin.include_tasks": str(ROOT / "roles/comfyui_gateway/tasks/configure.yml")},
        {"name": "Keep what the role computed", "ansible.builtin.copy": {
            "content": "{{ {'fleet': _comfyui_gateway_fleet_layout, 'gateway': __comfyui_gateway} | to_json }}",
            "dest": str(tmp_path / "out.json")}},
    ]  # fmt: skip
    play = [{"hosts": "front", "gather_facts": False,
             "vars_files": [*map(str, ROLE_FILES), str(tmp_path / "front.json")], "tasks": tasks}]  # fmt: skip
    (tmp_path / "play.yml").write_text(json.dumps(play))
    # The whole role through its main.yml, for runs of some of its tags only.
    gateway = {"name": "Gateway", "ansible.builtin.include_role": {"name": "comfybake.core.comfyui_gateway"},
               "tags": ["always"]}  # fmt: skip
    role = [{**play[0], "gather_facts": True, "tasks": [gateway, {**tasks[-1], "tags": ["always"]}]}]
    (tmp_path / "role.yml").write_text(json.dumps(role))
    return tmp_path


def converge(
    tmp_path: Path, env: dict[str, str], *argv: str, playbook: str = "play.yml", **extra: Any
) -> tuple[subprocess.CompletedProcess[str], Any]:
    (tmp_path / "extra.json").write_text(json.dumps(extra))
    (tmp_path / "out.json").unlink(missing_ok=True)
    done = subprocess.run([venv_bin("ansible-playbook"), "-i", str(tmp_path / "inventory.json"),
                           "-e", f"@{tmp_path / 'front-role-vars.json'}",  # over the roles' vars (role.yml)
                           "-e", f"@{tmp_path / 'extra.json'}", *argv, str(tmp_path / playbook)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    out = json.loads((tmp_path / "out.json").read_text()) if (tmp_path / "out.json").exists() else None
    return done, out


def test_a_front_routes_its_members_instances_and_keeps_their_pool_states(
    tmp_path: Path, ansible_env: dict[str, str]
) -> None:
    setup(tmp_path)
    members = {"comfyui_gateway_fleet_members": ["gpu-a-1", "gpu-a-2"]}
    done, out = converge(tmp_path, ansible_env, **members)
    assert done.returncode == 0, done.stdout[-4000:]
    # each member's instances at its address: ansible_host, or comfybake_fleet_address before it
    assert [(m["name"], m["address"]) for m in out["fleet"]] == [("gpu-a-1", "10.0.0.11"), ("gpu-a-2", "10.0.0.12")]
    routes = out["gateway"]["routes"]
    assert routes["instances"] == []
    prod = next(route for route in routes["environments"] if route["name"] == "prod")
    assert prod["members"] == {"10.0.0.11:8188": "gpu-a-1", "10.0.0.12:8188": "gpu-a-2"}
    config_dir = tmp_path / "front" / "gateway"
    assert json.loads((config_dir / "pool.json").read_text())["members"] == {"gpu-a-1": "serving", "gpu-a-2": "serving"}

    # A rolling playbook took gpu-a-1 out; the next converge changes nothing and keeps it out.
    front.change(apply.Paths(str(config_dir), group=""), ["gpu-a-1"], "out")
    done, out = converge(tmp_path, ansible_env, **members)
    assert done.returncode == 0, done.stdout[-4000:]
    changed = [line for line in done.stdout.splitlines() if line.startswith("changed: [")]
    assert len(changed) == 1, done.stdout[-3000:]  # the test's own copy of the results, nothing of the role
    assert not out["gateway"]["changed"], out["gateway"]["changed_files"]
    assert out["gateway"]["pool"] == {"gpu-a-1": "out", "gpu-a-2": "serving"}


def test_a_front_refuses_unconverged_unknown_members_and_instance_scopes(
    tmp_path: Path, ansible_env: dict[str, str]
) -> None:
    setup(tmp_path)
    done, _ = converge(tmp_path, ansible_env, comfyui_gateway_fleet_members=["gpu-a-1", "gpu-b-1"])
    assert done.returncode != 0
    assert "instances.json) of gpu-b-1" in done.stdout and "converge playbooks/site.yml on it first" in done.stdout
    done, _ = converge(
        tmp_path,
        ansible_env,
        comfyui_gateway_fleet_members=["gpu-a-1", "gpu-z-9"],
        comfyui_gateway_keys=[{"name": "ci", "scope": ["instance:a"], "api_key": "Y2k6c2VjcmV0"}],
    )
    assert done.returncode != 0
    assert "comfyui_gateway_fleet_members names gpu-z-9, not hosts of the inventory" in done.stdout
    assert "the users or keys ci have an instance: scope" in done.stdout


def test_without_members_the_role_routes_the_hosts_own_instances(tmp_path: Path, ansible_env: dict[str, str]) -> None:
    """The same tasks on a host's own gateway: its instances.json, a route per instance, no pool."""
    setup(tmp_path)
    (tmp_path / "front").mkdir()
    (tmp_path / "front" / "instances.json").write_text(layout(("a", "prod", 8188)))
    for run in range(2):
        done, out = converge(tmp_path, ansible_env)
        assert done.returncode == 0, done.stdout[-4000:]
        assert [route["name"] for route in out["gateway"]["routes"]["instances"]] == ["a"]
        assert out["gateway"]["changed"] == (run == 0) and out["gateway"]["pool"] == {}
    assert not (tmp_path / "front" / "gateway" / "pool.json").exists()


def test_a_tagged_run_keeps_the_fronts_routes_and_a_front_leaves_only_when_told(
    tmp_path: Path, ansible_env: dict[str, str]
) -> None:
    """--tags comfyui_gateway_configure through the role's main.yml reads the members as a whole
    run does (the reads are in the configure phase, so --skip-tags comfyui_gateway_preflight does
    too); an empty member list on a front fails unless comfyui_gateway_leave_fleet says to become
    a host's own gateway."""
    setup(tmp_path)
    members = {"comfyui_gateway_fleet_members": ["gpu-a-1", "gpu-a-2"]}
    done, out = converge(tmp_path, ansible_env, **members)
    assert done.returncode == 0, done.stdout[-4000:]
    config_dir = tmp_path / "front" / "gateway"
    front.change(apply.Paths(str(config_dir), group=""), ["gpu-a-1"], "out")
    config = (config_dir / "caddy.json").read_text()
    done, out = converge(tmp_path, ansible_env, "--tags", "comfyui_gateway_configure", playbook="role.yml", **members)
    assert done.returncode == 0, done.stdout[-4000:]
    assert [route["name"] for route in out["gateway"]["routes"]["environments"]] == ["dev", "prod"]
    assert not out["gateway"]["changed"], out["gateway"]["changed_files"]
    assert out["gateway"]["pool"] == {"gpu-a-1": "out", "gpu-a-2": "serving"}
    assert (config_dir / "caddy.json").read_text() == config

    (tmp_path / "front" / "instances.json").write_text(layout(("a", "prod", 8188)))
    done, _ = converge(tmp_path, ansible_env)
    assert done.returncode != 0
    assert "says this gateway is a front" in done.stdout and "comfyui_gateway_leave_fleet true" in done.stdout
    assert (config_dir / "caddy.json").read_text() == config
    done, out = converge(tmp_path, ansible_env, comfyui_gateway_leave_fleet=True)
    assert done.returncode == 0, done.stdout[-4000:]
    assert [route["name"] for route in out["gateway"]["routes"]["instances"]] == ["a"]


def test_an_unreachable_member_fails_the_run_and_its_check(tmp_path: Path, ansible_env: dict[str, str]) -> None:
    """Check mode tells what the run would do: fail, naming the member, not route without it."""
    setup(tmp_path)
    members = {"comfyui_gateway_fleet_members": ["gpu-a-1", "gpu-c-1"]}
    for argv in ((), ("--check",)):
        done, _ = converge(tmp_path, ansible_env, *argv, **members)
        assert done.returncode != 0, (argv, done.stdout[-4000:])
        assert "instances.json) of gpu-c-1" in done.stdout, (argv, done.stdout[-4000:])
    assert not (tmp_path / "front" / "gateway" / "pool.json").exists()


def test_an_environment_keeps_its_port_when_others_come(tmp_path: Path, ansible_env: dict[str, str]) -> None:
    """Ports mode on a front: the ports given out are read back from gateway.json, so a member
    adding an environment that sorts first moves no other environment."""
    setup(tmp_path)
    members = {"comfyui_gateway_fleet_members": ["gpu-a-1", "gpu-a-2"]}
    done, out = converge(tmp_path, ansible_env, **members)
    assert done.returncode == 0, done.stdout[-4000:]
    ports = {route["name"]: route["port"] for route in out["gateway"]["routes"]["environments"]}
    (tmp_path / "gpu-a-2" / "instances.json").write_text(layout(("a", "prod", 8188), ("z", "aaa", 8190)))
    done, out = converge(tmp_path, ansible_env, **members)
    assert done.returncode == 0, done.stdout[-4000:]
    after = {route["name"]: route["port"] for route in out["gateway"]["routes"]["environments"]}
    assert {name: after[name] for name in ports} == ports, after
    assert after["aaa"] not in ports.values()


def test_a_front_moves_queued_connections_to_the_new_listeners(tmp_path: Path, ansible_env: dict[str, str]) -> None:
    """The role's tcp_migrate_req tasks, run in a network namespace of their own (the setting is
    per namespace, so the machine's stays as it is): set now and across boots, then unchanged."""
    if subprocess.run(["unshare", "--net", "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("no network namespace can be made here (unshare --net)")
    conf = tmp_path / "60-comfybake-gateway.conf"
    # The role's read of the two (its preflight's probe reads them on a front), then the tasks.
    probe = {"ansible.builtin.command": {"argv": "{{ _comfyui_probe + [_comfyui_gateway_migrate_req,"
                                                 " _comfyui_gateway_sysctl_file] }}"},
             "changed_when": False, "register": "__comfyui_gateway_probe"}  # fmt: skip
    tasks = [probe, {"ansible.builtin.import_tasks": str(ROOT / "roles/comfyui_gateway/tasks/sysctl.yml")}]
    play = [{"hosts": "localhost", "gather_facts": False, "vars_files": [str(path) for path in ROLE_FILES],
             "tasks": tasks}]  # fmt: skip
    (tmp_path / "sysctl.yml").write_text(json.dumps(play))
    (tmp_path / "paths.json").write_text(json.dumps({"_comfyui_gateway_sysctl_file": str(conf)}))
    run = (f"{venv_bin('ansible-playbook')} -i localhost, -c local -e ansible_python_interpreter={sys.executable}"
           f" -e @{tmp_path / 'paths.json'} {tmp_path / 'sysctl.yml'}")  # fmt: skip
    script = f"cat /proc/sys/net/ipv4/tcp_migrate_req; {run} && {run} && cat /proc/sys/net/ipv4/tcp_migrate_req"
    done = subprocess.run(["unshare", "--net", "sh", "-c", script], cwd=tmp_path, env=ansible_env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert (lines[0], lines[-1]) == ("0", "1"), done.stdout
    recaps = [line for line in lines if line.startswith("localhost")]
    assert "changed=2" in recaps[0] and "changed=0" in recaps[1], recaps
    assert conf.read_text() == "net.ipv4.tcp_migrate_req = 1\n"


def test_a_front_refuses_to_take_an_environment_below_its_serving_minimum(
    tmp_path: Path, ansible_env: dict[str, str]
) -> None:
    """min_serving (comfybake_fleet_min_serving in a rolling change): gpu-a-1 and gpu-a-2 serve
    prod, gpu-a-1 alone serves dev. Draining gpu-a-2 keeps prod served; then draining gpu-a-1
    would leave prod none: refused, naming it and its serving member, and nothing changes. dev,
    on one member, never counts (it goes down while its one host changes, whatever the order).
    An environment keeps at most all its members but one; 0 refuses nothing."""
    setup(tmp_path)
    done, _ = converge(tmp_path, ansible_env, comfyui_gateway_fleet_members=["gpu-a-1", "gpu-a-2"])
    assert done.returncode == 0, done.stdout[-4000:]
    paths = apply.Paths(str(tmp_path / "front" / "gateway"), group="")
    assert front.change(paths, ["gpu-a-2"], "draining", min_serving=1)["changed"]
    with pytest.raises(GatewayError) as refused:
        front.change(paths, ["gpu-a-1"], "draining", min_serving=1)
    assert "setting gpu-a-1 draining would take prod (serving: gpu-a-1; keeps 1) below" in str(refused.value)
    assert "dev" not in str(refused.value)
    assert "comfybake_fleet_min_serving: 0" in str(refused.value)
    assert front.view(paths)["states"] == {"gpu-a-1": "serving", "gpu-a-2": "draining"}
    assert front.change(paths, ["gpu-a-2"], "out", min_serving=1)["changed"]  # it served nothing already
    front.change(paths, ["gpu-a-2"], "serving")
    # A minimum of 2 keeps 1 of prod's 2 members: one may leave, not both at once.
    assert front.change(paths, ["gpu-a-1"], "draining", min_serving=2)["changed"]
    front.change(paths, ["gpu-a-1"], "serving")
    with pytest.raises(GatewayError, match=r"would take prod \(serving: gpu-a-1, gpu-a-2; keeps 1\) below"):
        front.change(paths, ["gpu-a-1", "gpu-a-2"], "out", min_serving=2)
    assert front.change(paths, ["gpu-a-1", "gpu-a-2"], "out")["states"] == {"gpu-a-1": "out", "gpu-a-2": "out"}
