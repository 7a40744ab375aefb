"""Run the gateway as the tests need it: the real Caddy binary on loopback in front of real doubles.

`start_caddy` runs `caddy run --config <config dir>/caddy.json` (the admin API on a unix socket
in the scratch folder, as on a host) and waits until every route's port answers TLS. The
helpers speak to it as clients do: HTTPS verified with the root certificate of the gateway's
own CA (`<storage>/pki/authorities/local/root.crt`), WebSockets with websocket-client (what
Python clients of ComfyUI use), and the browser test drives Debian's chromium.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import shutil
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import websocket

from comfybake import cli
from harness.double import DOUBLE, Double, free_port, stop_process

CA_CERT = Path("pki") / "authorities" / "local" / "root.crt"


def tool(name: str, package: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is needed for the gateway tests; install Debian's {package} (scripts/bootstrap.sh does)")
    return found


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on loopback now."""
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_offset(ports: list[int]) -> int:
    """A port offset that puts every one of `ports` on a free port (the gateway's ports mode)."""
    for offset in range(1000, 4000, 7):
        if all(port + offset < 65536 and port_is_free(port + offset) for port in ports):
            return offset
    pytest.fail(f"no free port offset for the instance ports {ports}")


def start_double(code: Path, state: Path, name: str, port: int | None = None) -> Double:
    """One double on loopback, logging each request's URI and headers (what reached the instance)."""
    port = port or free_port()
    (state / name / "user").mkdir(parents=True, exist_ok=True)
    log = state / f"{name}.log"
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [sys.executable, "-s", str(code / "main.py"), "--listen", "127.0.0.1", "--port", str(port), "--cpu",
             "--disable-auto-launch", "--verbose", "DEBUG", "--user-directory", str(state / name / "user"),
             "--temp-directory", str(state / name), "--database-url", f"sqlite:///{state / name / 'db.sqlite'}"],
            stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    double = Double(process, port, log)
    wait_for_port(port, process, log)
    return double


def copy_double(dest: Path) -> Path:
    """A copy of the double's code (it writes into its tree; the source stays as committed)."""
    code = dest / "ComfyUI"
    if not code.exists():
        shutil.copytree(DOUBLE, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return code


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args[0]} exited with {process.returncode} before port {port} opened:\n"
                        f"{log.read_text()[-3000:]}")  # fmt: skip
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"port {port} did not open within {timeout} s:\n{log.read_text()[-3000:]}")


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


@dataclass
class Gateway:
    """A running `caddy run`: its files, its logs and an HTTPS client that trusts its CA."""

    process: subprocess.Popen[bytes]
    config_dir: Path
    storage: Path
    admin_socket: Path
    stdout: Path
    stderr: Path
    ports: list[int] = field(default_factory=list)

    @property
    def ca(self) -> Path:
        return self.storage / CA_CERT

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def request(
        self,
        port: int,
        path: str = "/",
        *,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        host: str = "localhost",
    ) -> Response:
        """One HTTPS request to 127.0.0.1:`port`, verified for the name `host` (also its Host header)."""
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=60, context=self.context())
        connection.sock = self.context().wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=60), server_hostname=host
        )
        try:
            connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            headers = {"Host": f"{host}:{port}", **(headers or {})}
            for name, value in headers.items():
                connection.putheader(name, value)
            if body is not None:
                connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body)
            response = connection.getresponse()
            return Response(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            connection.close()

    def websocket(
        self, port: int, path: str = "/ws", *, headers: dict[str, str] | None = None, host: str = "localhost"
    ) -> websocket.WebSocket:
        """A WebSocket over TLS to 127.0.0.1:`port` `path` for the name `host`, verified with the
        gateway's CA (raises on a refused upgrade)."""
        sock = self.context().wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=60),
                                          server_hostname=host)  # fmt: skip
        return websocket.create_connection(
            f"wss://{host}:{port}{path}",
            header=[f"{name}: {value}" for name, value in (headers or {}).items()],
            socket=sock,
            timeout=60,
        )

    def written(self) -> str:
        """Everything the gateway wrote: its output and every file in its storage and config folder."""
        parts = [self.stdout.read_text(errors="replace"), self.stderr.read_text(errors="replace")]
        for folder in (self.storage, self.config_dir):
            parts += [p.read_bytes().decode(errors="replace") for p in sorted(folder.rglob("*")) if p.is_file()]
        return "\n".join(parts)

    def stop(self) -> None:
        stop_process(self.process)


def start_caddy(
    config: Path, storage: Path, admin_socket: Path, logs: Path, ports: list[int], tls_name: str = "localhost"
) -> Gateway:
    """`caddy run` with `config`, as the gateway's unit does; waits until its CA exists and its ports answer."""
    caddy = tool("caddy", "caddy")
    logs.mkdir(parents=True, exist_ok=True)
    stdout, stderr = logs / "caddy.stdout", logs / "caddy.stderr"
    # XDG folders and HOME in the scratch space: caddy writes nothing of ours elsewhere.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(logs), "XDG_CONFIG_HOME": str(logs / "xdg-config"),
           "XDG_DATA_HOME": str(logs / "xdg-data")}  # fmt: skip
    with stdout.open("ab") as out, stderr.open("ab") as err:
        process = subprocess.Popen([caddy, "run", "--config", str(config)], stdout=out, stderr=err, env=env)
    gateway = Gateway(process, config.parent, storage, admin_socket, stdout, stderr, ports)
    deadline = time.monotonic() + 30
    for port in ports:
        wait_for_port(port, process, stderr)
    while not gateway.ca.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    for port in ports:  # the leaf certificates are issued at start, a moment after the ports open
        while True:
            try:
                with gateway.context().wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=2),
                                                   server_hostname=tls_name):  # fmt: skip
                    break
            except (OSError, ssl.SSLError):
                if time.monotonic() > deadline:
                    gateway.stop()
                    pytest.fail(f"the gateway did not answer TLS on port {port}:\n{stderr.read_text()[-3000:]}")
                time.sleep(0.1)
    return gateway


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


UPGRADE = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}  # fmt: skip


def leaf_spki(gateway: Gateway, port: int, host: str = "localhost") -> str:
    """base64 SHA-256 of the public key of the certificate `port` serves, verified with the gateway's CA:
    what chromium's --ignore-certificate-errors-spki-list takes (it matches the leaf, not a root)."""
    with gateway.context().wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5),
                                       server_hostname=host) as tls:  # fmt: skip
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    pem = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-pubkey"], input=der,
                         capture_output=True, check=True).stdout  # fmt: skip
    key = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=pem, capture_output=True, check=True)
    return base64.b64encode(hashlib.sha256(key.stdout).digest()).decode()


def chromium_title(
    url: str, spki: str, profile: Path, *, prefix: str = "ws:", timeout: float = 15, resolve: str = "localhost"
) -> str:
    """The title of `url` in headless chromium once it starts with `prefix` (else after `timeout`).

    Driven over the DevTools protocol: --dump-dom's virtual time does not wait for WebSocket
    messages, so the title is polled in real time instead.
    """
    browser = tool("chromium", "chromium")
    profile.mkdir(parents=True, exist_ok=True)
    log = profile.with_suffix(".log")
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}",
             f"--ignore-certificate-errors-spki-list={spki}", "--remote-debugging-address=127.0.0.1",
             "--remote-debugging-port=0", f"--host-resolver-rules=MAP {resolve} 127.0.0.1", "about:blank"],
            stdout=sink, stderr=subprocess.STDOUT, env={"PATH": "/usr/bin:/bin", "HOME": str(profile)},
        )  # fmt: skip
    try:
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not active.exists() or len(active.read_text().splitlines()) < 2:
            if time.monotonic() > deadline or process.poll() is not None:
                pytest.fail(f"chromium did not open its DevTools port:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        port = int(active.read_text().splitlines()[0])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/json/list")
        pages = [t for t in json.loads(connection.getresponse().read()) if t["type"] == "page"]
        connection.close()
        devtools = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=10, suppress_origin=True)
        calls = iter(range(1, 1_000_000))

        def call(method: str, **params: object) -> dict[str, Any]:
            number = next(calls)
            devtools.send(json.dumps({"id": number, "method": method, "params": params}))
            while True:
                answer = json.loads(devtools.recv())
                if answer.get("id") == number:
                    return dict(answer.get("result", {}))

        try:
            call("Page.navigate", url=url)
            title = ""
            while time.monotonic() < deadline:
                title = str(call("Runtime.evaluate", expression="document.title", returnByValue=True)["result"]
                            .get("value", ""))  # fmt: skip
                if title.startswith(prefix):
                    break
                time.sleep(0.1)
            return title
        finally:
            devtools.close()
    finally:
        stop_process(process)


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout} s")
        time.sleep(0.1)


def gateway_command(config_root: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`comfybake gateway --config-root ROOT ARGV...` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = cli.main(["gateway", "--config-root", str(config_root), *argv])
    out, err = capsys.readouterr()
    return code, out, err
