"""The exporter's route through the gateway, as Prometheus meets it: the real Caddy binary with the
configuration comfybake renders, in front of a real `comfybake exporter serve` that reads a real
test double, spoken to over verified TLS, and scraped by a real Prometheus with a Bearer key that
`comfybake gateway keys create --scope metrics` made.

Principals: `prom` (scope metrics), `alice` (`*`), `dev` (environment:e, the environment of the
one instance: it reaches the instance, never the metrics).
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from ansible_collections.comfybake.core.plugins.module_utils.gateway import apply, caddy, credentials, routes
from ansible_collections.comfybake.core.plugins.module_utils.gateway.credentials import Principal
from harness.double import Double, free_port, stop_process
from harness.exporter import samples, value, write_host
from harness.gateway import (
    Gateway,
    basic,
    bearer,
    copy_double,
    free_offset,
    free_ports,
    gateway_command,
    start_caddy,
    start_double,
    tool,
    wait_for_port,
    wait_until,
)
from harness.prometheus import ready

PROM_PASSWORD = "canary-prom-3e9a71"
ALICE_PASSWORD = "canary-alice-0c44d2"
DEV_PASSWORD = "canary-dev-8b1f6e"


def principal(name: str, secret: str, scope: list[str]) -> Principal:
    hashed = bcrypt.hashpw(secret.encode(), bcrypt.gensalt(rounds=4)).decode()  # cheap rounds: a test
    return Principal(name=name, kind="user", hash=hashed, scope=scope, source="inventory")


PRINCIPALS = [
    principal("prom", PROM_PASSWORD, ["metrics"]),
    principal("alice", ALICE_PASSWORD, ["*"]),
    principal("dev", DEV_PASSWORD, ["environment:e"]),
]


@dataclass
class Site:
    gateway: Gateway
    double: Double
    exporter: str  # the exporter's own address (loopback)
    config_root: Path
    public: dict[str, Any]
    settings: dict[str, Any]
    scratch: Path

    @property
    def metrics_port(self) -> int:
        return int(self.public["metrics"]["port"])

    @property
    def instance_port(self) -> int:
        return int(self.public["instances"][0]["port"])


def start_exporter(config_root: Path, state: Path, listen: str, log: Path) -> subprocess.Popen[bytes]:
    """`comfybake exporter serve` as its own process, as the exporter's unit runs it."""
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "comfybake", "exporter", "serve", "--config-root", str(config_root),
             "--listen", listen, "--state", str(state)],
            stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    wait_for_port(int(listen.rsplit(":", 1)[1]), process, log)
    return process


def configure(scratch: Path, config_root: Path, records: list[dict[str, Any]], **given: Any) -> tuple[Any, ...]:
    """Render, validate and write the gateway's files as the module does (routes, settings, credentials)."""
    gateway_dir = config_root / "gateway"
    gateway_dir.mkdir(mode=0o750, parents=True)
    storage, admin = scratch / "storage", scratch / "run" / "admin.sock"
    admin.parent.mkdir(mode=0o750)
    settings = caddy.normalize(
        {
            "names": ["localhost", "127.0.0.1"],
            "listen": ["127.0.0.1"],
            "storage": str(storage),
            "admin_socket": str(admin),
            **given,
        }
    )
    public = routes.public_routes(records, settings)
    paths = apply.Paths(config_dir=str(gateway_dir), group="")  # the test runs as one account
    credentials.save(paths.credentials, PRINCIPALS)
    apply.save_inputs(paths, public, settings)
    assert apply.apply(paths, caddy.render(public, settings, PRINCIPALS))
    return public, settings, paths, storage, admin


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """Ports mode: instance a of environment e, its environment route, and the metrics route."""
    scratch = tmp_path_factory.mktemp("metrics")
    double = start_double(copy_double(scratch), scratch / "state", "a")
    record = {"name": "a", "environment": "e", "port": double.port, "url": f"http://127.0.0.1:{double.port}"}
    config_root = write_host(scratch / "etc", [record])
    exporter = f"127.0.0.1:{free_port()}"
    process = start_exporter(config_root, scratch / "exporter.json", exporter, scratch / "exporter.log")
    try:
        env_port, metrics_port = free_ports(2)
        public, settings, paths, storage, admin = configure(
            scratch, config_root, [record],
            port_offset=free_offset([double.port]), environment_ports={"e": env_port},
            metrics={"upstream": exporter, "port": metrics_port},
        )  # fmt: skip
        ports = sorted({route["port"] for route in [*public["instances"], *public["environments"], public["metrics"]]})
        gateway = start_caddy(Path(paths.config), storage, admin, scratch / "logs", ports)
        try:
            yield Site(gateway, double, exporter, config_root, public, settings, scratch)
        finally:
            gateway.stop()
    finally:
        stop_process(process)
        double.stop()


def exported(text: str) -> float | None:
    """comfybake_instance_up of instance a, from a scrape's text."""
    return value(samples(text), "comfybake_instance_up", instance="a", environment="e")


def test_the_metrics_scope_reaches_the_exporter_and_nothing_else(site: Site) -> None:
    for who, headers in (("prom", basic("prom", PROM_PASSWORD)), ("alice", basic("alice", ALICE_PASSWORD))):
        response = site.gateway.request(site.metrics_port, "/metrics", headers=headers)
        assert response.status == 200, (who, response.status, response.text)
        assert response.headers["content-type"].startswith("text/plain"), who
        assert exported(response.text) == 1, (who, response.text[:500])  # the exporter's own scrape of a
        # The gateway's chain, as on every route: security headers, no Server, no credential passed on.
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "caddy" not in response.headers.get("server", "").lower()
        assert "set-cookie" not in response.headers  # one upstream: no session to keep
    for who, headers in (
        ("dev (environment:e)", basic("dev", DEV_PASSWORD)),
        ("no credentials", {}),
        ("a wrong password", basic("prom", "not-the-password")),
    ):
        response = site.gateway.request(site.metrics_port, "/metrics", headers=headers)
        assert response.status == 401, (who, response.status)
        assert "comfybake_" not in response.text, who
    # dev reaches its environment's instance; prom (metrics only) does not.
    assert site.gateway.request(site.instance_port, "/system_stats", headers=basic("dev", DEV_PASSWORD)).status == 200
    assert site.gateway.request(site.instance_port, "/system_stats", headers=basic("prom", PROM_PASSWORD)).status == 401
    foreign = {**basic("prom", PROM_PASSWORD), "Host": "rebound.example"}
    assert site.gateway.request(site.metrics_port, "/metrics", headers=foreign).status == 421


def cli_gateway(site: Site, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    return gateway_command(site.config_root, capsys, *argv)


def prometheus(scratch: Path, jobs: list[dict[str, Any]]) -> tuple[subprocess.Popen[bytes], int]:
    """Debian's prometheus on loopback, scraping `jobs` every two seconds."""
    binary = tool("prometheus", "prometheus")
    port = free_port()
    scratch.mkdir(parents=True)
    config = scratch / "prometheus.yml"
    config.write_text(json.dumps({"global": {"scrape_interval": "2s", "scrape_timeout": "2s"}, "scrape_configs": jobs}))
    log = scratch / "prometheus.log"
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={scratch / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=sink, stderr=subprocess.STDOUT, cwd=scratch,
        )  # fmt: skip
    wait_for_port(port, process, log, timeout=30)
    wait_until(lambda: ready(port), 30, "prometheus was not ready")  # its API answers 503 until then
    return process, port


def query(port: int, expression: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(expression)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return list(json.loads(response.read())["data"]["result"])


def targets(port: int) -> dict[str, dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets", timeout=10) as response:
        return {target["labels"]["job"]: target for target in json.loads(response.read())["data"]["activeTargets"]}


def test_prometheus_scrapes_with_a_bearer_key_made_for_the_metrics_scope(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli_gateway(site, capsys, "keys", "create", "scraper", "--scope", "metrics")
    assert code == 0, err
    key = out.strip()
    assert "scope metrics" in err
    code, _out, err = cli_gateway(site, capsys, "keys", "create", "wrong", "--scope", "metrics:e")
    assert code == 2 and "scope 'metrics:e' is invalid" in err and "'metrics' (the exporter's route)" in err
    # The key went through the running gateway's admin socket: a plain Bearer request uses it at once.
    response = site.gateway.request(site.metrics_port, "/metrics", headers=bearer(key))
    assert response.status == 200 and exported(response.text) == 1, response.status

    scratch = site.scratch / "prometheus"
    (site.scratch / "scraper.key").write_text(key + "\n")
    tls = {"ca_file": str(site.gateway.ca), "server_name": "localhost"}
    target = {"targets": [f"127.0.0.1:{site.metrics_port}"]}
    jobs = [
        {"job_name": "comfybake", "scheme": "https", "tls_config": tls, "static_configs": [target],
         "authorization": {"type": "Bearer", "credentials_file": str(site.scratch / "scraper.key")}},
        # No credentials (an out-of-scope principal costs Caddy a bcrypt of cost 14 before its 401,
        # near a scrape's timeout on a busy machine: the direct requests above check that one).
        {"job_name": "outsider", "scheme": "https", "tls_config": tls, "static_configs": [target]},
    ]  # fmt: skip
    process, port = prometheus(scratch, jobs)
    try:

        def up() -> dict[str, str]:
            return {item["metric"]["job"]: item["value"][1] for item in query(port, "up")}

        wait_until(lambda: up().get("comfybake") == "1" and "outsider" in up(), 60, "prometheus did not scrape")
        assert up()["outsider"] == "0"
        # Prometheus' own `instance` label names the target: the exporter's becomes exported_instance.
        found = query(port, 'comfybake_instance_up{job="comfybake"}')
        assert [(item["metric"]["exported_instance"], item["value"][1]) for item in found] == [("a", "1")], found
        assert "401" in targets(port)["outsider"]["lastError"]
    finally:
        stop_process(process)

    code, out, _err = cli_gateway(site, capsys, "status")
    line = next(line for line in out.splitlines() if line.startswith("metrics"))
    assert f"https://localhost:{site.metrics_port}/metrics" in line and site.exporter in line and " ok " in line, out
    report = json.loads(cli_gateway(site, capsys, "status", "--json")[1])
    [row] = [row for row in report["routes"] if row["kind"] == "metrics"]
    assert row["upstreams"][0]["direct"] == "ok"
    assert code == 0, out
    assert key not in (site.scratch / "logs" / "caddy.stdout").read_text() + "".join(
        path.read_text(errors="replace") for path in (site.config_root / "gateway").iterdir() if path.is_file()
    )


@pytest.mark.parametrize("mode", ["hosts", "paths"])
def test_hosts_and_paths_modes_place_the_metrics_route(site: Site, mode: str, tmp_path: Path) -> None:
    """metrics.<domain> (hosts), /metrics beside /instances/<name>/ (paths), on the one port."""
    port = free_ports(1)[0]
    record = {"name": "a", "environment": "e", "port": site.double.port, "url": f"http://127.0.0.1:{site.double.port}"}
    public, _settings, paths, storage, admin = configure(
        tmp_path, tmp_path / "etc", [record], mode=mode, port=port, domain="gw.test",
        metrics={"upstream": site.exporter},
    )  # fmt: skip
    host = "metrics.gw.test" if mode == "hosts" else "localhost"
    assert public["metrics"]["public_url"] == f"https://{host}:{port}/metrics"
    gateway = start_caddy(Path(paths.config), storage, admin, tmp_path / "logs", [port], tls_name=host)
    prom, dev = basic("prom", PROM_PASSWORD), basic("dev", DEV_PASSWORD)
    try:
        response = gateway.request(port, "/metrics", headers=prom, host=host)
        assert response.status == 200 and exported(response.text) == 1, (response.status, response.text[:300])
        assert gateway.request(port, "/metrics", headers=dev, host=host).status == 401
        assert gateway.request(port, "/metrics", host=host).status == 401
        instance = ("a.gw.test", "/system_stats") if mode == "hosts" else ("localhost", "/instances/a/system_stats")
        assert gateway.request(port, instance[1], headers=prom, host=instance[0]).status == 401
        assert gateway.request(port, instance[1], headers=dev, host=instance[0]).status == 200
        if mode == "paths":  # the instance's prefix is stripped; the exporter's path is its own
            assert gateway.request(port, "/metricsx", headers=prom).status == 404
    finally:
        gateway.stop()


def test_without_the_exporter_there_is_no_metrics_port(site: Site, tmp_path: Path) -> None:
    """Metrics off (comfyui_gateway_metrics or comfyui_exporter_enabled false): no route, no port."""
    record = {"name": "a", "environment": "e", "port": site.double.port, "url": f"http://127.0.0.1:{site.double.port}"}
    [env_port] = free_ports(1)
    public, _settings, paths, _storage, _admin = configure(
        tmp_path, tmp_path / "etc", [record], port_offset=free_offset([site.double.port]),
        environment_ports={"e": env_port}, metrics=None,
    )  # fmt: skip
    assert public["metrics"] is None
    config = json.loads(Path(paths.config).read_text())
    listened = {address for server in config["apps"]["http"]["servers"].values() for address in server["listen"]}
    assert listened == {f"127.0.0.1:{public['instances'][0]['port']}", f"127.0.0.1:{env_port}"}
    assert site.exporter not in Path(paths.config).read_text()


def test_no_password_reaches_a_log_or_a_file(site: Site) -> None:
    written = site.gateway.written() + (site.scratch / "exporter.log").read_text()
    assert '"uri"' in written, "the access log is empty: nothing was checked"
    for canary in (PROM_PASSWORD, ALICE_PASSWORD, DEV_PASSWORD):
        assert canary not in written, canary
