"""The fleet role's drain decisions and the fleet_summary callback, with real ansible-playbook runs.

The hosts are local-connection hosts of a temporary inventory (one closed ssh port for an
unreachable one), each with its own config root whose instances.json names a ComfyUI test double
running on loopback, so the drain asks a real /queue; the host command line is the built zipapp.
The whole fleet (containers, fronts, pools) is tested in tests/fleet.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness.double import DOUBLE, free_port
from harness.tools import venv_bin

ROOT = Path(__file__).resolve().parents[2]
CLI = ROOT / "roles" / "comfyui" / "files" / "comfybake.pyz"

# A rolling play shaped like site.yml's: leave, the change (a loop that fails on an item where
# fail_me is set, as the environments role does), join; a canary batch then batches of two,
# any failure stops the rollout.
ROLLING = """
- name: Rolling change
  hosts: comfybake
  gather_facts: false
  serial: ["{{ comfybake_canary | default(1) }}", 2]
  max_fail_percentage: "{{ comfybake_max_fail_percentage | default(0) }}"
  pre_tasks:
    - name: Leave
      ansible.builtin.include_role: {name: comfybake.core.fleet, tasks_from: leave}
  tasks:
    - name: Apply the change
      ansible.builtin.fail: {msg: "{{ fail_me }}"}
      when: fail_me is defined and item == 'prod'
      loop: [edit, prod]
    - name: Mark the host as changed
      ansible.builtin.file: {path: "{{ comfyui_config_root }}/applied", state: touch, mode: "0644"}
      changed_when: false
  post_tasks:
    - name: Join
      ansible.builtin.include_role: {name: comfybake.core.fleet, tasks_from: join}
"""

PLAIN = """
- name: No fleet role
  hosts: comfybake
  gather_facts: false
  tasks:
    - name: Nothing
      ansible.builtin.debug: {msg: hello}
"""


@pytest.fixture(scope="module")
def double(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One running double (a real HTTP server with a real queue), as an instance layout record."""
    tree = tmp_path_factory.mktemp("double") / "ComfyUI"
    shutil.copytree(DOUBLE, tree, ignore=shutil.ignore_patterns("__pycache__"))
    port = free_port()
    state = tree.parent / "state"
    args = ["--listen", "127.0.0.1", "--port", str(port), "--cpu", "--user-directory", str(state / "user"),
            "--output-directory", str(state / "output"), "--database-url", f"sqlite:///{state}/comfyui.db"]  # fmt: skip
    (state / "user").mkdir(parents=True)
    with (tree.parent / "double.log").open("wb") as sink:
        process = subprocess.Popen([sys.executable, "-s", str(tree / "main.py"), *args], stdout=sink, stderr=sink)
    record = {"name": "main", "environment": "cpu", "port": port, "listen": "127.0.0.1", "args": args,
              "enabled": True, "gpus": [], "unit": "comfyui@main.service"}  # fmt: skip
    deadline = time.monotonic() + 60
    while queue(record) is None:
        assert time.monotonic() < deadline, (tree.parent / "double.log").read_text()
        time.sleep(0.2)
    yield record
    process.terminate()
    process.wait(timeout=10)


def queue(record: dict[str, Any]) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{record['port']}/queue", timeout=2) as response:
            return dict(json.loads(response.read()))
    except OSError:
        return None


def post(record: dict[str, Any], route: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{record['port']}{route}", data=json.dumps(body).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=5):  # noqa: S310 - loopback http
        pass


def busy(record: dict[str, Any], seconds: float, pending: int = 0) -> None:
    """A prompt running for `seconds`, and `pending` more queued behind it."""
    prompt = {"prompt": {"1": {"class_type": "KSampler", "inputs": {}}}, "extra_data": {"test_double_seconds": seconds}}
    for _ in range(1 + pending):
        post(record, "/prompt", prompt)
    deadline = time.monotonic() + 10
    while not (queue(record) or {}).get("queue_running"):
        assert time.monotonic() < deadline, "the double did not start the prompt"
        time.sleep(0.1)


def idle(record: dict[str, Any]) -> None:
    post(record, "/queue", {"clear": True})
    post(record, "/interrupt", {})
    deadline = time.monotonic() + 10
    while (current := queue(record)) and (current["queue_running"] or current["queue_pending"]):
        assert time.monotonic() < deadline, current
        time.sleep(0.1)


def fleet(tmp_path: Path, hosts: dict[str, dict[str, Any]], instances: list[dict[str, Any]]) -> Path:
    """An inventory of local hosts, each with a config root holding instances.json."""
    entries = {}
    for name, host_vars in hosts.items():
        root = tmp_path / name
        root.mkdir()
        layout = {"format": 1, "manager": "systemd", "config_root": str(root), "code_root": str(tmp_path / "code"),
                  "instances": instances}  # fmt: skip
        (root / "instances.json").write_text(json.dumps(layout))
        entries[name] = {"comfyui_config_root": str(root), **host_vars}
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    inventory = {"comfybake": {"hosts": entries, "vars": local}}
    path = tmp_path / "hosts.yml"
    path.write_text(yaml.safe_dump(inventory))
    return path


def play(
    tmp_path: Path, inventory: Path, playbook: str, ansible_env: dict[str, str], *extra: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    (tmp_path / "play.yml").write_text(playbook)
    summary = tmp_path / "summary.json"
    summary.unlink(missing_ok=True)
    env = {**ansible_env, "COMFYBAKE_FLEET_SUMMARY": str(summary)}
    argv = [venv_bin("ansible-playbook"), "-i", str(inventory), str(tmp_path / "play.yml"), "-e", f"_fleet_cli={CLI}"]
    done = subprocess.run([*argv, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return done, (json.loads(summary.read_text()) if summary.exists() else {})


def outcomes(summary: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {row["host"]: (row["outcome"], row["detail"]) for row in summary["hosts"]}


def test_a_failed_canary_stops_the_rollout_and_the_summary_names_every_host(
    tmp_path: Path, ansible_env: dict[str, str]
) -> None:
    hosts = {"gpu-1": {"fail_me": "a node pack no longer imports"}, "gpu-2": {}, "gpu-3": {}, "gpu-4": {}}
    done, summary = play(tmp_path, fleet(tmp_path, hosts, []), ROLLING, ansible_env)
    assert done.returncode == 2, done.stdout
    assert outcomes(summary) == {
        "gpu-1": ("failed", "Apply the change: a node pack no longer imports"),
        "gpu-2": ("not reached", "rollout stopped after batch 1"),
        "gpu-3": ("not reached", "rollout stopped after batch 1"),
        "gpu-4": ("not reached", "rollout stopped after batch 1"),
    }
    assert summary["stopped_after_batch"] == 1
    assert "gpu-4  not reached: rollout stopped after batch 1" in done.stdout
    assert not (tmp_path / "gpu-2" / "applied").exists()


def test_a_host_whose_readiness_rolled_back_is_reported_rolled_back(
    tmp_path: Path, ansible_env: dict[str, str]
) -> None:
    failure = (
        "instance main (port 8188) is not ready after 3 s: node class ComfybakeBroken is missing\n"
        "rolled back environment cpu: its new release 2b1f failed readiness, so\n"
    )
    hosts = {"gpu-1": {}, "gpu-2": {"fail_me": failure}, "gpu-3": {}}
    done, summary = play(tmp_path, fleet(tmp_path, hosts, []), ROLLING, ansible_env)
    assert done.returncode == 2, done.stdout
    result = outcomes(summary)
    assert result["gpu-1"] == ("unchanged", "ready")
    assert result["gpu-2"][0] == "rolled back"
    assert "rolled back environment cpu" in result["gpu-2"][1]
    # gpu-3 was in gpu-2's batch: it left, and the rollout stopped before it rejoined.
    assert result["gpu-3"][0] == "stopped"


def test_an_unreachable_host_within_max_fail_percentage_is_reported_and_the_rollout_goes_on(
    tmp_path: Path, ansible_env: dict[str, str]
) -> None:
    closed = free_port()
    unreachable = {"ansible_connection": "ssh", "ansible_host": "127.0.0.1", "ansible_port": closed}
    hosts = {"gpu-1": {}, "gpu-2": unreachable, "gpu-3": {}, "gpu-4": {}, "gpu-5": {}}
    inventory = fleet(tmp_path, hosts, [])
    done, summary = play(tmp_path, inventory, ROLLING, ansible_env, "-e", "comfybake_max_fail_percentage=50")
    assert done.returncode == 2, done.stdout  # 2: the unreachable host fails, so that max_fail_percentage counts it
    result = outcomes(summary)
    assert result["gpu-2"][0] == "unreachable"
    assert str(closed) in result["gpu-2"][1]
    assert {result[name] for name in ("gpu-1", "gpu-3", "gpu-4", "gpu-5")} == {("unchanged", "ready")}
    assert summary["stopped_after_batch"] is None


def test_an_unreachable_host_beyond_max_fail_percentage_stops_the_rollout_before_its_batch_changes(
    tmp_path: Path, ansible_env: dict[str, str]
) -> None:
    # Ansible counts only failed hosts against max_fail_percentage: the fleet role fails an unreachable one.
    closed = free_port()
    unreachable = {"ansible_connection": "ssh", "ansible_host": "127.0.0.1", "ansible_port": closed}
    hosts = {"gpu-1": {}, "gpu-2": unreachable, "gpu-3": {}, "gpu-4": {}, "gpu-5": {}}
    done, summary = play(tmp_path, fleet(tmp_path, hosts, []), ROLLING, ansible_env)
    assert done.returncode != 0, done.stdout
    result = outcomes(summary)
    assert result["gpu-1"] == ("unchanged", "ready")
    assert result["gpu-2"][0] == "unreachable"
    assert result["gpu-3"] == (
        "stopped",
        "the rollout stopped during batch 2 before this host left the pools: unchanged",
    )
    assert not (tmp_path / "gpu-3" / "applied").exists()
    assert result["gpu-4"] == result["gpu-5"] == ("not reached", "rollout stopped after batch 2")


def test_the_summary_is_silent_without_the_fleet_role(tmp_path: Path, ansible_env: dict[str, str]) -> None:
    done, summary = play(tmp_path, fleet(tmp_path, {"gpu-1": {}}, []), PLAIN, ansible_env)
    assert done.returncode == 0, done.stdout
    assert "FLEET SUMMARY" not in done.stdout
    assert summary == {}


@pytest.mark.parametrize("decision", ["fail", "wait"])
def test_a_drain_that_times_out_fails_the_host_and_applies_nothing(
    tmp_path: Path, ansible_env: dict[str, str], double: dict[str, Any], decision: str
) -> None:
    busy(double, 60)
    try:
        inventory = fleet(tmp_path, {"gpu-1": {}, "gpu-2": {}}, [double])
        settings = ["-e", "comfybake_fleet_drain_timeout=1", "-e", f"comfybake_fleet_drain_on_timeout={decision}"]
        started = time.monotonic()
        done, summary = play(tmp_path, inventory, ROLLING, ansible_env, *settings)
        assert done.returncode == 2, done.stdout
        outcome, detail = outcomes(summary)["gpu-1"]
        assert outcome == "failed"
        waited = 2 if decision == "wait" else 1
        assert f"prompts still queued after {waited} s of draining (main: 1)" in detail
        assert outcomes(summary)["gpu-2"] == ("not reached", "rollout stopped after batch 1")
        assert not (tmp_path / "gpu-1" / "applied").exists()
        assert queue(double)["queue_running"], "the running prompt was left alone"  # type: ignore[index]
        assert time.monotonic() - started >= waited
    finally:
        idle(double)


def test_a_drain_that_times_out_with_skip_leaves_the_host_untouched_and_goes_on(
    tmp_path: Path, ansible_env: dict[str, str], double: dict[str, Any]
) -> None:
    busy(double, 60)
    try:
        inventory = fleet(tmp_path, {"gpu-1": {}, "gpu-2": {}}, [double])
        settings = ["-e", "comfybake_fleet_drain_timeout=1", "-e", "comfybake_fleet_drain_on_timeout=skip"]
        done, summary = play(tmp_path, inventory, ROLLING, ansible_env, *settings)
        assert done.returncode == 0, done.stdout
        outcome, detail = outcomes(summary)["gpu-1"]
        assert (outcome, detail.split(";")[0]) == ("skipped", "prompts still queued after the drain (main: 1)")
        assert not (tmp_path / "gpu-1" / "applied").exists()
        # gpu-2 shares the busy double: it is skipped the same way, and the rollout went through both.
        assert outcomes(summary)["gpu-2"][0] == "skipped"
    finally:
        idle(double)


def test_a_drain_that_times_out_with_interrupt_clears_the_queue_and_reports_the_count(
    tmp_path: Path, ansible_env: dict[str, str], double: dict[str, Any]
) -> None:
    busy(double, 60, pending=2)
    try:
        inventory = fleet(tmp_path, {"gpu-1": {}}, [double])
        settings = ["-e", "comfybake_fleet_drain_timeout=1", "-e", "comfybake_fleet_drain_on_timeout=interrupt"]
        done, summary = play(tmp_path, inventory, ROLLING, ansible_env, *settings)
        assert done.returncode == 0, done.stdout
        assert outcomes(summary)["gpu-1"] == ("changed", "interrupted 3 prompt(s): main: 3")
        assert (tmp_path / "gpu-1" / "applied").exists()
        assert queue(double) == {"queue_running": [], "queue_pending": []}
    finally:
        idle(double)


def test_check_mode_drains_nothing_and_says_so(
    tmp_path: Path, ansible_env: dict[str, str], double: dict[str, Any]
) -> None:
    busy(double, 60)
    try:
        inventory = fleet(tmp_path, {"gpu-1": {}}, [double])
        started = time.monotonic()
        done, summary = play(tmp_path, inventory, ROLLING, ansible_env, "--check")
        assert done.returncode == 0, done.stdout
        assert time.monotonic() - started < 60, "check mode waited for the drain"
        assert "gpu-1 would leave no front and drain 1 instance(s) (prompts queued now: 1), then rejoin" in " ".join(
            done.stdout.split()
        )
        assert outcomes(summary)["gpu-1"] == ("unchanged", "would leave, drain and rejoin; nothing to apply")
        assert queue(double)["queue_running"], "check mode interrupted nothing"  # type: ignore[index]
    finally:
        idle(double)


PLAYBOOKS = sorted(path.name for path in (ROOT / "playbooks").glob("*.yml") if path.name.startswith(("fleet_", "site")))


@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_the_fleet_playbooks_parse_against_the_example_inventory(ansible_env: dict[str, str], playbook: str) -> None:
    argv = [venv_bin("ansible-playbook"), "--syntax-check", "-i", "inventories/example", f"playbooks/{playbook}"]
    done = subprocess.run(argv, cwd=ROOT, env=ansible_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_fleet_drain_refuses_to_run_without_a_limit(tmp_path: Path, ansible_env: dict[str, str]) -> None:
    inventory = fleet(tmp_path, {"gpu-1": {}}, [])
    argv = [
        venv_bin("ansible-playbook"),
        "-i",
        str(inventory),
        "playbooks/fleet_drain.yml",
        "-e",
        "comfybake_fleet_state=out",
    ]
    done = subprocess.run(argv, cwd=ROOT, env=ansible_env, capture_output=True, text=True)
    assert done.returncode == 2
    assert "name the hosts with --limit HOST" in " ".join(done.stdout.split())


def test_fleet_status_writes_one_document_naming_every_host(
    tmp_path: Path, ansible_env: dict[str, str], double: dict[str, Any]
) -> None:
    closed = free_port()
    hosts = {
        "l4-1": {"comfybake_gpu_type": "l4"},
        "l4-2": {"ansible_connection": "ssh", "ansible_host": "127.0.0.1", "ansible_port": closed},
    }
    inventory = fleet(tmp_path, hosts, [double])
    out = tmp_path / "status.json"
    argv = [venv_bin("ansible-playbook"), "-i", str(inventory), "playbooks/fleet_status.yml"]
    argv += ["-e", f"_fleet_cli={CLI}", "-e", f"comfybake_fleet_status_file={out}"]
    done = subprocess.run(argv, cwd=ROOT, env=ansible_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout  # l4-2 is unreachable, which fails it
    document = json.loads(out.read_text())
    hosts_seen = {entry["host"]: entry for entry in document["hosts"]}
    assert document["fronts"] == []
    assert hosts_seen["l4-1"]["gpu_type"] == "l4" and hosts_seen["l4-1"]["reached"] is True
    assert [(row["instance"], row["environment"]) for row in hosts_seen["l4-1"]["instances"]] == [("main", "cpu")]
    assert hosts_seen["l4-2"] == {"host": "l4-2", "reached": False, "gpu_type": "-", "maintenance": None,
                                  "pools": {}, "instances": []}  # fmt: skip
    table = done.stdout[done.stdout.index("HOST  GPU") :].splitlines()
    assert table[0].split() == ["HOST", "GPU", "INSTANCE", "ENVIRONMENT", "RELEASE", "COMMIT", "STATE", "QUEUE"]
    assert table[1].split()[:4] == ["l4-1", "l4", "main", "cpu"]
    assert table[2].split() == ["l4-2", "-", "-", "-", "-", "-", "not", "reached", "-"]


def releases_of(tmp_path: Path, double: dict[str, Any], ids: list[str]) -> dict[str, Any]:
    """An environment `cpu` with complete releases (oldest first, the last one live) as the
    environments role leaves them, and the double as its instance, linked to the live release."""
    code = tmp_path / "code"
    env = code / "envs" / "cpu"
    for age, release in enumerate(ids):
        folder = env / "releases" / release
        folder.mkdir(parents=True)
        lock = {
            "comfyui": {"version": "v0.8.0", "commit": f"{age:02d}" * 20},
            "built_at": f"2026-01-0{age + 1}T00:00:00Z",
        }
        (folder / "comfybake.lock.json").write_text(json.dumps(lock))
        stamp = time.time() - 1000 + age
        os_utime(folder / "comfybake.lock.json", stamp)
    (env / "current").symlink_to(f"releases/{ids[-1]}")
    (code / "instances").mkdir()
    (code / "instances" / "main").symlink_to(f"../envs/cpu/releases/{ids[-1]}")
    return {**double, "code_dir": str(code / "instances" / "main"), "env_file": str(tmp_path / "main.env")}


def os_utime(path: Path, stamp: float) -> None:
    os.utime(path, (stamp, stamp))


def live(tmp_path: Path) -> str:
    return (tmp_path / "code" / "envs" / "cpu" / "current").readlink().name


def rollback(
    tmp_path: Path, inventory: Path, ansible_env: dict[str, str], *extra: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    summary = tmp_path / "summary.json"
    summary.unlink(missing_ok=True)
    env = {**ansible_env, "COMFYBAKE_FLEET_SUMMARY": str(summary)}
    argv = [
        venv_bin("ansible-playbook"),
        "-i",
        str(inventory),
        "playbooks/fleet_rollback.yml",
        "-e",
        f"_fleet_cli={CLI}",
    ]
    argv += ["-e", "comfybake_fleet_environment=cpu", *extra]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return done, (json.loads(summary.read_text()) if summary.exists() else {})


def test_fleet_rollback_goes_back_once_and_a_second_run_changes_nothing(
    tmp_path: Path, ansible_env: dict[str, str], double: dict[str, Any]
) -> None:
    record = releases_of(tmp_path, double, ["aaaa", "bbbb", "cccc"])
    (tmp_path / "main.env").write_text("COMFYUI_RELEASE=releases/cccc\n")
    inventory = fleet(tmp_path, {"gpu-1": {}}, [record])

    done, summary = rollback(tmp_path, inventory, ansible_env, "--check")
    assert done.returncode == 0, done.stdout
    assert live(tmp_path) == "cccc", "check mode rolled back"
    assert re.search(r"gpu-1 +: ok=\d+ +changed=[1-9]", done.stdout), done.stdout
    outcome, detail = outcomes(summary)["gpu-1"]
    assert (outcome, detail.split(";")[0]) == ("would change", "would roll back cpu cccc -> bbbb"), detail

    done, summary = rollback(tmp_path, inventory, ansible_env)
    assert done.returncode == 0, done.stdout
    assert live(tmp_path) == "bbbb"
    assert (tmp_path / "code" / "instances" / "main").readlink().name == "bbbb"
    assert (tmp_path / "main.env").read_text() == "COMFYUI_RELEASE=releases/bbbb\n"
    outcome, detail = outcomes(summary)["gpu-1"]
    assert (outcome, detail.split(";")[0]) == ("rolled back", "cpu cccc -> bbbb")

    done, summary = rollback(tmp_path, inventory, ansible_env)
    assert done.returncode == 0, done.stdout
    assert live(tmp_path) == "bbbb", "a second run walked further back"
    assert "changed=0" in done.stdout
    assert outcomes(summary)["gpu-1"] == (
        "unchanged",
        "cpu is rolled back already: release bbbb is live, newer cccc is not",
    )

    done, summary = rollback(tmp_path, inventory, ansible_env, "-e", "comfybake_fleet_rollback_to=aaaa")
    assert done.returncode == 0, done.stdout
    assert live(tmp_path) == "aaaa"

    done, summary = rollback(tmp_path, inventory, ansible_env, "-e", "comfybake_fleet_rollback_to=zzzz")
    assert done.returncode == 2
    assert live(tmp_path) == "aaaa"
    assert outcomes(summary)["gpu-1"][1].endswith(
        "gpu-1 has no release zzzz of environment cpu (releases, oldest first: aaaa, bbbb, cccc; live: aaaa): give one"
        " of them in comfybake_fleet_rollback_to, or leave this host out with --limit"
    )


def test_fleet_drain_marks_the_host_in_maintenance_once_and_undrain_removes_the_mark(
    tmp_path: Path, ansible_env: dict[str, str], double: dict[str, Any]
) -> None:
    inventory = fleet(tmp_path, {"gpu-1": {}, "gpu-2": {}}, [double])
    mark = tmp_path / "gpu-1" / "fleet-maintenance.json"

    def drain(state: str, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
        argv = [venv_bin("ansible-playbook"), "-i", str(inventory), "playbooks/fleet_drain.yml", "--limit", "gpu-1"]
        summary = tmp_path / "summary.json"
        env = {**ansible_env, "COMFYBAKE_FLEET_SUMMARY": str(summary)}
        argv += ["-e", f"_fleet_cli={CLI}", "-e", f"comfybake_fleet_state={state}", *extra]
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout
        return done, json.loads(summary.read_text())

    done, summary = drain("out")
    assert json.loads(mark.read_text())["state"] == "out"
    assert outcomes(summary)["gpu-1"][0] == "changed"
    assert list(outcomes(summary)) == ["gpu-1"], "a host outside --limit is in the summary"
    busy(double, 60)  # out of every pool already: a second out waits for no prompt
    try:
        done, summary = drain("out", "-e", "comfybake_fleet_drain_timeout=1")
    finally:
        idle(double)
    assert "changed=0" in done.stdout
    assert outcomes(summary)["gpu-1"][0] == "unchanged"
    done, summary = drain("serving")
    assert not mark.exists()
    assert outcomes(summary)["gpu-1"] == ("changed", "back from maintenance, serving (no front)")
    done, summary = drain("serving")
    assert "changed=0" in done.stdout
    assert outcomes(summary)["gpu-1"] == ("unchanged", "ready")
    assert not (tmp_path / "gpu-2" / "fleet-maintenance.json").exists()


DOCUMENTED = {"callback": ("comfybake.core.fleet_summary", "COMFYBAKE_FLEET_SUMMARY"),
              "role": ("comfybake.core.fleet", "Take the host out of every front's pools")}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(DOCUMENTED))
def test_ansible_doc_renders_the_fleet_plugins(ansible_env: dict[str, str], kind: str) -> None:
    name, expected = DOCUMENTED[kind]
    argv = [venv_bin("ansible-doc"), "-t", kind, name]
    done = subprocess.run(argv, cwd=ROOT, env=ansible_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert expected in " ".join(done.stdout.split())


def test_every_fleet_entry_point_documents_what_it_reads() -> None:
    specs = yaml.safe_load((ROOT / "roles" / "fleet" / "meta" / "argument_specs.yml").read_text())["argument_specs"]
    assert set(specs) == {"main", "leave", "join", "restart", "rollback", "drain", "status"}
    tasks = {path.stem: path.read_text() for path in (ROOT / "roles" / "fleet" / "tasks").glob("*.yml")}
    for entry, spec in specs.items():
        if entry != "main":
            assert set(spec["options"]) <= set(specs["main"]["options"]), entry
    # Each comfybake_* variable a task file reads is documented by the main entry point (the
    # set_stats key and the fronts' default group name are not variables).
    read = {word for text in tasks.values() for word in re.findall(r"\bcomfybake_\w+\b", text)}
    read -= {"comfybake_fleet", "comfybake_gateway"}
    assert read <= set(specs["main"]["options"]), read - set(specs["main"]["options"])


def test_the_example_inventory_admits_the_fronts_and_the_host_itself(ansible_env: dict[str, str]) -> None:
    # The unit's IPAddressAllow=localhost is loopback only: a host whose instances listen on its
    # fleet address must admit that address, or its own readiness and drain checks time out.
    argv = [venv_bin("ansible"), "-i", "inventories/example", "gpu-l40s-01.example.internal", "-m", "debug",
            "-a", "var=comfyui_instances_allowed_clients"]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, env=ansible_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "comfyui_instances_allowed_clients:\n    - 10.1.0.5\n    - 10.1.0.11\n" in done.stdout, done.stdout


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("false", False)])
def test_site_conditions_take_extra_var_booleans_as_strings(
    tmp_path: Path, ansible_env: dict[str, str], value: str, expected: bool
) -> None:
    # -e NAME=true is the string "true": ansible-core 2.19 refuses a conditional that is a string.
    site = yaml.safe_load((ROOT / "playbooks" / "site.yml").read_text())[0]
    conditions = [
        task["when"] for task in site["pre_tasks"] + site["post_tasks"] if "fleet_rolling" in str(task.get("when"))
    ]
    assert len(conditions) == 2, "site.yml's leave and join conditions"
    conditions += [role["when"] for role in site["roles"] if role["role"].endswith("nvidia_driver")]
    tasks = [{"name": f"Condition {n}", "ansible.builtin.debug": {"msg": "taken"}, "when": when}
             for n, when in enumerate(conditions)]  # fmt: skip
    playbook = [{"name": "Conditions", "hosts": "comfybake", "gather_facts": False, "tasks": tasks}]
    inventory = fleet(tmp_path, {"gpu-1": {}}, [])
    done, _ = play(tmp_path, inventory, yaml.safe_dump(playbook), ansible_env,
                   "-e", f"comfybake_fleet_rolling={value}", "-e", f"comfybake_nvidia_driver={value}")  # fmt: skip
    assert done.returncode == 0, done.stdout
    assert done.stdout.count("taken") == (len(conditions) if expected else 0), done.stdout


def test_a_rollback_command_that_fails_without_json_shows_its_error(
    tmp_path: Path, ansible_env: dict[str, str], double: dict[str, Any]
) -> None:
    record = releases_of(tmp_path, double, ["aaaa", "bbbb"])
    inventory = fleet(tmp_path, {"gpu-1": {}}, [record])
    broken = tmp_path / "comfybake"
    broken.write_text(
        f"#!/bin/sh\ncase \" $* \" in *' rollback '*) echo 'Traceback'; echo 'the disk is full' >&2; exit 1;; esac\n"
        f'exec {sys.executable} {CLI} "$@"\n'
    )
    broken.chmod(0o755)
    done, _ = rollback(tmp_path, inventory, ansible_env, "-e", f"_fleet_cli={broken}")
    assert done.returncode == 2, done.stdout
    assert "the disk is full" in done.stdout, done.stdout
    assert "from_json" not in done.stdout, done.stdout


def test_fleet_status_shows_an_unreachable_front_as_unknown_and_keeps_the_hosts(
    tmp_path: Path, ansible_env: dict[str, str], double: dict[str, Any]
) -> None:
    inventory = fleet(tmp_path, {"l4-1": {}, "l4-2": {}}, [double])
    document = yaml.safe_load(inventory.read_text())
    closed = {"ansible_connection": "ssh", "ansible_host": "127.0.0.1", "ansible_port": free_port()}
    document["comfybake_gateway"] = {"hosts": {"front-1": closed}}
    inventory.write_text(yaml.safe_dump(document))
    out = tmp_path / "status.json"
    argv = [venv_bin("ansible-playbook"), "-i", str(inventory), "playbooks/fleet_status.yml"]
    argv += ["-e", f"_fleet_cli={CLI}", "-e", f"comfybake_fleet_status_file={out}"]
    done = subprocess.run(argv, cwd=ROOT, env=ansible_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout
    hosts_seen = {entry["host"]: entry for entry in json.loads(out.read_text())["hosts"]}
    assert {host: entry["pools"] for host, entry in hosts_seen.items()} == {
        "l4-1": {"front-1": "?"},
        "l4-2": {"front-1": "?"},
    }
    assert all(entry["reached"] for entry in hosts_seen.values())
    table = done.stdout[done.stdout.index("HOST  GPU") :].splitlines()
    assert table[0].split()[-1] == "POOL@front-1" and table[1].split()[-1] == "?", table
    assert "unreachable" not in done.stdout[done.stdout.index("FLEET SUMMARY") :], done.stdout


def test_site_stops_the_rollout_at_a_batch_with_an_unreachable_host(
    tmp_path: Path, ansible_env: dict[str, str]
) -> None:
    # Only the facts step runs (tags): the unreachable host fails there, and max_fail_percentage 0 stops the rollout.
    closed = {"ansible_connection": "ssh", "ansible_host": "127.0.0.1", "ansible_port": free_port()}
    inventory = fleet(tmp_path, {"gpu-1": {}, "gpu-2": closed, "gpu-3": {}}, [])
    argv = [venv_bin("ansible-playbook"), "-i", str(inventory), "playbooks/site.yml", "--tags", "no-such-tag"]
    argv += ["-e", "comfybake_serial=1"]
    done = subprocess.run(argv, cwd=ROOT, env=ansible_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout
    assert "gpu-2 could not be reached" in done.stdout
    recap = done.stdout[done.stdout.index("PLAY RECAP") :]
    assert re.search(r"gpu-2 +: ok=\d+ +changed=0 +unreachable=0 +failed=1", recap), recap
    assert "gpu-3" not in recap, "gpu-3 was reached after the batch with the unreachable host"


CREDENTIALS = """
- name: A failure naming a mirror with credentials, on a delegated host
  hosts: comfybake
  gather_facts: false
  tasks:
    - name: Leave
      ansible.builtin.include_role: {name: comfybake.core.fleet, tasks_from: leave}
    - name: Fetch from the mirror
      ansible.builtin.fail: {msg: "cannot fetch https://mirror-user:s3cret@mirror.example/simple: 403"}
      delegate_to: gpu-2
"""


def test_the_summary_names_the_delegated_host_and_drops_url_credentials(
    tmp_path: Path, ansible_env: dict[str, str]
) -> None:
    inventory = fleet(tmp_path, {"gpu-1": {}, "gpu-2": {}}, [])
    done, summary = play(tmp_path, inventory, CREDENTIALS, ansible_env, "--limit", "gpu-1")
    assert done.returncode == 2, done.stdout
    assert outcomes(summary)["gpu-1"] == (
        "failed",
        "Fetch from the mirror: on gpu-2: cannot fetch https://***@mirror.example/simple: 403",
    )
    assert "s3cret" not in done.stdout[done.stdout.index("FLEET SUMMARY") :]


def test_fleet_drain_refuses_a_limit_that_selects_every_fleet_host(tmp_path: Path, ansible_env: dict[str, str]) -> None:
    inventory = fleet(tmp_path, {"gpu-1": {}}, [])
    argv = [venv_bin("ansible-playbook"), "-i", str(inventory), "playbooks/fleet_drain.yml", "--limit", "gpu-1"]
    argv += ["-e", f"_fleet_cli={CLI}", "-e", "comfybake_fleet_state=out"]
    done = subprocess.run(argv, cwd=ROOT, env=ansible_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout
    assert "needs -e comfybake_fleet_all=true" in " ".join(done.stdout.split())
    assert not (tmp_path / "gpu-1" / "fleet-maintenance.json").exists()
    done = subprocess.run([*argv, "-e", "comfybake_fleet_all=true"], cwd=ROOT, env=ansible_env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout
    assert (tmp_path / "gpu-1" / "fleet-maintenance.json").exists()
