"""Put a rendered configuration in place: validated first, swapped atomically, loaded without a restart.

`caddy validate` checks the candidate (with a throwaway storage folder, so validating creates no
CA or certificate where the gateway keeps its own); only a valid one replaces `caddy.json`. A
running gateway then loads it through its admin socket (Caddy's graceful reload: open
connections, WebSockets included, finish on the old configuration). Where the load fails (a port
another program holds), Caddy keeps serving the old configuration and the old file is put back,
so the file on disk is always the one that serves; a run that finds the file unchanged still
sends it to the gateway, which reloads nothing when it already serves it.

`refresh` is what the command line calls after it changed a user, a key or (on a front) a
member's pool state: it renders again from the inputs the module wrote (`gateway.json`, no
secrets), `credentials.json` and `pool.json`.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any

from ..runtime import UnixConnection
from . import caddy, credentials, pool
from .errors import GatewayError
from .files import read, write

CADDY = "/usr/bin/caddy"
GROUP = "comfybake-gateway"
VALIDATE_TIMEOUT = 60
LOAD_TIMEOUT = 60


@dataclass
class Paths:
    """Where one host's gateway keeps its files."""

    config_dir: str
    caddy: str = CADDY
    group: str = GROUP  # may read caddy.json (the gateway's account); "" leaves root's group

    @property
    def config(self) -> str:
        return os.path.join(self.config_dir, "caddy.json")

    @property
    def inputs(self) -> str:
        return os.path.join(self.config_dir, "gateway.json")

    @property
    def credentials(self) -> str:
        return os.path.join(self.config_dir, "credentials.json")

    @property
    def pool(self) -> str:
        return os.path.join(self.config_dir, "pool.json")

    @property
    def ca(self) -> str:
        return os.path.join(self.config_dir, "ca.crt")


def dump(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def validate(paths: Paths, config: dict[str, Any]) -> None:
    """Refuse a configuration Caddy would not load, with Caddy's own reason."""
    with tempfile.TemporaryDirectory(prefix="comfybake-gateway-") as scratch:
        trial = {**config, "admin": {"disabled": True}, "storage": {"module": "file_system", "root": scratch}}
        candidate = os.path.join(scratch, "caddy.json")
        with open(candidate, "w", encoding="utf-8") as handle:
            handle.write(dump(trial))
        try:
            result = subprocess.run(
                [paths.caddy, "validate", "--config", candidate],
                capture_output=True,
                text=True,
                timeout=VALIDATE_TIMEOUT,
                check=False,
            )
        except FileNotFoundError as error:
            raise GatewayError(f"{paths.caddy} is missing: install Caddy (the comfyui_gateway role does)") from error
    if result.returncode != 0:
        reason = [
            line for line in result.stderr.splitlines() if line.startswith("Error:")
        ] or result.stderr.splitlines()[-1:]
        raise GatewayError(
            f"Caddy refused the new gateway configuration, so the one in {paths.config} stays: "
            f"{' '.join(reason) or 'exit ' + str(result.returncode)}"
        )


def admin(socket_path: str, method: str, route: str, body: bytes | None = None) -> tuple[int, bytes] | None:
    """One request to Caddy's admin API on its unix socket; None when no gateway answers there."""
    if not os.path.exists(socket_path):
        return None
    connection = UnixConnection(socket_path, LOAD_TIMEOUT)
    try:
        # Caddy's admin API accepts no Host on a unix socket but an empty one.
        connection.putrequest(method, route, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", "")
        if body is not None:
            connection.putheader("Content-Type", "application/json")
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, response.read()
    except (ConnectionRefusedError, FileNotFoundError):
        return None  # a socket left behind by a gateway that stopped
    except OSError as error:
        raise GatewayError(f"the gateway's admin socket {socket_path} did not answer: {error}") from error
    finally:
        connection.close()


def apply(paths: Paths, config: dict[str, Any], validated: bool = False) -> bool:
    """Validate `config` (unless the caller just did), swap it in and load it into a running
    gateway; whether the file changed.

    A running gateway is sent the configuration even when the file holds it already (Caddy
    answers "config is unchanged" and reloads nothing), so a load that failed earlier, after the
    file was written, is made good. Where the load fails, the old file is put back.
    """
    text = dump(config)
    old = read(paths.config)
    if old != text and not validated:
        validate(paths, config)
    changed = write(paths.config, text, 0o640, paths.group)
    try:
        answer = admin(config["admin"]["listen"].removeprefix("unix/"), "POST", "/load", text.encode())
    except GatewayError:
        restore(paths, old)
        raise
    if answer is not None and answer[0] != 200:
        restore(paths, old)
        reason = answer[1].decode(errors="replace").strip()
        raise GatewayError(f"the running gateway refused the new configuration and keeps the old one: {reason}")
    return changed


def restore(paths: Paths, old: str | None) -> None:
    """Put back the configuration that serves, after a load that failed."""
    if old is not None:
        write(paths.config, old, 0o640, paths.group)


def save_inputs(paths: Paths, routes: dict[str, Any], settings: dict[str, Any]) -> bool:
    """The inputs `refresh` renders from: routes and settings, no secret."""
    return write(paths.inputs, dump({"format": 1, "routes": routes, "settings": settings}), 0o644)


def refresh(paths: Paths) -> bool:
    """Render again from gateway.json, credentials.json and pool.json, then apply."""
    text = read(paths.inputs)
    if text is None:
        raise GatewayError(f"{paths.inputs} is missing: converge the comfyui_gateway role on this host first")
    inputs = json.loads(text)
    states = pool.load(paths.pool)
    config = caddy.render(inputs["routes"], inputs["settings"], credentials.load(paths.credentials), states)
    return apply(paths, config)


def export_ca(paths: Paths, storage: str) -> bool:
    """Copy the root certificate of the gateway's internal CA where clients can fetch it."""
    root = os.path.join(storage, "pki", "authorities", "local", "root.crt")
    if not os.path.exists(root):
        return False
    with open(root, encoding="ascii") as handle:
        return write(paths.ca, handle.read(), 0o644)
