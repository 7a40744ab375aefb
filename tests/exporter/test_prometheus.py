"""A real Prometheus server scrapes a real `comfybake exporter serve` over test-double instances and
evaluates the role's alert rules (every `for:` shortened to 1 s): what an operator's server sees."""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from harness.double import free_port
from harness.exporter import port_open, write_host
from harness.prometheus import (
    Prometheus,
    PrometheusError,
    Target,
    dashboard_exprs,
    leaked,
    metric_names,
    running,
    write_config,
)
from harness.tls import TLSFiles, make_tls

Start = Callable[..., dict[str, Any]]
TOKEN = "hf_prometheusCanaryToken0123456789"
PROMPT = {"1": {"class_type": "KSampler", "inputs": {}}}


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[Path], int]]:
    """`comfybake exporter serve` on a free port (a canary token in its environment); returns the port."""
    servers: list[subprocess.Popen[bytes]] = []

    def run(config: Path) -> int:
        port = free_port()
        log = (tmp_path / "exporter.log").open("wb")
        server = subprocess.Popen(
            [
                *(sys.executable, "-m", "comfybake", "exporter", "serve", "--config-root", str(config)),
                *("--listen", f"127.0.0.1:{port}", "--timeout", "0.7", "--state", str(tmp_path / "state.json")),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_TOKEN": TOKEN},
        )
        servers.append(server)
        deadline = time.monotonic() + 30
        while not port_open(port):
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "exporter.log").read_text()
            time.sleep(0.05)
        return port

    yield run
    for server in servers:
        server.terminate()
        assert server.wait(timeout=10) == 0


def firing(server: Prometheus, alert: str, instance: str) -> list[dict[str, Any]] | None:
    found = [
        a for a in server.alerts() if a["labels"]["alertname"] == alert and a["labels"].get("instance") == instance
    ]
    return found or None


def test_prometheus_scrapes_the_exporter_and_fires_instance_down(
    start: Start, serve: Callable[[Path], int], tmp_path: Path
) -> None:
    a, b = start("a"), start("b")
    with socket.socket() as hung:  # accepts connections (the kernel's backlog) and never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        silent = {"name": "hung", "environment": "comm", "port": hung.getsockname()[1], "env": {"HF_TOKEN": TOKEN}}
        port = serve(write_host(tmp_path / "etc", [a, b, silent]))
        with running(tmp_path / "prometheus", Target(f"http://127.0.0.1:{port}/metrics")) as server:
            a_is = 'instance="a", job="comfybake", host="127.0.0.1"'
            server.wait("the exporter's target up", lambda: server.value('up{job="comfybake"}') == 1)
            server.wait("a up and ready", lambda: server.value(f"comfybake_instance_ready{{{a_is}}}") == 1)
            baseline = server.value(f"comfybake_prompts_completed_total{{{a_is}}}")
            assert baseline == 0
            # Two prompts on a: one runs, one waits; then both complete.
            for _ in range(2):
                status, body = a["double"].post("/prompt", {"prompt": PROMPT, "extra_data": {"test_double_seconds": 3}})
                assert status == 200, body
            server.wait(
                "a's queue: 1 running, 1 pending",
                lambda: (
                    server.value(f"comfybake_queue_running{{{a_is}}}") == 1
                    and server.value(f"comfybake_queue_pending{{{a_is}}}") == 1
                ),
            )
            server.wait(
                "a's prompts completed",
                lambda: (
                    server.value(f"comfybake_prompts_completed_total{{{a_is}}}") == 2
                    and server.value(f"comfybake_queue_running{{{a_is}}} + comfybake_queue_pending{{{a_is}}}") == 0
                ),
            )
            assert server.value(f"comfybake_prompts_failed_total{{{a_is}}}") == 0
            assert server.value(f"comfybake_prompt_duration_seconds_count{{{a_is}}}") == 2
            # The hung instance is down and the exporter still answers every scrape within its timeout.
            server.wait("hung reported down", lambda: server.value('comfybake_instance_up{instance="hung"}') == 0)
            seen_down = time.monotonic()
            # Stopping b: its up and ready metrics flip and ComfybakeInstanceDown fires for it.
            assert b["double"].stop() is not None
            server.wait("b reported down", lambda: server.value('comfybake_instance_up{instance="b"}') == 0)
            assert server.value('comfybake_instance_ready{instance="b"}') == 0
            alert = server.wait("ComfybakeInstanceDown for b", lambda: firing(server, "ComfybakeInstanceDown", "b"))
            assert alert[0]["labels"] == {
                "alertname": "ComfybakeInstanceDown",
                "environment": "comm",
                "host": "127.0.0.1",
                "instance": "b",
                "job": "comfybake",
                "severity": "critical",
            }
            assert alert[0]["annotations"]["summary"] == "ComfyUI instance b on 127.0.0.1 does not answer"
            # Every scrape since the hung instance was seen down succeeded (one that outlasts Prometheus's
            # 1 s timeout makes `up` 0 for that scrape): the lowest `up` over that window, at least 5 s.
            time.sleep(max(0.0, 5 - (time.monotonic() - seen_down)))
            window = int(time.monotonic() - seen_down)
            lowest = server.value(f'min_over_time(up{{job="comfybake"}}[{window}s])')
            assert lowest == 1, (
                f"a scrape of the exporter failed in the {window} s since the hung instance was seen down"
            )
            assert leaked(server, TOKEN) == []
            # Every query of the dashboard is PromQL this server runs; those whose metrics it has find series.
            answered = {}
            for expr in dashboard_exprs():
                concrete = expr.replace("$__rate_interval", "1m").replace("$host", ".*").replace("$instance", ".*")
                try:
                    answered[expr] = server.query(concrete)
                except urllib.error.HTTPError as error:
                    answered[expr] = [{"error": error.read().decode()}]
            assert [(expr, found) for expr, found in answered.items() if found and "error" in found[0]] == []
            here = {found["metric"]["__name__"] for found in server.query('count by (__name__) ({__name__=~".+"})')}
            empty = [expr for expr, found in answered.items() if not found and metric_names(expr) <= here]
            assert empty == [], f"queries that read only metrics this server has, and found nothing: {empty}"


def test_scrape_configs_through_a_gateway_pass_promtool(tmp_path: Path) -> None:
    """The configurations the harness writes for a gateway's metrics route: basic auth or a bearer key,
    over TLS with the gateway's CA. Prometheus's own checker accepts them; no secret is in the file."""
    tls = make_tls(tmp_path / "tls")
    (tmp_path / "auth").write_text("prometheus:s3cret-password\n")
    (tmp_path / "key").write_text("cbk_bearer-key\n")
    targets = {
        "plain": Target("http://127.0.0.1:9721/metrics"),
        "basic": Target("https://127.0.0.1:9722/metrics", basic_auth_file=tmp_path / "auth", ca=tls.ca),
        "bearer": Target(
            "https://metrics.example.test/metrics", bearer_file=tmp_path / "key", ca=tls.ca, server_name="x"
        ),
    }
    for name, target in targets.items():
        config = write_config(tmp_path / name, target)
        done = subprocess.run(
            ["promtool", "check", "config", str(config)], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0 and "SUCCESS" in done.stdout + done.stderr, (name, done.stdout, done.stderr)
        assert "s3cret" not in config.read_text() and "cbk_" not in config.read_text()
    with pytest.raises(PrometheusError, match="not both"):
        Target("https://h:1/metrics", basic_auth_file=tmp_path / "auth", bearer_file=tmp_path / "key").scrape_config(
            tmp_path
        )
    with pytest.raises(PrometheusError, match="'h:1' is not an http"):
        Target("h:1").scrape_config(tmp_path)


@contextmanager
def guarded(upstream: int, tls: TLSFiles, accepted: set[str]) -> Iterator[int]:
    """HTTPS on loopback that forwards GET to the exporter only with an accepted Authorization header
    (what the gateway's metrics route does, reduced to the part a scrape configuration must get right)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.headers.get("Authorization") not in accepted:
                self.send_response(401)
                self.end_headers()
                return
            with urllib.request.urlopen(f"http://127.0.0.1:{upstream}{self.path}", timeout=10) as response:
                body = response.read()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: Any) -> None:
            pass

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.cert, tls.key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_the_script_scrapes_through_auth_and_tls(serve: Callable[[Path], int], tmp_path: Path) -> None:
    """`prometheus.py run` as the gateway scenario calls it: over TLS with basic auth, then a bearer key."""
    tls = make_tls(tmp_path / "tls")
    (tmp_path / "auth").write_text("prometheus:s3cret-password\n")
    (tmp_path / "key").write_text("cbk_bearer-key\n")
    accepted = {"Basic " + base64.b64encode(b"prometheus:s3cret-password").decode(), "Bearer cbk_bearer-key"}
    script = [sys.executable, str(Path(__file__).resolve().parents[1] / "harness" / "prometheus.py"), "run"]
    with guarded(serve(write_host(tmp_path / "etc", [])), tls, accepted) as port:
        target = ("--target", f"https://127.0.0.1:{port}/metrics", "--ca", str(tls.ca))
        done = subprocess.run(
            [*script, *target, "--basic-auth-file", str(tmp_path / "auth"), "--query", 'up{job="comfybake"} == 1',
             "--forbid", TOKEN, "--wait", "30"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.splitlines()[0])["result"][0]["metric"]["host"] == "127.0.0.1"
        # A bearer key; --forbid finds a text that is there (a metric's name) and fails naming the count.
        done = subprocess.run(
            [*script, *target, "--bearer-file", str(tmp_path / "key"), "--query", 'up{job="comfybake"} == 1',
             "--forbid", "comfybake_exporter_scrape_duration_seconds", "--wait", "30"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert done.stdout and json.loads(done.stdout.splitlines()[0])["result"], done.stdout + done.stderr
    assert done.returncode == 1 and "1 series of job comfybake hold a forbidden text" in done.stderr, done.stderr
    assert "s3cret" not in done.stdout + done.stderr and "cbk_" not in done.stdout + done.stderr
