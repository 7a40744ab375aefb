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
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness import fleet  # noqa: E402 - after the path set-up

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    cost = commands.add_parser("noop", help="the time of a no-change converge of site.yml on one host")
    cost.add_argument("--rounds", type=int, default=3, help="no-change converges per connection (medians printed)")
    cost.add_argument("--root", type=Path, action="append", help="a checkout whose roles converge (default: this one)")
    cost.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    cost.add_argument("--keep", action="store_true", help="leave the host running (comfybake-fleet-bench)")
    cost.set_defaults(run=noop)
    args = parser.parse_args()
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
