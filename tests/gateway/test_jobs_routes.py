"""The job API's and the control API's routes through the gateway, as clients meet them: the real
Caddy binary with the configuration comfybake renders, in front of a real aiohttp server on two
unix sockets (as `comfybake jobs serve` listens), spoken to over verified TLS.

The upstream is a small aiohttp app that answers every request with what reached it (method,
path, query, headers), so each test sees what the job service would see. Principals: `alice`
(`*`), `submitter` (`jobs`), `operator` (`control`), `dev` (`environment:e`, the environment of
the one instance), `prom` (`metrics`). The last tests put the real `comfybake jobs serve` behind
the gateway: its job API, its control API, and the drain and resume the fleet role runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from aiohttp import web
from ansible_collections.comfybake.core.plugins.module_utils.gateway import apply, caddy, credentials, routes
from ansible_collections.comfybake.core.plugins.module_utils.gateway.credentials import Principal
from harness.double import stop_process
from harness.gateway import UPGRADE, Gateway, basic, bearer, free_ports, gateway_command, start_caddy, wait_until
from harness.tools import ROOT, venv_bin

SECRETS = {
    "alice": "canary-alice-5a0e17",
    "submitter": "canary-submitter-9d2c44",
    "operator": "canary-operator-61b7f0",
    "dev": "canary-dev-2f8e93",
    "prom": "canary-prom-c3a5d8",
}
SCOPES = {"alice": ["*"], "submitter": ["jobs"], "operator": ["control"], "dev": ["environment:e"], "prom": ["metrics"]}


def principal(name: str) -> Principal:
    hashed = bcrypt.hashpw(SECRETS[name].encode(), bcrypt.gensalt(rounds=4)).decode()  # cheap rounds: a test
    return Principal(name=name, kind="key", hash=hashed, scope=SCOPES[name], source="inventory")


def key(name: str) -> str:
    """The API key of `name` as clients send it: base64 of name:secret (credentials.new_key's shape)."""
    return basic(name, SECRETS[name])["Authorization"].removeprefix("Basic ")


class Upstream:
    """An aiohttp server on two unix sockets, `jobs.sock` and `control.sock`, in a thread of its own;
    every answer is JSON saying which socket took the request and what reached it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.loop = asyncio.new_event_loop()
        self.runners: list[web.AppRunner] = []
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def socket(self, name: str) -> str:
        return str(self.folder / f"{name}.sock")

    @staticmethod
    def app(name: str) -> web.Application:
        async def echo(request: web.Request) -> web.Response:
            body = await request.read()
            return web.json_response(
                {
                    "socket": name,
                    "method": request.method,
                    "path": request.path,
                    "query": request.query_string,
                    "headers": dict(request.headers),
                    "body": len(body),
                }
            )

        application = web.Application()
        application.router.add_route("*", "/{tail:.*}", echo)
        return application

    async def _start(self) -> None:
        for name in ("jobs", "control"):
            runner = web.AppRunner(self.app(name))
            await runner.setup()
            await web.UnixSite(runner, self.socket(name)).start()
            self.runners.append(runner)

    async def _stop(self) -> None:
        for runner in self.runners:
            await runner.cleanup()

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)


@dataclass
class Site:
    gateway: Gateway
    public: dict[str, Any]
    config_dir: Path
    port: int = 0  # the one port of hosts and paths modes

    def url(self, name: str) -> tuple[int, str]:
        """The port and path prefix of the route `name` (jobs, control)."""
        route = self.public[name]
        return int(route["port"]), route["path"].rstrip("/")

    def call(self, name: str, path: str, who: str | None = None, **given: Any) -> tuple[int, Any]:
        """A request to the route `name` as `who` (a Bearer key; None: no credentials): status and JSON body."""
        port, prefix = self.url(name)
        headers = {**(bearer(key(who)) if who else {}), **given.pop("headers", {})}
        response = self.gateway.request(
            port, prefix + path, headers=headers, host=self.public[name]["host"] or "localhost", **given
        )
        try:
            return response.status, json.loads(response.body)
        except ValueError:
            return response.status, response.text


def configure(scratch: Path, upstream: Upstream, record: dict[str, Any], **given: Any) -> tuple[Any, ...]:
    """Render, validate and write the gateway's files as the comfybake.core.gateway module does."""
    config_dir = scratch / "gateway"
    config_dir.mkdir(mode=0o750)
    storage, admin = scratch / "storage", scratch / "run" / "admin.sock"
    admin.parent.mkdir(mode=0o750)
    settings = caddy.normalize(
        {
            "names": ["localhost", "127.0.0.1"],
            "listen": ["127.0.0.1"],
            "storage": str(storage),
            "admin_socket": str(admin),
            "jobs": {"socket": upstream.socket("jobs"), "port": given.pop("jobs_port", routes.JOBS_PORT)},
            "control": {"socket": upstream.socket("control"), "port": given.pop("control_port", routes.CONTROL_PORT)},
            **given,
        }
    )
    public = routes.public_routes([record], settings)
    paths = apply.Paths(config_dir=str(config_dir), group="")  # the test runs as one account
    principals = [principal(name) for name in SECRETS]
    credentials.save(paths.credentials, principals)
    apply.save_inputs(paths, public, settings)
    assert apply.apply(paths, caddy.render(public, settings, principals))
    return public, paths, storage, admin


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    # A short folder: a unix socket's path holds at most 107 bytes.
    folder = Path(tempfile.mkdtemp(prefix="cbjobs-"))
    server = Upstream(folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def start_site(scratch: Path, upstream: Upstream, **given: Any) -> Site:
    # The instance's port is never dialled here: only the job service's routes are asked.
    instance, jobs, control, env = free_ports(4)
    record = {"name": "a", "environment": "e", "port": instance, "url": f"http://127.0.0.1:{instance}"}
    mode = given.get("mode", "ports")
    if mode == "ports":
        given = {"port_offset": 1, "environment_ports": {"e": env}, "jobs_port": jobs, "control_port": control, **given}
    else:
        given = {"port": jobs, "domain": "gw.test", **given}
    public, paths, storage, admin = configure(scratch, upstream, record, **given)
    ports = sorted(
        {route["port"] for route in [*public["instances"], *public["environments"], public["jobs"], public["control"]]}
    )
    tls_name = "jobs.gw.test" if mode == "hosts" else "localhost"
    gateway = start_caddy(Path(paths.config), storage, admin, scratch / "logs", ports, tls_name=tls_name)
    return Site(gateway, public, Path(paths.config_dir))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Site]:
    """Ports mode: instance a of environment e (never started), the job API and the control API."""
    running = start_site(tmp_path_factory.mktemp("jobs-routes"), upstream)
    try:
        yield running
    finally:
        running.gateway.stop()


def test_the_control_api_needs_a_key_whose_scope_holds_control(site: Site) -> None:
    for who in (None, "submitter", "dev", "prom"):
        status, body = site.call("control", "/v1/instances", who)
        assert status == 401, (who, status, body)
        assert "socket" not in str(body), who  # nothing reached the control API
    assert site.call("control", "/v1/instances", headers=bearer("bm90LWEta2V5"))[0] == 401  # an unknown key
    wrong = basic("operator", "not-the-secret")["Authorization"].removeprefix("Basic ")
    assert site.call("control", "/v1/instances", headers=bearer(wrong))[0] == 401
    for who in ("operator", "alice"):
        status, body = site.call("control", "/v1/instances", who)
        assert status == 200, (who, status, body)
        assert (body["socket"], body["path"]) == ("control", "/v1/instances")
        status, body = site.call("control", "/v1/instances/restart", who, method="POST", body=b'{"names": ["a"]}')
        assert (status, body["method"], body["body"]) == (200, "POST", 16), who


def test_the_job_api_needs_a_key_whose_scope_holds_jobs(site: Site) -> None:
    for who in (None, "operator", "dev", "prom"):
        status, body = site.call("jobs", "/v1/jobs", who)
        assert status == 401, (who, status, body)
    for who in ("submitter", "alice"):
        status, body = site.call("jobs", "/v1/jobs?state=running&limit=5", who)
        assert status == 200, (who, status, body)
        assert (body["socket"], body["path"], body["query"]) == ("jobs", "/v1/jobs", "state=running&limit=5")
    # A user's password (HTTP Basic) works as a key does.
    assert site.call("jobs", "/v1/health", headers=basic("submitter", SECRETS["submitter"]))[0] == 200
    # The jobs key reaches neither the instance nor the environment route.
    instance = site.public["instances"][0]["port"]
    environment = site.public["environments"][0]["port"]
    for port in (instance, environment):
        assert site.gateway.request(port, "/system_stats", headers=bearer(key("submitter"))).status == 401


def test_no_credential_reaches_the_job_service(site: Site) -> None:
    status, body = site.call("jobs", "/v1/jobs", "submitter", method="POST", body=b"{}")
    assert status == 200, body
    headers = {name.lower(): value for name, value in body["headers"].items()}
    assert "authorization" not in headers and "proxy-authorization" not in headers
    assert SECRETS["submitter"] not in json.dumps(body) and key("submitter") not in json.dumps(body)
    # The token query value is for WebSocket upgrades: refused on a plain request, stripped on an upgrade.
    assert site.call("jobs", f"/v1/jobs?token={key('submitter')}")[0] == 400
    status, body = site.call("jobs", f"/v1/jobs?token={key('submitter')}&clientId=me", headers=UPGRADE)
    assert status == 200, body  # the echo answers the upgrade as a plain request: what reached it is the point
    assert body["query"] == "clientId=me" and "authorization" not in {name.lower() for name in body["headers"]}
    # The usual answer headers, on the job service's answers too.
    response = site.gateway.request(site.url("jobs")[0], "/v1/health", headers=bearer(key("submitter")))
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "caddy" not in response.headers.get("server", "").lower()
    assert "set-cookie" not in response.headers  # one upstream: no session to keep
    written = site.gateway.written()
    assert '"uri"' in written, "the access log is empty: nothing was checked"
    assert "comfybake_access.jobs.jobs" in written and "comfybake_access.control.control" in written
    for secret in SECRETS.values():
        assert secret not in written
    assert key("submitter") not in written


def test_a_job_service_that_does_not_run_answers_502_after_authentication(tmp_path: Path) -> None:
    """`comfybake jobs serve` stopped (no socket where the route points): 401 without a key, 502 with one."""
    stopped = Upstream(Path(tempfile.mkdtemp(prefix="cbjobs-")))  # never started: no socket
    running = start_site(tmp_path, stopped)
    try:
        assert running.call("jobs", "/v1/health")[0] == 401
        assert running.call("jobs", "/v1/health", "submitter")[0] == 502
        assert running.call("control", "/v1/instances", "operator")[0] == 502
    finally:
        running.gateway.stop()
        shutil.rmtree(stopped.folder, ignore_errors=True)


@pytest.mark.parametrize("mode", ["hosts", "paths"])
def test_hosts_and_paths_modes_place_the_job_service_routes(mode: str, tmp_path: Path, upstream: Upstream) -> None:
    """jobs.<domain> and control.<domain> (hosts); /jobs/ and /control/, stripped (paths), on the one port."""
    running = start_site(tmp_path, upstream, mode=mode)
    try:
        port = running.public["jobs"]["port"]
        if mode == "hosts":
            assert running.public["jobs"]["public_url"] == f"https://jobs.gw.test:{port}/"
            assert running.public["control"]["public_url"] == f"https://control.gw.test:{port}/"
        else:
            assert running.public["jobs"]["public_url"] == f"https://localhost:{port}/jobs/"
            assert running.public["control"]["public_url"] == f"https://localhost:{port}/control/"
        status, body = running.call("jobs", "/v1/jobs", "submitter")
        assert (status, body["socket"], body["path"]) == (200, "jobs", "/v1/jobs"), body
        status, body = running.call("control", "/v1/drain", "operator", method="POST", body=b"{}")
        assert (status, body["socket"], body["path"]) == (200, "control", "/v1/drain"), body
        assert running.call("control", "/v1/instances", "submitter")[0] == 401
        assert running.call("jobs", "/v1/jobs", "operator")[0] == 401
        assert running.call("control", "/v1/instances")[0] == 401
    finally:
        running.gateway.stop()


def cli_gateway(site: Site, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    return gateway_command(site.config_dir.parent, capsys, *argv)


def test_keys_made_on_the_host_take_the_new_scopes_and_status_shows_the_routes(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli_gateway(site, capsys, "keys", "create", "ops", "--scope", "control")
    assert code == 0, err
    made = out.strip()
    assert "scope control" in err
    code, _out, err = cli_gateway(site, capsys, "keys", "create", "bad", "--scope", "jobs:e")
    assert code == 2 and "scope 'jobs:e' is invalid" in err and "'control' (the control API's)" in err
    # Applied through the running gateway's admin socket: the key works at once, on its route only.
    assert site.call("control", "/v1/instances", headers=bearer(made))[0] == 200
    assert site.call("jobs", "/v1/jobs", headers=bearer(made))[0] == 401
    code, out, _err = cli_gateway(site, capsys, "status", "--json")
    rows = {row["kind"]: row for row in json.loads(out)["routes"]}
    for name in ("jobs", "control"):
        [upstream] = rows[name]["upstreams"]
        assert upstream["address"] == site.public[name]["upstream"], upstream
        assert upstream["direct"] == "ok", upstream
        assert rows[name]["public_url"] == site.public[name]["public_url"]
    code, out, _err = cli_gateway(site, capsys, "status")
    line = next(line for line in out.splitlines() if line.startswith("jobs api"))
    assert site.public["jobs"]["public_url"] in line and " ok " in line, out


# -- the real job service behind the gateway -------------------------------------------------


@dataclass
class Serving:
    """`comfybake jobs serve` on two unix sockets, behind the gateway, for a host whose one instance
    (a, environment prod) does not run: the control API reports it, the job API places nothing."""

    site: Site
    sockets: Path
    log: Path

    def jobs_command(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """`comfybake jobs drain|resume` as the fleet role runs them on the host: on the control socket."""
        command = [venv_bin("comfybake"), "jobs", *argv, "--control-listen", f"unix:{self.sockets / 'control.sock'}",
                   "--json"]  # fmt: skip
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)

    def submit(self, who: str | None) -> tuple[int, Any, dict[str, str]]:
        port, prefix = self.site.url("jobs")
        headers = {"Content-Type": "application/json", **(bearer(key(who)) if who else {})}
        body = json.dumps({"workflow": GRAPH, "wait": 5}).encode()
        response = self.site.gateway.request(port, prefix + "/v1/jobs", method="POST", body=body, headers=headers)
        try:
            answer = json.loads(response.body)
        except ValueError:
            answer = response.text
        return response.status, answer, response.headers


# A workflow no environment of the host can run (its one instance is down): the job API refuses it
# with 422 naming why, which shows the request reached the runner.
GRAPH = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "gateway"}},
}


def start_serve(config_root: Path, state_root: Path, sockets: Path, log: Path) -> subprocess.Popen[bytes]:
    command = [venv_bin("comfybake"), "jobs", "serve", "--config-root", str(config_root), "--state-root",
               str(state_root), "--jobs-listen", f"unix:{sockets / 'jobs.sock'}",
               "--control-listen", f"unix:{sockets / 'control.sock'}"]  # fmt: skip
    with log.open("ab") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    for name in ("control.sock", "jobs.sock"):
        wait_until(lambda name=name: (sockets / name).exists() or process.poll() is not None, 30, f"no {name}")
    assert process.poll() is None, log.read_text()[-3000:]
    return process


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serving]:
    scratch = tmp_path_factory.mktemp("jobs-serve")
    config_root = scratch / "etc"
    config_root.mkdir()
    [port] = free_ports(1)  # nothing listens there: the instance is down
    record = {"name": "a", "environment": "prod", "port": port, "gpus": [], "enabled": True,
              "unit": "comfyui@a.service", "url": f"http://127.0.0.1:{port}",
              "state_dir": str(scratch / "state" / "a")}  # fmt: skip
    (config_root / "instances.json").write_text(json.dumps({"format": 1, "instances": [record]}))
    routed = {**record, "public_url": "", "description": "", "required_node_classes": [], "node_classes": []}
    (config_root / "routing.json").write_text(json.dumps({"format": 1, "instances": [routed], "environments": []}))
    sockets = Path(tempfile.mkdtemp(prefix="cbserve-"))  # a unix socket's path holds at most 107 bytes
    log = scratch / "serve.log"
    process = start_serve(config_root, scratch / "jobs-state", sockets, log)
    try:
        # Upstream only names the sockets here: `comfybake jobs serve` listens on them.
        (scratch / "site").mkdir()
        running = start_site(scratch / "site", Upstream(sockets))
        try:
            yield Serving(running, sockets, log)
        finally:
            running.gateway.stop()
    finally:
        stop_process(process)
        shutil.rmtree(sockets, ignore_errors=True)


def test_the_real_job_api_is_reached_with_a_jobs_key_only(serving: Serving) -> None:
    for who in (None, "operator", "dev"):
        assert serving.submit(who)[0] == 401, who
    status, answer, _headers = serving.submit("submitter")
    assert status == 422, answer  # placed by the runner: no environment can run it now
    assert answer["error"]["type"] == "placement", answer
    status, health = serving.site.call("jobs", "/v1/health", "submitter")
    assert status == 200, health
    assert key("submitter") not in serving.log.read_text()


def test_the_control_api_through_the_gateway_is_the_commands_report(serving: Serving) -> None:
    for who in (None, "submitter", "prom"):
        assert serving.site.call("control", "/v1/instances", who)[0] == 401, who
    status, report = serving.site.call("control", "/v1/instances", "operator")
    assert status == 200, report
    assert [row["name"] for row in report["instances"]] == ["a"]


def test_the_fleet_roles_drain_stops_new_jobs_until_resume(serving: Serving) -> None:
    """What roles/fleet/tasks/jobs.yml runs on a leaving host, and on its return."""
    done = serving.jobs_command("drain", "--timeout", "5")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["draining"] is True
    try:
        status, answer, headers = serving.submit("submitter")
        assert status == 503, answer
        assert headers.get("retry-after"), headers
    finally:
        done = serving.jobs_command("resume")
    assert done.returncode == 0, done.stdout + done.stderr
    assert serving.submit("submitter")[0] == 422  # taken again (and placed: nothing can run it)
    # The control API's own drain, through the gateway with a control key, does the same.
    status, answer = serving.site.call("control", "/v1/drain", "operator", method="POST", body=b"{}")
    assert (status, answer["draining"]) == (200, True), answer
    assert serving.submit("submitter")[0] == 503
    assert serving.site.call("control", "/v1/resume", "operator", method="POST", body=b"{}")[0] == 200
    assert serving.submit("submitter")[0] == 422


def fleet_jobs(serving: Serving, action: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The fleet role's tasks/jobs.yml with `action`, run by ansible-playbook on this host."""
    fleet = ROOT / "roles" / "fleet"
    play = [{
        "hosts": "localhost", "gather_facts": False,
        "vars_files": [str(fleet / "defaults" / "main.yml"), str(fleet / "vars" / "main.yml")],
        "tasks": [{"name": f"Fleet jobs {action}", "ansible.builtin.include_tasks": str(fleet / "tasks" / "jobs.yml"),
                   "vars": {"__fleet_jobs_action": action, "_fleet_cli": venv_bin("comfybake"),
                            "comfyui_jobs_socket_dir": str(serving.sockets), "comfybake_fleet_drain_timeout": 5}}],
    }]  # fmt: skip
    (tmp_path / f"{action}.yml").write_text(json.dumps(play))
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run([venv_bin("ansible-playbook"), "-i", "localhost,", "-c", "local", "-e",
                           f"ansible_python_interpreter={sys.executable}", f"{action}.yml"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip


def test_the_fleet_roles_task_file_drains_and_resumes_the_job_api(serving: Serving, tmp_path: Path) -> None:
    done = fleet_jobs(serving, "drain", tmp_path)
    assert done.returncode == 0 and "changed=0" in done.stdout, done.stdout + done.stderr
    try:
        assert serving.submit("submitter")[0] == 503
    finally:
        done = fleet_jobs(serving, "resume", tmp_path)
    assert done.returncode == 0 and "changed=0" in done.stdout, done.stdout + done.stderr
    assert serving.submit("submitter")[0] == 422
