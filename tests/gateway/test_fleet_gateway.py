"""A front's gateway as clients meet it while members leave and return: real Caddy on loopback,
configured by the real modules (comfybake.core.gateway with `fleet`, comfybake.core.gateway_pool)
run by ansible-playbook and by the real command `comfybake gateway pool`, in front of three real
test doubles. Each double stands for a member on its own host (all on 127.0.0.1, on different
ports: the upstream HOST:PORT is what tells them apart, as on a real fleet).

While each pool state changes, a poller opens new sessions on the environment's URL all along:
it must see no error (Caddy's reload is graceful).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from harness.double import Double
from harness.gateway import Gateway, basic, copy_double, free_ports, start_caddy, start_double
from harness.tools import ROOT, venv_bin

from comfybake.engine.gateway import apply
from comfybake.engine.gateway import front as pool_front
from comfybake.engine.gateway.errors import GatewayError

PASSWORD = "canary-fleet-3b9d1e"
AUTH = basic("alice", PASSWORD)
MEMBERS = ("gpu-a-1", "gpu-a-2", "gpu-b-1")


@dataclass
class Front:
    gateway: Gateway
    doubles: dict[str, Double]  # member -> its one instance
    port: int  # environment e's route
    config_root: Path
    scratch: Path
    module_args: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def pool_file(self) -> Path:
        return self.config_root / "gateway" / "pool.json"

    def states(self) -> dict[str, str]:
        return dict(json.loads(self.pool_file.read_text())["members"])

    def visit(self, cookie: str | None = None) -> tuple[int, str, str]:
        """(status, the member that answered or the body, the affinity cookie it set)."""
        headers = {**AUTH, **({"Cookie": cookie} if cookie else {})}
        response = self.gateway.request(self.port, "/system_stats", headers=headers)
        if response.status != 200:
            return response.status, response.text, ""
        argv = json.loads(response.body)["system"]["argv"]
        port = int(argv[argv.index("--port") + 1])
        served = next(name for name, double in self.doubles.items() if double.port == port)
        return 200, served, response.headers.get("set-cookie", "").split(";")[0]

    def cli(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "comfybake", "gateway", "--config-root", str(self.config_root),
                               *argv], capture_output=True, text=True, timeout=120, env=self.env)  # fmt: skip

    def playbook(self, name: str, tasks: list[dict[str, Any]], check: bool = False) -> dict[str, Any]:
        """Run `tasks` on localhost; each task registers `r<index>`, written to a JSON file."""
        tasks = [{**task, "register": f"r{index}"} for index, task in enumerate(tasks)]
        tasks.append({"name": "Keep the results", "ansible.builtin.copy": {
            "content": "{{ {" + ", ".join(f"'r{i}': r{i}" for i in range(len(tasks))) + "} | to_json }}",
            "dest": str(self.scratch / f"{name}.json")}, "check_mode": False})  # fmt: skip
        play = [{"hosts": "localhost", "gather_facts": False, "tasks": tasks}]
        (self.scratch / f"{name}.yml").write_text(json.dumps(play))
        argv = [venv_bin("ansible-playbook"), "-i", "localhost,", "-c", "local", "--diff",
                "-e", f"ansible_python_interpreter={sys.executable}", str(self.scratch / f"{name}.yml")]  # fmt: skip
        done = subprocess.run([*argv, *(["--check"] if check else [])], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
        results: dict[str, Any] = json.loads((self.scratch / f"{name}.json").read_text())
        results["stdout"] = done.stdout
        return results

    def converge(self) -> dict[str, Any]:
        """What the comfyui_gateway role's fleet mode runs: the gateway module with every member."""
        return self.playbook("converge", [{"comfybake.core.gateway": self.module_args}])["r0"]

    def pool_task(self, **args: Any) -> dict[str, Any]:
        return {"comfybake.core.gateway_pool": {"config_dir": str(self.config_root / "gateway"), "group": "", **args}}


def ansible_environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_FORCE_COLOR="0", ANSIBLE_NOCOLOR="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")  # fmt: skip
    return env


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    scratch = tmp_path_factory.mktemp("fleet")
    code = copy_double(scratch)
    doubles = {name: start_double(code, scratch / "state", name) for name in MEMBERS}
    config_root = scratch / "etc"
    storage, admin = scratch / "storage", scratch / "run" / "admin.sock"
    for folder in (config_root, config_root / "gateway", storage, admin.parent):
        folder.mkdir(mode=0o750)
    port = free_ports(1)[0]
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()  # cheap rounds: a test
    module_args = {
        "fleet_mode": True,
        "fleet": [
            {
                "name": name,
                "address": "127.0.0.1",
                "instances": [
                    {"name": "a", "environment": "e", "port": double.port, "url": f"http://127.0.0.1:{double.port}"}
                ],
            }
            for name, double in doubles.items()
        ],
        "settings": {
            "mode": "ports",
            "port": port,
            "names": ["localhost", "127.0.0.1"],
            "listen": ["127.0.0.1"],
            "storage": str(storage),
            "admin_socket": str(admin),
            "health_interval": "1s",
            "metrics": None,
        },
        "users": [{"name": "alice", "scope": ["environment:e"], "password_hash": hashed}],
        "config_dir": str(config_root / "gateway"),
        "group": "",
    }
    front = Front(None, doubles, port, config_root, scratch, module_args, ansible_environment())  # type: ignore[arg-type]
    first = front.converge()
    assert first["changed"], first
    assert first["routes"]["instances"] == []  # a front: no route per instance
    assert front.states() == dict.fromkeys(MEMBERS, "serving")
    front.gateway = start_caddy(config_root / "gateway" / "caddy.json", storage, admin, scratch / "logs", [port])
    assert front.converge()["changed_files"] == [str(config_root / "gateway" / "ca.crt")]  # the CA it just made
    try:
        yield front
    finally:
        front.gateway.stop()
        for double in doubles.values():
            double.stop()


class Poller:
    """New sessions on the environment's URL, one after another, until stopped: every answer that
    is not a 200 is kept."""

    def __init__(self, front: Front) -> None:
        self.front, self.errors, self.count = front, [], 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                status, what, _cookie = self.front.visit()
            except OSError as error:  # a refused or reset connection
                status, what = 0, repr(error)
            self.count += 1
            if status != 200:
                self.errors.append((status, what))

    def __enter__(self) -> Poller:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)


def cookie_of(front: Front, member: str) -> str:
    """An affinity cookie naming `member`'s instance (new sessions until one lands there)."""
    for _ in range(60):
        status, served, cookie = front.visit()
        assert status == 200, served
        if served == member:
            return cookie
    pytest.fail(f"no new session reached {member} in 60 tries")


def served(front: Front, count: int, cookie: str | None = None) -> set[str]:
    answers = [front.visit(cookie) for _ in range(count)]
    assert all(status == 200 for status, _, _ in answers), answers
    return {member for _, member, _ in answers}


def requests_seen(double: Double) -> int:
    return double.output().count("request GET ")


@pytest.fixture(autouse=True)
def every_member_serving(front: Front) -> None:
    """Each test starts from every member serving, whatever ran before."""
    paths = apply.Paths(str(front.config_root / "gateway"), group="")
    apply_states(paths, dict.fromkeys(MEMBERS, "serving"))


def apply_states(paths: apply.Paths, states: dict[str, str]) -> None:
    for state in set(states.values()):
        pool_front.change(paths, [m for m, s in states.items() if s == state], state)


def test_new_sessions_spread_over_serving_members(front: Front) -> None:
    assert served(front, 30) == set(MEMBERS)


def test_a_draining_member_keeps_its_sessions_and_gets_no_new_one(front: Front) -> None:
    cookie = cookie_of(front, "gpu-a-1")
    with Poller(front) as poller:
        done = front.cli("pool", "gpu-a-1", "--state", "draining")
        assert done.returncode == 0, done.stderr
        assert "gpu-a-1: serving -> draining, applied" in done.stderr
        assert served(front, 20) == {"gpu-a-2", "gpu-b-1"}  # still polling meanwhile
    assert poller.count > 20 and poller.errors == [], poller.errors
    assert served(front, 6, cookie) == {"gpu-a-1"}  # its client still reaches it
    listed = front.cli("pool", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {m["member"]: m["state"] for m in json.loads(listed.stdout)["members"]} == {
        "gpu-a-1": "draining", "gpu-a-2": "serving", "gpu-b-1": "serving"}  # fmt: skip


def test_the_module_in_check_mode_changes_nothing_and_unknown_members_fail(front: Front) -> None:
    apply_states(apply.Paths(str(front.config_root / "gateway"), group=""), {"gpu-a-1": "draining"})
    before_pool, before_config = front.pool_file.read_text(), (front.config_root / "gateway" / "caddy.json").read_text()
    results = front.playbook("check", [
        front.pool_task(member="gpu-a-2", state="out"),
        {**front.pool_task(member="gpu-z-9", state="out"), "ignore_errors": True},
        {**front.pool_task(members=["gpu-a-1"], state="draining")},
    ], check=True)  # fmt: skip
    assert results["r0"]["changed"] and results["r0"]["previous"] == {"gpu-a-2": "serving"}
    assert results["r0"]["states"]["gpu-a-2"] == "out"  # as it would be
    assert results["r0"]["diff"] == {"before": "gpu-a-2: serving\n", "after": "gpu-a-2: out\n"}
    assert results["r1"]["failed"]
    assert "'gpu-z-9' is not a member of this front; its members: gpu-a-1, gpu-a-2, gpu-b-1" in results["r1"]["msg"]
    assert not results["r2"]["changed"]  # already draining
    assert front.pool_file.read_text() == before_pool
    assert (front.config_root / "gateway" / "caddy.json").read_text() == before_config
    unknown = front.cli("pool", "gpu-z-9", "--state", "out")
    assert unknown.returncode == 2 and "'gpu-z-9' is not a member of this front" in unknown.stderr


def test_an_out_member_gets_nothing_and_a_converge_keeps_its_state(front: Front) -> None:
    apply_states(apply.Paths(str(front.config_root / "gateway"), group=""), {"gpu-a-1": "draining"})
    cookie = cookie_of(front, "gpu-a-2")
    out_cookie = "comfybake_e=127.0.0.1:{}".format(front.doubles["gpu-a-1"].port)  # draining gpu-a-1's
    with Poller(front) as poller:
        results = front.playbook("out", [front.pool_task(member="gpu-a-1", state="out")])
    assert poller.count > 0 and poller.errors == [], poller.errors
    assert results["r0"]["changed"] and results["r0"]["previous"] == {"gpu-a-1": "draining"}
    assert results["r0"]["upstreams"] == {"gpu-a-1": [f"127.0.0.1:{front.doubles['gpu-a-1'].port}"]}
    assert "-gpu-a-1: draining" in results["stdout"] and "+gpu-a-1: out" in results["stdout"]  # the diff
    seen = requests_seen(front.doubles["gpu-a-1"])
    assert served(front, 20) == {"gpu-a-2", "gpu-b-1"}
    assert served(front, 6, out_cookie) <= {"gpu-a-2", "gpu-b-1"}  # its client lands on a serving member
    assert served(front, 4, cookie) == {"gpu-a-2"}
    assert requests_seen(front.doubles["gpu-a-1"]) == seen  # nothing reached it, no health check either

    again = front.converge()  # the role's converge: nothing to change, and gpu-a-1 stays out
    assert not again["changed"], again["changed_files"]
    assert again["pool"] == front.states() == {"gpu-a-1": "out", "gpu-a-2": "serving", "gpu-b-1": "serving"}


def test_without_a_serving_member_new_sessions_get_503_and_draining_ones_still_work(front: Front) -> None:
    apply_states(apply.Paths(str(front.config_root / "gateway"), group=""), {"gpu-a-1": "out"})
    cookie = cookie_of(front, "gpu-b-1")
    for member in ("gpu-a-2", "gpu-b-1"):
        assert front.cli("pool", member, "--state", "draining").returncode == 0
    try:
        status, body, _ = front.visit()
        assert status == 503 and "environment e has no serving instance" in body, (status, body)
        assert served(front, 4, cookie) == {"gpu-b-1"}
    finally:
        for member in ("gpu-a-2", "gpu-b-1"):
            assert front.cli("pool", member, "--state", "serving").returncode == 0


def test_a_member_back_to_serving_gets_new_sessions_again(front: Front) -> None:
    apply_states(apply.Paths(str(front.config_root / "gateway"), group=""), {"gpu-a-1": "out"})
    with Poller(front) as poller:
        done = front.cli("pool", "gpu-a-1", "--state", "serving")
        assert done.returncode == 0, done.stderr
        assert "gpu-a-1: out -> serving, applied" in done.stderr
        assert "gpu-a-1" in served(front, 30)
    assert poller.errors == [], poller.errors
    status = front.cli("status", "--json")
    report = json.loads(status.stdout)
    assert report["members"] == dict.fromkeys(MEMBERS, "serving")
    pooled = {item["member"]: item["pool"] for row in report["routes"] for item in row["upstreams"]}
    assert pooled == dict.fromkeys(MEMBERS, "serving"), report
    assert status.returncode == 0, status.stdout


def test_a_slow_request_held_open_across_pool_changes_completes(front: Front) -> None:
    """A request still under way (here an upload that comes slowly) when the pool changes ends
    well: Caddy's graceful reload lets it finish on the old configuration."""
    cookie = cookie_of(front, "gpu-b-1")
    body = b'{"delete": []' + b" " * 4096 + b"}"
    connection = http.client.HTTPSConnection("127.0.0.1", front.port, timeout=60)
    connection.sock = front.gateway.context().wrap_socket(
        socket.create_connection(("127.0.0.1", front.port), timeout=60), server_hostname="localhost"
    )
    try:
        connection.putrequest("POST", "/api/history", skip_host=True, skip_accept_encoding=True)
        for name, value in {"Host": f"localhost:{front.port}", "Cookie": cookie, "Content-Length": str(len(body)),
                            "Content-Type": "application/json", **AUTH}.items():  # fmt: skip
            connection.putheader(name, value)
        connection.endheaders()
        connection.send(body[:10])
        for state in ("draining", "out", "serving"):  # three reloads while it is under way
            done = front.cli("pool", "gpu-a-1", "--state", state)
            assert done.returncode == 0, done.stderr
            connection.send(body[10 + 1000 * ("draining", "out", "serving").index(state) :][:1000])
            time.sleep(0.5)
        connection.send(body[3010:])
        response = connection.getresponse()
        assert response.status == 200, (response.status, response.read())
        response.read()
    finally:
        connection.close()


def test_a_refused_configuration_leaves_pool_json_as_it_was(front: Front) -> None:
    refusing = apply.Paths(str(front.config_root / "gateway"), caddy="/bin/false", group="")
    before = front.pool_file.read_text()
    with pytest.raises(GatewayError, match="Caddy refused the new gateway configuration"):
        pool_front.change(refusing, ["gpu-a-1"], "out")
    assert front.pool_file.read_text() == before
    # Where there was no pool.json (its members all served), there is none after a refusal.
    kept = front.pool_file.with_suffix(".kept")
    front.pool_file.rename(kept)
    try:
        with pytest.raises(GatewayError, match="Caddy refused the new gateway configuration"):
            pool_front.change(refusing, ["gpu-a-1"], "out")
        assert not front.pool_file.exists()
    finally:
        kept.rename(front.pool_file)


def test_a_lost_pool_json_means_every_member_serving(front: Front) -> None:
    """The members come from gateway.json's routes; without pool.json each serves, as the
    configuration rendered from them says."""
    kept = front.pool_file.with_suffix(".kept")
    front.pool_file.rename(kept)
    try:
        listed = front.cli("pool", "--json")
        assert listed.returncode == 0, listed.stderr
        assert {m["member"]: m["state"] for m in json.loads(listed.stdout)["members"]} == dict.fromkeys(
            MEMBERS, "serving"
        )
        status = front.cli("status", "--json")
        assert json.loads(status.stdout)["members"] == dict.fromkeys(MEMBERS, "serving"), status.stdout
    finally:
        kept.rename(front.pool_file)


def test_instance_scopes_are_refused_on_a_front(front: Front) -> None:
    user = ("users", "add", "carol", "--generate", "--scope", "environment:e", "--scope", "instance:a")
    for argv in (("keys", "create", "ci", "--scope", "instance:a"), user):
        done = front.cli(*argv)
        assert done.returncode == 2, (done.stdout, done.stderr)
        assert "scope instance:a reaches nothing on this gateway: it is a front" in done.stderr, done.stderr
    names = [item["name"] for item in json.loads(front.cli("keys", "list", "--json").stdout)["keys"]]
    assert "ci" not in names


def test_the_module_keeps_a_front_a_front(front: Front) -> None:
    """A run with fleet_mode but no member records (their reads skipped), or without fleet_mode
    on a front, fails and leaves the front as it serves."""
    config = (front.config_root / "gateway" / "caddy.json").read_text()
    no_members = {**front.module_args, "fleet": []}
    own = {**front.module_args, "fleet": [], "fleet_mode": False}
    results = front.playbook("keep", [
        {"comfybake.core.gateway": no_members, "ignore_errors": True},
        {"comfybake.core.gateway": own, "ignore_errors": True},
    ])  # fmt: skip
    assert results["r0"]["failed"] and "fleet_mode is on but no member's records were given" in results["r0"]["msg"]
    assert results["r1"]["failed"] and "says this gateway is a front" in results["r1"]["msg"]
    assert "comfyui_gateway_leave_fleet" in results["r1"]["msg"]
    assert (front.config_root / "gateway" / "caddy.json").read_text() == config
    assert front.states() == dict.fromkeys(MEMBERS, "serving")
