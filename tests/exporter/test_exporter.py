"""`comfybake exporter` against test-double instances on loopback: real HTTP, real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness.double import free_port
from harness.exporter import STATS, TRICKLE, exporter, samples, stand_in, value, write_host
from harness.tools import venv_bin

from comfybake import exporter as exporter_module
from comfybake.engine import environment
from comfybake.engine.environment.builder import Pins
from comfybake.engine.redaction import redact_data

Start = Callable[..., dict[str, Any]]
PROMPT = {"1": {"class_type": "KSampler", "inputs": {}}}


def queue(record: dict[str, Any], seconds: float) -> str:
    status, body = record["double"].post("/prompt", {"prompt": PROMPT, "extra_data": {"test_double_seconds": seconds}})
    assert status == 200, body
    return str(body["prompt_id"])


def drained(record: dict[str, Any]) -> None:
    deadline = time.monotonic() + 10
    while record["double"].get("/prompt")[1]["exec_info"]["queue_remaining"]:
        assert time.monotonic() < deadline, "the double's queue did not drain"
        time.sleep(0.05)


def scrape(config_root: Path, *argv: str, env: dict[str, str] | None = None) -> dict[Any, float]:
    done = exporter("scrape", "--config-root", str(config_root), *argv, env=env)
    assert done.returncode == 0, done.stderr
    return samples(done.stdout)


def test_up_ready_queue_and_vram(start: Start, tmp_path: Path) -> None:
    a = start("a")
    # The same process, configured with another command line: up, but not ready (comfyui_wait's rule).
    b = {**a, "name": "b", "args": [*a["args"], "--reserve-vram", "2"]}
    config = write_host(tmp_path / "etc", [a, b])
    queue(a, 5)
    queue(a, 5)
    found = scrape(config)
    for name, up, ready in (("a", 1, 1), ("b", 1, 0)):
        labels = {"instance": name, "environment": "comm"}
        assert value(found, "comfybake_instance_up", **labels) == up
        assert value(found, "comfybake_instance_ready", **labels) == ready
        assert value(found, "comfybake_queue_running", **labels) == 1
        assert value(found, "comfybake_queue_pending", **labels) == 1
        for index, device in enumerate(("cuda:0 Test Double GPU 0", "cuda:1 Test Double GPU 1")):
            assert value(found, "comfybake_vram_total_bytes", **labels, device=device) == 24 * 1024**3
            assert value(found, "comfybake_vram_free_bytes", **labels, device=device) == (20 - index) * 1024**3
    a["double"].post("/interrupt", {})
    assert value(found, "comfybake_exporter_scrape_duration_seconds") is not None
    assert not any(name == "comfybake_instance_restarts" for name, _labels in found), "no systemd here"


def test_prompts_are_counted_once_across_exporter_processes(start: Start, tmp_path: Path) -> None:
    a = start("a")
    state = tmp_path / "var" / "exporter.json"
    config = write_host(tmp_path / "etc", [a])
    labels = {"instance": "a", "environment": "comm"}
    first_id = queue(a, 0)
    queue(a, 0)
    queue(a, 5)
    time.sleep(0.3)
    a["double"].post("/interrupt", {})  # the running prompt ends as a failure
    drained(a)
    first = scrape(config, "--state", str(state))
    assert value(first, "comfybake_instance_ready", **labels) == 1, first
    assert value(first, "comfybake_prompts_completed_total", **labels) == 2
    assert value(first, "comfybake_prompts_failed_total", **labels) == 1
    assert value(first, "comfybake_prompt_duration_seconds_count", **labels) == 3
    assert json.loads(state.read_text())["instances"]["a"]["completed"] == 2
    # A second exporter process: the prompts still in /history are not counted again, the new one
    # is, and those ComfyUI has dropped from /history (it keeps a bounded number) stay counted.
    status, _body = a["double"].post("/history", {"delete": [first_id]})
    assert status == 200 and first_id not in a["double"].get("/history")[1]
    queue(a, 0)
    drained(a)
    second = scrape(config, "--state", str(state))
    assert value(second, "comfybake_instance_ready", **labels) == 1, second
    assert value(second, "comfybake_prompts_completed_total", **labels) == 3
    assert value(second, "comfybake_prompts_failed_total", **labels) == 1
    assert value(second, "comfybake_prompt_duration_seconds_count", **labels) == 4
    assert value(second, "comfybake_prompt_duration_seconds_bucket", **labels, le="+Inf") == 4
    third = scrape(config, "--state", str(state))
    assert value(third, "comfybake_prompts_completed_total", **labels) == 3
    # A state file that is not JSON is kept for the operator; an error is counted, nothing re-counted in it.
    for text in ("{broken", '{"format": 1, "instances": []}'):
        state.write_text(text)
        broken = scrape(config, "--state", str(state))
        assert value(broken, "comfybake_exporter_errors_total", instance="", what="state") == 1
        assert state.read_text() == text
    # The default state file is under the config root.
    scrape(config)
    assert (config / "state" / "exporter.json").is_file()


def serve(config: Path, state: Path, *argv: str) -> tuple[subprocess.Popen[str], int]:
    """`comfybake exporter serve --timeout 1` on a free loopback port (stop it with stop())."""
    port = free_port()
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "comfybake", "exporter", "serve", "--config-root", str(config)),
            *("--listen", f"127.0.0.1:{port}", "--timeout", "1", "--state", str(state), *argv),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    return server, port


def get(server: subprocess.Popen[str], port: int) -> dict[Any, float]:
    """One GET /metrics, once the exporter listens (a 30 s limit: a scrape that hangs fails the test)."""
    deadline = time.monotonic() + 30
    while True:
        assert server.poll() is None and time.monotonic() < deadline, server.stderr
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
                return samples(response.read().decode())
        except urllib.error.URLError as error:
            if not isinstance(error.reason, ConnectionRefusedError):
                raise
            time.sleep(0.1)


def stop(server: subprocess.Popen[str]) -> None:
    server.terminate()
    assert server.wait(timeout=10) == 0


def errors_of(found: dict[Any, float], instance: str) -> dict[str, float]:
    return {
        dict(labels)["what"]: v
        for (name, labels), v in found.items()
        if name == "comfybake_exporter_errors_total" and dict(labels)["instance"] == instance
    }


def test_a_hung_instance_costs_at_most_the_timeout(start: Start, tmp_path: Path) -> None:
    """The hung instance answers /system_stats, then sends /queue a byte every half second for a
    minute: no socket timeout ever fires, only the scrape's deadline bounds it (urlopen's 30 s
    limit fails the test without one)."""
    a = start("a")
    with stand_in("hung", queue=TRICKLE) as hung:
        server, port = serve(write_host(tmp_path / "etc", [a, hung]), tmp_path / "state.json")
        try:
            found = get(server, port)
        finally:
            stop(server)
    labels = {"instance": "hung", "environment": "comm"}
    assert value(found, "comfybake_instance_up", instance="a", environment="comm") == 1
    assert value(found, "comfybake_instance_up", **labels) == 1, "it answered /system_stats"
    assert value(found, "comfybake_vram_total_bytes", **labels, device="cuda:0 Stand-in") == 24
    assert value(found, "comfybake_queue_running", **labels) is None
    assert errors_of(found, "hung") == {"timeout": 1}


def test_a_slow_route_keeps_what_the_instance_answered(tmp_path: Path) -> None:
    """/history answering after the deadline: up, ready, queue and VRAM from the routes that
    answered in time, and one `timeout` error."""
    with stand_in(history=(3, {})) as slow:
        done = exporter("scrape", "--config-root", str(write_host(tmp_path / "etc", [slow])), "--timeout", "1")
    assert done.returncode == 0, done.stderr
    found = samples(done.stdout)
    labels = {"instance": "odd", "environment": "comm"}
    assert value(found, "comfybake_instance_up", **labels) == 1
    assert value(found, "comfybake_instance_ready", **labels) == 1
    assert value(found, "comfybake_queue_pending", **labels) == 0
    assert value(found, "comfybake_vram_free_bytes", **labels, device="cuda:0 Stand-in") == 20
    assert errors_of(found, "odd") == {"timeout": 1}


def test_concurrent_scrapes_share_one_collection(tmp_path: Path) -> None:
    """Four GETs at once against an instance slow on /history: they wait for the collection under
    way and share it (one `timeout` counted for all four), not for each other's in turn."""
    with stand_in(history=(3, {})) as slow:
        server, port = serve(write_host(tmp_path / "etc", [slow]), tmp_path / "state.json")
        try:
            assert errors_of(get(server, port), "odd") == {"timeout": 1}  # listening, one collection done
            with ThreadPoolExecutor(4) as pool:
                scrapes = list(pool.map(lambda _n: get(server, port), range(4)))
        finally:
            stop(server)
    assert [errors_of(found, "odd") for found in scrapes] == [{"timeout": 2}] * 4
    assert all(found == scrapes[0] for found in scrapes), "one collection's metrics"


def test_odd_answers_are_counted_for_their_instance_only(tmp_path: Path) -> None:
    """One instance's malformed answers, one that makes the probe raise, and a record without a
    port: each is an error of its own instance; the good instance is reported, the scrape exits 0."""
    good_history = {"p1": {"status": {"status_str": "success", "messages": []}}}
    odd_stats = {**STATS, "devices": [{"name": "cuda:0", "vram_total": "lots", "vram_free": 1}]}
    odd_queue = {"queue_running": 5, "queue_pending": []}
    with (
        stand_in("good", history=good_history) as good,
        stand_in("odd", system_stats=odd_stats, queue=odd_queue, history={"p1": {"status": "success"}}) as odd,
        stand_in("listed", system_stats=[1]) as listed,
    ):
        noport = {"name": "noport", "environment": "comm", "unit": "comfyui@noport.service"}
        config = write_host(tmp_path / "etc", [good, odd, listed, noport])
        state = tmp_path / "state.json"
        done = exporter("scrape", "--config-root", str(config), "--state", str(state))
        assert done.returncode == 0, done.stderr
        assert "asking instance listed (probe) failed: AttributeError" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
        found = samples(done.stdout)
        # A state file whose instance record lacks its fields: kept, counted in memory, exit 0.
        state.write_text(json.dumps({"format": 1, "instances": {"good": {"completed": 1}}, "errors": {}}))
        broken = scrape(config, "--state", str(state))
    good_labels = {"instance": "good", "environment": "comm"}
    assert value(found, "comfybake_instance_up", **good_labels) == 1
    assert value(found, "comfybake_prompts_completed_total", **good_labels) == 1
    assert errors_of(found, "good") == {}
    assert value(found, "comfybake_instance_up", instance="odd", environment="comm") == 1
    assert value(found, "comfybake_queue_running", instance="odd", environment="comm") is None
    assert not [
        labels for name, labels in found if name == "comfybake_vram_total_bytes" and ("instance", "odd") in labels
    ]
    assert errors_of(found, "odd") == {"history": 1, "queue": 1, "system_stats": 1}
    assert value(found, "comfybake_instance_up", instance="listed", environment="comm") == 0
    assert errors_of(found, "listed") == {"probe": 1}
    assert errors_of(found, "noport") == {"instances_json": 1}
    assert value(broken, "comfybake_exporter_errors_total", instance="", what="state") == 1
    assert value(broken, "comfybake_instance_up", **good_labels) == 1


def test_the_history_window_and_forgotten_instances(start: Start, tmp_path: Path) -> None:
    """/history is asked for its newest HISTORY_WINDOW prompts only; an instance removed from
    instances.json is forgotten with its error series."""
    a = start("a")
    gone = {"name": "gone", "environment": "comm", "port": free_port()}
    state = tmp_path / "state.json"
    labels = {"instance": "a", "environment": "comm"}
    window = exporter_module.HISTORY_WINDOW
    for _ in range(window + 4):
        queue(a, 0)
    drained(a)
    assert len(a["double"].get(f"/history?max_items={window}")[1]) == window
    first = scrape(write_host(tmp_path / "etc", [a, gone]), "--state", str(state))
    assert value(first, "comfybake_prompts_completed_total", **labels) == window
    assert len(json.loads(state.read_text())["instances"]["a"]["seen"]) == window
    assert errors_of(first, "gone") == {"system_stats": 1}
    queue(a, 0)
    drained(a)
    second = scrape(write_host(tmp_path / "etc", [a]), "--state", str(state))
    assert value(second, "comfybake_prompts_completed_total", **labels) == window + 1
    assert errors_of(second, "gone") == {}
    assert set(json.loads(state.read_text())["instances"]) == {"a"}


def test_moving_the_state_away_restarts_the_counters_of_a_running_exporter(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    server, port = serve(tmp_path / "etc", state)  # no instances.json: an error counted per scrape
    try:
        assert value(get(server, port), "comfybake_exporter_errors_total", instance="", what="instances_json") == 1
        assert value(get(server, port), "comfybake_exporter_errors_total", instance="", what="instances_json") == 2
        state.rename(tmp_path / "old-state.json")
        found = get(server, port)
    finally:
        stop(server)
    assert value(found, "comfybake_exporter_errors_total", instance="", what="instances_json") == 1
    assert json.loads(state.read_text())["errors"] == {"\tinstances_json": 1}


def test_a_missing_lock_names_its_environment(tmp_path: Path) -> None:
    record = {"name": "a", "environment": "comm", "port": free_port()}
    config = write_host(tmp_path / "etc", [record], code_root=str(tmp_path / "opt"))
    done = exporter("scrape", "--config-root", str(config), "--state", str(tmp_path / "state.json"))
    assert done.returncode == 0, done.stderr
    assert value(samples(done.stdout), "comfybake_exporter_errors_total", instance="", what="lock") == 1
    lock = tmp_path / "opt" / "envs" / "comm" / "current" / "comfybake.lock.json"
    assert f"environment comm has no readable live lock {lock}" in done.stderr


TOKEN = "hf_exporterSecretToken0123456789"


def test_info_metrics_from_a_lock_and_no_token_anywhere(tmp_path: Path) -> None:
    code_root = tmp_path / "opt"
    env = code_root / "envs" / "comm"
    release = env / "releases" / "0123456789abcdef"
    release.mkdir(parents=True)
    # The lock's pins as the environment builder writes them (Pins.summary, then redaction).
    spec = environment.Spec(
        name="comm",
        root=str(env),
        comfyui=environment.Source("ComfyUI", "https://git.example.test/ComfyUI.git", "v0.8.0"),
        uv="uv",
        custom_nodes=[environment.Source("ComfyUI-Comfybake-Basic", "https://git.example.test/b.git", "main")],
    )
    pins = Pins("a" * 40, "tag", {"ComfyUI-Comfybake-Basic": "b" * 40})
    lock = dict(
        redact_data({"schema": 1, "environment": "comm", "fingerprint": "0123456789abcdef" * 4, **pins.summary(spec)})
    )
    (release / "comfybake.lock.json").write_text(json.dumps(lock))
    (env / "current").symlink_to("releases/0123456789abcdef")
    build = {"version": 1, "started": 100.0, "finished": 160.0, "duration": 60.0, "success": True}
    (env / "last-build.json").write_text(json.dumps({**build, "release": "0123456789abcdef", "error": TOKEN}))
    store = tmp_path / "models"
    (store / ".comfybake").mkdir(parents=True)
    (store / "loras").mkdir()
    (store / "loras" / "style.safetensors").write_bytes(b"\0" * 4096)
    run = {"version": 1, "started": 10, "finished": 20, "duration": 10, "bytes": 4096, "entries": 1, "failed": 0}
    (store / ".comfybake" / "last-run.json").write_text(json.dumps({**run, "success": True, "last_success": 20}))
    record = {"name": "a", "environment": "comm", "port": free_port(), "env": {"HF_TOKEN": TOKEN}}
    config = write_host(tmp_path / "etc", [record], code_root=str(code_root))
    (config / "models.yml").write_text(f"store: {store}\nbudget: 1000000\nmodels: []\n")
    os.chmod(config / "models.yml", 0o600)
    done = exporter("scrape", "--config-root", str(config), env={"HF_TOKEN": TOKEN, "CIVITAI_TOKEN": TOKEN})
    assert done.returncode == 0, done.stderr
    assert TOKEN not in done.stdout and TOKEN not in done.stderr
    found = samples(done.stdout)
    assert value(found, "comfybake_instance_up", instance="a", environment="comm") == 0
    info = {"environment": "comm", "release": "0123456789abcdef", "comfyui_commit": "a" * 40}
    assert value(found, "comfybake_environment_info", **info) == 1
    node = {"environment": "comm", "node": "ComfyUI-Comfybake-Basic", "commit": "b" * 40}
    assert value(found, "comfybake_node_info", **node) == 1
    assert value(found, "comfybake_environment_build_last_timestamp_seconds", environment="comm") == 160
    assert value(found, "comfybake_environment_build_last_duration_seconds", environment="comm") == 60
    assert value(found, "comfybake_environment_build_last_success", environment="comm") == 1
    labels = {"store": str(store)}
    assert value(found, "comfybake_model_store_used_bytes", **labels) == 4096
    assert value(found, "comfybake_model_store_free_bytes", **labels) > 0  # type: ignore[operator]
    assert value(found, "comfybake_model_store_budget_bytes", **labels) == 1000000
    assert value(found, "comfybake_models_fetch_last_run_timestamp_seconds", **labels) == 20
    assert value(found, "comfybake_models_fetch_last_success_timestamp_seconds", **labels) == 20
    assert value(found, "comfybake_models_fetch_last_duration_seconds", **labels) == 10
    assert value(found, "comfybake_models_fetch_last_bytes", **labels) == 4096
    assert value(found, "comfybake_models_fetch_last_failures", **labels) == 0
    # Written atomically for node_exporter's textfile collector: the same metrics, no token.
    output = tmp_path / "textfile" / "comfybake.prom"
    output.parent.mkdir()
    done = exporter("scrape", "--config-root", str(config), "--output", str(output), env={"HF_TOKEN": TOKEN})
    assert done.returncode == 0, done.stderr
    assert "comfybake_environment_info{" in output.read_text() and TOKEN not in output.read_text()
    assert [path.name for path in output.parent.iterdir()] == ["comfybake.prom"]


def test_the_harness_refuses_a_series_given_twice() -> None:
    text = 'comfybake_instance_up{instance="a",environment="comm"} 1\n'
    assert value(samples(text), "comfybake_instance_up", instance="a", environment="comm") == 1
    with pytest.raises(AssertionError, match="is in the scrape twice"):
        samples(text + text.replace(" 1", " 0"))


def test_a_last_run_record_of_another_version_is_not_read(tmp_path: Path) -> None:
    """The store's last-run record is read by Store.last_run, which takes version 1 only."""
    store = tmp_path / "models"
    (store / ".comfybake").mkdir(parents=True)
    run = {"version": 2, "finished": 20, "duration": 10, "bytes": 4096, "failed": 0, "last_success": 20}
    (store / ".comfybake" / "last-run.json").write_text(json.dumps(run))
    config = write_host(tmp_path / "etc", [])
    (config / "models.yml").write_text(f"store: {store}\nmodels: []\n")
    os.chmod(config / "models.yml", 0o600)
    found = scrape(config, "--state", str(tmp_path / "state.json"))
    assert value(found, "comfybake_model_store_used_bytes", store=str(store)) == 0
    assert not [name for name, _labels in found if name.startswith("comfybake_models_fetch_last_")]


def test_a_host_without_instances_json_counts_an_error_and_still_answers(tmp_path: Path) -> None:
    found = scrape(tmp_path / "etc")
    assert value(found, "comfybake_exporter_errors_total", instance="", what="instances_json") == 1
    assert value(scrape(tmp_path / "etc"), "comfybake_exporter_errors_total", instance="", what="instances_json") == 2
    assert not [name for name, _labels in found if name == "comfybake_instance_up"]


def test_wrong_options_are_named(tmp_path: Path) -> None:
    done = exporter("serve", "--config-root", str(tmp_path), "--listen", "localhost")
    assert done.returncode == 2 and "--listen 'localhost' is not ADDRESS:PORT, such as 127.0.0.1:9721" in done.stderr
    for timeout in ("0", "-1", "61", "1e300", "inf", "nan"):
        done = exporter("scrape", "--config-root", str(tmp_path), "--timeout", timeout)
        shown = f"{float(timeout):g}"
        message = f"--timeout {shown} must be a number of seconds more than 0 and at most 60"
        assert done.returncode == 2 and message in done.stderr, (timeout, done.stderr)


def test_the_prometheus_client_pin_is_one_version() -> None:
    """The exporter names the pin it needs; pyproject.toml, the constraints and this venv agree."""
    root = Path(__file__).resolve().parents[2]
    assert f'"{exporter_module.PROMETHEUS_CLIENT}"' in (root / "pyproject.toml").read_text()
    assert exporter_module.PROMETHEUS_CLIENT in (root / "requirements" / "constraints.txt").read_text().splitlines()
    assert f"prometheus_client=={metadata.version('prometheus_client')}" == exporter_module.PROMETHEUS_CLIENT


SYSTEM_PYTHON = "/usr/bin/python3"  # the host's interpreter, the zipapp's shebang


def test_the_zipapp_carries_its_pinned_client_for_a_python_without_it(tmp_path: Path) -> None:
    """Issue 18 item 1: hosts run `comfybake exporter` from the zipapp with the system python3, which has
    no prometheus_client; build-cli.py bundles the pinned one (and nvidia-ml-py's pynvml), hash-checked."""
    root = Path(__file__).resolve().parents[2]
    probe = subprocess.run([SYSTEM_PYTHON, "-I", "-c", "import prometheus_client"], capture_output=True, check=False)
    assert probe.returncode != 0, f"{SYSTEM_PYTHON} has prometheus_client: this test needs one without it"
    pyz = tmp_path / "comfybake.pyz"
    subprocess.run([sys.executable, "scripts/build-cli.py", "--output", str(pyz)], cwd=root, check=True)
    config = write_host(tmp_path / "etc", [{"name": "a", "environment": "comm", "port": free_port()}])
    argv = [SYSTEM_PYTHON, "-I", str(pyz), "exporter", "scrape", "--config-root", str(config)]
    argv += ["--state", str(tmp_path / "exporter.json")]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert value(samples(done.stdout), "comfybake_instance_up", instance="a", environment="comm") == 0
    where = f"import sys; sys.path.insert(0, {str(pyz)!r}); import pynvml; print(pynvml.__file__)"
    nvml = subprocess.run(
        [SYSTEM_PYTHON, "-I", "-c", where],
        capture_output=True,
        text=True,
        check=False,
    )
    assert nvml.stdout.strip() == f"{pyz}/pynvml.py", nvml.stderr


def test_build_cli_refuses_a_wheel_it_does_not_pin(tmp_path: Path) -> None:
    """--wheel takes the pinned wheels only (by name, then by SHA-256), naming the ones it expects."""
    root = Path(__file__).resolve().parents[2]
    build = [sys.executable, "scripts/build-cli.py", "--output", str(tmp_path / "comfybake.pyz")]
    other = tmp_path / "prometheus_client-0.25.0-py3-none-any.whl"
    other.write_bytes(b"not the pinned wheel")
    done = subprocess.run([*build, "--wheel", str(other)], cwd=root, capture_output=True, text=True, check=False)
    assert done.returncode != 0
    assert f"{other} is not one of the pinned wheels (" in done.stderr
    assert "prometheus_client-0.26.0-py3-none-any.whl" in done.stderr
    forged = tmp_path / f"nvidia_ml_py-{exporter_module.NVML_VERSION}-py3-none-any.whl"
    forged.write_bytes(b"not the published wheel")
    done = subprocess.run([*build, "--wheel", str(forged)], cwd=root, capture_output=True, text=True, check=False)
    assert done.returncode != 0 and f"{forged} has sha256 " in done.stderr and "give the published wheel" in done.stderr
    assert not (tmp_path / "comfybake.pyz").exists()


def test_the_role_bounds_comfyui_exporter_timeout_as_the_exporter_does(
    tmp_path: Path, ansible_env: dict[str, str]
) -> None:
    """The comfyui role's preflight assert, run by ansible-playbook on localhost for each value:
    only a finite number above 0 and at most 60 passes (`--timeout`'s own bound)."""
    root = Path(__file__).resolve().parents[2]
    name = "Assert that the exporter listens on one address and port"
    preflight = yaml.safe_load((root / "roles" / "comfyui" / "tasks" / "preflight.yml").read_text())
    check = next(task for task in preflight if task["name"] == name)
    cases = {"2": True, "60": True, "0.5": True, "0": False, "61": False, "1e300": False, "inf": False, "nan": False}
    tasks = [
        {**check, "vars": {"comfyui_exporter_timeout": timeout}, "register": f"case_{index}", "ignore_errors": True}
        for index, timeout in enumerate(cases)
    ]
    passed = "[" + ", ".join(f"not case_{index}.failed" for index in range(len(cases))) + "]"
    tasks.append({"ansible.builtin.copy": {"content": "{{ " + passed + " | to_json }}", "dest": f"{tmp_path}/passed"}})
    files = [root / "roles" / "comfyui" / folder / "main.yml" for folder in ("defaults", "vars")]
    play = [{"hosts": "localhost", "gather_facts": False, "vars_files": [str(f) for f in files], "tasks": tasks}]
    (tmp_path / "play.yml").write_text(json.dumps(play))
    command = [venv_bin("ansible-playbook"), "-i", "localhost,", "-c", "local", "play.yml"]
    command += ["-e", f"ansible_python_interpreter={sys.executable}"]
    done = subprocess.run(command, cwd=tmp_path, env=ansible_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert dict(zip(cases, json.loads((tmp_path / "passed").read_text()), strict=True)) == cases
