"""Running instances: readiness, draining, unit state, logs and the ports in use on a host.

Shared by the `comfybake.core.wait` and `comfybake.core.listeners` modules (on the managed host) and by
`comfybake instances` (the host's command line, through the link src/comfybake/_runtime.py).
Standard library only; Python 3.10+.

Ready means "this instance can serve its environment", checked in order:
  1. the unit is active (a failed or restarting unit stops the wait at once);
  2. the port accepts a connection;
  3. `GET /system_stats` answers and its `system.argv` is exactly the configured command line
     (so a stale process on the port, or one started before an edit, is not taken as ready);
  4. `GET /object_info/<Class>` is non-empty for every required node class;
  5. `GET /models/<folder>` lists every required model.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .comfyui_log import gate_failures, optional_node_failures

JOURNAL_LINES = 40
_HTTP_TIMEOUT = 5.0


class UnixConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (Caddy's admin API, the job service's APIs); `timeout` bounds the
    connect and each read. A socket that cannot connect is closed before the error goes on."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Instance:
    """What readiness needs to know about one instance (a record of the instance layout)."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.name: str = record["name"]
        self.port: int = int(record["port"])
        listen = str(record.get("listen") or "127.0.0.1")
        wildcard = listen in ("0.0.0.0", "")  # noqa: S104 - reach a wildcard listener on loopback
        self.host = "127.0.0.1" if wildcard else ("::1" if listen == "::" else listen)
        self.args: list[str] = [str(arg) for arg in record.get("args") or []]
        self.node_classes: list[str] = list(record.get("required_node_classes") or [])
        self.models: dict[str, list[str]] = dict(record.get("required_models") or {})
        self.unit: str = record.get("unit") or f"comfyui@{self.name}.service"
        self.log_file: str = record.get("log_file") or ""

    def url(self, route: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{route}"


# Instances are asked directly, never through a proxy that http_proxy or HTTP_PROXY names: a
# host behind a corporate proxy has those set, and the proxy cannot reach a host's loopback.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get_json(url: str, timeout: float = _HTTP_TIMEOUT) -> Any:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310 - http://<instance>
    with _DIRECT.open(request, timeout=timeout) as response:
        return json.loads(response.read().decode("utf-8"))


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- systemd


def systemctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False)


def unit_state(unit: str) -> dict[str, str]:
    """ActiveState, SubState, MainPID, NRestarts, InvocationID and more of one unit."""
    keys = ["ActiveState", "SubState", "MainPID", "NRestarts", "InvocationID", "UnitFileState", "LoadState"]
    done = systemctl("show", unit, *[f"--property={key}" for key in keys])
    state = dict.fromkeys(keys, "")
    for line in done.stdout.splitlines():
        key, _equals, value = line.partition("=")
        state[key] = value
    return state


def recent_log(instance: Instance, invocation: str = "", lines: int = 200) -> str:
    """The instance's output since it last started: its journal, or the tail of its log file."""
    if instance.log_file:
        try:
            with open(instance.log_file, encoding="utf-8", errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except OSError as error:
            return f"(cannot read {instance.log_file}: {error.strerror})"
    command = ["journalctl", "--no-pager", "-o", "cat", "-n", str(lines)]
    command += [f"_SYSTEMD_INVOCATION_ID={invocation}"] if invocation else ["-u", instance.unit]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    return done.stdout if done.returncode == 0 else f"(journalctl failed: {done.stderr.strip()})"


def import_failures(log: str) -> dict[str, str]:
    """Custom nodes the log reports as IMPORT FAILED, each with its error."""
    failures: dict[str, str] = gate_failures(log, "")
    return failures


# --------------------------------------------------------------------------- readiness


def probe(instance: Instance, timeout: float = _HTTP_TIMEOUT) -> tuple[str, str, bool]:
    """One probe: (stage reached, what is missing, settled); stage `ready` when nothing is. Each
    request waits at most `timeout` seconds (the exporter passes its own bound).

    Settled means waiting cannot help while this process runs: ComfyUI imports every custom
    node before it answers HTTP, so a node class missing from an answering instance stays missing.
    """
    if not port_open(instance.host, instance.port, min(timeout, 1.0)):
        return "starting", f"port {instance.port} on {instance.host} does not accept connections", False
    try:
        stats = get_json(instance.url("/system_stats"), timeout)
    except (OSError, ValueError, urllib.error.URLError) as error:
        return "starting", f"/system_stats does not answer: {error}", False
    argv = [str(arg) for arg in (stats.get("system") or {}).get("argv") or []]
    if instance.args and argv[1:] != instance.args:
        running = " ".join(argv[1:]) or "(no argv)"
        return (
            "argv",
            f"the process on port {instance.port} runs {running!r}, not the configured {' '.join(instance.args)!r}",
            False,
        )
    for node_class in instance.node_classes:
        try:
            info = get_json(instance.url(f"/object_info/{urllib.parse.quote(node_class)}"), timeout)
        except (OSError, ValueError, urllib.error.URLError) as error:
            return "nodes", f"/object_info/{node_class} does not answer: {error}", False
        if not info or node_class not in info:
            return "nodes", f"node class {node_class} is missing", True
    for folder, names in instance.models.items():
        try:
            visible = set(get_json(instance.url(f"/models/{urllib.parse.quote(folder)}"), timeout))
        except urllib.error.HTTPError as error:
            return "models", f"model folder {folder} is unknown to ComfyUI (HTTP {error.code})", True
        except (OSError, ValueError, urllib.error.URLError) as error:
            return "models", f"/models/{folder} does not answer: {error}", False
        missing = [name for name in names if name not in visible]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            return "models", f"model {folder}/{missing[0]} is not visible{more}", False
    return "ready", "", False


def wait_ready(instance: Instance, timeout: float, interval: float = 0.25, use_systemd: bool = True) -> dict[str, Any]:
    """Poll one instance until ready, its unit fails, or `timeout` seconds pass."""
    started = time.monotonic()
    stage, missing, state = "starting", "", {}
    while True:
        if use_systemd:
            state = unit_state(instance.unit)
            if state["ActiveState"] in ("failed", "inactive") or state["SubState"] == "auto-restart":
                missing = f"unit {instance.unit} is {state['ActiveState']} ({state['SubState']})"
                break
        stage, missing, settled = probe(instance)
        if stage == "ready" or settled or time.monotonic() - started >= timeout:
            break
        time.sleep(interval)
    result: dict[str, Any] = {
        "name": instance.name,
        "port": instance.port,
        "ready": stage == "ready",
        "stage": stage,
        "seconds": round(time.monotonic() - started, 2),
    }
    if stage != "ready":
        log = recent_log(instance, state.get("InvocationID", "")) if use_systemd or instance.log_file else ""
        failures = import_failures(log)
        optional = optional_node_failures(log)
        result["error"] = missing
        result["import_failures"] = failures
        result["optional_node_failures"] = optional
        result["log"] = log.splitlines()[-JOURNAL_LINES:]
        result["message"] = describe_failure(instance, missing, failures, result["seconds"], optional)
    return result


def describe_failure(
    instance: Instance,
    missing: str,
    failures: dict[str, str],
    seconds: float,
    optional: dict[str, str] | None = None,
) -> str:
    text = f"instance {instance.name} (port {instance.port}) is not ready after {seconds:g} s: {missing}"
    for node, error in failures.items():
        text += f"\n  IMPORT FAILED: custom node {node}: {error}"
    for node, error in (optional or {}).items():
        # ComfyUI starts without its own optional nodes; their classes are missing too.
        text += f"\n  ComfyUI's optional node {node} failed to import: {error.splitlines()[0]}"
    return text


def _each_at_once(func: Callable[[Instance], dict[str, Any]], instances: list[Instance]) -> list[dict[str, Any]]:
    """func for every instance at once (one thread each), results in the instances' order."""
    if not instances:
        return []
    with ThreadPoolExecutor(max_workers=min(32, len(instances))) as pool:
        return list(pool.map(func, instances))


def wait_all(instances: list[Instance], timeout: float, use_systemd: bool = True) -> list[dict[str, Any]]:
    """Wait for every instance at once, all against the same timeout."""
    return _each_at_once(lambda item: wait_ready(item, timeout, use_systemd=use_systemd), instances)


def queue_length(instance: Instance) -> int | None:
    """Prompts running plus pending, or None when the instance does not answer."""
    try:
        queue = get_json(instance.url("/queue"))
    except (OSError, ValueError, urllib.error.URLError):
        return None
    return len(queue.get("queue_running") or []) + len(queue.get("queue_pending") or [])


def wait_drained(instance: Instance, timeout: float, interval: float = 1.0) -> dict[str, Any]:
    """Wait until the instance's queue is empty (or it does not answer), at most `timeout` seconds."""
    started = time.monotonic()
    length = queue_length(instance)
    while length and time.monotonic() - started < timeout:
        time.sleep(interval)
        length = queue_length(instance)
    return {
        "name": instance.name,
        "drained": not length,
        "queue": length or 0,
        "seconds": round(time.monotonic() - started, 2),
    }


def drain_all(instances: list[Instance], timeout: float) -> list[dict[str, Any]]:
    """Drain every instance at once, all against the same timeout."""
    return _each_at_once(lambda item: wait_drained(item, timeout), instances)


# --------------------------------------------------------------------------- listeners

_UNIT_IN_CGROUP = re.compile(r"/([^/]+\.service)$")


def _address(text: str) -> str:
    """A /proc/net/tcp* address (host-order 32-bit words in hex) as text."""
    raw = bytes.fromhex(text)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def _sockets() -> dict[str, tuple[int, int, str]]:
    """inode -> (port, owner uid, address) of every listening TCP socket (IPv4 and IPv6)."""
    result: dict[str, tuple[int, int, str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as handle:
                rows = handle.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == "0A":  # TCP_LISTEN
                address, port = fields[1].rsplit(":", 1)
                result[fields[9]] = (int(port, 16), int(fields[7]), _address(address))
    return result


def listeners() -> dict[int, dict[str, Any]]:
    """Listening TCP ports of this host, each with its addresses and the process and unit that own it.

    A socket is matched to the process holding it through /proc/<pid>/fd. Where that cannot be
    read (root without CAP_SYS_PTRACE, as in containers, cannot read other users' fds), the
    socket's owner uid names the unit when every process of that uid belongs to one unit, as
    with each instance's dynamic user.
    """
    sockets = _sockets()
    ports: dict[int, dict[str, Any]] = {}
    for port, uid, address in sockets.values():
        entry = ports.setdefault(
            port, {"port": port, "addresses": [], "uid": uid, "pid": None, "process": "", "unit": ""}
        )
        entry["addresses"] = sorted({*entry["addresses"], address})
    by_uid: dict[int, list[str]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for link in _fd_links(pid):
            if link.startswith("socket:[") and link[8:-1] in sockets:
                entry = ports[sockets[link[8:-1]][0]]
                if entry["pid"] is None:
                    entry.update(pid=int(pid), process=_read(f"/proc/{pid}/comm").strip(), unit=_unit_of(pid))
        owner = re.search(r"^Uid:\s+(\d+)", _read(f"/proc/{pid}/status"), re.MULTILINE)
        if owner:
            by_uid.setdefault(int(owner.group(1)), []).append(pid)
    for entry in ports.values():
        if entry["pid"] is not None:
            continue
        pids = by_uid.get(entry["uid"], [])
        units = {_unit_of(pid) for pid in pids}
        if len(units) == 1 and "" not in units:
            first = min(pids, key=int)
            entry.update(process=_read(f"/proc/{first}/comm").strip(), unit=units.pop())
    return ports


def _fd_links(pid: str) -> list[str]:
    """What the open files of a process point at; a file closed while reading is skipped."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    links = []
    for fd in fds:
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return links


def _unit_of(pid: str) -> str:
    for line in _read(f"/proc/{pid}/cgroup").splitlines():
        match = _UNIT_IN_CGROUP.search(line.rsplit(":", 1)[-1])
        if match:
            return match.group(1)
    return ""


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""
