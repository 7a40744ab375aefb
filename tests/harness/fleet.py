"""A simulated fleet for the fleet tests (tests/fleet) and the fleet benchmark: systemd containers
reached over SSH, as real fleets are, with an inventory of GPU types, sites and a front.

- `image()`: `comfybake/test-fleet:bookworm`, the local base image plus openssh-server (fresh
  host keys at each container's first start) and the system packages the roles would install
  (the comfyui role's list and the gateway's Caddy), so a converge spends its time on comfybake's
  work, not on apt. Built with `docker build` from Debian's archive over plain http and cached by
  a recipe label (the recipe: this file's Dockerfile text and the base image's id).
- `keypair(folder)`: the session's SSH key pair (harness.vm's).
- `start(names, network, fixtures, key)`: one systemd container per name (the flags of
  scripts/local.sh), named `comfybake-fleet-<name>`, on a Docker network of their own, with the
  session's public key authorized for root, the fixture git repositories at /srv/mirrors and
  the fleet's wheelhouse at /srv/wheelhouse (read-only volumes: nothing is copied per host);
  returns each host's bridge address once sshd answers there.
- `write_inventory(...)`: groups per GPU type (`gpu_l4`, `gpu_a100`) and per site (`site_east`,
  `site_west`) under `comfybake`, the front in `comfybake_gateway`, reached with
  `ansible_connection: ssh`, pipelining and a persistent control connection.
- `playbook(...)`: `ansible-playbook` of a playbook over that inventory, its whole log kept
  under build/test-logs/.

The fleet's environments are the fixture ComfyUI test double with fixture nodes, built offline
from the fixture git repositories and a wheelhouse in which torch is a small stand-in wheel of
the same name and version (the double never imports torch): an environment builds in seconds.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness import repos, vm, wheelhouse
from harness.tools import BASE_IMAGE, ROOT, failure_reason, save_log

IMAGE = os.environ.get("COMFYBAKE_FLEET_IMAGE", "comfybake/test-fleet:bookworm")
PREFIX = "comfybake-fleet-"
NETWORK = f"{PREFIX}net"
MIRRORS = "/srv/mirrors"
WHEELHOUSE = "/srv/wheelhouse"
GITHUB_NODES = "https://github.com/comfybake-fixtures"

# The fleet: (name, GPU type, site). Two GPU types with different layouts, two sites.
HOSTS = (
    ("l4-1", "l4", "east"), ("l4-2", "l4", "east"), ("l4-3", "l4", "west"),
    ("a100-1", "a100", "east"), ("a100-2", "a100", "west"), ("a100-3", "a100", "west"),
)  # fmt: skip
FRONT = "front"
# Instances per GPU type: every host serves `prod`; an a100 host also serves `edit`.
LAYOUTS: dict[str, list[dict[str, Any]]] = {
    "l4": [
        {"name": "a", "environment": "prod", "port": 8188, "gpus": []},
        {"name": "b", "environment": "prod", "port": 8189, "gpus": []},
    ],
    "a100": [
        {"name": "a", "environment": "prod", "port": 8188, "gpus": []},
        {"name": "e", "environment": "edit", "port": 8189, "gpus": []},
    ],
}
# The front's route of each environment (the gateway's ports mode).
ENVIRONMENT_PORTS = {"prod": 8443, "edit": 8444}

_DOCKERFILE = """\
FROM {base}
# Caddy's own units would serve :80 at boot: masked, as the gateway role does.
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends openssh-server {packages} \\
 && systemctl disable caddy.service && systemctl mask caddy.service caddy-api.service \\
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /etc/ssh/ssh_host_* \\
 && install -d -m 0700 /root/.ssh \\
 && mkdir -p /etc/systemd/system/ssh.service.d \\
 && printf '[Service]\\nExecStartPre=\\nExecStartPre=/usr/bin/ssh-keygen -A\\nExecStartPre=/usr/sbin/sshd -t\\n' \\
    > /etc/systemd/system/ssh.service.d/host-keys.conf \\
 && printf 'PasswordAuthentication no\\nPermitRootLogin prohibit-password\\nUseDNS no\\n' \\
    > /etc/ssh/sshd_config.d/comfybake-fleet.conf
LABEL org.comfybake.recipe={recipe}
"""


class FleetError(Exception):
    """A step of the fleet failed; the message says which and where its whole log is."""


def docker(*args: str, check: bool = True, timeout: float = 300, stdin: str | None = None) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, input=stdin)
    if check and done.returncode != 0:
        raise FleetError(f"docker {' '.join(args[:3])} ... exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done.stdout.strip()


def _role_packages() -> list[str]:
    """What the comfyui role installs on Debian, and the gateway's packages."""
    common = yaml.safe_load((ROOT / "roles/comfyui/vars/Debian.yml").read_text())["_comfyui_system_packages"]
    gateway = yaml.safe_load((ROOT / "roles/comfyui_gateway/vars/main.yml").read_text())["_comfyui_gateway_packages"]
    return [*common, *gateway]


def image() -> str:
    """The fleet image, built from the base image unless one with the same recipe exists."""
    base_id = docker("image", "inspect", "--format", "{{.Id}}", BASE_IMAGE)
    packages = " ".join(_role_packages())
    text = _DOCKERFILE.format(base=BASE_IMAGE, packages=packages, recipe="RECIPE")
    recipe = hashlib.sha256((base_id + text).encode()).hexdigest()[:16]
    current = docker("image", "inspect", "--format", '{{index .Config.Labels "org.comfybake.recipe"}}', IMAGE,
                     check=False)  # fmt: skip
    if current == recipe:
        return IMAGE
    done = subprocess.run(
        ["docker", "build", "--tag", IMAGE, "-"], input=text.replace("RECIPE", recipe),
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    if done.returncode != 0:
        log = done.stdout + done.stderr
        raise FleetError(
            f"docker build of {IMAGE} failed: {failure_reason(log)} (full log: {save_log('fleet-image', log)})"
        )
    return IMAGE


def keypair(folder: Path) -> Path:
    """The session's key pair (the private key; `.pub` beside it)."""
    folder.mkdir(parents=True, exist_ok=True)
    return vm.keypair(folder, "fleet-key")


@dataclass
class Fixtures:
    """What the hosts build their environments from: git mirrors and a wheelhouse on this machine."""

    repos: Path
    wheelhouse: Path
    commits: dict[str, dict[str, str]]
    torch: str


def fixtures(folder: Path) -> Fixtures:
    """The fixture repositories and the fleet's wheelhouse under `folder`: the wheels of the
    fixture wheelhouse but torch, which is a stand-in of the same name and version."""
    built = repos.build(folder / "repos")
    source = wheelhouse.wheelhouse()
    wheels = folder / "wheelhouse"
    wheels.mkdir(parents=True, exist_ok=True)
    name, version = wheelhouse.TORCH.split("==")
    for wheel in source.glob("*.whl"):
        if not wheel.name.startswith(f"{name}-"):
            shutil.copy2(wheel, wheels / wheel.name)
    wheelhouse.stand_in(wheels, name, version, {"torch/__init__.py": f'__version__ = "{version}"\n'})
    return Fixtures(
        repos=folder / "repos",
        wheelhouse=wheels,
        commits={key: repo.commits for key, repo in built.items()},
        torch=wheelhouse.TORCH,
    )


@dataclass
class Host:
    name: str
    container: str
    address: str

    def run(self, command: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`command` in the container (through `docker exec`, not SSH: the tests' own channel)."""
        done = subprocess.run(["docker", "exec", self.container, "bash", "-c", command], capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip
        if check and done.returncode != 0:
            raise FleetError(f"{self.name}: {command!r} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
        return done

    def json(self, command: str) -> Any:
        return json.loads(self.run(command).stdout)


def network(name: str = NETWORK) -> tuple[str, str]:
    """The fleet's Docker network (created when missing); returns its (subnet, gateway)."""
    if subprocess.run(["docker", "network", "inspect", name], capture_output=True).returncode != 0:
        docker("network", "create", "--label", "org.comfybake.fleet=true", name)
    config = json.loads(docker("network", "inspect", "--format", "{{json .IPAM.Config}}", name))[0]
    return config["Subnet"], config.get("Gateway") or ""


def start(
    names: list[str],
    net: str,
    fixtures: Fixtures,
    key: Path,
    timeout: float = 120,
    options: dict[str, list[str]] | None = None,
) -> dict[str, Host]:
    """Start (or restart from scratch) a systemd container per name on `net` (with `options[name]`,
    more `docker run` arguments); returns the hosts once sshd answers on each one's bridge address."""
    hosts = {}
    for name in names:
        container = PREFIX + name
        docker("rm", "-f", container, check=False)
        docker(
            "run", *(options or {}).get(name, []), "--detach", "--name", container, "--hostname", name,
            "--network", net,
            "--cap-add", "SYS_ADMIN", "--security-opt", "seccomp=unconfined",
            "--tmpfs", "/run", "--tmpfs", "/run/lock", "--tmpfs", "/tmp",
            "--cgroupns=host", "--volume", "/sys/fs/cgroup:/sys/fs/cgroup:rw", "--stop-signal", "SIGRTMIN+3",
            "--label", "org.comfybake.fleet=true",
            "--volume", f"{key.with_suffix('.pub')}:/root/.ssh/authorized_keys:ro",
            "--volume", f"{fixtures.repos}:{MIRRORS}:ro",
            "--volume", f"{fixtures.wheelhouse}:{WHEELHOUSE}:ro",
            IMAGE, "/lib/systemd/systemd",
        )  # fmt: skip
        template = f"{{{{(index .NetworkSettings.Networks {json.dumps(net)}).IPAddress}}}}"
        address = docker("inspect", "--format", template, container)
        hosts[name] = Host(name, container, address)
    deadline = time.monotonic() + timeout
    for host in hosts.values():
        while True:
            state = subprocess.run(["docker", "exec", host.container, "systemctl", "is-system-running", "--wait"],
                                   capture_output=True, text=True, timeout=timeout).stdout.strip()  # fmt: skip
            if state in ("running", "degraded") and _answers_ssh(host.address):
                break
            if time.monotonic() > deadline:
                failed = host.run("systemctl --failed --no-legend; journalctl -u ssh --no-pager -n 20", check=False)
                raise FleetError(f"{host.name}: systemd is {state!r} or sshd does not answer on {host.address}:22 "
                                 f"after {timeout:.0f} s:\n{failed.stdout}")  # fmt: skip
            time.sleep(1)
    return hosts


def _answers_ssh(address: str) -> bool:
    try:
        with socket.create_connection((address, 22), timeout=2) as sock:
            return sock.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def stop(names: list[str]) -> None:
    for name in names:
        docker("rm", "-f", PREFIX + name, check=False)


def remove_network(net: str = NETWORK) -> None:
    docker("network", "rm", net, check=False)


# -- the inventory ------------------------------------------------------------------------------


def environments(fx: Fixtures, prod_nodes: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """The fleet's environments; `prod_nodes` [(fixture node, commit label)] replaces prod's nodes."""

    def nodes(pins: list[tuple[str, str]]) -> list[dict[str, str]]:
        return [{"repo": f"{GITHUB_NODES}/{name}.git", "version": fx.commits[name][label]} for name, label in pins]

    def environment(pins: list[tuple[str, str]], classes: list[str]) -> dict[str, Any]:
        return {"comfyui_repo": "https://github.com/comfyanonymous/ComfyUI.git", "comfyui_version": "v0.8.0",
                "torch_flavor": "cpu", "torch_packages": [fx.torch], "custom_nodes": nodes(pins),
                "required_node_classes": classes}  # fmt: skip

    return {
        "prod": environment(prod_nodes or [("ComfyUI-Comfybake-Basic", "initial")], ["ComfybakeEcho"]),
        "edit": environment([("ComfyUI-Comfybake-SixOld", "initial")], ["ComfybakeSixOld"]),
    }


@dataclass
class Fleet:
    """The running fleet, its inventory and the front's credentials."""

    hosts: dict[str, Host]  # the fleet hosts (group comfybake), in inventory order
    front: Host
    folder: Path  # inventory, logs, keys
    key: Path
    fixtures: Fixtures
    subnet: str
    gateway_address: str  # this machine on the fleet's network
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    control: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cbf-")))  # short: a socket path

    @property
    def inventory(self) -> Path:
        return self.folder / "inventory"

    @property
    def user(self) -> str:
        return "fleet"

    def write_inventory(self, prod_nodes: list[tuple[str, str]] | None = None, **extra: Any) -> Path:
        """inventory/hosts.yml and group_vars/ for this fleet; `prod_nodes` pins prod's nodes
        (what an operator edits before a rolling upgrade), `extra` adds to the fleet's group_vars."""
        by_type = {gpu: [name for name, kind, _ in HOSTS if kind == gpu and name in self.hosts] for gpu in LAYOUTS}
        by_site = {site: [name for name, _, where in HOSTS if where == site and name in self.hosts]
                   for site in ("east", "west")}  # fmt: skip
        ssh = {
            "ansible_connection": "ssh",
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(self.key),
            "ansible_ssh_pipelining": True,
            # A persistent control connection per host (Ansible's default args, with a short path of ours).
            "ansible_ssh_args": f"-C -o ControlMaster=auto -o ControlPersist=120s -o ControlPath={self.control}/%C",
            "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
            "-o ConnectTimeout=10 -o LogLevel=ERROR",
            "ansible_python_interpreter": "/usr/bin/python3",
        }
        hosts_yml = {
            "all": {
                "vars": ssh,
                "children": {
                    "comfybake": {
                        "children": {
                            **{f"gpu_{gpu}": {"hosts": {n: {"ansible_host": self.hosts[n].address} for n in names}}
                               for gpu, names in by_type.items()},
                            **{f"site_{site}": {"hosts": {n: {} for n in names}} for site, names in by_site.items()},
                        }
                    },
                    "comfybake_gateway": {"hosts": {FRONT: {"ansible_host": self.front.address}}},
                },
            }
        }  # fmt: skip
        fleet_vars = {
            "comfyui_environments_wheelhouse": WHEELHOUSE,
            "comfyui_environments_git_mirrors": {
                "https://github.com/comfyanonymous/": f"file://{MIRRORS}/",
                "https://github.com/comfybake-fixtures/": f"file://{MIRRORS}/nodes/",
            },
            "comfyui_environments": environments(self.fixtures, prod_nodes),
            "comfyui_models_policy": "none",
            # Instances listen on the host's address for the front, which (with the host itself
            # and this machine, the tests' client) is allowed to connect.
            "comfyui_listen": "{{ ansible_host }}",
            "comfyui_instances_allowed_clients": [self.front.address, "{{ ansible_host }}", self.gateway_address],
            "comfyui_instances_memory_high": "1G",
            "comfyui_instances_memory_max": "2G",
            # The fleet's hosts are reached through the front: no per-host gateway or exporter
            # (each is tested on one host by its molecule scenario; here they would only cost time).
            "comfyui_gateway_enabled": False,
            "comfyui_exporter_enabled": False,
            **extra,
        }
        front_vars = {
            "comfyui_gateway_names": [self.front.address, "localhost"],
            "comfyui_gateway_environment_ports": ENVIRONMENT_PORTS,
            "comfyui_gateway_users": [{"name": self.user, "password": self.password, "scope": ["*"]}],
            "comfyui_gateway_metrics": False,
            "comfyui_exporter_enabled": False,
            "comfyui_gateway_health_interval": "2s",
        }
        group_vars = self.inventory / "group_vars"
        group_vars.mkdir(parents=True, exist_ok=True)
        (self.inventory / "hosts.yml").write_text(yaml.safe_dump(hosts_yml, sort_keys=False))
        (group_vars / "comfybake.yml").write_text(yaml.safe_dump(fleet_vars, sort_keys=False))
        for gpu, layout in LAYOUTS.items():
            (group_vars / f"gpu_{gpu}.yml").write_text(
                yaml.safe_dump({"comfybake_gpu_type": gpu, "comfyui_instances": layout}, sort_keys=False)
            )
        (group_vars / "comfybake_gateway.yml").write_text(yaml.safe_dump(front_vars, sort_keys=False))
        return self.inventory

    # -- running playbooks

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_HOST_KEY_CHECKING": "False",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            **extra,
        }

    def playbook(
        self,
        name: str,
        *args: str,
        log: str,
        timeout: float = 1500,
        check: bool = True,
        env: dict[str, str] | None = None,
    ) -> Run:
        """`ansible-playbook playbooks/<name>` over the fleet's inventory; its log is kept as
        build/test-logs/fleet-<log>.log. `check`: fail (with the run's reason) unless it exits 0."""
        summary = self.folder / f"summary-{log}.json"
        summary.unlink(missing_ok=True)
        saved = save_log(f"fleet-{log}", "")  # written as the run goes: `tail -f` it to follow one
        started = time.monotonic()
        with saved.open("w") as sink:
            done = subprocess.run(
                [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(self.inventory),
                 str(ROOT / "playbooks" / name), *args],
                cwd=ROOT, env=self.env(COMFYBAKE_FLEET_SUMMARY=str(summary), **(env or {})),
                stdout=sink, stderr=subprocess.STDOUT, text=True, timeout=timeout,
            )  # fmt: skip
        seconds = time.monotonic() - started
        with saved.open("a") as sink:
            sink.write(f"\nfleet: {name} {' '.join(args)} exited {done.returncode} after {seconds:.1f} s\n")
        text = saved.read_text()
        run = Run(done.returncode, text, seconds, saved, summary)
        if check and done.returncode != 0:
            raise FleetError(f"{name} ({log}) exited {done.returncode}: {failure_reason(text)} (full log: {saved})")
        return run

    def forget_connection(self, host: Host) -> None:
        """Close Ansible's persistent SSH connection to `host` (a new task then connects anew)."""
        subprocess.run(
            ["ssh", "-O", "exit", "-o", f"ControlPath={self.control}/%C", "-o", "StrictHostKeyChecking=no",
             "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", f"root@{host.address}"],
            capture_output=True, timeout=30,
        )  # fmt: skip

    # -- asking the hosts and the front

    def status(self, host: Host) -> list[dict[str, Any]]:
        """`comfybake instances status --json` on the host: its instances."""
        return list(host.json("comfybake instances status --json")["instances"])

    def releases(self, host: Host, environment: str) -> list[dict[str, Any]]:
        """`comfybake environments list ENV --json` on the host."""
        found = host.json(f"comfybake environments list {environment} --json")
        return list(found["releases"] if isinstance(found, dict) and "releases" in found else found)

    def ca(self) -> Path:
        """The front's gateway CA, copied here."""
        path = self.folder / "front-ca.crt"
        if not path.exists():
            path.write_text(self.front.run("cat /etc/comfybake/gateway/ca.crt").stdout)
        return path

    def request(
        self, environment: str, path: str = "/system_stats", *, method: str = "GET", body: bytes | None = None,
        cookie: str | None = None, timeout: float = 30,
    ) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
        """One HTTPS request to the front's route of `environment`, as the fleet's user."""
        context = ssl.create_default_context(cafile=str(self.ca()))
        port = ENVIRONMENT_PORTS[environment]
        connection = http.client.HTTPSConnection(self.front.address, port, timeout=timeout, context=context)
        headers = {"Authorization": "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()}
        if cookie:
            headers["Cookie"] = cookie
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()


@dataclass
class Run:
    returncode: int
    log: str
    seconds: float
    saved: Path
    summary_file: Path

    def summary(self) -> dict[str, Any] | None:
        """The fleet summary's JSON (COMFYBAKE_FLEET_SUMMARY), when the playbook wrote one."""
        return json.loads(self.summary_file.read_text()) if self.summary_file.exists() else None

    def recap(self) -> dict[str, dict[str, int]]:
        """PLAY RECAP: host -> {ok, changed, unreachable, failed, ...}."""
        found: dict[str, dict[str, int]] = {}
        lines = self.log.splitlines()
        for index, line in enumerate(lines):
            if line.startswith("PLAY RECAP"):
                for row in lines[index + 1 :]:
                    if " : " not in row:
                        break
                    host, _, counts = row.partition(" : ")
                    found[host.strip()] = {k: int(v) for k, v in (pair.split("=") for pair in counts.split())}
        return found


def instance_url(host: Host, port: int, path: str) -> str:
    return f"http://{host.address}:{port}{path}"


def http_json(url: str, body: Any = None, timeout: float = 10) -> Any:
    """GET (or POST `body` as JSON) an instance directly, as an allowed client."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data else {}
    request = urllib.request.Request(url, data=data, headers=headers)  # noqa: S310 - http:// on the test network
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - the same
        return json.loads(response.read() or b"null")


@contextlib.contextmanager
def fleet(folder: Path) -> Iterator[Fleet]:
    """The whole fleet (HOSTS and the front) started, its inventory written; removed on leaving
    unless COMFYBAKE_FLEET_KEEP=1 (to look at it after a failure)."""
    image()
    key = keypair(folder / "ssh")
    fx = fixtures(folder / "fixtures")
    subnet, gateway = network()
    names = [name for name, _, _ in HOSTS]
    try:
        # The front reloads Caddy at each pool change: the kernel hands connections queued on the
        # old listening socket to the new one (docs/gateway.md, "Reloads under load").
        front_options = {FRONT: ["--sysctl", "net.ipv4.tcp_migrate_req=1"]}
        started = start([*names, FRONT], NETWORK, fx, key, options=front_options)
        the_fleet = Fleet(
            hosts={name: started[name] for name in names}, front=started[FRONT], folder=folder, key=key,
            fixtures=fx, subnet=subnet, gateway_address=gateway,
        )  # fmt: skip
        the_fleet.write_inventory()
        yield the_fleet
    finally:
        if os.environ.get("COMFYBAKE_FLEET_KEEP") != "1":
            stop([*names, FRONT])
            remove_network()
