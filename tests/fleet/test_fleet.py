"""A simulated fleet (tests/harness/fleet.py): six systemd containers of two "GPU types" with
different layouts and a front running the fleet gateway, reached over SSH and converged once by
`playbooks/site.yml` in batches. The fleet playbooks then run against it, in order, each check
starting from the state the one before left:

a. the converge: every host's instances ready, the front's environment route answering;
b. `fleet_status.yml`: its JSON is what each host reports;
c. `fleet_drain.yml`: a host `out` gets no new session through the front, and gets them again
   once `serving`; `fleet_restart.yml` whose drain times out with `skip` restarts nothing and puts
   the host back in the state it had (draining);
d. `fleet_upgrade.yml` of prod's node pin while a long prompt runs on the canary: the prompt
   completes, and clients polling each environment's fleet URL all along see no error;
e. `fleet_upgrade.yml` to a release whose node fails to import: the rollout stops after the
   canary, which is back on its release and out of the pools, the other five untouched and
   serving, and the summary names each host's outcome;
f. `site.yml` with one host unreachable in a batch: reported, and the rollout stops there.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from harness import fleet as fleets
from harness.fleet import Fleet, FleetError, Host

pytestmark = [pytest.mark.docker, pytest.mark.slow]

CANARY = fleets.HOSTS[0][0]  # the first host of the play: the rollout's canary batch
SERIAL = "comfybake_serial=3"  # canary, then batches of three: [l4-1] [l4-2 l4-3 a100-1] [a100-2 a100-3]
# The first converge has no prompt to keep and no pool to hold up: the canary, then the five
# others at once (one batch fewer to wait for).
FIRST = "comfybake_serial=5"
UPGRADED = [("ComfyUI-Comfybake-Basic", "update")]  # Basic's update adds the class ComfybakeAddedLater
BROKEN = [*UPGRADED, ("ComfyUI-Comfybake-Broken", "initial")]  # a node that fails to import


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, docker_engine: None) -> Iterator[Fleet]:
    """The fleet, started and converged by site.yml (the canary, then the other five at once)."""
    folder = tmp_path_factory.mktemp("fleet")
    try:
        with fleets.fleet(folder) as started:
            started.playbook("site.yml", "-e", FIRST, log="site")
            yield started
    except FleetError as error:
        pytest.fail(str(error), pytrace=False)


def wait_ready(fleet: Fleet, host: Host, timeout: float = 120) -> list[dict[str, Any]]:
    deadline, rows = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        rows = fleet.status(host)
        if rows and all(row["ready"] for row in rows):
            return rows
        time.sleep(1)
    pytest.fail(f"{host.name}: instances not ready after {timeout:.0f} s: {rows}")


def served_by(fleet: Fleet, environment: str, count: int) -> dict[str, int]:
    """Which member's instance answered each of `count` new sessions (no cookie) through the
    front: the double's /system_stats names its --listen address."""
    by_address = {host.address: name for name, host in fleet.hosts.items()}
    seen: dict[str, int] = {}
    for _ in range(count):
        status, _, body = fleet.request(environment)
        assert status == 200, f"the front answered {status} for {environment}: {body[:300]!r}"
        argv = json.loads(body)["system"]["argv"]
        member = by_address.get(argv[argv.index("--listen") + 1], "?")
        seen[member] = seen.get(member, 0) + 1
    return seen


def pool_states(fleet: Fleet) -> dict[str, str]:
    """The front's pool states (`<config_dir>/pool.json`), member -> state; `serving` for a
    member it has none for."""
    found = fleet.front.run("cat /etc/comfybake/gateway/pool.json", check=False).stdout
    raw = json.loads(found) if found.strip() else {}
    states = raw.get("members", raw.get("states", raw)) if isinstance(raw, dict) else {}
    return {name: str(states.get(name, "serving")) for name in fleet.hosts}


def live_release(fleet: Fleet, host: Host, environment: str = "prod") -> str:
    rows = [row for row in fleet.releases(host, environment) if row["live"]]
    assert len(rows) == 1, f"{host.name}: {environment} has {len(rows)} live releases: {rows}"
    return str(rows[0]["release"])


def has_class(host: Host, port: int, name: str) -> bool:
    return bool(fleets.http_json(fleets.instance_url(host, port, f"/object_info/{name}")))


def prod_ports(host: Host) -> list[int]:
    kind = next(gpu for name, gpu, _ in fleets.HOSTS if name == host.name)
    return [row["port"] for row in fleets.LAYOUTS[kind] if row["environment"] == "prod"]


class Poller(threading.Thread):
    """Polls an environment's fleet URL (new sessions) until stopped; keeps every failure."""

    def __init__(self, fleet: Fleet, environment: str) -> None:
        super().__init__(daemon=True)
        self.fleet, self.environment = fleet, environment
        self.stopping = threading.Event()
        self.answers = 0
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                status, _, body = self.fleet.request(self.environment, timeout=20)
                if status != 200:
                    self.errors.append(f"{time.strftime('%H:%M:%S')} {status} {body[:200]!r}")
            except OSError as error:
                self.errors.append(f"{time.strftime('%H:%M:%S')} {error!r}")
            self.answers += 1
            time.sleep(0.2)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=60)


class HistoryWatch(threading.Thread):
    """Watches one instance's /history for a prompt (the double keeps it in memory, so it is
    read while the instance still runs: a restart on the new release starts a new history)."""

    def __init__(self, host: Host, port: int, prompt_id: str) -> None:
        super().__init__(daemon=True)
        self.url = fleets.instance_url(host, port, "/history")  # the double answers /history only
        self.prompt_id = prompt_id
        self.stopping = threading.Event()
        self.entry: dict[str, Any] | None = None

    def run(self) -> None:
        while not self.stopping.is_set() and self.entry is None:
            try:
                found = fleets.http_json(self.url, timeout=5)
                if isinstance(found, dict) and self.prompt_id in found:
                    self.entry = found[self.prompt_id]
            except OSError:
                pass
            time.sleep(0.3)


# -- a. the converge -----------------------------------------------------------------------------


def test_every_host_converged_and_its_instances_are_ready(fleet: Fleet) -> None:
    for name, host in fleet.hosts.items():
        kind = next(gpu for host_name, gpu, _ in fleets.HOSTS if host_name == name)
        rows = wait_ready(fleet, host)
        assert sorted((r["name"], r["environment"]) for r in rows) == sorted(
            (i["name"], i["environment"]) for i in fleets.LAYOUTS[kind]
        ), f"{name}: {rows}"


def test_the_front_routes_each_environment_across_the_fleet(fleet: Fleet) -> None:
    status, _, _ = fleet.request("prod")
    assert status == 200
    seen = served_by(fleet, "prod", 40)
    assert set(seen) == set(fleet.hosts), f"new prod sessions reached only {seen}"
    edit = served_by(fleet, "edit", 20)
    assert set(edit) == {name for name, gpu, _ in fleets.HOSTS if gpu == "a100"}, f"edit sessions reached {edit}"


# -- b. fleet status -----------------------------------------------------------------------------


def test_fleet_status_matches_what_each_host_reports(fleet: Fleet) -> None:
    out = fleet.folder / "fleet-status.json"
    run = fleet.playbook("fleet_status.yml", "-e", f"comfybake_fleet_status_file={out}", log="status")
    document = json.loads(out.read_text())
    assert document["fronts"] == [fleets.FRONT], document["fronts"]
    entries = {entry["host"]: entry for entry in document["hosts"]}
    assert list(entries) == list(fleet.hosts), f"fleet status names {list(entries)}"
    for name, host in fleet.hosts.items():
        kind = next(gpu for host_name, gpu, _ in fleets.HOSTS if host_name == name)
        entry = entries[name]
        assert (entry["reached"], entry["gpu_type"], entry["pools"]) == (True, kind, {fleets.FRONT: "serving"}), entry
        reported = {row["instance"]: row for row in entry["instances"]}
        truth = {row["name"]: row for row in fleet.status(host)}
        assert set(reported) == set(truth), f"{name}: status lists {sorted(reported)}, the host {truth}"
        releases = {env: fleet.releases(host, env) for env in {row["environment"] for row in truth.values()}}
        for instance, row in reported.items():
            live = next(r for r in releases[row["environment"]] if r["live"])
            expected = {
                "environment": truth[instance]["environment"],
                "port": truth[instance]["port"],
                "state": "ready" if truth[instance]["ready"] else "not ready",
                "queue": truth[instance]["queue"],
                "release": live["release"],
            }
            assert {key: row[key] for key in expected} == expected, f"{name}/{instance}: {row}"
            assert live["comfyui"].split()[1] in row["commit"], f"{name}/{instance}: {row} against {live}"
    for name in fleet.hosts:  # the table
        assert name in run.log, f"{name} is not in the table:\n{run.log[-3000:]}"


# -- c. drain and undrain ------------------------------------------------------------------------


def test_a_host_set_out_gets_no_new_session_and_gets_them_again_once_serving(fleet: Fleet) -> None:
    target = "l4-2"
    fleet.playbook("fleet_drain.yml", "-e", "comfybake_fleet_state=out", "--limit", target, log="drain-out")
    assert pool_states(fleet)[target] == "out"
    seen = served_by(fleet, "prod", 40)
    assert target not in seen, f"the front still sent new sessions to {target}, set out: {seen}"
    fleet.playbook("fleet_drain.yml", "-e", "comfybake_fleet_state=serving", "--limit", target, log="drain-serving")
    assert pool_states(fleet)[target] == "serving"
    seen = served_by(fleet, "prod", 40)
    assert target in seen, f"{target} is serving again but got none of 40 new sessions: {seen}"


def test_a_drain_past_its_timeout_with_skip_leaves_the_host_as_it_was(fleet: Fleet) -> None:
    """`fleet_restart.yml` on a host whose instance runs a prompt longer than the drain timeout,
    with comfybake_fleet_drain_on_timeout=skip: nothing restarts, the prompt completes, and the
    host is back in the pools in the state it had before the run (draining, set by hand on the
    front), not `serving`."""
    target = fleet.hosts["l4-3"]
    fleet.front.run(f"comfybake gateway pool {target.name} --state draining")
    assert pool_states(fleet)[target.name] == "draining"
    units = [f"comfyui@{row['name']}.service" for row in fleets.LAYOUTS["l4"]]
    started = target.run(f"systemctl show -p ActiveEnterTimestampMonotonic --value {' '.join(units)}").stdout.split()
    answer = fleets.http_json(
        fleets.instance_url(target, 8188, "/prompt"),
        {"prompt": {"1": {"class_type": "ComfybakeEcho", "inputs": {}}}, "extra_data": {"test_double_seconds": 25}},
    )
    watch = HistoryWatch(target, 8188, answer["prompt_id"])
    watch.start()
    try:
        run = fleet.playbook(
            "fleet_restart.yml", "--limit", target.name, "-e", "comfybake_fleet_drain_timeout=3",
            "-e", "comfybake_fleet_drain_on_timeout=skip", log="drain-skip",
        )  # fmt: skip
        states = pool_states(fleet)
        after = target.run(f"systemctl show -p ActiveEnterTimestampMonotonic --value {' '.join(units)}").stdout.split()
        watch.join(timeout=60)
    finally:
        watch.stopping.set()
        fleet.front.run(f"comfybake gateway pool {target.name} --state serving")
    assert states[target.name] == "draining", f"{target.name} is {states[target.name]} after a skipped drain: {states}"
    assert after == started, f"{target.name}'s instances restarted although the drain was skipped: {started} -> {after}"
    assert watch.entry is not None and watch.entry["status"]["status_str"] == "success", watch.entry
    rows = _per_host(run.summary() or {"hosts": []})
    assert rows[target.name]["outcome"] == "skipped", rows
    assert re.search(r"\ba: [1-9]", rows[target.name]["detail"]), rows[target.name]  # the busy instance, named


# -- d. the rolling upgrade ----------------------------------------------------------------------


def test_a_rolling_upgrade_loses_no_prompt_and_no_request(fleet: Fleet) -> None:
    canary = fleet.hosts[CANARY]
    before = {name: live_release(fleet, host) for name, host in fleet.hosts.items()}
    answer = fleets.http_json(
        fleets.instance_url(canary, 8188, "/prompt"),
        {"prompt": {"1": {"class_type": "ComfybakeEcho", "inputs": {}}}, "extra_data": {"test_double_seconds": 20}},
    )
    prompt_id = answer["prompt_id"]
    watch = HistoryWatch(canary, 8188, prompt_id)
    pollers = [Poller(fleet, "prod"), Poller(fleet, "edit")]
    watch.start()
    for poller in pollers:
        poller.start()
    fleet.write_inventory(prod_nodes=UPGRADED)
    try:
        run = fleet.playbook("fleet_upgrade.yml", "-e", SERIAL, log="upgrade", check=False)
    finally:
        for poller in pollers:
            poller.stop()
        watch.stopping.set()
        watch.join(timeout=10)
    assert run.returncode == 0, f"fleet_upgrade.yml failed: {run.log[-3000:]}"
    assert watch.entry is not None, f"prompt {prompt_id} never reached the canary's history before its restart"
    assert watch.entry["status"]["status_str"] == "success", watch.entry["status"]
    for poller in pollers:
        assert poller.answers > 20 and poller.errors == [], (
            f"{poller.environment}'s fleet URL failed {len(poller.errors)} of {poller.answers} times in the rollout: "
            f"{poller.errors[:10]}"
        )
    for name, host in fleet.hosts.items():
        wait_ready(fleet, host)
        assert live_release(fleet, host) != before[name], f"{name}: prod is still on release {before[name]}"
        for port in prod_ports(host):
            assert has_class(host, port, "ComfybakeAddedLater"), f"{name}:{port} does not serve the new node pin"
    assert set(pool_states(fleet).values()) == {"serving"}, pool_states(fleet)


# -- e. a broken release -------------------------------------------------------------------------


def test_a_broken_release_stops_after_the_canary_which_is_rolled_back_and_out(fleet: Fleet) -> None:
    before = {name: live_release(fleet, host) for name, host in fleet.hosts.items()}
    fleet.write_inventory(prod_nodes=BROKEN)
    try:
        run = fleet.playbook("fleet_upgrade.yml", "-e", SERIAL, log="broken", check=False)
    finally:
        fleet.write_inventory(prod_nodes=UPGRADED)
    assert run.returncode != 0, "an upgrade to a node that fails to import passed"
    states = pool_states(fleet)
    assert states[CANARY] == "out", f"the failed canary is {states[CANARY]} on the front: {states}"
    for name, host in fleet.hosts.items():
        wait_ready(fleet, host)
        assert live_release(fleet, host) == before[name], f"{name}: prod left its release {before[name]}"
        if name != CANARY:
            assert states[name] == "serving", f"{name} is {states[name]}: {states}"
            for port in prod_ports(host):
                assert has_class(host, port, "ComfybakeAddedLater")
    summary = run.summary()
    assert summary is not None, f"no fleet summary was written ({run.summary_file})"
    rows = _per_host(summary)
    assert list(rows) == list(fleet.hosts), f"the summary names {list(rows)}"
    assert rows[CANARY]["outcome"] in ("rolled back", "failed"), rows[CANARY]
    assert rows[CANARY]["detail"], rows[CANARY]  # why it failed
    assert summary["stopped_after_batch"] == 1, summary
    for name in fleet.hosts:
        if name != CANARY:
            assert rows[name]["outcome"] == "not reached", rows[name]
    served = served_by(fleet, "prod", 30)
    assert CANARY not in served, f"the rolled back canary got new sessions: {served}"
    fleet.playbook("fleet_drain.yml", "-e", "comfybake_fleet_state=serving", "--limit", CANARY, log="broken-undrain")


def _per_host(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The fleet summary's row of each host (COMFYBAKE_FLEET_SUMMARY: {"hosts": [{"host", "outcome", ...}]})."""
    return {str(row["host"]): row for row in summary["hosts"]}


# -- f. an unreachable host ----------------------------------------------------------------------


def test_an_unreachable_host_is_reported_and_stops_the_rollout(fleet: Fleet) -> None:
    lost = fleet.hosts["l4-2"]  # in the batch after the canary: [l4-2 l4-3 a100-1]
    lost.run("systemctl stop ssh.socket ssh.service", check=False)
    fleet.forget_connection(lost)
    try:
        run = fleet.playbook("site.yml", "-e", SERIAL, log="unreachable", check=False, timeout=900)
    finally:
        lost.run("systemctl start ssh.service")
    assert run.returncode != 0, "site.yml passed with a host unreachable"
    recap = run.recap()
    # The play's first contact ignores the unreachable result and fails the host instead, so that
    # Ansible's max_fail_percentage counts it (it never counts unreachable hosts).
    lost_counts = recap.get(lost.name, {})
    assert lost_counts.get("unreachable", 0) + lost_counts.get("failed", 0) >= 1, f"{lost.name} not stopped: {recap}"
    for name in ("a100-2", "a100-3"):  # the batch after: never reached
        assert recap.get(name, {}).get("ok", 0) == 0, f"{name} was reached after the batch failed: {recap}"
    summary = run.summary()
    assert summary is not None, f"no fleet summary was written ({run.summary_file})"
    rows = _per_host(summary)
    assert rows[lost.name]["outcome"] == "unreachable", rows
    assert summary["stopped_after_batch"] == 2, summary
    assert [rows[name]["outcome"] for name in ("a100-2", "a100-3")] == ["not reached"] * 2, rows
