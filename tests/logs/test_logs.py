"""Logs a machine can read: `comfybake --log-format json` and COMFYBAKE_LOG_FORMAT=json turn every
line a command writes on stderr into one JSON object (time, level, component, host, message, and
the entry, instance or environment concerned), never with a token. Real CLI processes against a
loopback hub; every stderr line is parsed."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from harness.double import free_port
from harness.exporter import port_open
from harness.mockhub import MockHub
from harness.models import CANARY_HF, assert_no_canary, safetensors
from harness.tools import ROOT, venv_bin

from comfybake import logs

T = TypeVar("T")

COMMON = ("time", "level", "component", "host", "message")


def comfybake(*argv: str, log_format: str | None = "json", **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "HF_TOKEN": CANARY_HF, **env}
    environment.pop("COMFYBAKE_LOG_FORMAT", None)
    if log_format is not None:
        environment["COMFYBAKE_LOG_FORMAT"] = log_format
    done = subprocess.run([venv_bin("comfybake"), *argv], capture_output=True, text=True, env=environment, check=False)
    assert_no_canary([done.stdout, done.stderr])
    return done


def lines(stderr: str) -> list[dict[str, Any]]:
    """Every stderr line as a JSON object with the common fields; fails on any other line."""
    found = []
    for line in stderr.splitlines():
        record = json.loads(line)  # a line that is not JSON fails here, with the line in the error
        assert isinstance(record, dict) and all(record.get(key) for key in COMMON), line
        assert record["host"] == socket.gethostname() and record["level"] in ("info", "warning", "error"), line
        assert record["time"].endswith("Z"), line
        found.append(record)
    assert found, "no line on stderr"
    return found


@pytest.fixture
def hub() -> Any:
    with MockHub("127.0.0.1") as server:
        yield server


@pytest.fixture
def cdn() -> Any:
    with MockHub("127.0.0.2") as server:
        yield server


def test_fetch_logs_one_object_per_entry_with_its_name_and_never_a_token(
    hub: MockHub, cdn: MockHub, tmp_path: Path
) -> None:
    """The boot-time fetch's lines: progress, warnings, results and errors, each naming its entry.
    Canaries: the hub's token (sent as a bearer token, echoed back in a response header) and a
    password in a source URL."""
    store = tmp_path / "models"
    store.mkdir()
    hub.add_hf("org/repo", "m.safetensors", safetensors(), cdn=cdn, token=CANARY_HF)
    hub.add_echo("/echo/error-code", "error-code")  # answers 404 with the credential in X-Error-Code
    mirrored = hub.add("/mirrored.bin", b"x" * 4096)
    hub.add("/mirror/vae/mirrored.bin", b"y" * 4096)  # a mirror with other bytes: a warning, then the origin
    canary_url = f"http://someone:{CANARY_HF}@127.0.0.1:{hub.port}/echo/error-code"
    manifest = tmp_path / "models.yml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "store": str(store),
                "hf_endpoint": hub.url,
                "allow_http": True,
                "retries": 1,
                "mirrors": [f"{hub.url}/mirror"],
                "models": [
                    {"url": "hf://org/repo/m.safetensors@main", "dest": "loras/"},
                    {"url": f"{hub.url}/mirrored.bin", "dest": "vae/mirrored.bin", "sha256": mirrored},
                    {"url": canary_url, "dest": "vae/echo.bin"},
                ],
            }
        )
    )
    manifest.chmod(0o600)  # credentials in a URL: not readable by others
    done = comfybake("models", "fetch", str(manifest))
    assert done.returncode == 1, done.stderr
    assert done.stdout == "", "JSON mode keeps the summary off stdout (the journal reads stderr)"
    records = lines(done.stderr)
    assert {record["component"] for record in records} == {"models"}
    by_entry: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_entry.setdefault(record.get("entry", ""), []).append(record)
    assert set(by_entry) >= {"loras/", "vae/mirrored.bin", "vae/echo.bin"}, done.stderr
    assert any(r.get("action") == "downloaded" for r in by_entry["loras/"])
    assert any(r["level"] == "warning" for r in by_entry["vae/mirrored.bin"]), done.stderr
    failed = [r for r in by_entry["vae/echo.bin"] if r["level"] == "error"]
    assert failed and "<redacted>" in failed[0]["message"], by_entry["vae/echo.bin"]
    assert "someone:" not in done.stderr, "the URL's credentials reached the log"
    assert records[-1]["totals"] == {"downloaded": 2, "failed": 1}, records[-1]


def test_text_mode_keeps_plain_lines_and_the_summary_on_stdout(hub: MockHub, tmp_path: Path) -> None:
    store = tmp_path / "models"
    store.mkdir()
    digest = hub.add("/a.bin", b"a" * 100)
    manifest = tmp_path / "models.yml"
    manifest.write_text(yaml.safe_dump([{"url": f"{hub.url}/a.bin", "dest": "vae/a.bin", "sha256": digest}]))
    for log_format in (None, "text"):
        done = comfybake("models", "fetch", str(manifest), "--store", str(store), "--allow-http", log_format=log_format)
        assert done.returncode == 0, done.stderr
        assert "present" in done.stdout or "downloaded" in done.stdout, done.stdout
        assert not any(line.startswith("{") for line in done.stderr.splitlines()), done.stderr


def test_the_global_option_wins_over_the_environment_and_usage_errors_are_objects(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yml"
    done = comfybake(
        "--log-format", "json", "models", "fetch", str(missing), "--store", str(tmp_path), log_format="text"
    )
    assert done.returncode == 2
    [record] = lines(done.stderr)
    assert record["level"] == "error" and str(missing) in record["message"], record
    assert not record["message"].startswith("error:"), "the level is a field, not a prefix"
    usage = comfybake("models", "no-such-action")
    assert usage.returncode == 2
    assert [r["level"] for r in lines(usage.stderr)][-1] == "error", usage.stderr
    joined = comfybake("--log-format=json", "models", "no-such-action", log_format=None)
    assert [r["component"] for r in lines(joined.stderr)] == ["models", "models"], joined.stderr
    plain = comfybake("--log-format", "text", "models", "fetch", str(missing), "--store", str(tmp_path))
    assert plain.stderr.startswith("error: cannot read manifest"), plain.stderr


def test_an_unknown_log_format_is_refused_naming_the_value(tmp_path: Path) -> None:
    done = comfybake("models", "du", "--config-root", str(tmp_path), log_format="yaml")
    assert done.returncode == 2
    assert "COMFYBAKE_LOG_FORMAT 'yaml' is not a log format: use one of text, json" in done.stderr, done.stderr
    option = comfybake("--log-format", "yaml", "models", "du", log_format=None)
    assert option.returncode == 2 and "invalid choice: 'yaml'" in option.stderr, option.stderr


def test_instances_errors_are_objects_of_their_component(tmp_path: Path) -> None:
    done = comfybake("instances", "--config-root", str(tmp_path / "absent"), "status")
    assert done.returncode == 2
    [record] = lines(done.stderr)
    assert (record["component"], record["level"]) == ("instances", "error"), record
    environments = comfybake("environments", "--config-root", str(tmp_path / "absent"), "list")
    assert lines(environments.stderr)[0]["component"] == "environments", environments.stderr


def test_the_keeper_reports_on_stdout_in_text_mode_and_objects_naming_the_instance_in_json(tmp_path: Path) -> None:
    """The keeper (supervisord's stand-in for timers) is long-running: its reports are log lines."""
    for name in ("a", "b"):
        old = tmp_path / "state" / name / "output" / "old.png"
        old.parent.mkdir(parents=True)
        old.write_bytes(b"x")
        os.utime(old, (time.time() - 40 * 86400,) * 2)
    records = [{"name": name, "state_dir": str(tmp_path / "state" / name)} for name in ("a", "b")]
    (tmp_path / "instances.json").write_text(
        json.dumps({"instances": records, "retry_interval": 0, "retention_days": 30, "service_manager": "systemd"})
    )
    keeper = ("instances", "--config-root", str(tmp_path), "keeper", "--once")
    done = comfybake(*keeper)
    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr
    cleaned = {record["instance"]: record["message"] for record in lines(done.stderr)}
    assert cleaned == {"a": "a: deleted 1 files older than 30 days", "b": "b: deleted 1 files older than 30 days"}
    assert {record["component"] for record in lines(done.stderr)} == {"instances"}


def test_the_retry_and_clean_units_report_objects_naming_the_instance_in_json(tmp_path: Path) -> None:
    """comfyui-retry@ and comfyui-clean@ run `comfybake --log-format json instances retry|clean`: in
    JSON mode their reports leave stdout (the journal would get them as plain lines)."""
    old = tmp_path / "state" / "a" / "output" / "old.png"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 40 * 86400,) * 2)
    records: list[dict[str, Any]] = [
        {"name": "a", "state_dir": str(tmp_path / "state" / "a"), "unit": "comfyui@a.service", "port": 8188}
    ]
    (tmp_path / "instances.json").write_text(json.dumps({"instances": records}))
    retried = comfybake("instances", "--config-root", str(tmp_path), "retry", "a")
    assert retried.returncode == 0 and retried.stdout == "", retried.stdout + retried.stderr
    [record] = lines(retried.stderr)
    assert (record["level"], record["instance"]) == ("info", "a"), record
    assert record["message"] == "a: not in a crash loop, left alone", record
    cleaned = comfybake("instances", "--config-root", str(tmp_path), "clean", "a")
    assert cleaned.returncode == 0 and cleaned.stdout == "", cleaned.stdout + cleaned.stderr
    [record] = lines(cleaned.stderr)
    assert (record["level"], record["instance"]) == ("info", "a"), record
    assert record["message"] == "a: deleted 1 files (1 B) older than 30 days", record


@pytest.mark.skipif(os.geteuid() != 0, reason="works as another account: needs root")
def test_clean_s_errors_are_errors_naming_the_instance_in_json(tmp_path: Path) -> None:
    """As root under supervisor, clean works as each instance's account: `nobody` cannot reach a's
    folder (below root's 0700 tmp) and b's record has no state folder (the forked child fails)."""
    records = [
        {"name": "a", "state_dir": str(tmp_path / "state" / "a"), "user": "nobody", "port": 8188},
        {"name": "b", "user": "nobody", "port": 8189},
    ]
    (tmp_path / "instances.json").write_text(json.dumps({"instances": records, "manager": "supervisor"}))
    failed = comfybake("instances", "--config-root", str(tmp_path), "clean")
    assert failed.returncode == 1 and failed.stdout == "", failed.stdout + failed.stderr
    errors = [record for record in lines(failed.stderr) if record["level"] == "error"]
    by_instance = {record.get("instance", ""): record["message"] for record in errors}
    assert "cannot delete" in by_instance["a"] and "Permission denied" in by_instance["a"], failed.stderr
    assert "could not work as the account nobody" in by_instance["b"], failed.stderr
    assert any(record["message"].startswith("comfybake instances: as nobody: ") for record in errors), failed.stderr


def test_an_unexpected_error_is_one_redacted_object_with_its_traceback(tmp_path: Path) -> None:
    """An exception no command expected (here a retry interval that is not a number, holding a URL
    with credentials) comes out as one error object, redacted, not Python's plain traceback."""
    url = f"https://someone:{CANARY_HF}@example.org/"
    (tmp_path / "instances.json").write_text(json.dumps({"instances": [], "retry_interval": url}))
    keeper = ("instances", "--config-root", str(tmp_path), "keeper", "--once")
    done = comfybake(*keeper)  # assert_no_canary: the credentials are redacted
    assert done.returncode == 1 and done.stdout == "", done.stdout + done.stderr
    [record] = lines(done.stderr)
    assert record["level"] == "error" and record["message"].startswith("ValueError: invalid literal"), record
    assert "https://***@example.org/" in record["message"], record
    assert record["traceback"].startswith("Traceback (most recent call last):"), record
    assert "someone:" not in done.stderr
    plain = comfybake(*keeper, log_format="text")
    assert plain.returncode == 1 and "Traceback (most recent call last):" in plain.stderr.replace(CANARY_HF, "")


def test_the_log_format_option_takes_any_case_as_the_environment_does(tmp_path: Path) -> None:
    for argv, environment in ((("--log-format", "JSON"), None), ((), "JSON")):
        done = comfybake(
            *argv, "instances", "--config-root", str(tmp_path / "absent"), "status", log_format=environment
        )
        assert done.returncode == 2
        [record] = lines(done.stderr)
        assert record["component"] == "instances" and "invalid choice" not in record["message"], record


def exporter_serving(tmp_path: Path, while_serving: Callable[[list[str], int], T]) -> tuple[int, str, T]:
    """A real `comfybake exporter serve` in JSON mode on a free port: `while_serving(command, port)`
    runs once it listens, then SIGTERM stops it. Returns the port, its stderr and what the call returned."""
    (tmp_path / "instances.json").write_text(json.dumps({"instances": []}))
    port = free_port()
    environment = {**os.environ, "COMFYBAKE_LOG_FORMAT": "json"}
    command = [venv_bin("comfybake"), "exporter", "serve", "--config-root", str(tmp_path)]
    command += ["--listen", f"127.0.0.1:{port}", "--state", str(tmp_path / "exporter.json")]
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=environment) as process:
        try:
            deadline = time.monotonic() + 30
            while not port_open(port) and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert port_open(port), "the exporter did not start"
            result = while_serving(command, port)
        finally:
            process.send_signal(signal.SIGTERM)
            _out, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    return port, stderr, result


def test_the_exporter_logs_a_failed_request_as_one_warning(tmp_path: Path) -> None:
    """socketserver prints a banner and a traceback for a request that failed: one object instead."""

    def reset_twice(_command: list[str], port: int) -> None:
        for _attempt in range(2):
            with socket.create_connection(("127.0.0.1", port)) as client:
                client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                time.sleep(0.2)
                # headers unfinished; close with RST while the server reads them (SO_LINGER 0)
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        time.sleep(0.5)

    _port, stderr, _none = exporter_serving(tmp_path, reset_twice)
    records = lines(stderr)
    assert [record["level"] for record in records] == ["info", "warning", "warning", "info"], stderr
    for failed in records[1:3]:
        assert failed["client"] == "127.0.0.1" and "request from 127.0.0.1 failed: " in failed["message"], failed


def test_the_exporter_logs_start_stop_and_errors(tmp_path: Path) -> None:
    port, stderr, busy = exporter_serving(tmp_path, lambda command, _port: comfybake(*command[1:]))  # the same port
    started, stopped = lines(stderr)
    assert started["component"] == stopped["component"] == "exporter"
    assert "serving /metrics" in started["message"] and "stopped" in stopped["message"], stderr
    assert started["listen"] == f"127.0.0.1:{port}"
    assert busy.returncode == 2
    [error] = lines(busy.stderr)
    assert error["level"] == "error" and error["listen"] == f"127.0.0.1:{port}", error


def test_the_roles_run_comfybake_in_the_log_format_and_instances_keep_their_journal_identity() -> None:
    """Every unit, program and entrypoint line of the roles that runs comfybake passes
    comfyui_log_format (through _comfyui_cli_logged, or the argument itself); ComfyUI's own output
    stays in the journal under the instance's identity (comfyui-<name>), whatever the format."""
    runs = re.compile(r"\{\{ _comfyui_cli(?: \| [^}]*)? \}\}(?P<rest> [a-z-]+)")
    found = 0
    for path in sorted((ROOT / "roles").glob("*/templates/*.j2")) + sorted((ROOT / "roles").glob("*/vars/main.yml")):
        for match in runs.finditer(path.read_text()):
            found += 1
            assert match["rest"] == " --log-format", f"{path.relative_to(ROOT)} runs comfybake{match['rest']} ..."
    assert found >= 1  # supervisord's keeper (quoted for supervisor)
    logged = yaml.safe_load((ROOT / "roles/comfyui/vars/main.yml").read_text())
    assert logged["_comfyui_cli_logged"] == "{{ _comfyui_cli }} --log-format {{ comfyui_log_format }}"
    assert "'--log-format', comfyui_log_format, 'exporter'" in logged["_comfyui_exporter_argv"]
    models = yaml.safe_load((ROOT / "roles/comfyui_models/vars/main.yml").read_text())
    assert models["_comfyui_models_boot_command"].startswith("{{ _comfyui_cli_logged }} models fetch ")
    instance = (ROOT / "roles/comfyui_instances/templates/comfyui@.service.j2").read_text()
    assert "SyslogIdentifier=comfyui-%i\n" in instance
    defaults = yaml.safe_load((ROOT / "roles/comfyui/defaults/main.yml").read_text())
    spec = yaml.safe_load((ROOT / "roles/comfyui/meta/argument_specs.yml").read_text())
    option = spec["argument_specs"]["main"]["options"]["comfyui_log_format"]
    assert defaults["comfyui_log_format"] == option["default"] == "text"
    assert option["choices"] == ["text", "json"]
    # The spec and the docs' row say how the roles pass it, and to which components.
    row = next(
        line for line in (ROOT / "docs/configuration.md").read_text().splitlines() if "`comfyui_log_format`" in line
    )
    for text in (" ".join(option["description"]), row):
        assert "--log-format" in text and "COMFYBAKE_LOG_FORMAT" not in text, text
        for component in ("model fetch", "exporter", "clean", "retry", "instances prepare", "keeper"):
            assert component in text, f"{component!r} missing from {text!r}"


def test_the_exporter_reports_a_failed_thread_as_one_error_object(monkeypatch: pytest.MonkeyPatch) -> None:
    """In process: the hook `exporter serve` sets for threads, a real thread that raises."""
    from comfybake import exporter

    sink = io.StringIO()
    monkeypatch.setattr("sys.stderr", logs.JsonLines(sink, "exporter"))
    monkeypatch.setattr("threading.excepthook", exporter._thread_failed)

    def fail() -> None:
        raise RuntimeError(f"cannot reach https://someone:{CANARY_HF}@example.org/")

    thread = threading.Thread(target=fail, name="exporter-a")
    thread.start()
    thread.join()
    [record] = lines(sink.getvalue())
    assert record["level"] == "error" and record["message"].startswith("comfybake exporter: thread exporter-a failed: ")
    assert "RuntimeError" in record["traceback"] and "https://***@example.org/" in record["message"], record
    assert_no_canary([sink.getvalue()])


def test_json_lines_keep_a_redraw_s_last_state_drop_blank_lines_and_redact_every_field() -> None:
    """In process: what the stream does with the shapes of text commands write."""
    sink = io.StringIO()
    stream = logs.JsonLines(sink, "models")
    stream.write("\r\033[K[###.....] 1 MiB\r\033[K   downloaded  loras/a.safetensors\n\n")
    stream.write(f"warning: https://user:{CANARY_HF}@hub/x ")
    stream.write("half\n")
    stream.close()
    records = lines(sink.getvalue())
    assert [(r["level"], r["message"]) for r in records] == [
        ("info", "downloaded  loras/a.safetensors"),
        ("warning", "https://***@hub/x half"),
    ]
    found = logs.record("m", "models", hf_token=CANARY_HF, source={"url": f"https://u:{CANARY_HF}@h/"})
    assert found["hf_token"] == "<redacted>" and found["source"] == {"url": "https://***@h/"}
    assert_no_canary([json.dumps(found)])
