"""A fault-injecting loopback HTTP(S) origin for the model engine's tests and benchmark.

Serves bytes, deterministic virtual files (so only the client uses disk) or real files (with
sendfile), with Range/HEAD/ETag, Hugging Face-like and Civitai-like endpoints, redirects to
a second host, and faults: truncation, ignored ranges, 416, 401/403/404 with the Hub's error
codes, 429/5xx sequences, slow drips and per-connection rate caps, HEAD or Range refused, a 206
whose Content-Range is not the range asked for, and If-Range ignored. Every request is logged
with the body bytes actually sent. A hub may require HTTP basic auth on every path (a private
package index), and may call observers on each request while its client waits for the answer."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from harness.tls import TLSFiles

SLICE = 1 << 20
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class VirtualFile:
    """`size` pseudo-random bytes made of rotations of one 1 MiB block: cheap to serve at any offset."""

    def __init__(self, size: int, seed: int = 0, sha256: str | None = None) -> None:
        """`sha256` declares the digest instead, for a file that is never read whole (hashing
        a file larger than the disk takes minutes)."""
        self.size = size
        self.seed = seed
        block = hashlib.sha256(f"seed-{seed}".encode()).digest() * (SLICE // 32)
        self._block = block + block  # doubled so any rotation is one slice
        self._sha256: str | None = sha256

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        parts = []
        while offset < end:
            index, within = divmod(offset, SLICE)
            rotate = (within + index * 4099) % SLICE
            take = min(SLICE - within, end - offset)
            parts.append(self._block[rotate : rotate + take])
            offset += take
        return b"".join(parts)

    def sha256(self) -> str:
        if self._sha256 is None:
            digest = hashlib.sha256()
            for offset in range(0, self.size, SLICE):
                digest.update(self.read(offset, SLICE))
            self._sha256 = digest.hexdigest()
        return self._sha256


@dataclass
class FileBody:
    """A real file, sent with os.sendfile when no fault or rate cap applies."""

    path: Path

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    def read(self, offset: int, length: int) -> bytes:
        with self.path.open("rb") as handle:
            handle.seek(offset)
            return handle.read(length)

    def sha256(self) -> str:
        digest = hashlib.sha256()
        with self.path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(SLICE), b""):
                digest.update(chunk)
        return digest.hexdigest()


Body = bytes | VirtualFile | FileBody


def _size(body: Body) -> int:
    return len(body) if isinstance(body, bytes) else body.size


def _read(body: Body, offset: int, length: int) -> bytes:
    return body[offset : offset + length] if isinstance(body, bytes) else body.read(offset, length)


def body_sha256(body: Body) -> str:
    return hashlib.sha256(body).hexdigest() if isinstance(body, bytes) else body.sha256()


@dataclass
class Route:
    body: Body = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/octet-stream"
    etag: str | None = None
    last_modified: str | None = None
    ranges: bool = True
    ignore_range: bool = False
    truncate_at: int | None = None
    truncate_times: int = 1_000_000
    chunked: bool = False
    rate: int | None = None
    drip_delay: float = 0.0
    stall_at: int | None = None  # send this many body bytes, then nothing for stall_for seconds, then close
    stall_for: float = 0.0
    fail_first: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    error: tuple[int, dict[str, str], str] | None = None
    redirect: str | None = None
    content_disposition: str | None = None
    range_416_content_range: bool = True
    require_auth: str | None = None
    reject_auth: bool = False
    handler: Any = None  # callable(request handler) -> bool for dynamic routes (HF, Civitai)
    expire_after: int | None = None  # after this many requests, the first URL's query (signature) is refused
    head_status: int | None = None  # answer HEAD with this status (405, 501: a server without HEAD)
    range_status: int | None = None  # answer any Range request with this status and no Content-Range
    range_shift: int = 0  # a 206 that serves the asked range moved by this many bytes (and says so)
    ignore_if_range: bool = False  # serve the asked range whatever If-Range says
    seen: int = 0
    first_query: str | None = None


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    status: int = 0
    body_bytes: int = 0
    server: str = ""


class MockHub:
    """A threaded HTTP/1.1 server on a loopback address, configured route by route."""

    def __init__(self, host: str = "127.0.0.1", *, tls: TLSFiles | None = None, port: int = 0) -> None:
        if host in ("", "0.0.0.0", "::"):  # noqa: S104 - the values refused here
            raise ValueError(
                f"MockHub needs the one address to serve on, not {host!r}, which would serve every network"
            )
        self.host = host
        self.tls = tls
        self._port = port
        self.routes: dict[str, Route] = {}
        self.folders: dict[str, Path] = {}
        self.missing_repos: set[str] = set()
        self.hf_repos: set[str] = set()
        self._log: list[Request] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        # (user, password) every request must send as HTTP basic auth, or get 401 with a challenge.
        self.basic_auth: tuple[str, str] | None = None
        # Called with each request before it is answered (its client is still running).
        self.observers: list[Callable[[Request], None]] = []

    # lifecycle ------------------------------------------------------------------

    def __enter__(self) -> MockHub:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        hub = self

        class Handler(_Handler):
            owner = hub

        server = _Server((self.host, self._port), Handler)
        server.daemon_threads = True
        if self.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(self.tls.cert), str(self.tls.key))
            server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def port(self) -> int:
        assert self._server is not None, "the hub is not started"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    # configuration --------------------------------------------------------------

    def add(self, path: str, body: Body = b"", **settings: Any) -> str:
        """Serve `body` at `path` with the given faults; returns its sha256."""
        etag = settings.pop("etag", "auto")
        if etag == "auto":
            etag = f'"{body_sha256(body)}"'
        route = Route(body=body, etag=etag, **settings)
        if route.fail_first:
            route.fail_first = list(route.fail_first)
        self.routes[path] = route
        return body_sha256(body)

    def add_folder(self, prefix: str, folder: Path) -> None:
        """Serve every file under `folder` at `prefix` + its relative path, read when asked for:
        files written after the server started are served too (a git push to a served repository)."""
        self.folders[prefix] = folder.resolve()

    def add_hf(
        self,
        repo: str,
        path: str,
        body: Body,
        *,
        revision: str = "main",
        commit: str = COMMIT,
        lfs: bool = True,
        cdn: MockHub | None = None,
        token: str | None = None,
        gated: bool = False,
        granted: bool = True,
        private: bool = False,
        cdn_expire_after: int | None = None,
    ) -> str:
        """A Hub file under /<repo>/resolve/<revision|commit>/<path>; returns its sha256.

        Each redirect carries a new signature; with `cdn_expire_after`, the CDN refuses the first
        signature after that many requests (a presigned URL that expires mid-download)."""
        digest = body_sha256(body)
        size = _size(body)
        self.hf_repos.add(repo)
        store = cdn or self
        cdn_path = f"/cdn/{digest}"
        if lfs:
            store.add(cdn_path, body, etag=f'"{digest}"', reject_auth=True, expire_after=cdn_expire_after)
        signatures = iter(range(1, 1 << 30))

        def handle(request: _Handler) -> bool:
            auth = request.headers.get("Authorization")
            needs = gated or private or token is not None
            if auth and token is not None and auth != f"Bearer {token}":
                return request.reply(401, "Invalid credentials in Authorization header")
            if needs and not auth:
                if private:
                    return request.reply(
                        401, f"Repository Not Found for url: {request.path}", {"X-Error-Code": "RepoNotFound"}
                    )
                if gated:
                    return request.reply(
                        401,
                        f"Access to model {repo} is restricted. You must have access to it and be authenticated "
                        "to access it. Please log in.",
                        {"X-Error-Code": "GatedRepo"},
                    )
                return request.reply(401, "Invalid credentials in Authorization header")
            if gated and not granted:
                return request.reply(
                    403,
                    f"Access to model {repo} is restricted and you are not in the authorized list. "
                    f"Visit https://huggingface.co/{repo} to ask for access.",
                    {"X-Error-Code": "GatedRepo"},
                )
            if lfs:
                location = f"{store.url}{cdn_path}?X-Amz-Signature={next(signatures)}"
                headers = {
                    "Location": location,
                    "X-Linked-Etag": f'"{digest}"',
                    "X-Linked-Size": str(size),
                    "X-Repo-Commit": commit,
                    "ETag": f'"{digest}"',
                }
                return request.reply(302, "", headers)
            blob = hashlib.sha1(b"blob %d\0" % size + _read(body, 0, size), usedforsecurity=False).hexdigest()
            route = Route(body=body, etag=f'"{blob}"', headers={"X-Repo-Commit": commit})
            request.serve(route)
            return True

        for ref in {revision, commit}:
            self.routes[f"/{repo}/resolve/{ref}/{path}"] = Route(handler=handle)
        return digest

    def add_echo(self, path: str, how: str) -> None:
        """A hostile origin at `path` that echoes the credential its client sent (a bearer token or
        a basic-auth password) back: `how` is `error-code` (404 with X-Error-Code), `request-id`
        (503 with X-Request-Id, retried), `redirect` (a redirect into a path that holds it, which
        answers 404) or `scheme` (a redirect to ftp:// with it in the path)."""

        def echo(request: _Handler) -> bool:
            kind, _, value = request.headers.get("Authorization", "").partition(" ")
            if kind == "Basic":
                value = base64.b64decode(value).decode().partition(":")[2]
            if how == "error-code":
                return request.reply(404, "Not found", {"X-Error-Code": value})
            if how == "request-id":
                return request.reply(503, "Slow down", {"X-Request-Id": value})
            if how == "redirect":
                return request.reply(302, "", {"Location": f"/echoed/{urllib.parse.quote(value)}/file"})
            return request.reply(302, "", {"Location": f"ftp://{self.host}/{value}/file"})

        self.routes[path] = Route(handler=echo)

    def add_hf_missing(self, repo: str) -> None:
        """Every path of `repo` answers 404 RepoNotFound."""
        self.missing_repos.add(repo)

    def add_civitai(
        self,
        version_id: int,
        filename: str,
        body: Body,
        *,
        token: str | None = None,
        cdn: MockHub | None = None,
        publish_hash: bool = True,
    ) -> str:
        """/api/v1/model-versions/<id> and /api/download/models/<id> (a redirect to the CDN)."""
        digest = body_sha256(body)
        store = cdn or self
        cdn_path = f"/cdn/civitai/{version_id}/{filename}"
        store.add(cdn_path, body, reject_auth=True, content_disposition=f'attachment; filename="{filename}"')
        info = {
            "id": version_id,
            "name": "v1",
            "files": [
                {
                    "name": filename,
                    "sizeKB": _size(body) / 1024,
                    "type": "Model",
                    "primary": True,
                    "hashes": {"SHA256": digest.upper()} if publish_hash else {},
                    "downloadUrl": f"{self.url}/api/download/models/{version_id}",
                }
            ],
        }
        self.add(f"/api/v1/model-versions/{version_id}", json.dumps(info).encode(), content_type="application/json")

        def download(request: _Handler) -> bool:
            query = urllib.parse.parse_qs(request.query)
            given = request.headers.get("Authorization") == f"Bearer {token}" or query.get("token") == [token]
            if token is not None and not given:
                text = json.dumps(
                    {
                        "error": "Unauthorized",
                        "message": "The creator of this asset requires you to be logged in to download it",
                    }
                )
                return request.reply(401, text, {"Content-Type": "application/json"})
            return request.reply(307, "", {"Location": f"{store.url}{cdn_path}?X-Amz-Signature=def"})

        self.routes[f"/api/download/models/{version_id}"] = Route(handler=download)
        return digest

    # the log ------------------------------------------------------------------------

    def requests(self, path: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self._log if path is None or r.path == path]

    @property
    def bytes_served(self) -> int:
        with self._lock:
            return sum(r.body_bytes for r in self._log if r.method == "GET")

    def reset_log(self) -> None:
        with self._lock:
            self._log.clear()

    def _record(self, request: Request) -> None:
        with self._lock:
            self._log.append(request)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that hang up (killed downloads, aborted ranges) are part of the tests: stay quiet."""


class _Handler(BaseHTTPRequestHandler):
    owner: MockHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        """Quiet."""

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        self.route_path, self.query = parts.path, parts.query
        self.entry = Request(self.command, parts.path, parts.query, dict(self.headers.items()), server=self.owner.host)
        self.owner._record(self.entry)
        for observe in self.owner.observers:
            observe(self.entry)
        try:
            if self.owner.basic_auth and not self._basic_auth_ok(self.owner.basic_auth):
                self.reply(401, "Unauthorized", {"WWW-Authenticate": 'Basic realm="comfybake-test"'})
                return
            self._handle()
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            self.close_connection = True

    def _handle(self) -> None:
        route = self.owner.routes.get(self.route_path)
        repo = next((r for r in self.owner.missing_repos if self.route_path.startswith(f"/{r}/")), None)
        if repo is not None:
            self.reply(404, f"Repository Not Found for url: {self.route_path}", {"X-Error-Code": "RepoNotFound"})
            return
        if route is None:
            route = self._folder_route()
        if route is None:
            hub_repo = any(self.route_path.startswith(f"/{r}/resolve/") for r in self.owner.hf_repos)
            extra = {"X-Error-Code": "EntryNotFound"} if hub_repo else {}
            self.reply(404, "Not found", extra)
            return
        if route.handler is not None:
            route.handler(self)
            return
        self.serve(route)

    def _basic_auth_ok(self, wanted: tuple[str, str]) -> bool:
        expected = base64.b64encode(f"{wanted[0]}:{wanted[1]}".encode()).decode()
        return self.headers.get("Authorization") == f"Basic {expected}"

    def _folder_route(self) -> Route | None:
        for prefix, folder in self.owner.folders.items():
            if self.route_path.startswith(prefix):
                path = (folder / urllib.parse.unquote(self.route_path[len(prefix) :])).resolve()
                if path.is_file() and path.is_relative_to(folder):
                    return Route(body=FileBody(path))
        return None

    # responses ----------------------------------------------------------------------

    def reply(self, status: int, text: str, headers: dict[str, str] | None = None) -> bool:
        data = text.encode()
        self.entry.status = status
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "text/plain; charset=utf-8")
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
            self.entry.body_bytes = len(data)
        return True

    def serve(self, route: Route) -> None:
        if route.expire_after is not None:
            route.seen += 1
            route.first_query = self.query if route.first_query is None else route.first_query
            if route.seen > route.expire_after and self.query == route.first_query:
                self.reply(403, "Request has expired", {"X-Error-Code": "AccessDenied"})
                return
        if route.fail_first:
            status, headers = route.fail_first.pop(0)
            self.reply(status, f"injected {status}", headers)
            return
        if route.error:
            status, headers, text = route.error
            self.reply(status, text, headers)
            return
        if route.redirect:
            self.reply(302, "", {"Location": route.redirect, **route.headers})
            return
        if route.reject_auth and (
            {"authorization", "cookie", "x-api-key"} & {h.lower() for h in self.headers} or "token=" in self.query
        ):
            self.reply(400, "Only one auth mechanism allowed")
            return
        if route.require_auth and self.headers.get("Authorization") != f"Bearer {route.require_auth}":
            self.reply(401, "Unauthorized")
            return
        if self.command == "HEAD" and route.head_status:
            self.reply(route.head_status, "Method Not Allowed", {"Allow": "GET"})
            return
        size = _size(route.body)
        start, end, status = 0, size, route.status
        wanted = self.headers.get("Range")
        if wanted and route.range_status:
            self.reply(route.range_status, "Range refused")
            return
        if_range = self.headers.get("If-Range")
        use_range = bool(wanted) and route.ranges and not route.ignore_range
        if use_range and if_range and if_range not in (route.etag, route.last_modified) and not route.ignore_if_range:
            use_range = False
        if use_range and wanted:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted.strip())
            if match:
                start = int(match.group(1))
                if start >= size:
                    headers = {"Content-Range": f"bytes */{size}"} if route.range_416_content_range else {}
                    self.reply(416, "Range Not Satisfiable", headers)
                    return
                end = min(int(match.group(2)) + 1, size) if match.group(2) else size
                shifted = min(max(start + route.range_shift, 0), size - 1)
                start, end = shifted, min(end + shifted - start, size)
                status = 206
        self.entry.status = status
        self.send_response(status)
        self.send_header("Content-Type", route.content_type)
        if route.etag:
            self.send_header("ETag", route.etag)
        if route.last_modified:
            self.send_header("Last-Modified", route.last_modified)
        if route.ranges:  # also when ignore_range: a server that advertises ranges and ignores them
            self.send_header("Accept-Ranges", "bytes")
        if route.content_disposition:
            self.send_header("Content-Disposition", route.content_disposition)
        for key, value in route.headers.items():
            self.send_header(key, value)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        if route.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if self.command == "HEAD":
            return
        if route.stall_at is not None:
            self._send_body(route, start, min(end, start + route.stall_at))
            self.wfile.flush()
            time.sleep(route.stall_for)
            self.close_connection = True
            return
        limit = end
        truncate = route.truncate_at is not None and route.truncate_times > 0
        if truncate:
            route.truncate_times -= 1
            limit = min(end, start + (route.truncate_at or 0))
        self._send_body(route, start, limit)
        if truncate or (route.chunked and limit < end):
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)  # the promised length is never reached
        elif route.chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _send_body(self, route: Route, start: int, end: int) -> None:
        body = route.body
        if isinstance(body, FileBody) and not (route.rate or route.drip_delay or route.chunked or self.owner.tls):
            self.wfile.flush()
            with body.path.open("rb") as handle:
                offset = start
                while offset < end:
                    sent = os.sendfile(self.connection.fileno(), handle.fileno(), offset, min(end - offset, 1 << 30))
                    if sent == 0:
                        break
                    offset += sent
                    self.entry.body_bytes += sent
            return
        slice_size = 64 << 10 if route.rate or route.drip_delay else SLICE
        started = time.monotonic()
        for offset in range(start, end, slice_size):
            data = _read(body, offset, min(slice_size, end - offset))
            if route.drip_delay:
                time.sleep(route.drip_delay)
            if route.rate:
                due = started + (offset - start + len(data)) / route.rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            if route.chunked:
                self.wfile.write(b"%x\r\n" % len(data) + data + b"\r\n")
            else:
                self.wfile.write(data)
            self.entry.body_bytes += len(data)
