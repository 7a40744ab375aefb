"""Benchmark of fleet operations on the simulated fleet (tests/harness/fleet.py): systemd
containers reached over SSH, as real fleets are reached.

Subcommands:

- `noop`: the cost of doing nothing. One host is converged once with `playbooks/site.yml` (every
  role of a fleet host: base, environments, models, instances, gateway, exporter), then
  converged again, unchanged, N rounds, over SSH (pipelining, a persistent control connection:
  how fleets run it) and over the Docker connection (`docker exec`, how the molecule scenarios
  and `make provision` run it), side by side on the same host. It prints the wall time of each
  converge, the time of each role (ansible.posix.profile_roles), the tasks run and skipped, and
  the ratio of the two connections. Every round must report changed=0: a no-change converge
  that changes something is a bug, and the benchmark stops on it.

    .venv/bin/python bench/fleet.py noop                          # 3 rounds
    .venv/bin/python bench/fleet.py noop --root BASE --root .     # a change against its base

`--root` converges the roles and playbooks of that checkout of comfybake (its ansible.cfg, with
its comfybake.pyz built); given several times, the first converges the host and each round
then runs every checkout in turn on the same host, so a change and its base are compared under
the same load (this machine's load moves during a run; each round must still change nothing,
whichever checkout converged last). Nothing here asserts a time: it measures. The host is
removed at the end (--keep leaves it running, named comfybake-fleet-bench).

- `roll`: the time and the failed requests of a rolling change. A fleet of its own (hosts
  `comfybake-fleet-roll-<host>` and a front `comfybake-fleet-roll-front` on the network
  `comfybake-fleet-roll-net`, as many hosts as the largest size) is converged once, untimed.
  Then, for each size N and each mode, prod's node pins flip between two sets (as the fleet
  tests' rolling upgrade does) and the change rolls over the first N hosts, timed, while
  clients send prompts through the front's prod URL (a new connection each) and count those
  that fail (a connection error, a time-out, any status but 200). The front's pools are those
  N hosts for the row (converged before it, untimed), so every request reaches a host being
  changed. Modes (batches of `serial` hosts, the canary batch included):

    rolling-1  fleet_upgrade.yml at serial 1 (leave, drain, apply, rejoin, host by host)
    rolling-2  fleet_upgrade.yml at serial 2
    naive-1    site.yml -e comfybake_fleet_rolling=false at serial 1 (no leave, no drain)
    all        the same naive converge, every host in one batch

  A rolling mode whose batch would hold all N hosts (rolling-2 at N=2) is not run: the fleet role
  refuses to take an environment's last serving host out (comfybake_fleet_min_serving).

  One host's time is a separate roll of one host (rolling-1, N=1, in the last row's pools),
  run after the rows; each row's ratio is its time over N / serial x that time.

    .venv/bin/python bench/fleet.py roll                                  # N = 2, 4, 6, every mode
    .venv/bin/python bench/fleet.py roll --sizes 2 --modes rolling-1,naive-1
    .venv/bin/python bench/fleet.py roll --sizes 4 --keep --work /tmp/roll  # leave the fleet running

Each playbook's whole log is kept under build/test-logs/ (fleet-roll-*.log). The fleet is
removed at the end (--keep leaves it running).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import http.client
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness import fleet  # noqa: E402 - after the path set-up
from harness.tools import failure_reason  # noqa: E402 - the same

NAME = "bench"  # the container comfybake-fleet-bench (the fleet tests' hosts have other names)
NETWORK = f"{fleet.PREFIX}bench-net"
ROLE_ROW = re.compile(r"^(\S+) -+ (\d+(?:\.\d+)?)s$")
RECAP_ROW = re.compile(r"^(\S+)\s+: (ok=.*)$")


def inventories(folder: Path, host: fleet.Host, fx: fleet.Fixtures, key: Path, control: Path) -> dict[str, Path]:
    """One inventory per connection, for the same host and the same settings: those of a fleet
    host (tests/harness/fleet.py), with the gateway and the exporter on, as a host of its own."""
    settings: dict[str, Any] = {
        "comfyui_environments_wheelhouse": fleet.WHEELHOUSE,
        "comfyui_environments_git_mirrors": {
            "https://github.com/comfyanonymous/": f"file://{fleet.MIRRORS}/",
            "https://github.com/comfybake-fixtures/": f"file://{fleet.MIRRORS}/nodes/",
        },
        "comfyui_environments": fleet.environments(fx),
        "comfyui_models_policy": "none",
        "comfyui_instances": fleet.LAYOUTS["a100"],
    }
    connections: dict[str, dict[str, Any]] = {
        "ssh": {
            "ansible_host": host.address,
            "ansible_connection": "ssh",
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(key),
            "ansible_ssh_pipelining": True,
            "ansible_ssh_args": f"-C -o ControlMaster=auto -o ControlPersist=120s -o ControlPath={control}/%C",
            "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
            "ansible_python_interpreter": "/usr/bin/python3",
        },
        "docker": {
            "ansible_host": host.container,
            "ansible_connection": "community.docker.docker",
            "ansible_python_interpreter": "/usr/bin/python3",
        },
    }
    paths = {}
    for connection, hostvars in connections.items():
        inventory = folder / f"inventory-{connection}"
        (inventory / "group_vars").mkdir(parents=True, exist_ok=True)
        (inventory / "hosts.yml").write_text(yaml.safe_dump({"comfybake": {"hosts": {NAME: hostvars}}}))
        (inventory / "group_vars" / "comfybake.yml").write_text(yaml.safe_dump(settings, sort_keys=False))
        paths[connection] = inventory
    return paths


def host_cpu(container: str) -> float:
    """CPU seconds the container's processes used so far (its cgroup v1 or v2 accounting)."""
    full = fleet.docker("inspect", "--format", "{{.Id}}", container)
    v1 = Path(f"/sys/fs/cgroup/cpuacct/docker/{full}/cpuacct.usage")
    if v1.exists():
        return int(v1.read_text()) / 1e9
    v2 = Path(f"/sys/fs/cgroup/system.slice/docker-{full}.scope/cpu.stat")
    if v2.exists():
        return int(v2.read_text().split("usage_usec ")[1].split()[0]) / 1e6
    return float("nan")


def converge(checkout: Path, inventory: Path, log: Path, container: str) -> dict[str, Any]:
    """`ansible-playbook playbooks/site.yml` of `checkout` over `inventory`: its wall time, the
    time of each role, the recap, and the CPU seconds it cost on this machine (Ansible and its
    ssh or docker clients) and on the host. The CPU figures hold on a loaded machine, where the
    wall time mostly measures the load."""
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(checkout / "ansible.cfg"),
        "ANSIBLE_CALLBACKS_ENABLED": "ansible.posix.profile_roles",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_NOCOLOR": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    host_before = host_cpu(container)
    started = time.perf_counter()
    done = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory), "playbooks/site.yml"],
        cwd=checkout, env=env, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    controller = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    host = host_cpu(container) - host_before
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"the converge over {inventory.name} failed (exit {done.returncode}); its log: {log}")
    roles: dict[str, float] = {}
    recap: dict[str, int] = {}
    for line in done.stdout.splitlines():
        if match := ROLE_ROW.match(line.strip()):
            roles[match[1]] = roles.get(match[1], 0.0) + float(match[2])
        elif (match := RECAP_ROW.match(line)) and match[1] == NAME:
            recap = {k: int(v) for k, v in (pair.split("=") for pair in match[2].split())}
    roles.pop("total", None)
    return {"seconds": seconds, "roles": roles, "recap": recap, "controller_cpu": controller, "host_cpu": host}


def noop(args: argparse.Namespace) -> int:
    checkouts = [path.resolve() for path in args.root or [ROOT]]
    for checkout in checkouts:
        if not (checkout / "roles/comfyui/files/comfybake.pyz").is_file():
            raise SystemExit(f"{checkout}/roles/comfyui/files/comfybake.pyz is missing: run scripts/build-cli.py there")
    work = Path(tempfile.mkdtemp(prefix="comfybake-bench-fleet-", dir=args.work))
    control = Path(tempfile.mkdtemp(prefix="cbb-"))  # short: ssh's control socket path
    print(f"checkouts {', '.join(map(str, checkouts))}; work in {work}", flush=True)
    fleet.image()
    key = fleet.keypair(work / "ssh")
    fx = fleet.fixtures(work / "fixtures")
    fleet.network(NETWORK)
    try:
        host = fleet.start([NAME], NETWORK, fx, key)[NAME]
        paths = inventories(work, host, fx, key, control)
        first = converge(checkouts[0], paths["ssh"], work / "converge-first.log", host.container)
        print(f"first converge over ssh: {first['seconds']:.1f} s, {first['recap']}", flush=True)
        runs: dict[Path, dict[str, list[dict[str, Any]]]] = {c: {"ssh": [], "docker": []} for c in checkouts}
        for round_ in range(1, args.rounds + 1):
            for index, checkout in enumerate(checkouts):
                for connection in ("ssh", "docker"):
                    log = work / f"noop-{index}-{connection}-{round_}.log"
                    run = converge(checkout, paths[connection], log, host.container)
                    if run["recap"].get("changed", -1) != 0:
                        raise SystemExit(f"round {round_} of {checkout} over {connection} changed something: "
                                         f"{run['recap']} (log: {log})")  # fmt: skip
                    runs[checkout][connection].append(run)
                    print(f"round {round_} {checkout.name:<12} {connection:<6} {run['seconds']:6.1f} s wall, "
                          f"CPU {run['controller_cpu']:5.1f} s here + {run['host_cpu']:5.1f} s on the host  "
                          f"ok={run['recap'].get('ok')} skipped={run['recap'].get('skipped')}", flush=True)  # fmt: skip
        for checkout in checkouts:
            report(checkout, runs[checkout])
        if len(checkouts) > 1:
            print()
            for pick in ("seconds", "controller_cpu", "host_cpu"):
                values = {c: statistics.median(run[pick] for run in runs[c]["ssh"]) for c in checkouts}
                base = values[checkouts[0]]
                print(
                    f"over ssh, median {pick} against {checkouts[0].name}: "
                    + ", ".join(f"{c.name} {values[c]:.1f} s ({base / values[c]:.2f} x less)" for c in checkouts[1:])
                )
    finally:
        if not args.keep:
            fleet.stop([NAME])
            fleet.remove_network(NETWORK)
    return 0


def report(checkout: Path, runs: dict[str, list[dict[str, Any]]]) -> None:
    def median(connection: str, pick: str) -> float:
        if pick == "wall":
            return statistics.median(run["seconds"] for run in runs[connection])
        if pick in ("controller_cpu", "host_cpu"):
            return statistics.median(run[pick] for run in runs[connection])
        return statistics.median(run["roles"].get(pick, 0.0) for run in runs[connection])

    roles = list(dict.fromkeys(role for run in runs["ssh"] + runs["docker"] for role in run["roles"]))
    print(f"\n{checkout}: no-change converge of site.yml, one host, median of {len(runs['ssh'])} rounds (seconds)")
    print(f"{'':<24} {'ssh':>8} {'docker':>8} {'docker/ssh':>11}")
    for pick in [*roles, "wall", "controller_cpu", "host_cpu"]:
        ssh, docker = median("ssh", pick), median("docker", pick)
        ratio = f"{docker / ssh:.2f}" if ssh else "-"
        print(f"{pick:<24} {ssh:8.1f} {docker:8.1f} {ratio:>11}")
    for connection in ("ssh", "docker"):
        walls = sorted(run["seconds"] for run in runs[connection])
        print(f"{connection} wall per round, fastest first: {', '.join(f'{wall:.1f}' for wall in walls)}")
    recap = runs["ssh"][-1]["recap"]
    print(f"tasks: ok={recap.get('ok')} skipped={recap.get('skipped')} changed={recap.get('changed')}")


# -- roll: the time and the failed requests of a rolling change ---------------------------------

ROLL = "roll-"  # the containers comfybake-fleet-roll-<host>: neither the tests' nor noop's
ROLL_NETWORK = f"{fleet.PREFIX}roll-net"
# The change each row rolls: prod's node pins flip between these two sets (Basic's update adds a class).
PINS = ([("ComfyUI-Comfybake-Basic", "initial")], [("ComfyUI-Comfybake-Basic", "update")])
# mode -> (playbook, its extra arguments, hosts per batch: a number, or 0 for all N at once)
MODES: dict[str, tuple[str, list[str], int]] = {
    "rolling-1": ("fleet_upgrade.yml", [], 1),
    "rolling-2": ("fleet_upgrade.yml", [], 2),
    "naive-1": ("site.yml", ["-e", "comfybake_fleet_rolling=false"], 1),
    "all": ("site.yml", ["-e", "comfybake_fleet_rolling=false"], 0),
}
PROMPT = json.dumps({"prompt": {"1": {"class_type": "ComfybakeEcho", "inputs": {}}}}).encode()


class Load:
    """`clients` threads sending prompts through the front's prod URL, each on a new connection
    (a new session: the front picks a serving member), until stopped; counts what failed."""

    def __init__(self, the_fleet: fleet.Fleet, clients: int, pause: float = 0.1) -> None:
        self.fleet, self.pause = the_fleet, pause
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.total = 0
        self.failures: list[tuple[str, str]] = []  # (time, what failed)
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(clients)]

    def client(self) -> None:
        while not self.stopping.is_set():
            failure = None
            try:
                status, _, body = self.fleet.request("prod", "/prompt", method="POST", body=PROMPT, timeout=20)
                if status != 200:
                    failure = f"{status} {body[:120]!r}"
            except (OSError, http.client.HTTPException) as error:
                failure = repr(error)[:160]
            with self.lock:
                self.total += 1
                if failure:
                    self.failures.append((time.strftime("%H:%M:%S"), failure))
            time.sleep(self.pause)

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=60)


class Roller:
    """The roll bench's fleet: which pin set each host runs and which hosts the front's pools hold."""

    def __init__(self, the_fleet: fleet.Fleet) -> None:
        self.fleet = the_fleet
        self.pins = dict.fromkeys(the_fleet.hosts, 0)  # host -> index in PINS
        self.members = list(the_fleet.hosts)  # site.yml's fronts play: every fleet host
        self.runs = 0

    def log(self, what: str) -> str:
        self.runs += 1
        return f"roll-{self.runs:02d}-{what}"

    def pools(self, members: list[str]) -> None:
        """The front's pools set to `members` (untimed): the fronts' play with those members."""
        if members == self.members:
            return
        write_inventory(self.fleet, PINS[self.pins[members[0]]])
        extra = json.dumps({"comfyui_gateway_fleet_members": members})
        self.fleet.playbook("site.yml", "--limit", fleet.FRONT, "-e", extra, log=self.log("front"))
        self.members = members
        self.settle()

    def align(self, hosts: list[str]) -> None:
        """The hosts not on the first one's pins converged to them (untimed), so a row changes all."""
        want = self.pins[hosts[0]]
        behind = [name for name in hosts if self.pins[name] != want]
        if behind:
            write_inventory(self.fleet, PINS[want])
            self.fleet.playbook("site.yml", "--limit", ",".join(behind), "-e", "comfybake_fleet_rolling=false",
                                "-e", f"comfybake_canary={len(behind)}", "-e", f"comfybake_serial={len(behind)}",
                                log=self.log("align"))  # fmt: skip
            self.pins.update(dict.fromkeys(behind, want))
            self.settle()

    def settle(self, timeout: float = 180) -> None:
        """Wait until the front answers 10 prompts in a row (its health checks see every member)."""
        deadline, streak, last = time.monotonic() + timeout, 0, ""
        while streak < 10:
            try:
                status, _, body = self.fleet.request("prod", "/prompt", method="POST", body=PROMPT, timeout=20)
                streak, last = (streak + 1, "") if status == 200 else (0, f"{status} {body[:200]!r}")
            except (OSError, http.client.HTTPException) as error:
                streak, last = 0, repr(error)
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"the front's prod URL did not answer 10 prompts in a row after {timeout:.0f} s: {last}"
                )
            time.sleep(0.3 if streak else 2)

    def roll(self, mode: str, hosts: list[str], clients: int) -> dict[str, Any]:
        """Flip prod's pins on `hosts` with `mode`, timed, under load; the row."""
        playbook, args, serial = MODES[mode]
        serial = serial or len(hosts)
        self.align(hosts)
        target = 1 - self.pins[hosts[0]]
        before = {name: self.live(name) for name in hosts}
        write_inventory(self.fleet, PINS[target])
        log = self.log(f"{mode}-n{len(hosts)}")
        with Load(self.fleet, clients) as load:
            run = self.fleet.playbook(playbook, "--limit", ",".join(hosts), *args, "-e", f"comfybake_canary={serial}",
                                      "-e", f"comfybake_serial={serial}", log=log, check=False)  # fmt: skip
        if run.returncode != 0:
            raise SystemExit(f"{mode} over {hosts} failed: {failure_reason(run.log)} (log: {run.saved})")
        self.pins.update(dict.fromkeys(hosts, target))
        same = [name for name in hosts if self.live(name) == before[name]]
        if same:
            raise SystemExit(f"{mode}: prod's live release did not change on {same} (log: {run.saved})")
        self.settle()
        return {
            "mode": mode, "n": len(hosts), "serial": serial, "seconds": run.seconds,
            "total": load.total, "failed": len(load.failures), "failures": load.failures,
        }  # fmt: skip

    def live(self, name: str) -> str:
        rows = [row for row in self.fleet.releases(self.fleet.hosts[name], "prod") if row["live"]]
        return str(rows[0]["release"]) if rows else ""


def write_inventory(the_fleet: fleet.Fleet, pins: list[tuple[str, str]]) -> None:
    """The fleet's inventory with prod's node `pins`; the front routes prod only (the first hosts
    of the simulated fleet are L4 hosts, which serve no `edit`, and a route needs instances)."""
    the_fleet.write_inventory(prod_nodes=pins)
    front_vars = the_fleet.inventory / "group_vars" / "comfybake_gateway.yml"
    settings = yaml.safe_load(front_vars.read_text())
    settings["comfyui_gateway_environment_ports"] = {"prod": fleet.ENVIRONMENT_PORTS["prod"]}
    front_vars.write_text(yaml.safe_dump(settings, sort_keys=False))


def roll_fleet(work: Path, count: int) -> fleet.Fleet:
    """The roll bench's fleet: the first `count` hosts of the simulated fleet and a front, on a
    network of their own, converged once by site.yml (the canary, then the rest at once)."""
    fleet.image()
    key = fleet.keypair(work / "ssh")
    fx = fleet.fixtures(work / "fixtures")
    subnet, gateway = fleet.network(ROLL_NETWORK)
    names = [name for name, _, _ in fleet.HOSTS][:count]
    # The front reloads Caddy at each pool change: queued connections move to the new socket.
    front_options = {ROLL + fleet.FRONT: ["--sysctl", "net.ipv4.tcp_migrate_req=1"]}
    started = fleet.start([ROLL + name for name in [*names, fleet.FRONT]], ROLL_NETWORK, fx, key, options=front_options)
    hosts = {name: dataclasses.replace(started[ROLL + name], name=name) for name in names}
    front = dataclasses.replace(started[ROLL + fleet.FRONT], name=fleet.FRONT)
    the_fleet = fleet.Fleet(hosts=hosts, front=front, folder=work, key=key, fixtures=fx, subnet=subnet,
                            gateway_address=gateway)  # fmt: skip
    write_inventory(the_fleet, PINS[0])
    return the_fleet


def roll(args: argparse.Namespace) -> int:
    sizes = sorted({int(size) for size in args.sizes.split(",")})
    modes = [mode.strip() for mode in args.modes.split(",")]
    if unknown := [mode for mode in modes if mode not in MODES]:
        raise SystemExit(f"--modes {args.modes}: unknown {unknown}; the modes are {', '.join(MODES)}")
    if not sizes or sizes[0] < 1 or sizes[-1] > len(fleet.HOSTS):
        raise SystemExit(f"--sizes {args.sizes}: each size must be 1 to {len(fleet.HOSTS)} (the simulated fleet)")
    if not (ROOT / "roles/comfyui/files/comfybake.pyz").is_file():
        raise SystemExit(f"{ROOT}/roles/comfyui/files/comfybake.pyz is missing: run scripts/build-cli.py")
    work = Path(tempfile.mkdtemp(prefix="comfybake-bench-roll-", dir=args.work))
    started = time.monotonic()
    print(f"roll: sizes {sizes}, modes {modes}, {args.clients} clients; work in {work}", flush=True)
    names = [ROLL + name for name in [*[name for name, _, _ in fleet.HOSTS][: sizes[-1]], fleet.FRONT]]
    rows: list[dict[str, Any]] = []
    try:
        the_fleet = roll_fleet(work, sizes[-1])
        first = the_fleet.playbook("site.yml", "-e", f"comfybake_serial={max(sizes[-1] - 1, 1)}", log="roll-00-site")
        print(f"first converge of {sizes[-1]} hosts and the front: {first.seconds:.1f} s (untimed)", flush=True)
        roller = Roller(the_fleet)
        hosts = list(the_fleet.hosts)
        for size in sizes:
            roller.pools(hosts[:size])
            for mode in modes:
                playbook, _, serial = MODES[mode]
                if playbook == "fleet_upgrade.yml" and serial >= size:
                    print(f"row {mode:<10} N={size}: not run: one batch would hold every host of prod, which the"
                          " fleet role refuses (comfybake_fleet_min_serving)", flush=True)  # fmt: skip
                    continue
                row = roller.roll(mode, hosts[:size], args.clients)
                rows.append(row)
                print(f"row {mode:<10} N={size} serial={row['serial']}: {row['seconds']:.1f} s, "
                      f"failed {row['failed']}/{row['total']} requests", flush=True)  # fmt: skip
                for failure, count in collections.Counter(what for _, what in row["failures"]).most_common(5):
                    times = [when for when, what in row["failures"] if what == failure]
                    print(f"    {count} x {failure} ({times[0]} to {times[-1]})", flush=True)
        # One host's time: a rolling change of the first host alone, in the last row's pools.
        unit = roller.roll("rolling-1", hosts[:1], args.clients)
        print(f"one host (rolling-1, N=1): {unit['seconds']:.1f} s, failed {unit['failed']}/{unit['total']} "
              f"requests (the pools hold {len(roller.members)} hosts)", flush=True)  # fmt: skip
        print(f"\nrolling change of prod's node pins; one host's time {unit['seconds']:.1f} s "
              f"(a separate rolling-1 roll of one host); {args.clients} clients")  # fmt: skip
        print(f"{'mode':<10} {'N':>2} {'serial':>6} {'seconds':>8} {'failed/total':>13} {'ratio':>6}")
        for row in rows:
            expected = row["n"] / row["serial"] * unit["seconds"]
            failed = f"{row['failed']}/{row['total']}"
            print(f"{row['mode']:<10} {row['n']:>2} {row['serial']:>6} {row['seconds']:8.1f} {failed:>13} "
                  f"{row['seconds'] / expected:6.2f}")  # fmt: skip
        print(f"\nwall time of the bench: {time.monotonic() - started:.0f} s")
    finally:
        if not args.keep:
            print(f"removing {', '.join(fleet.PREFIX + name for name in names)} and {ROLL_NETWORK}", flush=True)
            fleet.stop(names)
            fleet.remove_network(ROLL_NETWORK)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    cost = commands.add_parser("noop", help="the time of a no-change converge of site.yml on one host")
    cost.add_argument("--rounds", type=int, default=3, help="no-change converges per connection (medians printed)")
    cost.add_argument("--root", type=Path, action="append", help="a checkout whose roles converge (default: this one)")
    cost.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    cost.add_argument("--keep", action="store_true", help="leave the host running (comfybake-fleet-bench)")
    cost.set_defaults(run=noop)
    rolls = commands.add_parser("roll", help="the time and the failed requests of a rolling change over N hosts")
    rolls.add_argument("--sizes", default="2,4,6", help="hosts the change rolls over, comma-separated (default 2,4,6)")
    rolls.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)} (default all)")
    rolls.add_argument("--clients", type=int, default=4, help="concurrent clients sending prompts (default 4)")
    rolls.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    rolls.add_argument("--keep", action="store_true", help="leave the fleet running (comfybake-fleet-roll-*)")
    rolls.set_defaults(run=roll)
    args = parser.parse_args()
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
