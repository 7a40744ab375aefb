"""`comfybake jobs serve` as a real process (the job API and the control API), and a small HTTP
client for it over TCP or a unix socket, for the API, restart and benchmark runs.
(A module of its own name: test folders hold no packages, so every conftest is `conftest`.)"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.double import free_port
from harness.jobs import JobInstance
from harness.tools import venv_bin

from comfybake.engine import runtime


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str]


def call(
    listen: str, method: str, route: str, body: Any = None, timeout: float = 60, raw: bytes | None = None
) -> Reply:
    """One request to `listen` (unix:/path or HOST:PORT); the body sent as JSON (or `raw` as is)."""
    if listen.startswith("unix:"):
        connection: http.client.HTTPConnection = runtime.UnixConnection(listen.removeprefix("unix:"), timeout)
    else:
        host, _, port = listen.rpartition(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        connection.request(method, route, data, {"Content-Type": "application/json"} if data is not None else {})
        response = connection.getresponse()
        text = response.read()
        try:
            parsed = json.loads(text) if text else None
        except ValueError:
            parsed = text.decode(errors="replace")
        return Reply(response.status, parsed, {key.lower(): value for key, value in response.getheaders()})
    finally:
        connection.close()


@dataclass
class Served:
    """A running `comfybake jobs serve`; `jobs` and `control` are its listen addresses."""

    process: subprocess.Popen[bytes]
    jobs: str
    control: str
    log: Path

    def job_api(self, method: str, route: str, body: Any = None, timeout: float = 60) -> Reply:
        return call(self.jobs, method, route, body, timeout)

    def control_api(self, method: str, route: str, body: Any = None, timeout: float = 120) -> Reply:
        return call(self.control, method, route, body, timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def finished_lines(self) -> list[dict[str, Any]]:
        """The finished-job log lines (one JSON object each) the process wrote."""
        found = []
        for line in self.output().splitlines():
            if line.startswith("{") and '"job"' in line:
                record = json.loads(line)
                if record.get("component") == "jobs" or "job" in record:
                    found.append(record)
        return found

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)


def written(instance: JobInstance, prefix: str) -> list[Path]:
    """The files an instance's output nodes wrote under `prefix` (ComfyUI names them `<prefix>_00001_.png`)."""
    return [path for path in instance.output_files() if path.name.startswith(f"{prefix}_")]


def serve(
    config_root: Path,
    state_root: Path,
    log: Path,
    *args: str,
    jobs: str | None = None,
    control: str | None = None,
    environ: dict[str, str] | None = None,
) -> Served:
    """Start `comfybake jobs serve` (TCP on loopback unless given) and wait until it answers."""
    jobs = jobs or f"127.0.0.1:{free_port()}"
    control = control or f"127.0.0.1:{free_port()}"
    command = [venv_bin("comfybake"), "jobs", "serve", "--config-root", str(config_root), "--state-root",
               str(state_root), "--jobs-listen", jobs, "--control-listen", control, *args]  # fmt: skip
    with log.open("ab") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, **(environ or {})}
        )
    served = Served(process, jobs, control, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"comfybake jobs serve exited with {process.returncode}:\n{served.output()[-3000:]}")
        try:
            call(jobs, "GET", "/v1/health", timeout=2)
            call(control, "GET", "/v1/health", timeout=2)  # a 404 of the control API: it answers too
            return served
        except OSError:
            time.sleep(0.05)
    served.kill()
    raise AssertionError(f"comfybake jobs serve did not answer within 30 s:\n{served.output()[-3000:]}")
