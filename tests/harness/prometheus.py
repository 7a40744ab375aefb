"""Run a real Prometheus server (Debian's `prometheus`) against comfybake's exporter.

`start_prometheus` writes a scrape configuration for one target (the job `comfybake`, as
docs/observability.md wires it: `honor_labels`, a `host` label from the target's address),
loads the role's alert rules with every `for:` shortened, starts `prometheus` on a free loopback
port with its storage in a scratch folder, and waits until it is ready. `Prometheus.query` and
`Prometheus.alerts` read its HTTP API; `wait` polls one of them until it answers what the test
wants.

Also a script, for checks outside pytest (the gateway scenario scrapes a host's exporter through
the gateway):

    python tests/harness/prometheus.py run --target https://metrics.example.test:9722/metrics \
        --basic-auth-file auth.txt --ca ca.crt --query 'up{job="comfybake"} == 1' --forbid hf_xyz

It waits (up to --wait seconds) until every --query has a non-empty result and every --alert
fires, prints each result as a JSON line, checks that no series of the job holds a --forbid
text, and exits 0, or 1 naming what never came. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

try:
    from harness.double import free_port, stop_process
except ImportError:  # run as a script: tests/ is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from harness.double import free_port, stop_process

FILES = Path(__file__).resolve().parents[2] / "roles" / "comfyui_exporter" / "files"
RULES = FILES / "prometheus" / "comfybake-rules.yml"
DASHBOARD = FILES / "grafana" / "comfybake-dashboard.json"
JOB = "comfybake"
KEYWORDS = {"and", "or", "unless", "bool", "offset", "group_left", "group_right", "inf", "nan"}
T = TypeVar("T")


class PrometheusError(RuntimeError):
    """Prometheus did not start, or did not answer what was waited for."""


def binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        raise PrometheusError("prometheus is not on PATH; install Debian's prometheus (scripts/bootstrap.sh does)")
    return found


def shortened_rules(source: Path, dest: Path, duration: str = "1s") -> Path:
    """A copy of the rules file with every `for:` set to `duration` (alerts fire within a test)."""
    text, count = re.subn(r"(?m)^(\s+for:)\s*\S+\s*$", rf"\1 {duration}", source.read_text())
    if count == 0:
        raise PrometheusError(f"{source} has no `for:` to shorten; is it an alert rules file?")
    dest.write_text(text)
    return dest


@dataclass
class Target:
    """One scrape target, as Prometheus's scrape_config needs it."""

    url: str  # http(s)://HOST:PORT/PATH
    basic_auth_file: Path | None = None  # one line, USER:PASSWORD
    bearer_file: Path | None = None  # the bearer key
    ca: Path | None = None  # a CA bundle for an https target
    server_name: str | None = None  # TLS server name, when it differs from the URL's host

    def scrape_config(self, folder: Path) -> dict[str, Any]:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise PrometheusError(f"--target {self.url!r} is not an http(s)://HOST:PORT/PATH URL")
        config: dict[str, Any] = {
            "job_name": JOB,
            "honor_labels": True,
            "scheme": parts.scheme,
            "metrics_path": parts.path or "/metrics",
            "static_configs": [{"targets": [parts.netloc]}],
            # A `host` label: the target's address without its port (docs/observability.md).
            "relabel_configs": [
                {"source_labels": ["__address__"], "regex": "(.+?)(?::[0-9]+)?", "target_label": "host"}
            ],
        }
        if self.basic_auth_file is not None and self.bearer_file is not None:
            raise PrometheusError("give --basic-auth-file or --bearer-file, not both: a scrape sends one")
        if self.basic_auth_file is not None:
            user, colon, password = self.basic_auth_file.read_text().strip().partition(":")
            if not colon:
                raise PrometheusError(f"{self.basic_auth_file} must hold one line USER:PASSWORD")
            with os.fdopen(os.open(folder / "password", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as sink:
                sink.write(password)  # readable by this account only, from the start
            config["basic_auth"] = {"username": user, "password_file": str(folder / "password")}
        if self.bearer_file is not None:
            config["authorization"] = {"type": "Bearer", "credentials_file": str(self.bearer_file.resolve())}
        if self.ca is not None or self.server_name is not None:
            tls: dict[str, str] = {}
            if self.ca is not None:
                tls["ca_file"] = str(self.ca.resolve())
            if self.server_name is not None:
                tls["server_name"] = self.server_name
            config["tls_config"] = tls
        return config


@dataclass
class Prometheus:
    """A running `prometheus`: its process, port and scratch folder."""

    process: subprocess.Popen[bytes]
    port: int
    folder: Path

    def api(self, route: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{route}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.loads(response.read())
        if answer.get("status") != "success":
            raise PrometheusError(f"{route} {params} answered {answer}")
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query: [{"metric": {labels}, "value": [time, "value"]}, ...]."""
        return list(self.api("query", query=expr)["result"])

    def value(self, expr: str) -> float | None:
        """The value of a query that has at most one result (None when it has none)."""
        result = self.query(expr)
        if len(result) > 1:
            raise PrometheusError(f"{expr} has {len(result)} results, expected at most one: {result}")
        return float(result[0]["value"][1]) if result else None

    def alerts(self, state: str = "firing") -> list[dict[str, Any]]:
        """Alerts in `state` ("firing" or "pending"): labels, annotations, value."""
        return [alert for alert in self.api("alerts")["alerts"] if alert["state"] == state]

    def log(self) -> str:
        return (self.folder / "prometheus.log").read_text(errors="replace")[-3000:]

    def wait(self, what: str, check: Callable[[], T | None], timeout: float = 30) -> T:
        """Poll `check` until it returns something other than None or False; fail naming `what`."""
        deadline = time.monotonic() + timeout
        while True:
            found = check()
            if found is not None and found is not False:
                return found
            if self.process.poll() is not None:
                raise PrometheusError(f"prometheus exited while waiting for {what}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise PrometheusError(f"waited {timeout:g} s for {what}; it never came")
            time.sleep(0.2)

    def stop(self) -> None:
        stop_process(self.process, timeout=15)


def write_config(folder: Path, target: Target, rules: Path | None = RULES, for_: str = "1s") -> Path:
    """`<folder>/prometheus.yml`: scrape `target` every second, evaluate `rules` (every `for:` set to `for_`)."""
    folder.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [target.scrape_config(folder)],
    }
    if rules is not None:
        config["rule_files"] = [str(shortened_rules(rules, folder / "rules.yml", for_))]
    path = folder / "prometheus.yml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


def ready(port: int) -> bool:
    """Prometheus on `port` answers `/-/ready` (its API answers 503 until then)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def start_prometheus(
    folder: Path, target: Target, rules: Path | None = RULES, for_: str = "1s", timeout: float = 30
) -> Prometheus:
    """`prometheus` with `write_config`'s configuration, on a free loopback port; waits until it is ready."""
    write_config(folder, target, rules, for_)
    port = free_port()
    with (folder / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [
                binary(),
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Prometheus(process, port, folder)
    try:
        server.wait("prometheus to be ready", lambda: ready(port), timeout)
    except PrometheusError:
        server.stop()
        raise
    return server


@contextmanager
def running(folder: Path, target: Target, **options: Any) -> Iterator[Prometheus]:
    server = start_prometheus(folder, target, **options)
    try:
        yield server
    finally:
        server.stop()


def leaked(server: Prometheus, text: str) -> list[dict[str, Any]]:
    """Every series of the job whose labels or value hold `text` (a canary token)."""
    return [sample for sample in server.query(f'{{job="{JOB}"}}') if text in json.dumps(sample)]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana's $variables allowed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables
    return {
        match[1]
        for match in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?", expr)
        if not match[2] and match[1].lower() not in KEYWORDS
    }


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard: its panels' queries and its variables' selectors."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["query"]["query"])
            if not found:
                raise PrometheusError(f"dashboard variable {variable['name']}: not label_values(SELECTOR, LABEL)")
            exprs.append(found[1])
    return exprs


# --------------------------------------------------------------------------- the script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prometheus.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="scrape one target and wait for queries and alerts")
    run.add_argument("--target", required=True, help="the exporter's URL, http(s)://HOST:PORT/PATH")
    run.add_argument("--basic-auth-file", type=Path, help="a file with one line USER:PASSWORD")
    run.add_argument("--bearer-file", type=Path, help="a file with the bearer key")
    run.add_argument("--ca", type=Path, help="the CA bundle that signed an https target's certificate")
    run.add_argument("--server-name", help="the TLS server name, when it is not the URL's host")
    run.add_argument("--rules", type=Path, default=RULES, help="alert rules (default: the role's)")
    run.add_argument("--for", dest="for_", default="1s", help="every rule's `for:` (default 1s)")
    run.add_argument("--query", action="append", default=[], help="wait until this query has a result (repeat)")
    run.add_argument("--alert", action="append", default=[], help="wait until this alert fires (repeat)")
    run.add_argument("--forbid", action="append", default=[], help="fail when a series holds this text (repeat)")
    run.add_argument("--wait", type=float, default=60, help="seconds to wait for each query and alert")
    run.add_argument("--folder", type=Path, help="keep the configuration, data and log here")
    args = parser.parse_args(argv)

    target = Target(args.target, args.basic_auth_file, args.bearer_file, args.ca, args.server_name)
    folder = args.folder or Path(tempfile.mkdtemp(prefix="comfybake-prometheus-"))
    try:
        with running(folder, target, rules=args.rules, for_=args.for_) as server:
            for expr in args.query:
                result = server.wait(f"a result of {expr}", lambda expr=expr: server.query(expr) or None, args.wait)
                print(json.dumps({"query": expr, "result": result}))
            for name in args.alert:
                alerts = server.wait(
                    f"alert {name} to fire",
                    lambda name=name: [a for a in server.alerts() if a["labels"]["alertname"] == name] or None,
                    args.wait,
                )
                print(json.dumps({"alert": name, "firing": alerts}))
            for text in args.forbid:
                found = leaked(server, text)
                if found:
                    print(f"prometheus.py: {len(found)} series of job {JOB} hold a forbidden text", file=sys.stderr)
                    return 1
    except PrometheusError as error:
        print(f"prometheus.py: {error}", file=sys.stderr)
        if (folder / "prometheus.log").is_file():
            print((folder / "prometheus.log").read_text(errors="replace")[-3000:], file=sys.stderr)
        return 1
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
