"""The gateway as clients meet it: the real Caddy binary with the configuration comfybake renders,
in front of three real test doubles, spoken to over verified TLS with curl-like requests, a
WebSocket client and headless chromium.

One gateway for the module: instances a and b of environment `e` (the route of `e` balances over
them) and instance c of environment `other`. Principals: user `alice` (everything), user `bob`
(instance a only), key `ci` (environment e: its route and its instances). Their secrets are
canaries that the last test looks for in everything the gateway and the instances wrote.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest
import websocket
from ansible_collections.comfybake.core.plugins.module_utils.gateway import apply, caddy, routes
from ansible_collections.comfybake.core.plugins.module_utils.gateway.credentials import Principal
from ansible_collections.comfybake.core.plugins.module_utils.gateway.errors import GatewayError
from harness.double import Double
from harness.gateway import (
    UPGRADE,
    Gateway,
    basic,
    bearer,
    chromium_title,
    copy_double,
    free_offset,
    free_ports,
    leaf_spki,
    start_caddy,
    start_double,
    wait_until,
)

PASSWORD = "canary-password-7f3a9c"
BOB_PASSWORD = "canary-bob-51e0d2"
KEY_SECRET = "canarykeysecret4b8e1d0a9"
KEY = base64.b64encode(f"ci:{KEY_SECRET}".encode()).decode()  # a key is base64(name:secret)
CANARIES = (PASSWORD, BOB_PASSWORD, KEY_SECRET, KEY, base64.b64encode(f"alice:{PASSWORD}".encode()).decode())
MAX_BODY = 1 << 20
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
assert not set(KEY) & set("+/="), "the canary key must pass unescaped in a URL, as the CLI draws them"


def principal(name: str, kind: str, secret: str, scope: list[str]) -> Principal:
    hashed = bcrypt.hashpw(secret.encode(), bcrypt.gensalt(rounds=4)).decode()  # cheap rounds: a test
    return Principal(name=name, kind=kind, hash=hashed, scope=scope, source="inventory")


@dataclass
class Site:
    gateway: Gateway
    doubles: dict[str, Double]
    ports: dict[str, int]  # route name (a, b, c, env:e, env:other) -> public port
    settings: dict[str, object]
    principals: list[Principal]
    public: dict[str, object]
    paths: apply.Paths
    scratch: Path
    code: Path

    def restart(self, name: str) -> None:
        """Start instance `name` again on its port, after a stop."""
        self.doubles[name] = start_double(self.code, self.scratch / "state", name, self.doubles[name].port)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    scratch = tmp_path_factory.mktemp("gateway")
    code = copy_double(scratch)
    layout = {"a": "e", "b": "e", "c": "other"}
    doubles = {name: start_double(code, scratch / "state", name) for name in layout}
    records = [
        {"name": name, "environment": env, "port": doubles[name].port, "url": f"http://127.0.0.1:{doubles[name].port}"}
        for name, env in layout.items()
    ]
    env_ports = free_ports(3)
    config_dir, storage, admin = scratch / "config", scratch / "storage", scratch / "run" / "admin.sock"
    for folder in (config_dir, storage, admin.parent):
        folder.mkdir(mode=0o750)
    settings: dict[str, object] = {
        "mode": "ports",
        "port": env_ports[2],
        "port_offset": free_offset([d.port for d in doubles.values()]),
        "environment_ports": {"e": env_ports[0], "other": env_ports[1]},
        "names": ["localhost", "127.0.0.1"],
        "listen": ["127.0.0.1"],
        "storage": str(storage),
        "admin_socket": str(admin),
        "max_request_body": MAX_BODY,
        "health_interval": "1s",
    }
    principals = [
        principal("alice", "user", PASSWORD, ["*"]),
        principal("bob", "user", BOB_PASSWORD, ["instance:a"]),
        principal("ci", "key", KEY_SECRET, ["environment:e"]),
    ]
    public = routes.public_routes(records, settings)
    ports = {route["name"]: route["port"] for route in public["instances"]}
    ports.update({f"env:{route['name']}": route["port"] for route in public["environments"]})
    paths = apply.Paths(config_dir=str(config_dir), group="")  # the test runs as one account
    assert apply.apply(paths, caddy.render(public, settings, principals))  # validated, written: nothing runs yet
    gateway = start_caddy(Path(paths.config), storage, admin, scratch / "logs", sorted(ports.values()))
    try:
        yield Site(gateway, doubles, ports, settings, principals, public, paths, scratch, code)
    finally:
        gateway.stop()
        for double in doubles.values():
            double.stop()


def served_by(site: Site, response_body: bytes) -> str:
    """Which instance answered a /system_stats: its --port in argv."""
    argv = json.loads(response_body)["system"]["argv"]
    port = int(argv[argv.index("--port") + 1])
    return next(name for name, double in site.doubles.items() if double.port == port)


def raw_upgrade(site: Site, port: int, path: str, headers: dict[str, str] | None = None) -> int:
    """The status of a WebSocket upgrade request (101 when it went through)."""
    response = site.gateway.request(port, path, headers={**UPGRADE, **(headers or {})})
    return response.status


# -- authentication ---------------------------------------------------------------------------


def test_unauthenticated_requests_get_401_on_every_route_and_method(site: Site) -> None:
    wrong = basic("alice", "not-the-password")
    for name, port in site.ports.items():
        for method in METHODS:
            for headers in ({}, wrong, bearer("Y2k6bm9wZQ")):
                response = site.gateway.request(port, "/system_stats", method=method, headers=headers)
                assert response.status == 401, (name, method, headers, response.status, response.text)
        assert raw_upgrade(site, port, "/ws?clientId=x") == 401, name
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            site.gateway.websocket(port, "/ws")
        assert refused.value.status_code == 401, name
        challenge = site.gateway.request(port, "/").headers.get("www-authenticate", "")
        assert challenge.startswith("Basic "), (name, challenge)


def test_users_and_keys_succeed_within_their_scope_only(site: Site) -> None:
    allowed = {
        "alice": (basic("alice", PASSWORD), {"a", "b", "c", "env:e", "env:other"}),
        "bob": (basic("bob", BOB_PASSWORD), {"a"}),
        "ci (Bearer)": (bearer(KEY), {"a", "b", "env:e"}),
        "ci (Basic)": (basic("ci", KEY_SECRET), {"a", "b", "env:e"}),
    }
    for who, (headers, scope) in allowed.items():
        for name, port in site.ports.items():
            status = site.gateway.request(port, "/system_stats", headers=headers).status
            assert status == (200 if name in scope else 401), (who, name, status)
    # The scheme is case-insensitive (RFC 7235): a lower-case bearer is the same key.
    assert (
        site.gateway.request(site.ports["a"], "/system_stats", headers={"Authorization": f"bearer {KEY}"}).status == 200
    )
    # Another user's password is no key to a route: bob's password with alice's name.
    assert site.gateway.request(site.ports["a"], "/", headers=basic("alice", BOB_PASSWORD)).status == 401


def test_query_token_opens_a_websocket_within_scope_only(site: Site) -> None:
    client = site.gateway.websocket(site.ports["a"], f"/ws?clientId=fromtoken&token={KEY}")
    try:
        assert json.loads(client.recv())["data"]["sid"] == "fromtoken"  # clientId survives the rewrite
    finally:
        client.close()
    for name in ("c", "env:other"):
        assert raw_upgrade(site, site.ports[name], f"/ws?clientId=x&token={KEY}") == 401, name
    assert raw_upgrade(site, site.ports["a"], "/ws?clientId=x&token=Y2k6bm9wZQ") == 401


def test_query_token_is_refused_outside_a_websocket_upgrade(site: Site) -> None:
    for method in ("GET", "POST"):
        response = site.gateway.request(site.ports["a"], f"/system_stats?token={KEY}", method=method)
        assert response.status == 400, (method, response.status, response.text)
        assert "token" in response.text
    # Not beside a header either: one credential per request.
    headers = basic("alice", PASSWORD)
    assert raw_upgrade(site, site.ports["a"], f"/ws?clientId=x&token={KEY}", headers) == 400
    # An Upgrade header alone, on a request that upgrades nothing, is no WebSocket upgrade.
    response = site.gateway.request(
        site.ports["a"], f"/view?filename=a.png&token={KEY}", headers={"Upgrade": "websocket"}
    )
    assert response.status == 400, (response.status, response.text)


# -- WebSockets, TLS ------------------------------------------------------------------------


def test_websocket_gets_comfyuis_status_messages_over_verified_tls(site: Site) -> None:
    client = site.gateway.websocket(site.ports["a"], "/ws?clientId=viagateway", headers=basic("alice", PASSWORD))
    try:
        first = json.loads(client.recv())
        assert first == {
            "type": "status",
            "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "viagateway"},
        }
        prompt = {"prompt": {"1": {"class_type": "KSampler", "inputs": {}}}, "extra_data": {"test_double_seconds": 0.2}}
        queued = site.gateway.request(site.ports["a"], "/prompt", method="POST", body=json.dumps(prompt).encode(),
                                      headers=basic("alice", PASSWORD))  # fmt: skip
        assert queued.status == 200, queued.text
        seen = [json.loads(client.recv())["data"]["status"]["exec_info"]["queue_remaining"] for _ in range(3)]
        assert seen == [1, 1, 0]  # queued, started, finished
    finally:
        client.close()
    # The chain ends at the gateway's own CA: a client that trusts only the system's roots refuses it.
    with pytest.raises(ssl.SSLCertVerificationError):
        ssl.create_default_context().wrap_socket(
            socket.create_connection(("127.0.0.1", site.ports["a"])), server_hostname="localhost"
        )
    issuer = subprocess.run(["openssl", "x509", "-in", str(site.gateway.ca), "-noout", "-subject"],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "comfybake" in issuer


def test_a_browser_loads_the_page_and_its_websocket_connects(site: Site, tmp_path: Path) -> None:
    """Chromium sends the Basic credentials of the page's URL again on its same-origin WebSocket
    handshake (which the gateway refuses without them), and the environment route's cookie too."""
    for route in ("a", "env:e"):
        spki = leaf_spki(site.gateway, site.ports[route])
        url = f"https://localhost:{site.ports[route]}/"
        title = chromium_title(url.replace("https://", f"https://alice:{PASSWORD}@"), spki, tmp_path / f"{route}-with")
        assert re.fullmatch(r"ws:[0-9a-f]{32}", title), (route, title)
        assert not chromium_title(url, spki, tmp_path / f"{route}-without", timeout=1.5).startswith("ws:"), route


# -- the environment route ----------------------------------------------------------------


def test_environment_route_spreads_keeps_and_moves_sessions(site: Site) -> None:
    port, auth = site.ports["env:e"], basic("alice", PASSWORD)

    def visit(cookie: str | None = None) -> tuple[str, str]:
        response = site.gateway.request(
            port, "/system_stats", headers={**auth, **({"Cookie": cookie} if cookie else {})}
        )
        assert response.status == 200, response.text
        set_cookie = response.headers.get("set-cookie", "")
        assert set_cookie.startswith("comfybake_e=") and "HttpOnly" in set_cookie and "Secure" in set_cookie
        return served_by(site, response.body), set_cookie.split(";")[0]

    fresh = [visit() for _ in range(16)]
    assert {name for name, _ in fresh} == {"a", "b"}, fresh  # new sessions go to both
    cookie_b = next(cookie for name, cookie in fresh if name == "b")
    assert {visit(cookie_b)[0] for _ in range(8)} == {"b"}  # a session stays where it started

    site.doubles["b"].stop()
    try:
        assert {visit(cookie_b)[0] for _ in range(4)} == {"a"}  # b's sessions move on
        assert {visit()[0] for _ in range(8)} == {"a"}  # and no new session goes to b
    finally:
        site.restart("b")
    wait_until(lambda: "b" in {visit()[0] for _ in range(8)}, 45, "new sessions did not reach b again")
    assert {visit(cookie_b)[0] for _ in range(4)} == {"b"}


# -- the other modes -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["hosts", "paths"])
def test_hosts_and_paths_modes_route_on_one_port(site: Site, mode: str, tmp_path: Path) -> None:
    """The same instances behind one port: by host name (`a.gw.test`) or by path (`/instances/a/`)."""
    port = free_ports(1)[0]
    settings = {**site.settings, "mode": mode, "port": port, "domain": "gw.test", "environment_ports": {},
                "storage": str(tmp_path / "storage"), "admin_socket": str(tmp_path / "admin.sock")}  # fmt: skip
    records = [
        {"name": n, "environment": e, "port": site.doubles[n].port, "url": f"http://127.0.0.1:{site.doubles[n].port}"}
        for n, e in (("a", "e"), ("b", "e"), ("c", "other"))
    ]
    public = routes.public_routes(records, settings)
    (tmp_path / "config").mkdir()
    paths = apply.Paths(config_dir=str(tmp_path / "config"), group="")
    apply.apply(paths, caddy.render(public, settings, site.principals))
    host = "a.gw.test" if mode == "hosts" else "localhost"
    gateway = start_caddy(Path(paths.config), tmp_path / "storage", tmp_path / "admin.sock", tmp_path / "logs",
                          [port], tls_name=host)  # fmt: skip
    alice, bob = basic("alice", PASSWORD), basic("bob", BOB_PASSWORD)

    def where(route: str) -> tuple[str, str]:
        """(host, path prefix) of instance or environment `route`, as the mode places it."""
        kind = "environments" if route == "e" else "instances"
        return (f"{route}.gw.test", "") if mode == "hosts" else ("localhost", f"/{kind}/{route}")

    try:
        for route, instances in (("a", {"a"}), ("c", {"c"}), ("e", {"a", "b"})):
            name, prefix = where(route)
            response = gateway.request(port, f"{prefix}/system_stats", headers=alice, host=name)
            assert response.status == 200, (route, response.status, response.text)
            assert served_by(site, response.body) in instances, route
            assert gateway.request(port, f"{prefix}/system_stats", host=name).status == 401, route
        name, prefix = where("b")
        assert gateway.request(port, f"{prefix}/system_stats", headers=bob, host=name).status == 401
        name, prefix = where("a")
        assert gateway.request(port, f"{prefix}/system_stats", headers=bob, host=name).status == 200
        client = gateway.websocket(port, f"{prefix}/ws?clientId=mode{mode}&token={KEY}", host=name)
        assert json.loads(client.recv())["data"]["sid"] == f"mode{mode}"
        client.close()
        # The page's own relative WebSocket URL works in each mode (a browser sees the prefix).
        title = chromium_title(f"https://alice:{PASSWORD}@{name}:{port}{prefix}/", leaf_spki(gateway, port, name),
                               tmp_path / "browser", resolve=name)  # fmt: skip
        assert re.fullmatch(r"ws:[0-9a-f]{32}", title), title
        foreign = gateway.request(port, "/system_stats", headers={**alice, "Host": "rebound.example"}, host=name)
        assert foreign.status == 421
        # Hosts mode: each route's host has its logger; paths mode shares one host (the uri tells).
        loggers = access_loggers(gateway.stdout)
        expected = {"instance.e.a", "instance.other.c", "environment.e"} if mode == "hosts" else set()
        assert {f"http.log.access.comfybake_access.{name}" for name in expected} <= loggers, loggers
        assert mode == "hosts" or loggers == {"http.log.access.comfybake_access"}, loggers
    finally:
        gateway.stop()


# -- configuration changes ------------------------------------------------------------------


def test_a_bad_configuration_is_refused_and_a_good_one_loads_live(site: Site) -> None:
    before = Path(site.paths.config).read_text()
    broken = caddy.render(site.public, site.settings, site.principals)
    route = broken["apps"]["http"]["servers"][f"port{site.ports['a']}"]["routes"][0]
    route["match"][0]["path_regexp"] = {"pattern": "*"}  # a route Caddy cannot provision
    try:
        with pytest.raises(GatewayError, match=r"stays: .*path_regexp"):
            apply.apply(site.paths, broken)
    finally:
        if Path(site.paths.config).read_text() != before:
            apply.apply(site.paths, json.loads(before))
            pytest.fail("the bad configuration replaced the good one")
    bob = basic("bob", BOB_PASSWORD)
    assert site.gateway.request(site.ports["a"], "/system_stats", headers=bob).status == 200
    assert site.gateway.request(site.ports["b"], "/system_stats", headers=bob).status == 401

    # A good change (bob may use environment e) loads into the running gateway, no restart.
    wider = [Principal(**{**vars(p), "scope": [*p.scope, "environment:e"]}) if p.name == "bob" else p
             for p in site.principals]  # fmt: skip
    open_socket = site.gateway.websocket(site.ports["a"], "/ws?clientId=acrossreload", headers=bob)
    try:
        assert json.loads(open_socket.recv())["data"]["sid"] == "acrossreload"
        assert apply.apply(site.paths, caddy.render(site.public, site.settings, wider))
        assert site.gateway.request(site.ports["b"], "/system_stats", headers=bob).status == 200
        # Caddy 2.6 closes upgraded connections when it replaces a configuration (a delay for them
        # came in 2.7): the WebSocket ends with a close frame, and the client's reconnect (ComfyUI's
        # frontend does it by itself) is served at once. Plain HTTP requests are not dropped.
        # websocket-client answers a close frame with "", a connection gone before it with an error.
        with contextlib.suppress(websocket.WebSocketConnectionClosedException):
            assert open_socket.recv() == ""
        again = site.gateway.websocket(site.ports["a"], "/ws?clientId=acrossreload", headers=bob)
        assert json.loads(again.recv())["data"]["sid"] == "acrossreload"
        again.close()
    finally:
        open_socket.close()
        apply.apply(site.paths, caddy.render(site.public, site.settings, site.principals))
    assert site.gateway.request(site.ports["b"], "/system_stats", headers=bob).status == 401
    assert site.gateway.process.poll() is None


# -- the rest of the chain ------------------------------------------------------------------


def test_foreign_host_names_are_refused(site: Site) -> None:
    auth = basic("alice", PASSWORD)
    for name, port in site.ports.items():
        response = site.gateway.request(port, "/system_stats", headers={**auth, "Host": "rebound.example"})
        assert response.status == 421, (name, response.status)
    assert site.gateway.request(site.ports["a"], "/system_stats", headers=auth, host="127.0.0.1").status == 200


def test_responses_carry_security_headers(site: Site) -> None:
    answers = {
        200: site.gateway.request(site.ports["a"], "/", headers=basic("alice", PASSWORD)),
        401: site.gateway.request(site.ports["a"], "/"),  # an error the gateway itself answers
    }
    for status, response in answers.items():
        assert response.status == status
        # HSTS would bind every port of localhost to HTTPS for a year: acme mode only (test_routes.py)
        assert "strict-transport-security" not in response.headers, status
        assert response.headers["x-content-type-options"] == "nosniff", status
        assert response.headers["x-frame-options"] == "SAMEORIGIN", status
        assert "caddy" not in response.headers.get("server", "").lower(), status
    assert answers[401].headers["www-authenticate"] == 'Basic realm="comfybake"'  # browsers still ask


def test_uploads_over_the_limit_are_refused_and_the_instance_keeps_serving(site: Site) -> None:
    auth = basic("alice", PASSWORD)
    small = site.gateway.request(site.ports["a"], "/upload/image", method="POST", headers=auth, body=b"x" * 1000)
    assert small.status == 400  # ComfyUI's answer to a body that is no form: it reached the instance
    big = site.gateway.request(
        site.ports["a"], "/upload/image", method="POST", headers=auth, body=b"x" * (MAX_BODY + 1)
    )
    assert big.status == 413, big.status
    # One client's oversized upload must not take the instance's route down for the others.
    assert site.gateway.request(site.ports["a"], "/system_stats", headers=auth).status == 200


def access_loggers(log: Path) -> set[str]:
    """The logger of every line of a JSON access log."""
    return {json.loads(line)["logger"] for line in log.read_text().splitlines() if line.startswith("{")}


def test_each_route_names_itself_in_the_access_log(site: Site) -> None:
    """Caddy 2.6 logs a request as it arrived, before a handler could add a field: in ports mode
    each route's lines come from its own logger, which names the instance and its environment."""
    auth = basic("alice", PASSWORD)
    for route in ("a", "env:e"):
        assert site.gateway.request(site.ports[route], "/system_stats", headers=auth).status == 200
    loggers = access_loggers(site.gateway.stdout)
    assert {"http.log.access.comfybake_access.instance.e.a", "http.log.access.comfybake_access.environment.e"} <= (
        loggers
    ), loggers


# -- last: what was written ------------------------------------------------------------------


def test_no_secret_reaches_a_log_a_file_or_an_instance(site: Site) -> None:
    """After every test above: no canary anywhere the gateway or an instance wrote."""
    written = site.gateway.written()
    assert "comfybake_access" in written or '"uri"' in written, "the access log is empty: nothing was checked"
    for canary in CANARIES:
        assert canary not in written, f"{canary!r} is in what the gateway wrote"
    hashes = [p.hash for p in site.principals]
    assert all(h in (site.gateway.config_dir / "caddy.json").read_text() or
               base64.b64encode(h.encode()).decode() in (site.gateway.config_dir / "caddy.json").read_text()
               for h in hashes)  # fmt: skip
    upstream = "\n".join(double.output() for double in site.doubles.values())
    assert "request GET /ws?clientId=fromtoken headers" in upstream, "the instances' request log is empty"
    for canary in CANARIES:
        assert canary not in upstream, f"{canary!r} reached an instance"
    assert '"Authorization"' not in upstream
    assert "token=" not in upstream
