"""Loopback HTTP servers that answer as ComfyUI instances do (readiness, /object_info from a
recorded answer, the queue), and routing.json files that list them, for the placement tests.
(A module of its own name: test folders hold no packages, so every conftest is `conftest`.)"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from harness.double import free_port

DATA = Path(__file__).resolve().parent / "data"
# /object_info as ComfyUI answers it (its input specs: combos as [[values], {...}], the newer
# schema's as ["COMBO", {"options": [...]}]).
OBJECT_INFO: dict[str, Any] = json.loads((DATA / "object_info.json").read_text(encoding="utf-8"))


@dataclass
class Instance:
    """A running loopback server with what it answers; `hits` counts requests per route."""

    name: str
    environment: str
    port: int
    object_info: dict[str, Any]
    queue_remaining: int = 0
    hits: dict[str, int] = field(default_factory=dict)
    server: ThreadingHTTPServer | None = None

    def record(self, **extra: Any) -> dict[str, Any]:
        """Its entry in routing.json, as the comfyui_instances role writes it."""
        entry = {
            "name": self.name,
            "environment": self.environment,
            "url": f"http://127.0.0.1:{self.port}",
            "public_url": "",
            "port": self.port,
            "gpus": ["0"],
            "enabled": True,
            "description": "",
            "required_node_classes": ["KSampler"],
            "node_classes": sorted(self.object_info),
        }
        entry.update(extra)
        return entry


def _handler(instance: Instance) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
            pass

        def _send(self, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            route = unquote(urlsplit(self.path).path).removeprefix("/api")
            instance.hits[route] = instance.hits.get(route, 0) + 1
            if route == "/system_stats":
                self._send({"system": {"argv": ["main.py"], "comfyui_version": "0.3.64"}, "devices": []})
            elif route == "/object_info":
                self._send(instance.object_info)
            elif route.startswith("/object_info/"):
                name = route.removeprefix("/object_info/")
                self._send({name: instance.object_info[name]} if name in instance.object_info else {})
            elif route == "/prompt":
                self._send({"exec_info": {"queue_remaining": instance.queue_remaining}})
            else:
                self.send_error(404)

    return Handler


class Server(ThreadingHTTPServer):
    request_queue_size = 128  # aiohttp's backlog (ComfyUI's), not socketserver's 5


StartInstance = Callable[..., Instance]


def start_instance(
    started: list[Instance],
    name: str,
    environment: str,
    *,
    queue_remaining: int = 0,
    object_info: dict[str, Any] | None = None,
) -> Instance:
    """Start a loopback instance answering `object_info` (default: the recorded one)."""
    info = copy.deepcopy(OBJECT_INFO) if object_info is None else object_info
    item = Instance(name, environment, 0, info, queue_remaining)
    server = Server(("127.0.0.1", 0), _handler(item))
    item.port, item.server = server.server_address[1], server
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    started.append(item)
    return item


def stop_all(started: list[Instance]) -> None:
    for item in started:
        assert item.server is not None
        item.server.shutdown()
        item.server.server_close()


def stopped(name: str, environment: str) -> Instance:
    """An instance routing.json lists but nothing listens for (stopped)."""
    return Instance(name, environment, free_port(), copy.deepcopy(OBJECT_INFO))


def write_routing(root: Path, records: list[dict[str, Any]]) -> Path:
    path = root / "routing.json"
    path.write_text(json.dumps({"format": 1, "instances": records, "environments": []}, indent=2) + "\n")
    return root
