"""The alert rules and the Grafana dashboard shipped with comfyui_exporter: promtool checks them, and
every metric they read is one a real exporter exposes (scraped over test-double instances, with a
lock, last-run records and a models file, so that every family appears)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness.double import free_port
from harness.exporter import exporter, samples, write_host
from harness.prometheus import DASHBOARD, dashboard_exprs, metric_names

Start = Callable[..., dict[str, Any]]
FILES = Path(__file__).resolve().parents[2] / "roles" / "comfyui_exporter" / "files"
RULES = FILES / "prometheus" / "comfybake-rules.yml"
RULE_TESTS = FILES / "prometheus" / "comfybake-rules.test.yml"
ALERTS = {
    "ComfybakeInstanceDown", "ComfybakeInstanceNotReady", "ComfybakeQueueStuck", "ComfybakePromptsFailing",
    "ComfybakeVramNearlyFull", "ComfybakeModelStoreNearlyFull", "ComfybakeModelFetchFailed",
    "ComfybakeInstanceCrashLooping", "ComfybakeEnvironmentBuildFailed", "ComfybakeExporterDown",
}  # fmt: skip
# Names that are not the exporter's: Prometheus's own series.
PROMETHEUS_SERIES = {"up", "ALERTS"}
# The exporter exposes it only where systemd runs the instances (docs/observability.md), which this
# machine does not: it must at least be a metric the exporter writes and the docs list.
SYSTEMD_ONLY = {"comfybake_instance_restarts"}


def nvml_only() -> set[str]:
    """The GPU families (`--nvml auto` on a GPU host, which this machine is not), as the exporter
    renders them for one device that reports every reading; each is also in the docs' table."""
    from types import SimpleNamespace

    from comfybake import exporter as module

    device = {"labels": ["0", "GPU-0", "stand-in"], "utilization": 0.5, "temperature": 40.0, "power": 300.0, "ecc": 0}
    device["memory"] = SimpleNamespace(used=1.0, total=2.0)
    return {sample.name for family in module.gpu_families([device]) for sample in family.samples}


def promtool(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is needed; install Debian's prometheus (scripts/bootstrap.sh does)")
    return subprocess.run([found, *argv], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def series_labels(case: dict[str, Any]) -> list[dict[str, str]]:
    """The labels of each input series of a promtool test case (`name{k="v",...}`), name left out."""
    return [dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', item["series"])) for item in case["input_series"]]


def test_metric_names_reads_promql() -> None:
    expr = (
        'sum by (host, le) (rate(a_bucket{host=~"$host", x="y z"}[$__rate_interval])) / on (host) group_left b '
        "> 0.5 and c offset 1h unless bool d or 1e9 * up"
    )
    assert metric_names(expr) == {"a_bucket", "b", "c", "d", "up"}


def test_rules_pass_promtool_check_and_their_unit_tests() -> None:
    done = promtool("check", "rules", RULES.name, cwd=RULES.parent)
    assert done.returncode == 0 and "SUCCESS: 10 rules found" in done.stdout, done.stdout + done.stderr
    done = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


def test_every_alert_is_there_documented_and_tested_both_ways() -> None:
    found = rules()
    assert {rule["alert"] for rule in found} == ALERTS
    for rule in found:
        assert rule.get("for"), f"{rule['alert']} has no for:"
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
        assert "{{ $labels." in rule["annotations"]["summary"], f"{rule['alert']}'s summary names no label"
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
            # Every case also has series that must not fire: a label set of its input that no alert has.
            firing = [check_alert["exp_labels"].items() for check_alert in check["exp_alerts"]]
            assert any(not any(labels.items() <= alert for alert in firing) for labels in series_labels(case)), (
                f"{case['name']}: every series fires {check['alertname']} at {check['eval_time']}"
            )
    assert fires == ALERTS and quiet == ALERTS
    docs = (Path(__file__).resolve().parents[2] / "docs" / "observability.md").read_text()
    assert [name for name in sorted(ALERTS) if f"`{name}`" not in docs] == []


def test_the_dashboard_is_a_grafana_dashboard_on_a_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"host", "instance"} <= set(variables)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    rows = [panel["title"] for panel in dashboard["panels"] if panel["type"] == "row"]
    assert rows == ["Fleet overview", "Per host", "Per instance"]
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all(target["datasource"]["uid"] == "${datasource}" for target in panel["targets"])
        assert all('host=~"$host"' in target["expr"] for target in panel["targets"]), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    assert len(dashboard_exprs()) > 20


def panel_expr(title: str) -> str:
    """The first query of the dashboard's panel `title`, for every host (`$host` as `.*`)."""
    dashboard = json.loads(DASHBOARD.read_text())
    [panel] = [panel for panel in dashboard["panels"] if panel["title"] == title]
    return str(panel["targets"][0]["expr"]).replace("$host", ".*")


def test_the_fleet_panels_count_what_the_alerts_do(tmp_path: Path) -> None:
    """promtool evaluates two panels' queries on series: "Failed share (1 h)" is 0, not NaN, when
    nothing finished; "Instances not ready" counts an up instance that is not ready, not a down one
    (that one is ComfybakeInstanceDown's, as in the rules)."""
    labels = 'job="comfybake",host="gpu1",environment="comm"'
    series = {
        f'comfybake_prompts_failed_total{{{labels},instance="a"}}': "0x70",
        f'comfybake_prompts_completed_total{{{labels},instance="a"}}': "0x70",
        f'comfybake_instance_up{{{labels},instance="a"}}': "1x70",
        f'comfybake_instance_ready{{{labels},instance="a"}}': "0x70",
        f'comfybake_instance_up{{{labels},instance="b"}}': "0x70",
        f'comfybake_instance_ready{{{labels},instance="b"}}': "0x70",
        f'comfybake_instance_up{{{labels},instance="c"}}': "1x70",
        f'comfybake_instance_ready{{{labels},instance="c"}}': "1x70",
    }
    checks = [
        {"expr": panel_expr("Failed share (1 h)"), "eval_time": "60m", "exp_samples": [{"labels": "{}", "value": 0}]},
        {"expr": panel_expr("Instances not ready"), "eval_time": "60m", "exp_samples": [{"labels": "{}", "value": 1}]},
    ]
    test = {
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": name, "values": values} for name, values in series.items()],
                "promql_expr_test": checks,
            }
        ],
    }
    (tmp_path / "panels.test.yml").write_text(yaml.safe_dump(test))
    done = promtool("test", "rules", "panels.test.yml", cwd=tmp_path)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


def full_host(start: Start, tmp_path: Path) -> Path:
    """A host whose scrape has every family: two doubles (one with a finished prompt), one instance
    that is down (an error counted), a live release's lock, a last build, a models file with a
    budget and a last fetch."""
    a, b = start("a"), start("b")
    status, _body = a["double"].post("/prompt", {"prompt": {"1": {"class_type": "KSampler", "inputs": {}}}})
    assert status == 200
    down = {"name": "down", "environment": "comm", "port": free_port()}
    code_root = tmp_path / "opt"
    env = code_root / "envs" / "comm"
    (env / "releases" / "r1").mkdir(parents=True)
    lock = {"schema": 1, "environment": "comm", "comfyui": {"commit": "a" * 40}, "custom_nodes": []}
    lock["custom_nodes"] = [{"name": "ComfyUI-Comfybake-Basic", "commit": "b" * 40}]
    (env / "releases" / "r1" / "comfybake.lock.json").write_text(json.dumps(lock))
    (env / "current").symlink_to("releases/r1")
    build = {"version": 1, "started": 1, "finished": 2, "duration": 1, "success": False, "release": None, "error": "x"}
    (env / "last-build.json").write_text(json.dumps(build))
    store = tmp_path / "models"
    (store / ".comfybake").mkdir(parents=True)
    run = {"version": 1, "started": 1, "finished": 2, "duration": 1, "bytes": 0, "entries": 0, "failed": 0}
    (store / ".comfybake" / "last-run.json").write_text(json.dumps({**run, "success": True, "last_success": 2}))
    config = write_host(tmp_path / "etc", [a, b, down], code_root=str(code_root))
    (config / "models.yml").write_text(f"store: {store}\nbudget: 1000000\nmodels: []\n")
    (config / "models.yml").chmod(0o600)
    return config


def test_rules_and_dashboard_read_only_metrics_the_exporter_exposes(start: Start, tmp_path: Path) -> None:
    config = full_host(start, tmp_path)
    done = exporter("scrape", "--config-root", str(config), "--state", str(tmp_path / "state.json"))
    assert done.returncode == 0, done.stderr
    exposed = {name for name, _labels in samples(done.stdout)}
    source = (Path(__file__).resolve().parents[2] / "src" / "comfybake" / "exporter.py").read_text()
    docs = (Path(__file__).resolve().parents[2] / "docs" / "observability.md").read_text()
    for name in SYSTEMD_ONLY:
        assert f'"{name}"' in source and f"| `{name}` |" in docs, name
    gpus = nvml_only()
    assert len(gpus) == 6 and all(f"| `{name}` |" in docs for name in gpus), gpus
    known = exposed | PROMETHEUS_SERIES | SYSTEMD_ONLY | gpus
    used = {rule["alert"]: metric_names(rule["expr"]) for rule in rules()}
    used |= {f"dashboard: {expr}": metric_names(expr) for expr in dashboard_exprs()}
    unknown = {where: sorted(names - known) for where, names in used.items() if names - known}
    assert unknown == {}, f"metrics the exporter does not expose: {unknown}; it exposes {sorted(exposed)}"
    assert all(used.values()), [where for where, names in used.items() if not names]
    # Every family the exporter has is read by the dashboard (an unread one is a panel to add).
    histogram = re.compile(r"_(bucket|sum|count)$")
    read = {histogram.sub("", name) for name in set().union(*used.values())}
    assert sorted({histogram.sub("", name) for name in exposed | gpus} - read) == []


def test_the_documented_scrape_config_is_one_prometheus_accepts(tmp_path: Path) -> None:
    """docs/observability.md's "Wiring" example, its files made real: promtool checks it, rules included."""
    docs = (Path(__file__).resolve().parents[2] / "docs" / "observability.md").read_text()
    wiring = docs.split("## Wiring Prometheus and Grafana", 1)[1]
    example = re.search(r"```yaml\n(.*?)```", wiring, re.DOTALL)
    assert example, "no yaml example under Wiring Prometheus and Grafana"
    text = example[1]
    for path in re.findall(r"/etc/prometheus/\S+", text):
        local = tmp_path / Path(path).name
        local.write_text(RULES.read_text() if path.endswith(".yml") else "x\n")
        text = text.replace(path, str(local))
    (tmp_path / "prometheus.yml").write_text(text)
    done = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert done.returncode == 0 and "SUCCESS: 10 rules found" in done.stdout, done.stdout + done.stderr
    job = yaml.safe_load(text)["scrape_configs"][0]
    assert job["job_name"] == "comfybake" and job["honor_labels"] is True
