"""The gateway's routes and its Caddy configuration, as pure functions (the proxy itself: test_proxy.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from comfybake.engine.gateway import caddy, credentials
from comfybake.engine.gateway.credentials import Principal
from comfybake.engine.gateway.errors import GatewayError
from comfybake.engine.gateway.routes import public_routes


def record(name: str, environment: str, port: int, enabled: bool = True) -> dict[str, Any]:
    return {
        "name": name,
        "environment": environment,
        "port": port,
        "url": f"http://127.0.0.1:{port}",
        "enabled": enabled,
    }


LAYOUT = [record("a", "prod", 8188), record("b", "prod", 8189), record("c", "dev", 8190, enabled=False)]
NAMES = {"names": ["gpu1.example.com", "10.0.0.5"]}


def by_name(routes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {route["name"]: route for route in routes}


def test_ports_mode_offsets_instances_and_gives_each_environment_a_port() -> None:
    routes = public_routes(LAYOUT, {**NAMES, "environment_ports": {"prod": 9000}})
    instances, environments = by_name(routes["instances"]), by_name(routes["environments"])
    assert instances["a"]["public_url"] == "https://gpu1.example.com:9188/"
    assert instances["a"]["upstream"] == "127.0.0.1:8188"
    assert environments["prod"]["public_url"] == "https://gpu1.example.com:9000/"
    assert environments["prod"]["upstreams"] == ["127.0.0.1:8188", "127.0.0.1:8189"]
    # dev has no pinned port: the first free one from comfyui_gateway_port; its only instance is
    # disabled, so the environment route has no upstream while the instance keeps its own route.
    assert environments["dev"]["port"] == 8443
    assert environments["dev"]["upstreams"] == []
    assert instances["c"]["port"] == 9190


def test_ports_mode_reports_every_collision_naming_both_sides() -> None:
    with pytest.raises(GatewayError) as error:
        public_routes(LAYOUT, {**NAMES, "port_offset": 1, "environment_ports": {"prod": 9188, "nowhere": 9500}})
    message = str(error.value)
    # a's route (8189) collides with instance b's own port; b's (8190) with c's own port
    assert "the route of instance 'a' and instance 'b' itself both want port 8189" in message
    assert "the route of instance 'b' and instance 'c' itself both want port 8190" in message
    assert "'nowhere' is not the environment of any instance" in message


def test_hosts_mode_names_each_route_below_the_domain() -> None:
    routes = public_routes(LAYOUT, {**NAMES, "mode": "hosts", "domain": "comfy.example.com", "port": 443})
    assert by_name(routes["instances"])["b"]["public_url"] == "https://b.comfy.example.com/"
    assert by_name(routes["environments"])["prod"]["host"] == "prod.comfy.example.com"
    with pytest.raises(GatewayError, match="'my_env' cannot be a host name label"):
        public_routes([record("x", "my_env", 8188)], {**NAMES, "mode": "hosts", "domain": "example.com"})
    with pytest.raises(GatewayError, match="environment 'prod' and instance 'prod' would both answer"):
        public_routes([record("prod", "prod", 8188)], {**NAMES, "mode": "hosts", "domain": "example.com"})
    with pytest.raises(GatewayError, match="comfyui_gateway_domain '' must be a host name in hosts mode"):
        public_routes(LAYOUT, {**NAMES, "mode": "hosts"})


def test_paths_mode_puts_every_route_below_one_port() -> None:
    routes = public_routes(LAYOUT, {**NAMES, "mode": "paths"})
    assert by_name(routes["instances"])["a"]["public_url"] == "https://gpu1.example.com:8443/instances/a/"
    assert by_name(routes["environments"])["prod"]["public_url"] == "https://gpu1.example.com:8443/environments/prod/"
    # Caddy matches paths regardless of case: Prod's prefix would also be prod's.
    with pytest.raises(GatewayError, match="environments 'Prod' and 'prod' differ only in case"):
        public_routes([record("x", "Prod", 8188), record("y", "prod", 8189)], {**NAMES, "mode": "paths"})


def test_settings_report_every_problem_at_once() -> None:
    with pytest.raises(GatewayError) as error:
        caddy.normalize(
            {
                "tls": {"mode": "selfsigned"},
                "max_request_body": "lots",
                "listen": ["*"],
                "names": ["Bad Name"],
                "colour": 1,
            }
        )
    message = str(error.value)
    for part in ("'colour'", "'selfsigned'", "'lots'", "'*'"):
        assert part in message
    with pytest.raises(GatewayError, match="'Bad Name' is not a lower-case host name"):
        public_routes(LAYOUT, {"names": ["Bad Name"]})
    assert caddy.normalize({"max_request_body": "512M"})["max_request_body"] == 512 << 20


def principals() -> list[Principal]:
    return [
        Principal("alice", "user", "$2b$10$" + "a" * 53, ["*"]),
        Principal("bob", "user", "$2b$10$" + "b" * 53, ["instance:a"]),
        Principal("ci", "key", "$2b$10$" + "c" * 53, ["environment:dev"]),
    ]


def accounts(config: dict[str, Any], port: int) -> list[str]:
    server = config["apps"]["http"]["servers"][f"port{port}"]
    chain = server["routes"][0]["handle"][0]["routes"]
    for step in chain:
        for handler in step["handle"]:
            if handler["handler"] == "authentication":
                return [account["username"] for account in handler["providers"]["http_basic"]["accounts"]]
    raise AssertionError(f"no authentication on port {port}")


def test_each_route_admits_only_the_principals_whose_scope_covers_it() -> None:
    settings = caddy.normalize(NAMES)
    config = caddy.render(public_routes(LAYOUT, settings), settings, principals())
    assert accounts(config, 9188) == ["alice", "bob"]  # instance a
    assert accounts(config, 9189) == ["alice"]  # instance b
    assert accounts(config, 9190) == ["alice", "ci"]  # instance c, of environment dev
    assert accounts(config, 8443) == ["alice", "ci"]  # environment dev, first in name order: 8443


def test_the_configuration_keeps_admin_off_tcp_and_credentials_out_of_logs() -> None:
    settings = caddy.normalize(NAMES)
    config = caddy.render(public_routes(LAYOUT, settings), settings, principals())
    assert config["admin"] == {"listen": "unix//run/comfybake-gateway/admin.sock", "config": {"persist": False}}
    for logger in config["logging"]["logs"].values():
        fields = logger["encoder"]["fields"]
        assert fields["request>headers>Authorization"] == {"filter": "delete"}
        assert fields["request>uri"]["actions"] == [{"type": "delete", "parameter": "token"}]
    for server in config["apps"]["http"]["servers"].values():
        assert server["routes"][0]["match"][0]["host"] == ["gpu1.example.com", "10.0.0.5"]
        assert server["routes"][-1]["handle"][0]["status_code"] == 421  # any other Host
    headers = json.dumps(config["apps"]["http"]["servers"])
    assert "Strict-Transport-Security" not in headers  # internal CA: never HSTS for localhost
    acme = caddy.normalize({**NAMES, "tls": {"mode": "acme"}})
    assert "Strict-Transport-Security" in json.dumps(caddy.render(public_routes(LAYOUT, acme), acme, [])["apps"])


# -- the exporter's route (metrics) ----------------------------------------------------------

METRICS = {"metrics": {"upstream": "127.0.0.1:9721"}}


def test_the_metrics_route_is_placed_by_each_mode() -> None:
    ports = public_routes(LAYOUT, {**NAMES, **METRICS})["metrics"]
    assert (ports["port"], ports["public_url"], ports["upstream"]) == (
        9722,
        "https://gpu1.example.com:9722/metrics",
        "127.0.0.1:9721",
    )
    moved = public_routes(LAYOUT, {**NAMES, "metrics": {"upstream": "0.0.0.0:9800", "port": 9900}})["metrics"]
    assert (moved["port"], moved["upstream"]) == (9900, "127.0.0.1:9800")  # a wildcard is dialled on loopback
    hosts = public_routes(LAYOUT, {**NAMES, **METRICS, "mode": "hosts", "domain": "comfy.example.com", "port": 443})
    assert hosts["metrics"]["host"] == "metrics.comfy.example.com"
    assert hosts["metrics"]["public_url"] == "https://metrics.comfy.example.com/metrics"
    paths = public_routes(LAYOUT, {**NAMES, **METRICS, "mode": "paths"})["metrics"]
    assert (paths["path"], paths["public_url"]) == ("/metrics", "https://gpu1.example.com:8443/metrics")
    # The other routes are where they were without it: adding it moves no URL.
    for mode in ("ports", "hosts", "paths"):
        settings = {**NAMES, "mode": mode, "domain": "comfy.example.com"}
        without, with_it = public_routes(LAYOUT, settings), public_routes(LAYOUT, {**settings, **METRICS})
        assert without["metrics"] is None
        assert (without["instances"], without["environments"]) == (with_it["instances"], with_it["environments"])


def test_metrics_route_collisions_name_both_sides() -> None:
    with pytest.raises(GatewayError) as error:
        public_routes(LAYOUT, {**NAMES, "metrics": {"upstream": "127.0.0.1:9721", "port": 9188}})
    assert "the metrics route (comfyui_gateway_metrics_port) and the route of instance 'a' both want port 9188" in str(
        error.value
    )
    assert "comfyui_gateway_metrics_port" in str(error.value).rsplit("change", 1)[1]
    with pytest.raises(GatewayError, match=r"the metrics route .* and the exporter itself .* both want port 9721"):
        public_routes(LAYOUT, {**NAMES, "metrics": {"upstream": "127.0.0.1:9721", "port": 9721}})
    with pytest.raises(GatewayError, match=r"the exporter itself .* and instance 'b' itself both want port 8189"):
        public_routes(LAYOUT, {**NAMES, "metrics": {"upstream": "127.0.0.1:8189"}})
    with pytest.raises(
        GatewayError,
        match=r"exporter's route 'metrics' and instance 'metrics' would both answer as metrics\.example\.com; rename "
        "the instance, or set comfyui_gateway_metrics false",
    ):
        public_routes([record("metrics", "prod", 8188)], {**NAMES, **METRICS, "mode": "hosts", "domain": "example.com"})
    with pytest.raises(GatewayError, match=r"comfyui_exporter_listen 'loopback' .* is not ADDRESS:PORT"):
        public_routes(LAYOUT, {**NAMES, "metrics": {"upstream": "loopback"}})
    with pytest.raises(GatewayError, match="comfyui_gateway_metrics_port 70000 must be a port"):
        public_routes(LAYOUT, {**NAMES, "metrics": {"upstream": "127.0.0.1:9721", "port": 70000}})


def test_only_the_metrics_scope_and_star_reach_the_metrics_route() -> None:
    assert credentials.check_scope(["metrics", "environment:prod"]) == ["environment:prod", "metrics"]
    for wrong in ("metrics:prod", "metric", "Metrics"):
        with pytest.raises(GatewayError, match=f"scope {wrong!r} is invalid: use .*'metrics'"):
            credentials.check_scope([wrong])
    settings = caddy.normalize({**NAMES, **METRICS})
    prometheus = Principal("prometheus", "key", "$2b$10$" + "p" * 53, ["metrics"])
    config = caddy.render(public_routes(LAYOUT, settings), settings, [*principals(), prometheus])
    assert accounts(config, 9722) == ["alice", "prometheus"]  # alice's *; not bob's instance, ci's environment
    for port in (9188, 9189, 9190, 8443):
        assert "prometheus" not in accounts(config, port)
    route = config["apps"]["http"]["servers"]["port9722"]["routes"][0]
    chain = json.dumps(route)
    assert '"dial": "127.0.0.1:9721"' in chain
    assert "Set-Cookie" not in chain and "health_checks" not in chain  # one upstream: no session, no pool
    assert "strip_path_prefix" not in chain  # Prometheus' /metrics reaches the exporter as it was sent


def test_without_the_metrics_setting_there_is_no_metrics_route() -> None:
    for given in ({}, {"metrics": None}):
        settings = caddy.normalize({**NAMES, **given})
        public = public_routes(LAYOUT, settings)
        assert public["metrics"] is None
        assert "port9722" not in caddy.render(public, settings, principals())["apps"]["http"]["servers"]
    # gateway.json of an earlier version, without the key, renders as before
    settings = caddy.normalize(NAMES)
    earlier = {key: value for key, value in public_routes(LAYOUT, settings).items() if key != "metrics"}
    assert caddy.render(earlier, settings, principals()) == caddy.render(
        public_routes(LAYOUT, settings), settings, principals()
    )
    paths = caddy.normalize({**NAMES, **METRICS, "mode": "paths"})
    server = caddy.render(public_routes(LAYOUT, paths), paths, principals())["apps"]["http"]["servers"]["port8443"]
    metrics = next(route for route in server["routes"] if route["match"][0].get("path") == ["/metrics"])
    assert metrics["match"][0]["host"] == ["gpu1.example.com", "10.0.0.5"]


# -- the job service's routes (jobs, control) ------------------------------------------------

JOBS = {
    "jobs": {"socket": "/run/comfybake-jobs/jobs.sock"},
    "control": {"socket": "/run/comfybake-jobs/control.sock"},
}


def test_the_job_service_routes_are_placed_by_each_mode() -> None:
    ports = public_routes(LAYOUT, {**NAMES, **METRICS, **JOBS})
    assert [
        (ports[name]["port"], ports[name]["public_url"], ports[name]["upstream"]) for name in ("jobs", "control")
    ] == [
        (9723, "https://gpu1.example.com:9723/", "unix//run/comfybake-jobs/jobs.sock"),
        (9724, "https://gpu1.example.com:9724/", "unix//run/comfybake-jobs/control.sock"),
    ]
    pinned = {"jobs": {**JOBS["jobs"], "port": 10443}, "control": {**JOBS["control"], "port": 10444}}
    moved = public_routes(LAYOUT, {**NAMES, **pinned})
    assert (moved["jobs"]["port"], moved["control"]["port"]) == (10443, 10444)
    hosts = public_routes(LAYOUT, {**NAMES, **JOBS, "mode": "hosts", "domain": "comfy.example.com", "port": 443})
    assert hosts["jobs"]["public_url"] == "https://jobs.comfy.example.com/"
    assert hosts["control"]["host"] == "control.comfy.example.com"
    paths = public_routes(LAYOUT, {**NAMES, **JOBS, "mode": "paths"})
    assert (paths["jobs"]["path"], paths["jobs"]["public_url"]) == ("/jobs/", "https://gpu1.example.com:8443/jobs/")
    assert paths["control"]["public_url"] == "https://gpu1.example.com:8443/control/"
    # Claimed after every other route: turning the job service on moves no URL.
    for mode in ("ports", "hosts", "paths"):
        settings = {**NAMES, **METRICS, "mode": mode, "domain": "comfy.example.com"}
        without, with_it = public_routes(LAYOUT, settings), public_routes(LAYOUT, {**settings, **JOBS})
        assert (without["jobs"], without["control"]) == (None, None)
        assert [without[key] for key in ("instances", "environments", "metrics")] == [
            with_it[key] for key in ("instances", "environments", "metrics")
        ]


def test_job_service_route_problems_name_the_variable() -> None:
    with pytest.raises(GatewayError) as error:
        public_routes(LAYOUT, {**NAMES, "jobs": {"socket": "/run/j.sock", "port": 9188}})
    assert "the jobs route (comfyui_gateway_jobs_port) and the route of instance 'a' both want port 9188" in str(
        error.value
    )
    assert "comfyui_gateway_jobs_port" in str(error.value).rsplit("change", 1)[1]
    with pytest.raises(GatewayError, match=r"the control route .* and the jobs route .* both want port 9723"):
        public_routes(LAYOUT, {**NAMES, **JOBS, "control": {"socket": "/run/c.sock", "port": 9723}})
    with pytest.raises(
        GatewayError,
        match=r"the control API's route 'control' and environment 'control' would both answer as control\.example\.com;"
        " rename the environment, or set comfyui_jobs_enabled false",
    ):
        public_routes([record("x", "control", 8188)], {**NAMES, **JOBS, "mode": "hosts", "domain": "example.com"})
    with pytest.raises(GatewayError) as error:
        public_routes(LAYOUT, {**NAMES, "jobs": {"socket": "run/jobs.sock"}, "control": {"socket": "/c", "port": 0}})
    assert "the jobs socket 'run/jobs.sock' (comfyui_jobs_socket_dir) must be an absolute path" in str(error.value)
    assert "comfyui_gateway_control_port 0 must be a port" in str(error.value)
    with pytest.raises(GatewayError, match=r"gateway setting jobs '/run/j\.sock' must be an object with socket"):
        public_routes(LAYOUT, {**NAMES, "jobs": "/run/j.sock"})


def test_jobs_and_control_scopes_reach_their_own_route_only() -> None:
    assert credentials.check_scope(["control", "jobs", "metrics"]) == ["control", "jobs", "metrics"]
    for wrong in ("jobs:prod", "job", "Control"):
        with pytest.raises(GatewayError, match=f"scope {wrong!r} is invalid: use .*'jobs'.*'control'"):
            credentials.check_scope([wrong])
    settings = caddy.normalize({**NAMES, **METRICS, **JOBS})
    submitter = Principal("submitter", "key", "$2b$10$" + "j" * 53, ["jobs"])
    operator = Principal("operator", "key", "$2b$10$" + "o" * 53, ["control"])
    config = caddy.render(public_routes(LAYOUT, settings), settings, [*principals(), submitter, operator])
    assert accounts(config, 9723) == ["alice", "submitter"]  # alice's *; no environment or instance scope
    assert accounts(config, 9724) == ["alice", "operator"]
    for port in (9188, 9189, 9190, 8443, 9722):
        assert not {"submitter", "operator"} & set(accounts(config, port)), port
    for port, socket in ((9723, "/run/comfybake-jobs/jobs.sock"), (9724, "/run/comfybake-jobs/control.sock")):
        chain = json.dumps(config["apps"]["http"]["servers"][f"port{port}"]["routes"][0])
        assert f'"dial": "unix/{socket}"' in chain
        assert '"delete": ["Authorization"]' in chain  # the job service never sees a credential
        assert "Set-Cookie" not in chain and "health_checks" not in chain and "strip_path_prefix" not in chain
        server = config["apps"]["http"]["servers"][f"port{port}"]
        assert server["logs"]["default_logger_name"].endswith(f".{'jobs' if port == 9723 else 'control'}")


def test_paths_mode_strips_the_job_service_prefixes() -> None:
    settings = caddy.normalize({**NAMES, **JOBS, "mode": "paths"})
    server = caddy.render(public_routes(LAYOUT, settings), settings, principals())["apps"]["http"]["servers"][
        "port8443"
    ]
    for prefix in ("/jobs/", "/control/"):
        route = next(route for route in server["routes"] if route["match"][0].get("path") == [prefix + "*"])
        assert {"handler": "rewrite", "strip_path_prefix": prefix.rstrip("/")} in [
            handler for step in route["handle"][0]["routes"] for handler in step["handle"]
        ]
    assert "/jobs/ and /control/" in json.dumps(server["routes"][-2])  # the 404 names every route
