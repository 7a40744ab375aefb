"""Readiness, draining and port owners (module_utils/runtime.py, shared by the wait module,
the listeners module and `comfybake instances`) against the ComfyUI test double as real processes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness.double import DOUBLE, free_port
from harness.tools import venv_bin

from comfybake.engine import runtime

FIXTURE_NODES = Path(__file__).resolve().parents[1] / "fixtures" / "nodes"

Start = Callable[..., dict[str, Any]]


@pytest.fixture(scope="module")
def code(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ComfyUI tree: the double with a working node, a broken node and one model."""
    tree = tmp_path_factory.mktemp("env") / "ComfyUI"
    shutil.copytree(DOUBLE, tree, ignore=shutil.ignore_patterns("__pycache__"))
    for node in ("ComfyUI-Comfybake-Basic", "ComfyUI-Comfybake-Broken"):
        shutil.copytree(FIXTURE_NODES / node, tree / "custom_nodes" / node)
    (tree / "models" / "loras").mkdir(parents=True)
    (tree / "models" / "loras" / "style.safetensors").write_bytes(b"\0" * 16)
    return tree


@pytest.fixture
def start(code: Path, tmp_path: Path) -> Iterator[Start]:
    """Start an instance of the tree; returns its layout record (args as the role writes them)."""
    processes: list[subprocess.Popen[bytes]] = []

    def run(name: str = "a", *, args: list[str] | None = None, **record: Any) -> dict[str, Any]:
        port = free_port()
        state = tmp_path / name
        (state / "user").mkdir(parents=True, exist_ok=True)
        configured = [
            "--listen", "127.0.0.1", "--port", str(port), "--cpu",
            "--user-directory", str(state / "user"), "--output-directory", str(state / "output"),
            "--database-url", f"sqlite:///{state}/comfyui.db",
        ]  # fmt: skip
        log = tmp_path / f"{name}.log"
        with log.open("wb") as sink:
            command = [sys.executable, "-s", str(code / "main.py"), *(args or configured)]
            processes.append(subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT))
        return {"name": name, "port": port, "args": configured, "log_file": str(log), **record}

    yield run
    for process in processes:
        process.terminate()
        process.wait(timeout=10)


def wait(record: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
    return runtime.wait_ready(runtime.Instance(record), timeout, use_systemd=False)


def test_ready_needs_the_configured_argv_the_node_classes_and_the_models(start: Start) -> None:
    result = wait(start(required_node_classes=["ComfybakeEcho"], required_models={"loras": ["style.safetensors"]}))
    assert result["ready"] is True and result["stage"] == "ready"
    assert "error" not in result


def test_instances_are_asked_directly_whatever_proxy_the_host_names(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A host behind a corporate proxy sets these; the proxy (here: nothing listens) cannot
    # reach the host's loopback, so readiness must never go through it.
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{free_port()}")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    result = wait(start())
    assert result["ready"] is True, result


def test_a_process_with_another_command_line_is_not_ready(start: Start) -> None:
    record = start()
    result = wait(record | {"args": [*record["args"], "--reserve-vram", "2"]}, timeout=3)
    assert result["ready"] is False and result["stage"] == "argv"
    assert result["error"].endswith(f"not the configured '{' '.join(record['args'])} --reserve-vram 2'")


def test_a_missing_node_class_names_the_class_and_the_failed_import(start: Start) -> None:
    result = wait(start(required_node_classes=["ComfybakeEcho", "ComfybakeBroken"]), timeout=120)
    assert result["ready"] is False and result["stage"] == "nodes"
    assert result["seconds"] < 120, "an answering instance lacking a class cannot gain it: no need to wait"
    assert result["error"] == "node class ComfybakeBroken is missing"
    assert list(result["import_failures"]) == ["ComfyUI-Comfybake-Broken"]
    assert "comfybake_fixture_missing_module" in result["import_failures"]["ComfyUI-Comfybake-Broken"]
    assert result["message"].startswith(
        f"instance a (port {result['port']}) is not ready after {result['seconds']:g} s: "
    )
    assert "\n  IMPORT FAILED: custom node ComfyUI-Comfybake-Broken: " in result["message"]
    # ComfyUI's own audio nodes need torchaudio (not in this venv): not a custom node, but named.
    assert list(result["optional_node_failures"]) == ["comfy_extras/nodes_audio.py"]
    audio = "comfy_extras/nodes_audio.py failed to import: No module named 'torchaudio'"
    assert f"\n  ComfyUI's optional node {audio}" in result["message"]
    assert any("IMPORT FAILED" in line for line in result["log"])


def test_missing_models_and_unknown_folders_are_named(start: Start) -> None:
    record = start(required_models={"loras": ["style.safetensors", "gone.safetensors", "also.safetensors"]})
    result = wait(record, timeout=5)
    assert result["stage"] == "models"
    assert result["error"] == "model loras/gone.safetensors is not visible (and 1 more)"
    result = wait(record | {"required_models": {"nope": ["x.bin"]}}, timeout=2)
    assert result["error"] == "model folder nope is unknown to ComfyUI (HTTP 404)"


def test_a_closed_port_times_out_naming_the_port() -> None:
    port = free_port()
    result = wait({"name": "gone", "port": port, "args": []}, timeout=1)
    assert result["ready"] is False and result["stage"] == "starting"
    assert result["error"] == f"port {port} on 127.0.0.1 does not accept connections"
    assert result["seconds"] >= 1


def test_wait_all_waits_for_every_instance_together(start: Start) -> None:
    records = [start(name, required_node_classes=["ComfybakeEcho"]) for name in ("a", "b", "c")]
    results = runtime.wait_all([runtime.Instance(r) for r in records], timeout=30, use_systemd=False)
    assert [(r["name"], r["ready"]) for r in results] == [("a", True), ("b", True), ("c", True)]


def post_prompt(port: int, seconds: float) -> None:
    body = json.dumps({"prompt": {"1": {"class_type": "ComfybakeEcho", "inputs": {"text": "x"}}},
                       "extra_data": {"test_double_seconds": seconds}}).encode()  # fmt: skip
    request = urllib.request.Request(f"http://127.0.0.1:{port}/prompt", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback
        assert response.status == 200


def test_drain_waits_for_the_queue_and_is_bounded(start: Start) -> None:
    record = start()
    assert wait(record)["ready"]
    instance = runtime.Instance(record)
    assert runtime.queue_length(instance) == 0
    post_prompt(record["port"], 2)
    post_prompt(record["port"], 0)
    assert runtime.queue_length(instance) == 2
    bounded = runtime.wait_drained(instance, timeout=0.5, interval=0.1)
    assert bounded["drained"] is False and bounded["queue"] >= 1
    drained = runtime.wait_drained(instance, timeout=20, interval=0.1)
    assert drained == drained | {"drained": True, "queue": 0}
    gone = runtime.wait_drained(runtime.Instance({"name": "x", "port": free_port()}), timeout=5)
    assert gone["drained"] is True and gone["seconds"] < 5


def test_drain_all_drains_every_instance_together(start: Start) -> None:
    records = [start(name) for name in ("a", "b")]
    for record in records:
        assert wait(record)["ready"]
        post_prompt(record["port"], 1)
    results = runtime.drain_all([runtime.Instance(r) for r in records], timeout=20)
    assert [(r["name"], r["drained"], r["queue"]) for r in results] == [("a", True, 0), ("b", True, 0)]
    assert max(r["seconds"] for r in results) < 20


def test_listeners_name_the_process_that_holds_a_port() -> None:
    with socket.socket(socket.AF_INET6) as six:
        six.bind(("::1", 0))
        six.listen()
        assert runtime.listeners()[six.getsockname()[1]]["addresses"] == ["::1"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        found = runtime.listeners()
    assert found[port]["pid"] == os.getpid() and found[port]["uid"] == os.getuid()
    assert found[port]["addresses"] == ["127.0.0.1"]
    assert found[port]["process"] == Path(f"/proc/{os.getpid()}/comm").read_text().strip()
    assert port not in runtime.listeners()


def cli(config_root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    command = [venv_bin("comfybake"), "instances", "--config-root", str(config_root), *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_the_command_line_names_what_is_missing_or_unknown(tmp_path: Path) -> None:
    done = cli(tmp_path, "status")
    assert done.returncode != 0
    assert f"{tmp_path}/instances.json does not exist: converge the host with the comfyui_instances role" in done.stderr
    instances = [{"name": "a", "environment": "comm", "port": 8188}, {"name": "b", "environment": "sp", "port": 8189}]
    (tmp_path / "instances.json").write_text(json.dumps({"format": 1, "instances": instances}))
    done = cli(tmp_path, "restart", "z", "--no-wait")
    assert done.returncode != 0 and "no instance named z (instances: a, b)" in done.stderr
    done = cli(tmp_path, "stop", "--ports", "81x")
    assert done.returncode != 0 and "--ports '81x' is not a port or a range such as 8188-8190" in done.stderr
    done = cli(tmp_path, "stop", "--environment", "nope")
    assert done.returncode != 0 and "no instance matches the selection" in done.stderr
    (tmp_path / "instances.json").write_text(json.dumps({"format": 1, "instances": []}))
    done = cli(tmp_path, "status")
    assert done.returncode == 2
    assert "no instances are configured on this host (comfyui_instances is empty)" in done.stderr


def test_a_wait_is_not_fooled_by_a_slow_start(start: Start, code: Path) -> None:
    """The port opens before custom nodes are checked: ready only once the class answers."""
    record = start(required_node_classes=["ComfybakeEcho"])
    began = time.monotonic()
    result = wait(record)
    assert result["ready"] and result["seconds"] <= time.monotonic() - began + 0.01
