"""`comfybake gateway users|keys|status`: the real command, real bcrypt, real files, and Caddy
(/usr/bin/caddy) validating every configuration; one test runs the gateway itself."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pty
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from comfybake import cli
from comfybake.engine.gateway import apply, caddy, credentials, routes

CADDY = "/usr/bin/caddy"
PASSWORD = "canary-Pa55word-gw"  # must never reach a file


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class SystemStats(BaseHTTPRequestHandler):
    """The one endpoint of ComfyUI that the status and the gateway's health checks ask."""

    def do_GET(self) -> None:
        body = json.dumps({"system": {"comfyui_version": "test"}, "devices": []}).encode()
        self.send_response(200 if self.path == "/system_stats" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
        pass


@dataclass
class Host:
    config_root: Path
    gateway: Path
    run_dir: Path
    port: int  # the gateway's one port (paths mode)
    live: str  # instance a's upstream, which answers
    dead: str  # instance b's, where nothing listens
    capsys: pytest.CaptureFixture[str]
    monkeypatch: pytest.MonkeyPatch

    def run(self, *argv: str, stdin: str = "") -> tuple[int, str, str]:
        self.capsys.readouterr()
        self.monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = cli.main(["gateway", "--config-root", str(self.config_root), *argv])
        out, err = self.capsys.readouterr()
        return code, out, err

    @property
    def credentials(self) -> Path:
        return self.gateway / "credentials.json"

    def stored(self) -> list[credentials.Principal]:
        return credentials.load(str(self.credentials))

    def accounts(self) -> set[str]:
        """User names of every http_basic handler of caddy.json."""
        found: set[str] = set()

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                if node.get("handler") == "authentication":
                    for account in node["providers"]["http_basic"]["accounts"]:
                        found.add(account["username"])
                for value in node.values():
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk(json.loads((self.gateway / "caddy.json").read_text()))
        return found

    def files_hold(self, secret: str) -> list[str]:
        """Every file under the configuration root and the gateway's run folder holding `secret`."""
        holders = []
        for top in (self.config_root, self.run_dir):
            for path in top.rglob("*"):
                if path.is_file() and not path.is_symlink() and secret.encode() in path.read_bytes():
                    holders.append(str(path))
        return holders


@pytest.fixture
def upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), SystemStats)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def host(
    tmp_path: Path, upstream: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Host]:
    """A host as the comfyui_gateway role leaves it: gateway.json (paths mode, one free port), no
    users yet. The admin socket lives in a short folder (a unix socket path has 108 bytes)."""
    run_dir = Path(tempfile.mkdtemp(prefix="gw-", dir="/tmp"))
    gateway = tmp_path / "etc" / "gateway"
    gateway.mkdir(parents=True)
    gateway.chmod(0o750)
    port = free_port()
    dead = f"127.0.0.1:{free_port()}"
    records = [
        {"name": "a", "environment": "main", "port": int(upstream.rsplit(":", 1)[1]), "url": f"http://{upstream}"},
        {"name": "b", "environment": "main", "port": int(dead.rsplit(":", 1)[1]), "url": f"http://{dead}"},
    ]
    settings = caddy.normalize(
        {
            "mode": "paths",
            "port": port,
            "names": ["localhost"],
            "listen": ["127.0.0.1"],
            "storage": str(run_dir / "storage"),
            "admin_socket": str(run_dir / "admin.sock"),
            "health_interval": "1s",
        }
    )
    apply.save_inputs(apply.Paths(str(gateway), group=""), routes.public_routes(records, settings), settings)
    yield Host(tmp_path / "etc", gateway, run_dir, port, upstream, dead, capsys, monkeypatch)
    shutil.rmtree(run_dir, ignore_errors=True)


def test_users_add_hashes_the_password_and_applies_it(host: Host) -> None:
    code, out, err = host.run(
        "users", "add", "alice", "--scope", "environment:main", "--password-stdin", stdin=PASSWORD + "\n"
    )
    assert (code, out) == (0, ""), err
    assert "added user alice (scope environment:main)" in err
    [alice] = host.stored()
    assert (alice.name, alice.kind, alice.scope, alice.source) == ("alice", "user", ["environment:main"], "cli")
    assert credentials.verify(PASSWORD, alice.hash)
    assert stat.S_IMODE(host.credentials.stat().st_mode) == 0o600
    assert host.accounts() == {"alice"}  # caddy.json rendered again, validated by Caddy, swapped in
    code, out, err = host.run("users", "list")
    assert code == 0 and "alice" in out and "environment:main" in out and "cli" in out
    assert "$2" not in out
    code, out, _err = host.run("users", "list", "--json")
    assert json.loads(out)["users"][0]["name"] == "alice" and "hash" not in json.loads(out)["users"][0]
    assert host.files_hold(PASSWORD) == []


def test_a_generated_password_is_printed_once_on_stdout(host: Host) -> None:
    code, out, err = host.run("users", "add", "bob", "--scope", "instance:a", "--generate")
    assert code == 0, err
    password = out.strip()
    assert out == password + "\n" and len(password) >= 20
    assert credentials.verify(password, host.stored()[0].hash)
    assert host.files_hold(password) == []
    assert password not in host.run("users", "list")[1]


def test_keys_create_prints_the_key_once_and_only_the_key(host: Host) -> None:
    code, out, err = host.run("keys", "create", "ci", "--scope", "instance:a", "--scope", "instance:b")
    assert code == 0, err
    token = out.strip()
    assert out == token + "\n"  # nothing else on stdout: `KEY=$(comfybake gateway keys create ...)` works
    assert "only this once" in err and "Authorization: Bearer" in err and token not in err
    name, secret = credentials.split_key(token)
    [key] = host.stored()
    assert (name, key.kind, key.scope) == ("ci", "key", ["instance:a", "instance:b"])
    assert credentials.verify(secret, key.hash)
    assert host.accounts() == {"ci"}
    for listing in (host.run("keys", "list"), host.run("keys", "list", "--json")):
        assert listing[0] == 0 and "ci" in listing[1]
        assert token not in listing[1] and secret not in listing[1] and key.hash not in listing[1]
    assert host.files_hold(token) == [] and host.files_hold(secret) == []
    code, _out, err = host.run("keys", "revoke", "ci")
    assert code == 0 and "revoked key ci" in err
    assert host.stored() == [] and host.accounts() == set()


def test_inventory_entries_are_changed_in_the_inventory(host: Host) -> None:
    declared = [
        credentials.Principal("ops", "user", credentials.hash_secret(PASSWORD, rounds=4), ["*"], "inventory", "x"),
        credentials.Principal("bot", "key", credentials.new_key("bot")[1], ["*"], "inventory", "x"),
    ]
    credentials.save(str(host.credentials), declared)
    before = host.credentials.read_bytes()
    code, _out, err = host.run("users", "remove", "ops")
    assert code == 2 and "declared in the inventory (comfyui_gateway_users)" in err
    code, _out, err = host.run("keys", "revoke", "bot")
    assert code == 2 and "declared in the inventory (comfyui_gateway_keys)" in err
    code, _out, err = host.run("users", "remove", "bot")
    assert code == 2 and "bot is a key, not a user: use `comfybake gateway keys revoke bot`" in err
    code, _out, err = host.run("keys", "create", "ops", "--scope", "*")
    assert code == 2 and "the name ops is taken by a user" in err and "comfyui_gateway_users" in err
    code, _out, err = host.run("keys", "revoke", "nobody")
    assert code == 2 and "no key named nobody (keys: bot)" in err
    assert host.credentials.read_bytes() == before
    code, out, _err = host.run("users", "list")
    assert "inventory" in out


@pytest.mark.parametrize(
    ("argv", "stdin", "message"),
    [
        (["users", "add", "Alice", "--scope", "*", "--generate"], "", "user or key name 'Alice' is invalid"),
        (["users", "add", "al", "--scope", "everything", "--generate"], "", "scope 'everything' is invalid"),
        (["users", "add", "al", "--scope", "*", "--password-stdin"], "short\n", "the password is 5 characters long"),
        (
            ["users", "add", "al", "--scope", "*"],
            "",
            "no terminal to ask for the password on: pass it with --password-stdin",
        ),
        (["keys", "create", "a:b", "--scope", "*"], "", "user or key name 'a:b' is invalid"),
    ],
)
def test_wrong_input_changes_nothing_and_says_why(host: Host, argv: list[str], stdin: str, message: str) -> None:
    code, out, err = host.run(*argv, stdin=stdin)
    assert (code, out) == (2, "")
    assert err.startswith("comfybake gateway: ") and message in err
    assert not host.credentials.exists() and not (host.gateway / "caddy.json").exists()


def test_a_configuration_caddy_refuses_puts_the_credentials_back(host: Host) -> None:
    assert host.run("users", "add", "alice", "--scope", "*", "--password-stdin", stdin=PASSWORD)[0] == 0
    before = host.credentials.read_bytes()
    config = (host.gateway / "caddy.json").read_bytes()
    inputs = json.loads((host.gateway / "gateway.json").read_text())
    inputs["settings"]["tls"] = {"mode": "files", "cert_file": "/nonexistent.crt", "key_file": "/nonexistent.key"}
    (host.gateway / "gateway.json").write_text(json.dumps(inputs))
    code, out, err = host.run("keys", "create", "ci", "--scope", "*")
    assert (code, out) == (2, "")  # no key printed: it was never made
    assert "Caddy refused the new gateway configuration" in err and "nothing was changed" in err
    assert host.credentials.read_bytes() == before
    assert (host.gateway / "caddy.json").read_bytes() == config


def test_a_gateway_json_not_as_the_role_writes_it_puts_the_credentials_back(host: Host) -> None:
    assert host.run("users", "add", "alice", "--scope", "*", "--password-stdin", stdin=PASSWORD)[0] == 0
    before = host.credentials.read_bytes()
    (host.gateway / "gateway.json").write_text(json.dumps({"format": 1, "routes": {}}))
    code, out, err = host.run("users", "remove", "alice")
    assert (code, out) == (2, "")
    assert "cannot render the gateway's configuration from" in err and "(KeyError: 'settings')" in err
    assert "nothing was changed" in err and host.credentials.read_bytes() == before


def test_without_the_gateway_set_up_nothing_is_written(host: Host) -> None:
    (host.gateway / "gateway.json").unlink()
    code, _out, err = host.run("keys", "create", "ci", "--scope", "*")
    assert code == 2 and "gateway.json does not exist: converge the host with the comfyui_gateway role first" in err
    assert not host.credentials.exists()
    assert host.run("status")[0] == 2


def test_pool_states_belong_to_a_front(host: Host) -> None:
    """A host's own gateway has no members: `pool` says so and writes nothing."""
    for argv in (["pool"], ["pool", "gpu-a-1", "--state", "out"]):
        code, _out, err = host.run(*argv)
        assert code == 2 and "is a host's own, not a front" in err, (argv, err)
    code, _out, err = host.run("pool", "gpu-a-1")
    assert code == 2 and "give MEMBER and --state together" in err
    assert not (host.gateway / "pool.json").exists()


def test_changes_need_root(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    # The one thing not real here: this machine runs the tests as root, and no other account
    # can run the project's interpreter.
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    for argv in (["users", "add", "al", "--scope", "*", "--generate"], ["keys", "list"], ["keys", "revoke", "x"]):
        code, _out, err = host.run(*argv)
        assert code == 2 and "run it as root" in err, argv


def test_status_without_a_running_gateway(host: Host) -> None:
    code, out, _err = host.run("status")
    assert code == 1
    assert f"gateway: not running (nothing answers on its admin socket {host.run_dir}/admin.sock)" in out
    assert f"https://localhost:{host.port}/instances/a/" in out
    assert f"https://localhost:{host.port}/environments/main/" in out
    lines = {line.split()[3]: line for line in out.splitlines()[2:] if line.split()[0] == "instance"}
    assert " ok " in lines[host.live] and "down (" in lines[host.dead]
    report = json.loads(host.run("status", "--json")[1])
    assert report["gateway"].startswith("not running")
    environment = next(row for row in report["routes"] if row["kind"] == "environment")
    assert [(item["address"], item["direct"][:4]) for item in environment["upstreams"]] == [
        (host.live, "ok"),
        (host.dead, "down"),
    ]


@contextlib.contextmanager
def gateway(host: Host) -> Iterator[subprocess.Popen[bytes]]:
    """Caddy serving caddy.json, as the unit runs it, until its admin socket answers."""
    process = subprocess.Popen(
        [CADDY, "run", "--config", str(host.gateway / "caddy.json")],
        stdout=subprocess.DEVNULL,
        stderr=(host.run_dir / "caddy.log").open("wb"),
    )
    try:
        deadline = time.monotonic() + 30
        while apply.admin(str(host.run_dir / "admin.sock"), "GET", "/config/") is None:
            assert process.poll() is None, (host.run_dir / "caddy.log").read_text()
            assert time.monotonic() < deadline, "the gateway did not start in 30 s"
            time.sleep(0.2)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=30)


def get(host: Host, path: str, key: str) -> int:
    """The status of an HTTPS request through the gateway, the CA it made trusted."""
    context = ssl.create_default_context(cafile=str(host.run_dir / "storage/pki/authorities/local/root.crt"))
    request = urllib.request.Request(f"https://localhost:{host.port}{path}", headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, context=context, timeout=60) as response:  # noqa: S310 - https, our URL
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def test_a_running_gateway_takes_each_change_and_reports_its_upstreams(host: Host) -> None:
    code, out, _err = host.run("keys", "create", "first", "--scope", "instance:a")
    assert code == 0
    first = out.strip()
    with gateway(host):
        assert get(host, "/instances/a/system_stats", first) == 200
        assert get(host, "/instances/b/system_stats", first) == 401  # outside its scope
        code, out, err = host.run("keys", "create", "second", "--scope", "environment:main")
        assert code == 0, err
        second = out.strip()
        assert get(host, "/instances/a/system_stats", second) == 200  # loaded without a restart
        assert host.run("keys", "revoke", "first")[0] == 0
        assert get(host, "/instances/a/system_stats", first) == 401
        code, out, _err = host.run("status")
        assert out.startswith("gateway: running\n")
        lines = {line.split()[3]: line for line in out.splitlines()[2:] if line.split()[0] == "instance"}
        assert " ok " in lines[host.live] and "active, 0 fails" in lines[host.live]
        assert code == 1  # instance b does not answer
        report = json.loads(host.run("status", "--json")[1])
        assert report["gateway"] == "running"
        instance_a = next(row for row in report["routes"] if row["name"] == "a")
        assert instance_a["upstreams"][0]["gateway"] == {"requests": 0, "fails": 0}
    assert host.files_hold(first) == [] and host.files_hold(second) == []
    assert host.run("status")[1].startswith("gateway: not running")


def converse(host: Host, argv: list[str], answers: list[str]) -> tuple[int, str]:
    """Run the command on a terminal (a pty), typing each answer after a password prompt."""
    pid, terminal = pty.fork()
    if pid == 0:  # the child: the command, with the pty as its controlling terminal
        os.environ["PYTHONPATH"] = str(Path(cli.__file__).parents[1])
        os.execv(  # noqa: S606 - the command itself, no shell
            sys.executable,
            [sys.executable, "-m", "comfybake", "gateway", "--config-root", str(host.config_root), *argv],
        )
    seen = b""
    typed = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            chunk = os.read(terminal, 4096)
        except OSError:  # the child exited and closed the terminal
            break
        if not chunk:
            break
        seen += chunk
        if typed < len(answers) and seen.count(b"password") > typed and seen.rstrip().endswith(b":"):
            os.write(terminal, answers[typed].encode() + b"\n")
            typed += 1
    os.close(terminal)
    _pid, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), seen.decode(errors="replace")


def test_users_add_asks_for_the_password_twice_on_a_terminal(host: Host) -> None:
    code, seen = converse(host, ["users", "add", "typist", "--scope", "*"], [PASSWORD, PASSWORD + "x"])
    assert code == 2 and "the two passwords differ; nothing was changed" in seen
    assert not host.credentials.exists()
    code, seen = converse(host, ["users", "add", "typist", "--scope", "*"], [PASSWORD, PASSWORD])
    assert code == 0, seen
    assert "password for typist: " in seen and "the same password again: " in seen
    assert PASSWORD not in seen  # not echoed
    assert credentials.verify(PASSWORD, host.stored()[0].hash)
    assert host.files_hold(PASSWORD) == []


@pytest.mark.parametrize("argv", [["users", "add"], ["users", "remove"], ["keys", "create"], ["keys", "revoke"]])
def test_each_change_names_its_exit_codes(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["gateway", *argv, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "exit status:\n  0  " in text and "\n  2  " in text and "nothing was changed" in text


def test_replace_gives_a_user_a_new_password_and_a_key_a_new_secret(host: Host) -> None:
    assert host.run("users", "add", "alice", "--scope", "*", "--password-stdin", stdin=PASSWORD)[0] == 0
    code, _out, err = host.run("users", "add", "alice", "--scope", "*", "--password-stdin", stdin=PASSWORD + "2")
    assert code == 2 and "the user alice exists: give --replace to replace it" in err
    argv = ["users", "add", "alice", "--scope", "instance:a", "--password-stdin", "--replace"]
    code, _out, err = host.run(*argv, stdin=PASSWORD + "2")
    assert code == 0 and "replaced user alice (scope instance:a)" in err
    [alice] = host.stored()
    assert credentials.verify(PASSWORD + "2", alice.hash) and not credentials.verify(PASSWORD, alice.hash)
    old = host.run("keys", "create", "ci", "--scope", "*")[1].strip()
    code, out, err = host.run("keys", "create", "ci", "--scope", "*", "--replace")
    assert code == 0, err
    new = out.strip()
    key = next(item for item in host.stored() if item.name == "ci")
    assert credentials.verify(credentials.split_key(new)[1], key.hash)
    assert not credentials.verify(credentials.split_key(old)[1], key.hash)
    code, _out, err = host.run("keys", "create", "alice", "--scope", "*", "--replace")
    assert code == 2 and "the name alice is taken by a user" in err  # --replace replaces its own kind only


def test_a_change_waits_for_the_gateway_lock(host: Host) -> None:
    # A converge (the module) or another command holds it: this one waits, then adds to what is there.
    environment = {**os.environ, "PYTHONPATH": str(Path(cli.__file__).parents[1])}
    argv = [sys.executable, "-m", "comfybake", "gateway", "--config-root", str(host.config_root)]
    with credentials.locked(str(host.gateway)):
        waiting = subprocess.Popen(
            [*argv, "keys", "create", "late", "--scope", "*"], env=environment, stdout=subprocess.PIPE
        )
        time.sleep(3)
        assert waiting.poll() is None
        credentials.save(
            str(host.credentials), [credentials.Principal("early", "key", credentials.new_key("early")[1], ["*"])]
        )
    out, _err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0
    assert [item.name for item in host.stored()] == ["early", "late"]
    assert credentials.split_key(out.decode().strip())[0] == "late"


def test_refresh_applies_a_credentials_file_put_there_from_outside(host: Host) -> None:
    # What a container's entrypoint does with the secret comfybake_gateway: install the file,
    # then have the configuration rendered again from it.
    assert host.run("users", "add", "alice", "--scope", "*", "--password-stdin", stdin=PASSWORD + "\n")[0] == 0
    bob = credentials.Principal("bob", "user", credentials.hash_secret(PASSWORD), ["instance:a"])
    credentials.save(str(host.credentials), [bob])
    assert host.accounts() == {"alice"}  # caddy.json still serves the old users
    code, out, err = host.run("refresh")
    assert (code, out) == (0, ""), err
    assert "configuration applied" in err
    assert host.accounts() == {"bob"}
    assert host.run("refresh")[2].strip().endswith("configuration unchanged")
