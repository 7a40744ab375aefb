"""HTTP API of the ComfyUI test double: the endpoints comfybake's readiness, status, gateway and jobs use.

Every route answers at `/<route>` and `/api/<route>`, as in ComfyUI. Prompts are validated and
run as ComfyUI does (execution.py: its error shapes, its WebSocket messages, `--test-double-strict`),
one at a time by a worker thread, for `extra_data.test_double_seconds` seconds (default 0), so
tests can watch a queue fill and drain. The job routes follow ComfyUI 0.3.x:

- `POST /prompt {"prompt", "client_id", "prompt_id", "extra_data", "number", "front"}`: the
  client's prompt_id is kept (a new uuid4 without one), `client_id` goes into extra_data, the
  keys ComfyUI deems sensitive are dropped, `create_time` added; 200
  `{"prompt_id", "number", "node_errors"}` or 400 `{"error", "node_errors"}`.
- `GET /queue` and `/history[/<prompt_id>]` items are ComfyUI's `[number, prompt_id, graph,
  extra_data, outputs_to_execute]`; a history entry adds `outputs` (node id -> UI output),
  `status` (`status_str` success|error, `completed`, the status messages) and `meta`. When a
  prompt ends, its history entry is written, the queue status sent, then `executing` with node
  null: a client should take that (not `execution_success`) as the moment /history has it.
- `POST /interrupt` stops the running prompt; with `{"prompt_id"}` only if that one is running.
  `POST /queue {"delete": [...]}` / `{"clear": true}` drops pending prompts.
- `POST /upload/image` (multipart `image`, `overwrite`, `type`, `subfolder`): a name taken by a
  different file becomes `name (1).png`, the same bytes keep the name; over `--max-upload-size`
  MB is a 413. `GET /view?filename=&subfolder=&type=` serves output/, input/ or temp/ files
  (400 on `..` or an unknown type, 403 for a subfolder outside, 404 when absent).

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
import email.parser
import email.policy
import hashlib
import json
import logging
import mimetypes
import os
import platform
import socket
import struct
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import comfyui_version
import execution
import files
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
    """A class as ComfyUI's /object_info describes it."""
    source = nodes.NODE_SOURCES.get(name)
    inputs = node_class.INPUT_TYPES()  # type: ignore[attr-defined]
    returns = list(getattr(node_class, "RETURN_TYPES", ()))
    return {
        "input": inputs,
        "input_order": {key: list(value) for key, value in inputs.items()},
        "output": returns,
        "output_is_list": list(getattr(node_class, "OUTPUT_IS_LIST", [False] * len(returns))),
        "output_name": list(getattr(node_class, "RETURN_NAMES", returns)),
        "name": name,
        "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(name, name),
        "description": getattr(node_class, "DESCRIPTION", ""),
        "python_module": source or "nodes",
        "category": getattr(node_class, "CATEGORY", ""),
        "output_node": getattr(node_class, "OUTPUT_NODE", False) is True,
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

    def __init__(self, rfile: object, wfile: object, connection: socket.socket) -> None:
        self.rfile = rfile
        self.wfile = wfile
        self.connection = connection
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

    def abort(self) -> None:
        """End the TCP connection without a close frame (the dropped-socket test hook)."""
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

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

    def send(self, event: str, data: dict[str, Any], sid: str | None) -> None:
        """ComfyUI's send_sync: `{"type": event, "data": data}` to the client `sid`, or to all when None."""
        with self.lock:
            targets = list(self.open.values()) if sid is None else [self.open[sid]] if sid in self.open else []
        for target in targets:
            # A socket closing under it: OSError from the connection, ValueError from its file once
            # closed. Its reader sees the closed connection and removes it; the worker goes on.
            with contextlib.suppress(OSError, ValueError):
                target.send_json({"type": event, "data": data})

    def broadcast(self, message: dict[str, Any]) -> None:
        self.send(message["type"], message["data"], None)

    def drop(self, sid: str) -> None:
        with self.lock:
            target = self.open.get(sid)
        if target is not None:
            logging.info("test double: dropping the WebSocket of client %s", sid)
            target.abort()


# How many prompts /history keeps (ComfyUI's MAXIMUM_HISTORY_SIZE).
MAXIMUM_HISTORY_SIZE = 10000


class PromptQueue:
    """ComfyUI's PromptQueue and prompt worker: pending prompts by number, one running, the history."""

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.sockets = Sockets()
        self.lock = threading.Condition()
        self.pending: list[list[Any]] = []  # [number, prompt_id, prompt, extra_data, outputs_to_execute]
        self.running: list[list[Any]] = []
        self.history: dict[str, dict[str, Any]] = {}
        self.number = 0
        self.interrupted = threading.Event()
        self.executor = execution.Executor(self.sockets.send, self.sockets.drop, self.interrupted)
        threading.Thread(target=self._work, daemon=True).start()

    def put(self, item: list[Any]) -> None:
        with self.lock:
            self.pending.append(item)
            self.pending.sort(key=lambda i: (i[0], i[1]))
            self.lock.notify()
        self.changed()

    def next_number(self, front: bool) -> int:
        with self.lock:
            number = -self.number if front else self.number
            self.number += 1
            return number

    def changed(self) -> None:
        """ComfyUI's `queue_updated`: every socket gets the new queue size."""
        self.sockets.broadcast({"type": "status", "data": {"status": self.info()}})

    def info(self) -> dict[str, object]:
        return {"exec_info": {"queue_remaining": self.remaining()}}

    def remaining(self) -> int:
        with self.lock:
            return len(self.pending) + len(self.running)

    def _take(self) -> list[Any]:
        with self.lock:
            while not self.pending:
                self.lock.wait()
            item = self.pending.pop(0)
            self.running.append(item)
        self.changed()
        return item

    def _work(self) -> None:
        while True:
            item = self._take()
            _number, prompt_id, prompt, extra_data, outputs = item
            began = time.monotonic()
            self.interrupted.clear()  # ComfyUI's interrupt_processing(False) at each start
            self.executor.execute(prompt, prompt_id, extra_data, outputs)
            executor = self.executor
            with self.lock:
                self.running.remove(item)
                if len(self.history) > MAXIMUM_HISTORY_SIZE:
                    self.history.pop(next(iter(self.history)))
                status = {
                    "status_str": "success" if executor.success else "error",
                    "completed": executor.success,
                    "messages": executor.status_messages,
                }
                self.history[prompt_id] = {"prompt": item, "outputs": {}, "status": status, **executor.history_result}
            self.changed()
            if executor.client_id is not None:
                self.sockets.send("executing", {"node": None, "prompt_id": prompt_id}, executor.client_id)
            logging.info("Prompt executed in %.2f seconds", time.monotonic() - began)

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
            return [list(item) for item in getattr(self, key)]


class Handler(BaseHTTPRequestHandler):
    server_version = "ComfyUI-test-double"
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY, as aiohttp sets it: headers and body go in two writes, which Nagle's algorithm
    # and a client's delayed ACK would hold for 40 ms on a kept-alive connection.
    disable_nagle_algorithm = True
    prompts: PromptQueue
    cpu = False
    max_upload = 100 * 1024 * 1024  # bytes; --max-upload-size (MB), as ComfyUI's client_max_size

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
        socket_ = WebSocket(self.rfile, self.wfile, self.connection)
        self.prompts.sockets.add(sid, socket_)
        try:
            socket_.send_json({"type": "status", "data": {"status": self.prompts.info(), "sid": sid}})
            executor = self.prompts.executor
            if executor.client_id == sid and executor.last_node_id is not None:  # ComfyUI: a reconnect
                socket_.send_json({"type": "executing", "data": {"node": executor.last_node_id}})
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

    def _prompt(self, raw: bytes) -> None:
        """ComfyUI's POST /prompt: validate, then queue under the client's prompt_id (a new uuid4 without)."""
        try:
            body = json.loads(raw or b"{}")
            prompt = body["prompt"]
            assert isinstance(prompt, dict)
        except (ValueError, KeyError, TypeError, AssertionError):
            error = {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided",
                     "extra_info": {}}  # fmt: skip
            self._send(400, {"error": error, "node_errors": {}})
            return
        logging.info("got prompt")
        number = body["number"] if isinstance(body.get("number"), (int, float)) else None
        if number is None:
            number = self.prompts.next_number(bool(body.get("front")))
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        valid, error, outputs, node_errors = execution.validate_prompt(prompt, self.prompts.strict)
        if not valid:
            logging.warning("invalid prompt: %s", error)
            self._send(400, {"error": error, "node_errors": node_errors})
            return
        extra_data = dict(body.get("extra_data") or {})
        if body.get("client_id") is not None:
            extra_data["client_id"] = str(body["client_id"])
        for key in execution.SENSITIVE_EXTRA_DATA_KEYS:  # ComfyUI keeps these out of /queue and /history
            extra_data.pop(key, None)
        extra_data["create_time"] = int(time.time() * 1000)
        self.prompts.put([number, prompt_id, prompt, extra_data, outputs])
        self._send(200, {"prompt_id": prompt_id, "number": number, "node_errors": node_errors})

    def _interrupt(self, raw: bytes) -> None:
        """ComfyUI's POST /interrupt: the running prompt; with {"prompt_id"} only if that one is running."""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {}
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        running = [item[1] for item in self.prompts.as_lists("running")]
        if not prompt_id or prompt_id in running:
            self.prompts.interrupted.set()
        else:
            logging.info("Prompt %s is not currently running, skipping interrupt", prompt_id)
        self._send(200, "", "text/plain")

    def _view(self) -> None:
        """ComfyUI's GET /view: a file of output/, input/ or temp/ by filename, subfolder and type."""
        query = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query, keep_blank_values=True).items()}
        filename = query.get("filename", "")
        kind = query.get("type", "output")
        if not filename or filename[0] == "/" or ".." in filename or kind not in ("output", "input", "temp"):
            self._send(400, "400: Bad Request", "text/plain")
            return
        root = os.path.abspath(files.directory(kind))
        folder = os.path.abspath(os.path.join(root, query.get("subfolder", "")))
        if os.path.commonpath((folder, root)) != root:
            self._send(403, "403: Forbidden", "text/plain")
            return
        path = os.path.join(folder, os.path.basename(filename))
        if not os.path.isfile(path):
            self._send(404, "404: Not Found", "text/plain")
            return
        with open(path, "rb") as served:
            data = served.read()
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        if content_type in ("text/html", "application/xhtml+xml", "text/javascript", "text/css"):
            content_type = "application/octet-stream"  # ComfyUI makes these a download
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Disposition", f'filename="{os.path.basename(filename)}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _upload(self, raw: bytes) -> None:
        """ComfyUI's POST /upload/image (multipart: image, overwrite, type, subfolder)."""
        fields, upload = _multipart(self.headers.get("Content-Type", ""), raw)
        kind = fields.get("type") or "input"
        if upload is None or not upload[0] or kind not in ("input", "output", "temp"):
            self._send(400, "400: Bad Request", "text/plain")
            return
        filename, data = upload
        subfolder = fields.get("subfolder", "")
        root = os.path.abspath(files.directory(kind))
        folder = os.path.join(root, os.path.normpath(subfolder))
        path = os.path.abspath(os.path.join(folder, filename))
        if os.path.commonpath((root, path)) != root:
            self._send(400, "400: Bad Request", "text/plain")
            return
        os.makedirs(folder, exist_ok=True)
        stem, suffix = os.path.splitext(filename)
        duplicate = False
        if fields.get("overwrite") not in ("true", "1"):
            index = 1
            while os.path.exists(path):
                with open(path, "rb") as existing:
                    if hashlib.sha256(existing.read()).digest() == hashlib.sha256(data).digest():
                        duplicate = True  # ComfyUI keeps the same file under its name
                        break
                filename = f"{stem} ({index}){suffix}"
                path = os.path.join(folder, filename)
                index += 1
        if not duplicate:
            with open(path, "wb") as out:
                out.write(data)
        self._send(200, {"name": filename, "subfolder": subfolder, "type": kind})

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
        elif route.startswith("/history/"):
            prompt_id = route[len("/history/") :]
            with self.prompts.lock:
                item = self.prompts.history.get(prompt_id)
                self._send(200, {prompt_id: item} if item is not None else {})
        elif route == "/view":
            self._view()
        else:
            self._send(404, "404: Not Found", "text/plain")

    def do_POST(self) -> None:
        route = self._route()
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.max_upload:
            self.close_connection = True
            self._send(413, f"Maximum request body size {self.max_upload} exceeded, actual body size {length}",
                       "text/plain")  # fmt: skip
            return
        raw = self.rfile.read(length) if length else b""
        if route == "/prompt":
            self._prompt(raw)
        elif route == "/upload/image":
            self._upload(raw)
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
                    item for item in self.prompts.pending if not body.get("clear") and item[1] not in dropped
                ]
            self.prompts.changed()
            self._send(200, "", "text/plain")
        elif route == "/interrupt":
            self._interrupt(raw)
        elif route == "/free":
            self._send(200, "", "text/plain")
        else:
            self._send(405, "405: Method Not Allowed", "text/plain")


def _multipart(content_type: str, body: bytes) -> tuple[dict[str, str], tuple[str, bytes] | None]:
    """A multipart/form-data body's text fields, and its `image` file (name, bytes) if it has one."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    fields: dict[str, str] = {}
    upload = None
    if not message.is_multipart():
        return fields, None
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if name == "image" and part.get_filename() is not None:
            upload = (os.path.basename(str(part.get_filename())), bytes(payload))
        elif isinstance(name, str):
            fields[name] = bytes(payload).decode("utf-8", "replace")
    return fields, upload


class _Server4(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server4):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        # Keep "::" to IPv6 so "0.0.0.0,::" can bind both families on one port, as aiohttp does.
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()


def serve(
    addresses: list[str], port: int, cpu: bool, stop: threading.Event, strict: bool = False, max_upload_mb: float = 100
) -> None:
    """Bind every address first (a failure is fatal, as in ComfyUI), then serve until `stop`."""
    Handler.prompts = PromptQueue(strict)
    Handler.cpu = cpu
    Handler.max_upload = int(max_upload_mb * 1024 * 1024)
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
