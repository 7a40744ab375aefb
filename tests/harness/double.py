"""Run the ComfyUI test double (tests/comfyui_double) as a real process on loopback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DOUBLE = Path(__file__).resolve().parents[1] / "comfyui_double"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGTERM a server the tests started, then SIGKILL it if it has not exited after `timeout` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Double:
    """A running double: its process, port, log file and HTTP helpers."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def get(self, route: str) -> tuple[int, object]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{route}", timeout=5) as response:
                body = response.read()
                status = response.status
        except urllib.error.HTTPError as error:
            body, status = error.read(), error.code
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode()

    def post(self, route: str, payload: object) -> tuple[int, object]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{route}", data=json.dumps(payload).encode(), method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback http
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(timeout=10)


def run_double(code: Path, *args: str, log: Path) -> subprocess.CompletedProcess[str]:
    """Run main.py to completion (for --quick-test-for-ci and argument errors)."""
    done = subprocess.run(
        [sys.executable, "-s", str(code / "main.py"), *args], capture_output=True, text=True, timeout=60
    )
    log.write_text(done.stdout + done.stderr)
    return done
