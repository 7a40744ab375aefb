"""HTTP API of the ComfyUI test double: the endpoints comfybake's readiness, status and gateway use.

Every route answers at `/<route>` and `/api/<route>`, as in ComfyUI. Prompts are queued and
"run" by a worker thread for `extra_data.test_double_seconds` seconds (default 0), so tests
can watch a queue fill and drain.

`/ws` is a real WebSocket (RFC 6455, text frames), as ComfyUI's: the client id comes from the
`clientId` query parameter (empty or missing: a new `uuid4().hex`, and a second socket with the
same id replaces the first), the first message is
`{"type": "status", "data": {"status": {"exec_info": {"queue_remaining": N}}, "sid": "<id>"}}`
and every change of the queue (a prompt queued, started, finished) sends
`{"type": "status", "data": {"status": {"exec_info": {"queue_remaining": N}}}}` to every socket.
Pings are answered, a close is echoed; what the client sends is otherwise ignored. A plain GET
of `/ws` is a 400, as aiohttp answers it. `/` serves a page whose script opens `/ws` on its own
origin (wss on https) and sets `document.title = "ws:" + sid` on the first status message, so a
headless browser shows whether the WebSocket got through. With `--verbose DEBUG` each request's
method, URI and headers are logged, so tests can see what a proxy forwarded.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import platform
import queue
import socket
import struct
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import comfyui_version
import folder_paths
import nodes


def _ram() -> tuple[int, int]:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            values = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in meminfo}
        return values.get("MemTotal", 0), values.get("MemAvailable", 0)
    except OSError:
        return 0, 0


GIB = 1024**3


def devices(cpu: bool) -> list[dict[str, object]]:
    """A CPU, or one stand-in CUDA device per id in CUDA_VISIBLE_DEVICES (no GPU is touched): 24 GiB
    each, 20 GiB free less 1 GiB per index, so a reader can tell the devices apart."""
    if cpu:
        return [{"name": "cpu", "type": "cpu", "index": None, "vram_total": 0, "vram_free": 0}]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0")
    ids = [d.strip() for d in visible.split(",") if d.strip()]
    return [
        {
            "name": f"cuda:{i} Test Double GPU {gpu}",
            "type": "cuda",
            "index": i,
            "vram_total": 24 * GIB,
            "vram_free": (20 - i) * GIB,
        }
        for i, gpu in enumerate(ids)
    ]


def node_info(name: str, node_class: type) -> dict[str, object]:
    source = nodes.NODE_SOURCES.get(name)
    return {
        "input": node_class.INPUT_TYPES(),
        "output": list(getattr(node_class, "RETURN_TYPES", ())),
        "name": name,
        "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(name, name),
        "category": getattr(node_class, "CATEGORY", ""),
        "python_module": source or "nodes",
    }


WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455, section 1.3

# The page `/` serves: like ComfyUI's frontend, it opens `<its own folder>/ws?clientId=<id>` on
# its own host (wss on https) and reads the first status message; the title tells a browser test.
INDEX = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>ComfyUI test double</title></head>
<body><p>ComfyUI test double</p>
<script>
(function () {
  var id = Array.from(crypto.getRandomValues(new Uint8Array(16)), function (b) {
    return ("0" + b.toString(16)).slice(-2);
  }).join("");
  var base = location.pathname.replace(/[^/]*$/, "");
  var scheme = location.protocol === "https:" ? "wss://" : "ws://";
  var socket = new WebSocket(scheme + location.host + base + "ws?clientId=" + id);
  socket.onmessage = function (event) {
    var message = JSON.parse(event.data);
    if (message.type === "status" && message.data.sid) { document.title = "ws:" + message.data.sid; }
  };
  socket.onerror = function () { document.title = "ws:error"; };
})();
</script>
</body></html>
"""


class WebSocket:
    """The server side of one RFC 6455 connection: unmasked frames out, masked frames in."""

    def __init__(self, rfile: object, wfile: object) -> None:
        self.rfile = rfile
        self.wfile = wfile
        self.lock = threading.Lock()

    def send(self, payload: bytes, opcode: int = 0x1) -> None:
        size = len(payload)
        if size < 126:
            header = struct.pack("!BB", 0x80 | opcode, size)
        elif size < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 126, size)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 127, size)
        with self.lock:
            self.wfile.write(header + payload)  # type: ignore[attr-defined]
            self.wfile.flush()  # type: ignore[attr-defined]

    def send_json(self, message: object) -> None:
        self.send(json.dumps(message).encode())

    def _read(self, size: int) -> bytes:
        data = self.rfile.read(size)  # type: ignore[attr-defined]
        if len(data) < size:
            raise ConnectionError("the client closed the connection")
        return bytes(data)

    def receive(self) -> tuple[int, bytes]:
        """The next frame's opcode and unmasked payload."""
        first, second = self._read(2)
        size = second & 0x7F
        if size == 126:
            size = struct.unpack("!H", self._read(2))[0]
        elif size == 127:
            size = struct.unpack("!Q", self._read(8))[0]
        if not second & 0x80:
            raise ConnectionError("a client frame was not masked (RFC 6455, section 5.1)")
        mask = self._read(4)
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(self._read(size)))
        return first & 0x0F, payload


class Sockets:
    """The open WebSockets by client id, as ComfyUI's `PromptServer.sockets`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open: dict[str, WebSocket] = {}

    def add(self, sid: str, socket_: WebSocket) -> None:
        with self.lock:
            self.open[sid] = socket_  # the same clientId again replaces the old socket

    def remove(self, sid: str, socket_: WebSocket) -> None:
        with self.lock:
            if self.open.get(sid) is socket_:
                del self.open[sid]

    def broadcast(self, message: object) -> None:
        with self.lock:
            targets = list(self.open.values())
        for target in targets:
            with contextlib.suppress(OSError):  # its reader sees the closed connection and removes it
                target.send_json(message)


class PromptQueue:
    def __init__(self) -> None:
        self.sockets = Sockets()
        self.lock = threading.Lock()
        self.pending: list[dict[str, object]] = []
        self.running: list[dict[str, object]] = []
        self.history: dict[str, object] = {}
        self.number = 0
        self.interrupted = threading.Event()
        self.items: queue.Queue[dict[str, object]] = queue.Queue()
        threading.Thread(target=self._work, daemon=True).start()

    def put(self, prompt: dict[str, object], extra_data: dict[str, object]) -> dict[str, object]:
        with self.lock:
            item = {"prompt_id": str(uuid.uuid4()), "number": self.number, "prompt": prompt, "extra_data": extra_data}
            self.number += 1
            self.pending.append(item)
        self.items.put(item)
        self.changed()
        return item

    def changed(self) -> None:
        """ComfyUI's `queue_updated`: every socket gets the new queue size."""
        self.sockets.broadcast({"type": "status", "data": {"status": self.info()}})

    def info(self) -> dict[str, object]:
        return {"exec_info": {"queue_remaining": self.remaining()}}

    def remaining(self) -> int:
        with self.lock:
            return len(self.pending) + len(self.running)

    def _work(self) -> None:
        while True:
            item = self.items.get()
            with self.lock:
                if item not in self.pending:  # dropped by POST /queue
                    continue
                self.pending.remove(item)
                self.running.append(item)
            self.changed()
            self.interrupted.clear()
            seconds = float(item["extra_data"].get("test_double_seconds", 0))  # type: ignore[union-attr]
            prompt_id = str(item["prompt_id"])
            began = int(time.time() * 1000)
            self.interrupted.wait(seconds)
            with self.lock:
                self.running.remove(item)
                status = "interrupted" if self.interrupted.is_set() else "success"
                end = "execution_interrupted" if self.interrupted.is_set() else "execution_success"
                # ComfyUI's status: the outcome and its messages with millisecond timestamps.
                messages = [
                    ["execution_start", {"prompt_id": prompt_id, "timestamp": began}],
                    [end, {"prompt_id": prompt_id, "timestamp": int(time.time() * 1000)}],
                ]
                self.history[prompt_id] = {
                    "prompt": item["prompt"],
                    "status": {"status_str": status, "completed": status == "success", "messages": messages},
                }
            self.changed()
            logging.info("Prompt executed in %.2f seconds", seconds)

    def get_history(self, max_items: int | None) -> dict[str, object]:
        """ComfyUI's get_history without a prompt id or offset: every item, or the newest `max_items`."""
        offset = 0 if max_items is None else len(self.history) - max_items
        out: dict[str, object] = {}
        for index, key in enumerate(self.history):
            if index >= offset:
                out[key] = self.history[key]
                if max_items is not None and len(out) >= max_items:
                    break
        return out

    def as_lists(self, key: str) -> list[list[object]]:
        with self.lock:
            return [[i["number"], i["prompt_id"], i["prompt"], i["extra_data"], []] for i in getattr(self, key)]


class Handler(BaseHTTPRequestHandler):
    server_version = "ComfyUI-test-double"
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY, as aiohttp sets it: headers and body go in two writes, which Nagle's algorithm
    # and a client's delayed ACK would hold for 40 ms on a kept-alive connection.
    disable_nagle_algorithm = True
    prompts: PromptQueue
    cpu = False

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        logging.debug("%s - %s", self.address_string(), format % args)

    def _send(self, status: int, body: object, content_type: str = "application/json") -> None:
        data = (json.dumps(body) if content_type == "application/json" else str(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self) -> str:
        logging.debug("request %s %s headers %s", self.command, self.path, json.dumps(dict(self.headers.items())))
        path = unquote(urlsplit(self.path).path)
        return path[4:] if path.startswith("/api/") else path

    def _websocket(self) -> None:
        """Upgrade to a WebSocket and serve it until the client closes, as ComfyUI's `/ws`."""
        key = self.headers.get("Sec-WebSocket-Key", "")
        if self.headers.get("Upgrade", "").lower() != "websocket" or not key:
            self._send(400, f"No WebSocket UPGRADE hdr: {self.headers.get('Upgrade')}", "text/plain")
            return
        accept = base64.b64encode(hashlib.sha1((key + WEBSOCKET_GUID).encode()).digest()).decode()  # noqa: S324 - RFC 6455
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.close_connection = True
        sid = parse_qs(urlsplit(self.path).query).get("clientId", [""])[0] or uuid.uuid4().hex
        socket_ = WebSocket(self.rfile, self.wfile)
        self.prompts.sockets.add(sid, socket_)
        try:
            socket_.send_json({"type": "status", "data": {"status": self.prompts.info(), "sid": sid}})
            while True:
                opcode, payload = socket_.receive()
                if opcode == 0x8:  # close: echo it, then end
                    socket_.send(payload[:2], 0x8)
                    return
                if opcode == 0x9:  # ping
                    socket_.send(payload, 0xA)
        except OSError:  # ConnectionError too: the client went away
            return
        finally:
            self.prompts.sockets.remove(sid, socket_)

    def do_GET(self) -> None:
        route = self._route()
        if route == "/":
            self._send(200, INDEX, "text/html")
        elif route == "/ws":
            self._websocket()
        elif route == "/system_stats":
            total, free = _ram()
            self._send(
                200,
                {
                    "system": {
                        "os": os.name,
                        "ram_total": total,
                        "ram_free": free,
                        "comfyui_version": comfyui_version.__version__,
                        "python_version": sys.version,
                        "pytorch_version": "none (ComfyUI test double)",
                        "embedded_python": False,
                        "argv": sys.argv,
                        "platform": platform.platform(),
                    },
                    "devices": devices(self.cpu),
                },
            )
        elif route == "/object_info":
            self._send(200, {n: node_info(n, c) for n, c in nodes.NODE_CLASS_MAPPINGS.items()})
        elif route.startswith("/object_info/"):
            name = route[len("/object_info/") :]
            node_class = nodes.NODE_CLASS_MAPPINGS.get(name)
            self._send(200, {name: node_info(name, node_class)} if node_class else {})
        elif route == "/models":
            self._send(200, [k for k in folder_paths.folder_names_and_paths if k != "custom_nodes"])
        elif route.startswith("/models/"):
            folder = route[len("/models/") :]
            if folder_paths.map_legacy(folder) not in folder_paths.folder_names_and_paths or folder == "custom_nodes":
                self._send(404, "404: Not Found", "text/plain")
            else:
                self._send(200, folder_paths.get_filename_list(folder))
        elif route == "/queue":
            self._send(
                200,
                {"queue_running": self.prompts.as_lists("running"), "queue_pending": self.prompts.as_lists("pending")},
            )
        elif route == "/prompt":
            self._send(200, {"exec_info": {"queue_remaining": self.prompts.remaining()}})
        elif route == "/history":  # ComfyUI's: ?max_items=N, the newest N (PromptQueue.get_history)
            max_items = parse_qs(urlsplit(self.path).query).get("max_items", [None])[0]
            with self.prompts.lock:
                self._send(200, self.prompts.get_history(None if max_items is None else int(max_items)))
        else:
            self._send(404, "404: Not Found", "text/plain")

    def do_POST(self) -> None:
        route = self._route()
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if route == "/prompt":
            try:
                body = json.loads(raw or b"{}")
                prompt = body["prompt"]
                assert isinstance(prompt, dict)
            except (ValueError, KeyError, AssertionError):
                self._send(400, {"error": {"type": "no_prompt", "message": "No prompt provided"}, "node_errors": {}})
                return
            missing = {
                node_id: node.get("class_type")
                for node_id, node in prompt.items()
                if not isinstance(node, dict) or node.get("class_type") not in nodes.NODE_CLASS_MAPPINGS
            }
            if missing:
                node_id, class_type = next(iter(missing.items()))
                self._send(
                    400,
                    {
                        "error": {
                            "type": "invalid_prompt",
                            "message": f"Cannot execute because node {class_type} does not exist.",
                            "details": f"Node ID '#{node_id}'",
                        },
                        "node_errors": {},
                    },
                )
                return
            item = self.prompts.put(prompt, dict(body.get("extra_data") or {}))
            self._send(200, {"prompt_id": item["prompt_id"], "number": item["number"], "node_errors": {}})
        elif route == "/history":  # ComfyUI's: {"clear": true} and/or {"delete": [prompt ids]}
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                body = {}
            with self.prompts.lock:
                if body.get("clear"):
                    self.prompts.history.clear()
                for prompt_id in body.get("delete") or []:
                    self.prompts.history.pop(str(prompt_id), None)
            self._send(200, "", "text/plain")
        elif route == "/queue":  # ComfyUI's: {"clear": true} and/or {"delete": [prompt ids]} drop pending prompts
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                body = {}
            with self.prompts.lock:
                dropped = {str(prompt_id) for prompt_id in body.get("delete") or []}
                self.prompts.pending = [
                    item for item in self.prompts.pending if not body.get("clear") and item["prompt_id"] not in dropped
                ]
            self.prompts.changed()
            self._send(200, "", "text/plain")
        elif route == "/interrupt":
            self.prompts.interrupted.set()
            self._send(200, "", "text/plain")
        elif route == "/free":
            self._send(200, "", "text/plain")
        else:
            self._send(405, "405: Method Not Allowed", "text/plain")


class _Server4(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server4):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        # Keep "::" to IPv6 so "0.0.0.0,::" can bind both families on one port, as aiohttp does.
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()


def serve(addresses: list[str], port: int, cpu: bool, stop: threading.Event) -> None:
    """Bind every address first (a failure is fatal, as in ComfyUI), then serve until `stop`."""
    Handler.prompts = PromptQueue()
    Handler.cpu = cpu
    servers = [(_Server6 if ":" in a else _Server4)((a, port), Handler) for a in addresses]
    for server, address in zip(servers, addresses, strict=True):
        threading.Thread(target=server.serve_forever, daemon=True).start()
        shown = f"[{address}]" if ":" in address else address
        logging.info("To see the GUI go to: http://%s:%d", "127.0.0.1" if address == "0.0.0.0" else shown, port)  # noqa: S104 - a comparison
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
