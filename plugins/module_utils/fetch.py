# PRIVATE to comfybake: not a public API; it may change without notice.
#
# The one download engine of comfybake. The comfyui_models module and the
# `comfybake models` CLI both drive it; nothing else in comfybake downloads.
# It needs only the standard library and requests, and runs on the managed
# host's Python (3.10 or later).
"""Fetch, verify and record the files of a model manifest in a model store."""

from __future__ import annotations

import contextlib
import email.utils
import errno
import fcntl
import functools
import hashlib
import io
import json
import os
import random
import re
import shutil
import stat
import tarfile
import threading
import time
import urllib.parse
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import IO, Any

try:
    import requests

    HAS_REQUESTS = True
    REQUESTS_IMPORT_ERROR: ImportError | None = None
except ImportError as _error:  # pragma: no cover - reported by the module and CLI
    HAS_REQUESTS = False
    REQUESTS_IMPORT_ERROR = _error

MiB = 1 << 20
BLOCK = MiB  # read and hash in 1 MiB pieces: large enough for hashlib to release the GIL
SEGMENT = 16 * MiB  # unit of parallel ranges and of resume checkpoints
STATE_DIR = ".comfybake"  # per-store records and locks, at the store root
RECORDS_FILE = "verified.json"
PARTIAL_SUFFIX = ".comfybake-partial"  # staging files: hidden, no model extension
SIDECAR_SUFFIX = PARTIAL_SUFFIX + ".json"
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".pkl", ".sft", ".onnx", ".gguf")
ENTRY_KEYS = frozenset(
    {"url", "dest", "sha256", "size", "extract", "files", "state", "auth", "allow_http", "allow_unverified"}
)
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._+-]")


# --------------------------------------------------------------------------- errors


class FetchError(Exception):
    """A failure the user can act on; the message names the entry, the cause and the fix."""

    retryable = False

    def __init__(self, message: str, entry: str | None = None) -> None:
        super().__init__(f"{entry}: {message}" if entry else message)
        self.entry = entry
        self.reason = message


class ManifestError(FetchError):
    """The manifest is invalid; nothing was fetched."""


class AuthError(FetchError):
    """401/403: a missing, invalid or unentitled token. Never retried."""


class NotFoundError(FetchError):
    """404: the repository, file or model version does not exist. Never retried."""


class HTTPStatusError(FetchError):
    """Another HTTP status, after the retries it deserved."""


class TransferError(FetchError):
    """The connection broke or the body was cut short; resumable."""

    retryable = True


class ChecksumError(FetchError):
    """The bytes do not have the expected SHA-256."""


class DiskFullError(FetchError):
    """Not enough free space, found before the first byte or while writing."""


class RedirectError(FetchError):
    """A redirect that comfybake refuses to follow."""


class ContentError(FetchError):
    """The bytes are not what the destination says (an HTML page saved as a model)."""


class ArchiveError(FetchError):
    """An archive with unsafe members or past the size limits; nothing was extracted."""


class PathError(FetchError):
    """A destination that escapes the model store."""


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Options:
    """Settings of one run. Tokens live here and nowhere else."""

    store: str
    parallel: int = 4
    connections: int = 4
    verify: str = "recorded"  # recorded | full
    hf_token: str | None = field(default=None, repr=False)
    civitai_token: str | None = field(default=None, repr=False)
    hf_endpoint: str = "https://huggingface.co"
    civitai_endpoint: str = "https://civitai.com"
    mirrors: tuple[str, ...] = ()
    allow_http: bool = False
    ca_bundle: str | None = None
    owner: int | None = None
    group: int | None = None
    mode: int = 0o640
    directory_mode: int = 0o2750
    retries: int = 5
    backoff: float = 1.0
    max_retry_wait: float = 120.0
    timeout: float = 30.0
    segment_size: int = SEGMENT
    min_split_size: int = 4 * SEGMENT
    archive_max_bytes: int = 32 << 30
    archive_max_members: int = 10_000
    check_mode: bool = False


@dataclass(frozen=True)
class Entry:
    """One validated manifest entry."""

    index: int
    url: str
    dest: str
    sha256: str | None = None
    size: int | None = None
    extract: bool = False
    files: tuple[str, ...] = ()
    state: str = "present"
    auth: str = "none"  # hf | civitai | none
    allow_http: bool = False
    allow_unverified: bool = False

    @property
    def name(self) -> str:
        return self.dest

    @property
    def folder(self) -> bool:
        return self.dest.endswith("/")

    @property
    def key(self) -> str:
        return f"{self.url} -> {self.dest}"


@dataclass
class Result:
    """What happened to one entry; safe to print (no token, no signed URL)."""

    name: str
    source: str
    action: str = "pending"
    changed: bool = False
    path: str | None = None
    sha256: str | None = None
    size: int | None = None
    bytes: int = 0
    seconds: float = 0.0
    msg: str | None = None
    files: list[str] | None = None
    replaced: str | None = None  # sha256 of the file this run replaced (or would replace)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class Report:
    results: list[Result]
    warnings: list[str]

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if r.action == "failed"]

    @property
    def changed(self) -> bool:
        return any(r.changed for r in self.results)


class Progress:
    """Receives transfer progress; the CLI draws bars, the module ignores it."""

    def start(self, name: str, total: int | None) -> None:
        """A transfer of `total` bytes (None: unknown) begins."""

    def advance(self, name: str, amount: int) -> None:
        """`amount` more bytes of `name` arrived."""

    def finish(self, name: str, action: str) -> None:
        """`name` is done."""


# --------------------------------------------------------------------------- manifest


def parse_manifest(items: Sequence[Any], options: Options) -> list[Entry]:
    """Validate every entry before any I/O; raise one ManifestError listing every problem."""
    problems: list[str] = []
    entries: list[Entry] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        label = f"models[{index}]"
        if not isinstance(item, Mapping):
            problems.append(f"{label}: must be a mapping with url and dest, got {type(item).__name__}")
            continue
        label = f"models[{index}] ({item.get('dest') or item.get('url')})"
        try:
            entry = _parse_entry(index, item, options)
        except ManifestError as error:
            problems.append(f"{label}: {error.reason}")
            continue
        target = entry.dest.rstrip("/")
        if not entry.folder or entry.extract:
            if target in seen:
                problems.append(f"{label}: dest {entry.dest!r} is also the dest of models[{seen[target]}]")
            seen[target] = index
        entries.append(entry)
    if problems:
        raise ManifestError("invalid model manifest:\n  " + "\n  ".join(problems))
    return entries


def _parse_entry(index: int, item: Mapping[str, Any], options: Options) -> Entry:
    unknown = sorted(set(item) - ENTRY_KEYS)
    if unknown:
        raise ManifestError(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(ENTRY_KEYS))}")
    url, dest = item.get("url"), item.get("dest")
    if not isinstance(url, str) or not url:
        raise ManifestError("url is required (https://, hf://, civitai:// or file://)")
    if not isinstance(dest, str) or not dest:
        raise ManifestError("dest is required: a folder key such as 'checkpoints/' or a path under the store")
    check_relative_path(dest, "dest")
    state = item.get("state", "present")
    if state not in ("present", "absent"):
        raise ManifestError(f"state must be present or absent, got {state!r}")
    sha256 = item.get("sha256")
    if sha256 is not None:
        if not isinstance(sha256, str) or not _HEX64.match(sha256):
            raise ManifestError(f"sha256 must be 64 hex digits, got {sha256!r}")
        sha256 = sha256.lower()
    size = item.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise ManifestError(f"size must be a number of bytes, got {size!r}")
    extract = _flag(item, "extract")
    files = item.get("files") or []
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise ManifestError("files must be a list of paths inside the extracted folder")
    for name in files:
        check_relative_path(name, "files")
    if extract and not dest.endswith("/"):
        raise ManifestError(f"extract needs a folder dest ending in '/', got {dest!r}")
    if files and not extract:
        raise ManifestError("files lists the members of an extracted archive; set extract: true")
    allow_http = _flag(item, "allow_http") or options.allow_http
    source = urllib.parse.urlsplit(url)
    scheme = source.scheme.lower()
    if scheme not in ("https", "http", "file", "hf", "civitai"):
        raise ManifestError(f"unsupported url scheme {scheme!r} in {display_url(url)}; use https, hf, civitai or file")
    if scheme == "http" and not allow_http:
        raise ManifestError(f"refusing plain http for {display_url(url)}: use https, or set allow_http: true")
    if scheme == "hf":
        parse_hf_url(url)
    if scheme == "civitai":
        parse_civitai_url(url)
    if scheme == "file" and not source.path.startswith("/"):
        raise ManifestError(f"file url must be absolute (file:///path), got {url!r}")
    auth = item.get("auth")
    inferred = _infer_auth(url, options)
    if auth is None:
        auth = inferred
    elif auth not in ("hf", "civitai", "none"):
        raise ManifestError(f"auth must be hf, civitai or none, got {auth!r}")
    elif auth != "none" and auth != inferred:
        host = source.hostname or url
        owner = options.hf_endpoint if auth == "hf" else options.civitai_endpoint
        raise ManifestError(
            f"refusing to send the {auth} token to {host}: it goes only to {urllib.parse.urlsplit(owner).netloc}; "
            "remove auth or fix the url"
        )
    return Entry(
        index=index,
        url=url,
        dest=dest,
        sha256=sha256,
        size=size,
        extract=extract,
        files=tuple(files),
        state=state,
        auth=auth,
        allow_http=allow_http,
        allow_unverified=_flag(item, "allow_unverified"),
    )


def _flag(item: Mapping[str, Any], key: str) -> bool:
    value = item.get(key, False)
    if not isinstance(value, bool):
        raise ManifestError(f"{key} must be true or false, got {value!r}")
    return value


def check_relative_path(path: str, what: str) -> None:
    """Refuse anything that could leave the store: absolute, '..', backslashes, drives, NUL, hidden names."""
    bad = None
    if "\x00" in path:
        bad = "contains a NUL byte"
    elif "\\" in path:
        bad = "contains a backslash"
    elif path.startswith("/"):
        bad = "is absolute"
    elif re.match(r"^[A-Za-z]:", path):
        bad = "starts with a drive letter"
    else:
        parts = path.rstrip("/").split("/")
        if any(part in ("", ".", "..") for part in parts):
            bad = "has an empty, '.' or '..' component"
        elif any(part.startswith(".") for part in parts):
            bad = "has a hidden component (names starting with '.' are reserved for staging)"
    if bad:
        raise ManifestError(f"{what} {path!r} {bad}; give a path relative to the model store")


def parse_hf_url(url: str) -> tuple[str, str, str]:
    """hf://<owner>/<name>/<path>@<revision> -> (repo, path, revision)."""
    body = url[len("hf://") :]
    revision = "main"
    if "@" in body:
        body, revision = body.rsplit("@", 1)
    parts = body.split("/")
    if parts and parts[0] in ("datasets", "spaces"):
        repo_parts, rest = parts[:3], parts[3:]
    else:
        repo_parts, rest = parts[:2], parts[2:]
    if len(repo_parts) < 2 or not rest or not all(repo_parts) or not revision:
        raise ManifestError(f"hf url must be hf://<owner>/<repo>/<path>@<revision>, got {url!r}")
    path = "/".join(rest)
    check_relative_path(path, "hf file path")
    return "/".join(repo_parts), path, revision


def hf_repo(url: str, options: Options) -> str | None:
    """The repository of an hf:// url or of a Hub resolve url."""
    if url.startswith("hf://"):
        return parse_hf_url(url)[0]
    path = urllib.parse.urlsplit(url).path[len(urllib.parse.urlsplit(options.hf_endpoint).path.rstrip("/")) :]
    repo, found, _rest = path.strip("/").partition("/resolve/")
    return repo if found else None


def parse_civitai_url(url: str) -> int:
    body = url[len("civitai://") :]
    if not body.isdigit():
        raise ManifestError(f"civitai url must be civitai://<modelVersionId> (digits), got {url!r}")
    return int(body)


def _infer_auth(url: str, options: Options) -> str:
    scheme = url.split(":", 1)[0].lower()
    if scheme == "hf":
        return "hf"
    if scheme == "civitai":
        return "civitai"
    if scheme in ("http", "https"):
        origin = _origin(url)
        if origin == _origin(options.hf_endpoint):
            return "hf"
        if origin == _origin(options.civitai_endpoint):
            return "civitai"
    return "none"


def _origin(url: str) -> tuple[str, int | None]:
    parts = urllib.parse.urlsplit(url)
    port = parts.port or {"https": 443, "http": 80}.get(parts.scheme)
    return (parts.hostname or "").lower(), port


def display_url(url: str) -> str:
    """A URL safe to print: no user info, no query (signatures, tokens), no fragment."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def _source_label(url: str) -> str:
    return url if url.split(":", 1)[0] in ("hf", "civitai", "file") else display_url(url)


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover - unreachable


# --------------------------------------------------------------------------- store


class Store:
    """The model store: path containment, the verification records and per-file locks."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.root = os.path.realpath(options.store)
        self.state_dir = os.path.join(self.root, STATE_DIR)
        self._lock = threading.Lock()
        self.records: dict[str, Any] = {"version": 1, "files": {}, "archives": {}, "names": {}}
        self._dirty: dict[str, dict[str, Any]] = {"files": {}, "archives": {}, "names": {}}
        self.refresh()

    def refresh(self) -> None:
        """Re-read the records another process may have written (after waiting for a lock)."""
        loaded = _read_records(os.path.join(self.state_dir, RECORDS_FILE))
        with self._lock:
            if not self._dirty["files"] and not self._dirty["archives"] and not self._dirty["names"]:
                self.records = loaded  # every change of this run is saved already

    def path(self, relpath: str) -> str:
        """The absolute path of `relpath`, refusing one that resolves outside the store."""
        check_relative_path(relpath, "destination")
        full = os.path.join(self.root, relpath)
        real = os.path.realpath(full)
        if os.path.commonpath([real, self.root]) != self.root:
            raise PathError(
                f"destination resolves outside the model root ({relpath} -> {real}); "
                "remove the symlink or choose another dest",
                relpath,
            )
        return full

    def makedirs(self, directory: str) -> None:
        """Create missing directories with the store's directory mode and ownership."""
        missing: list[str] = []
        current = directory
        while not os.path.isdir(current):
            missing.append(current)
            current = os.path.dirname(current)
        for path in reversed(missing):
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o700)
                self.apply_attributes(path, self.options.directory_mode)

    def apply_attributes(self, path: str, mode: int, fd: int | None = None) -> None:
        owner = -1 if self.options.owner is None else self.options.owner
        group = -1 if self.options.group is None else self.options.group
        if fd is not None:
            if owner != -1 or group != -1:
                os.fchown(fd, owner, group)
            os.fchmod(fd, mode)
        else:
            if owner != -1 or group != -1:
                os.chown(path, owner, group)
            os.chmod(path, mode)

    @contextlib.contextmanager
    def locked(self, relpath: str) -> Iterator[None]:
        """Serialise work on one destination across threads and processes."""
        locks = os.path.join(self.state_dir, "locks")
        os.makedirs(locks, mode=0o700, exist_ok=True)
        name = hashlib.sha1(relpath.encode(), usedforsecurity=False).hexdigest()
        with open(os.path.join(locks, name + ".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # records ------------------------------------------------------------------

    def file_record(self, relpath: str) -> dict[str, Any] | None:
        with self._lock:
            record = self.records["files"].get(relpath)
            return dict(record) if record else None

    def archive_record(self, reldir: str) -> dict[str, Any] | None:
        with self._lock:
            record = self.records["archives"].get(reldir)
            return dict(record) if record else None

    def name_for(self, key: str) -> str | None:
        with self._lock:
            name = self.records["names"].get(key)
            return name if isinstance(name, str) else None

    def record(self, section: str, key: str, value: Any) -> None:
        """Set (or with None, drop) a record and persist it at once, merged under a store lock."""
        with self._lock:
            if value is None:
                self.records[section].pop(key, None)
            else:
                self.records[section][key] = value
            if not self.options.check_mode:
                self._dirty[section][key] = value
                self._save()

    def _save(self) -> None:
        os.makedirs(self.state_dir, mode=0o750, exist_ok=True)
        path = os.path.join(self.state_dir, RECORDS_FILE)
        with open(os.path.join(self.state_dir, "records.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = _read_records(path)
            for section, changes in self._dirty.items():
                for key, value in changes.items():
                    if value is None:
                        current[section].pop(key, None)
                    else:
                        current[section][key] = value
            temporary = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump(current, handle, indent=1, sort_keys=True)
            os.replace(temporary, path)
            self.records = current
            self._dirty = {"files": {}, "archives": {}, "names": {}}


def _read_records(path: str) -> dict[str, Any]:
    records: dict[str, Any] = {"version": 1, "files": {}, "archives": {}, "names": {}}
    with contextlib.suppress(FileNotFoundError, ValueError):
        with open(path, encoding="utf-8") as handle:
            loaded = json.load(handle)
        if isinstance(loaded, dict) and loaded.get("version") == 1:
            records.update({k: dict(loaded.get(k) or {}) for k in ("files", "archives", "names")})
    return records


def stat_record(path: str) -> dict[str, int]:
    info = os.stat(path)
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "ino": info.st_ino}


def stat_matches(path: str, record: Mapping[str, Any]) -> bool:
    try:
        current = stat_record(path)
    except OSError:
        return False
    return all(record.get(key) == value for key, value in current.items())


# --------------------------------------------------------------------------- hashing


def hash_file(path: str) -> tuple[str, int]:
    """SHA-256 and size of a file, read once in 1 MiB blocks."""
    digest = hashlib.sha256()
    buffer = bytearray(BLOCK)
    view = memoryview(buffer)
    total = 0
    with open(path, "rb", buffering=0) as handle:
        while True:
            count = handle.readinto(buffer)
            if not count:
                break
            digest.update(view[:count])
            total += count
    return digest.hexdigest(), total


class StreamHasher:
    """Hashes a file while it is written, on its own thread, exactly once per byte.

    Writers report bytes that are on disk (`done`); bytes handed over in order with `feed`
    are hashed from memory, the rest is read back from the page cache (parallel ranges,
    and the prefix of a resumed download, which this process has never hashed)."""

    def __init__(self, fd: int, start: int = 0) -> None:
        self._fd = fd
        self._digest = hashlib.sha256()
        self._hashed = 0
        self._fed: list[tuple[int, bytes]] = []
        self._spans: list[tuple[int, int]] = [(0, start)] if start else []
        self._watermark = start
        self._finished = False
        self._aborted = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()

    @property
    def watermark(self) -> int:
        with self._cond:
            return self._watermark

    def feed(self, offset: int, data: bytes) -> None:
        """`data` at `offset` is on disk; hash it from memory if it continues the stream."""
        with self._cond:
            end = self._fed[-1][0] + len(self._fed[-1][1]) if self._fed else self._hashed
            if offset == end and len(self._fed) < 64:  # bounded: the rest comes from the page cache
                self._fed.append((offset, data))
            self._add_span(offset, offset + len(data))

    def done(self, start: int, end: int) -> None:
        """Bytes [start, end) are on disk."""
        with self._cond:
            self._add_span(start, end)

    def _add_span(self, start: int, end: int) -> None:
        spans = sorted([*self._spans, (start, end)])
        merged: list[tuple[int, int]] = []
        for a, b in spans:
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self._spans = merged
        self._watermark = merged[0][1] if merged and merged[0][0] == 0 else 0
        self._cond.notify_all()

    def reset(self) -> None:
        """Start over (the server ignored Range): forget every byte."""
        with self._cond:
            self._digest = hashlib.sha256()
            self._hashed = 0
            self._fed = []
            self._spans = []
            self._watermark = 0

    def finish(self) -> tuple[str, int]:
        """Wait until every byte on disk is hashed; return the digest and the byte count."""
        with self._cond:
            self._finished = True
            self._cond.notify_all()
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._digest.hexdigest(), self._hashed

    def abort(self) -> None:
        """Stop hashing at once (the transfer failed); the bytes on disk stay as they are."""
        with self._cond:
            self._finished = self._aborted = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while self._hashed >= self._watermark and not self._finished:
                        self._cond.wait()
                    if self._aborted or self._hashed >= self._watermark:
                        return
                    digest, start, target = self._digest, self._hashed, self._watermark
                    while self._fed and self._fed[0][0] < start:
                        self._fed.pop(0)
                    chunk = self._fed.pop(0)[1] if self._fed and self._fed[0][0] == start else None
                if chunk is None:
                    chunk = os.pread(self._fd, min(BLOCK, target - start), start)
                    if not chunk:
                        raise OSError(errno.EIO, "short read while hashing the staging file")
                digest.update(chunk)
                with self._cond:
                    if self._digest is digest:  # not reset meanwhile
                        self._hashed = start + len(chunk)
                    self._cond.notify_all()
        except BaseException as error:  # noqa: BLE001 - re-raised by finish() on the caller's thread
            with self._cond:
                self._error = error
                self._cond.notify_all()


def check_model_header(path: str, dest: str, content_type: str | None) -> None:
    """Catch an HTML page or JSON error saved under a model name."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind in ("text/html", "application/json", "text/plain") and dest.lower().endswith(MODEL_EXTENSIONS):
        raise ContentError(
            f"not a model file (Content-Type {kind}): the server sent a page, often a login or error page; "
            "check the url and the token",
            dest,
        )
    if not dest.lower().endswith((".safetensors", ".sft")):
        return
    problem = None
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            problem = "shorter than a safetensors header"
        else:
            length = int.from_bytes(head, "little")
            size = os.fstat(handle.fileno()).st_size
            if length <= 1 or length > 100 * MiB or length + 8 > size:
                problem = f"header length {length} is impossible for a {size}-byte file"
            else:
                try:
                    header = json.loads(handle.read(length))
                    if not isinstance(header, dict):
                        problem = "header is not a JSON object"
                except ValueError:
                    problem = "header is not valid JSON"
    if problem:
        kind_text = f"Content-Type {kind}; " if kind else ""
        raise ContentError(f"not a safetensors file ({kind_text}header invalid: {problem})", dest)


# --------------------------------------------------------------------------- HTTP


@dataclass
class Remote:
    """Where an entry's bytes come from, and what the source says about them."""

    url: str  # the URL to request first (origin or mirror)
    final_url: str | None = None  # after redirects, used for ranged requests
    size: int | None = None
    sha256: str | None = None  # published by the source (X-Linked-Etag, Civitai API)
    filename: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    ranges: bool = False
    content_type: str | None = None
    commit: str | None = None
    mirror: bool = False

    @property
    def validator(self) -> str | None:
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified


class Client:
    """requests with comfybake's rules: tokens only to their host, no downgrade, bounded retries."""

    def __init__(self, options: Options, warn: Callable[[str], None]) -> None:
        self.options = options
        self.warn = warn
        self._local = threading.local()

    def session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = True  # proxies from the environment
            session.headers["User-Agent"] = "comfybake-fetch/1"
            session.headers["Accept-Encoding"] = "identity"
            self._local.session = session
        return session

    def auth_headers(self, url: str, auth: str) -> dict[str, str]:
        """The token of `auth`, only when `url` is on that token's own host."""
        if auth == "hf":
            token, owner = self.options.hf_token, self.options.hf_endpoint
        elif auth == "civitai":
            token, owner = self.options.civitai_token, self.options.civitai_endpoint
        else:
            return {}
        if token and _origin(url) == _origin(owner):
            return {"Authorization": f"Bearer {token}"}
        return {}

    def request(
        self,
        method: str,
        url: str,
        entry: Entry,
        *,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        on_redirect: Callable[[requests.Response], None] | None = None,
    ) -> requests.Response:
        """One request with redirects followed by hand and retries for 408/429/5xx and broken connections."""
        attempt = 0
        while True:
            try:
                response = self._follow(method, url, entry, headers or {}, stream, on_redirect)
            except requests.exceptions.SSLError:
                raise FetchError(
                    f"TLS verification failed for {display_url(url)}; if a proxy re-signs TLS, "
                    "give its CA bundle with ca_bundle",
                    entry.name,
                ) from None
            except (requests.ConnectionError, requests.Timeout) as error:
                attempt += 1
                if attempt > self.options.retries:
                    raise TransferError(
                        f"network error from {display_url(url)} after {attempt} attempts: {type(error).__name__}; "
                        "check connectivity or proxies and run again",
                        entry.name,
                    ) from None
                self.sleep(attempt, None)
                continue
            except requests.RequestException as error:  # an invalid URL, scheme or header: not retried
                raise FetchError(
                    f"cannot request {display_url(url)}: {type(error).__name__}; check the url", entry.name
                ) from None
            if response.status_code in RETRY_STATUSES:
                attempt += 1
                if attempt > self.options.retries:
                    raise self.status_error(response, entry, attempts=attempt)
                wait = response.headers.get("Retry-After")
                response.close()
                self.sleep(attempt, wait)
                continue
            return response

    def _follow(
        self,
        method: str,
        url: str,
        entry: Entry,
        headers: Mapping[str, str],
        stream: bool,
        on_redirect: Callable[[requests.Response], None] | None,
    ) -> requests.Response:
        session = self.session()
        current = url
        for _hop in range(10):
            request_headers = dict(headers)
            request_headers.update(self.auth_headers(current, entry.auth))
            response = session.request(
                method,
                current,
                headers=request_headers,
                stream=stream,
                allow_redirects=False,
                timeout=(self.options.timeout, self.options.timeout),
                # per request: with trust_env, requests lets REQUESTS_CA_BUNDLE override the session's
                verify=self.options.ca_bundle or True,
            )
            if response.status_code not in (301, 302, 303, 307, 308) or "Location" not in response.headers:
                response.url = current
                return response
            if on_redirect is not None:
                on_redirect(response)
            target = urllib.parse.urljoin(current, response.headers["Location"])
            response.close()
            old, new = urllib.parse.urlsplit(current).scheme, urllib.parse.urlsplit(target).scheme
            if old == "https" and new != "https":
                raise RedirectError(
                    f"refusing https→{new} redirect from {display_url(current)} to {display_url(target)}; "
                    "the source must stay on https",
                    entry.name,
                )
            if new not in ("https", "http"):
                raise RedirectError(f"refusing redirect to {new}: URL {display_url(target)}", entry.name)
            if new == "http" and not entry.allow_http:
                raise RedirectError(
                    f"refusing redirect to plain http ({display_url(target)}); set allow_http: true to permit it",
                    entry.name,
                )
            current = target
        raise RedirectError(f"too many redirects from {display_url(url)}", entry.name)

    def sleep(self, attempt: int, retry_after: str | None) -> None:
        delay = min(self.options.backoff * 2 ** (attempt - 1), 30.0) * (0.5 + random.random() / 2)  # noqa: S311
        if retry_after:
            if retry_after.strip().isdigit():
                delay = float(retry_after.strip())
            else:
                with contextlib.suppress(TypeError, ValueError):
                    when = email.utils.parsedate_to_datetime(retry_after)
                    delay = max(0.0, when.timestamp() - time.time())
        time.sleep(min(delay, self.options.max_retry_wait))

    def status_error(self, response: requests.Response, entry: Entry, attempts: int = 1) -> FetchError:
        """The one place that turns an HTTP status into a message that says what to do."""
        status = response.status_code
        code = response.headers.get("X-Error-Code", "")
        request_id = response.headers.get("X-Request-Id") or response.headers.get("X-Amz-Request-Id")
        where = display_url(response.url or entry.url)
        sent_token = bool(self.auth_headers(response.url or entry.url, entry.auth))
        with contextlib.suppress(Exception):
            response.close()
        subject = where
        if entry.auth == "hf":
            subject = hf_repo(entry.url, self.options) or where
        elif entry.auth == "civitai" and entry.url.startswith("civitai://"):
            subject = f"civitai model version {parse_civitai_url(entry.url)}"
        if status == 401:
            if entry.auth == "hf" and code == "GatedRepo":
                return AuthError(
                    f"token missing or invalid for {subject}: it is a gated repository; set hf_token (or HF_TOKEN) "
                    f"to a token of an account that accepted its licence at https://huggingface.co/{subject}",
                    entry.name,
                )
            if not sent_token and entry.auth in ("hf", "civitai"):
                var = "hf_token (or HF_TOKEN)" if entry.auth == "hf" else "civitai_token (or CIVITAI_TOKEN)"
                return AuthError(
                    f"token missing or invalid for {subject} (401{', ' + code if code else ''}): set {var}; "
                    "HF also answers 401 for private or missing repos",
                    entry.name,
                )
            return AuthError(
                f"authentication failed for {subject} (401; HF also uses 401 for private or missing repos): "
                "check the token is current and the repository name",
                entry.name,
            )
        if status == 403:
            if entry.auth == "hf":
                return AuthError(
                    f"accept the licence at https://huggingface.co/{subject} with the account that owns this token "
                    "(403: the token is valid but not authorised for this gated repository)",
                    entry.name,
                )
            return AuthError(f"access denied (403) by {where}: check the token's permissions", entry.name)
        if status == 404:
            detail = f" ({code})" if code else ""
            return NotFoundError(
                f"repo/file not found (404{detail}) at {where}: check the url and revision", entry.name
            )
        suffix = f", request id {request_id}" if request_id else ""
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        return HTTPStatusError(f"HTTP {status} from {where}{tries}{suffix}; try again later", entry.name)


# --------------------------------------------------------------------------- the engine


@dataclass
class _Plan:
    entry: Entry
    result: Result
    relpath: str | None = None  # the file (or extract folder) inside the store
    remote: Remote | None = None
    sources: list[Remote] = field(default_factory=list)
    expected: str | None = None  # sha256 to verify against
    needs_fetch: bool = False
    local: tuple[str, int] | None = None  # (sha256, size) of the file already at the path, once hashed
    started: float = 0.0

    def where(self) -> str:
        """`relpath`, which inspection or the probe sets before any step that reads it."""
        if self.relpath is None:
            raise FetchError(f"internal error: {self.entry.name} has no path in the store yet")
        return self.relpath

    def probed(self) -> Remote:
        """`remote`, which the probe sets (or fails) before any step that reads it."""
        if self.remote is None:
            raise FetchError(f"internal error: {self.entry.name} was not probed")
        return self.remote


class Fetcher:
    """Bring a store in line with a manifest: probe, preflight, download, verify, record."""

    def __init__(
        self,
        options: Options,
        progress: Progress | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if not HAS_REQUESTS:
            raise FetchError(f"the Python library requests is required: {REQUESTS_IMPORT_ERROR}")
        self.options = options
        self.progress = progress or Progress()
        self._log = log
        self.warnings: list[str] = []
        self._warn_lock = threading.Lock()
        self.client = Client(options, self.warn)
        self.store = Store(options)

    def warn(self, message: str) -> None:
        with self._warn_lock:
            self.warnings.append(message)
        if self._log:
            self._log(message)

    # public ------------------------------------------------------------------

    def run(self, entries: Sequence[Entry]) -> Report:
        """Converge the store; per-entry failures are reported, the others still run."""
        plans = [_Plan(e, Result(name=e.name, source=_source_label(e.url)), started=time.monotonic()) for e in entries]
        self._each(plans, self._inspect)  # no network: stat and records, hash unrecorded files
        self._each([p for p in plans if p.needs_fetch], self._probe)  # HEAD and API calls, no body
        self._each([p for p in plans if p.needs_fetch], self._settle)  # keep a local file that matches
        fetching = [p for p in plans if p.needs_fetch]
        try:
            self._preflight_space(fetching)
        except DiskFullError as error:
            for plan in fetching:
                self._fail(plan, error)
            fetching = []
        for plan in fetching:
            if plan.local is not None:
                plan.result.replaced = plan.local[0]
        if self.options.check_mode:
            for plan in fetching:
                plan.result.action = "would_extract" if plan.entry.extract else "would_download"
                plan.result.changed = True
                plan.result.size = plan.remote.size if plan.remote else plan.entry.size
                plan.result.sha256 = plan.expected
        else:
            self._each(fetching, self._fetch)
        for plan in plans:
            plan.result.seconds = round(time.monotonic() - plan.started, 3)
        return Report([p.result for p in plans], list(self.warnings))

    def resolve(self, entries: Sequence[Entry]) -> list[dict[str, Any]]:
        """Pin every entry: exact revision, exact file name, size and SHA-256 (the lock)."""
        plans = [_Plan(e, Result(name=e.name, source=_source_label(e.url))) for e in entries if e.state == "present"]
        self._each(plans, self._probe)
        self._each([p for p in plans if p.result.action != "failed" and not p.expected], self._hash_remote)
        failures = [p.result.msg for p in plans if p.result.action == "failed"]
        if failures:
            raise FetchError("could not lock the manifest:\n  " + "\n  ".join(str(f) for f in failures))
        locked: list[dict[str, Any]] = []
        for plan in plans:
            entry, remote = plan.entry, plan.probed()
            url = entry.url
            if url.startswith("hf://") and remote.commit:
                repo, path, _revision = parse_hf_url(url)
                url = f"hf://{repo}/{path}@{remote.commit}"
            item: dict[str, Any] = {"url": url, "dest": entry.dest if entry.extract else plan.relpath}
            item["sha256"] = plan.expected
            if remote.size is not None:
                item["size"] = remote.size
            if entry.extract:
                item["extract"] = True
                if entry.files:
                    item["files"] = list(entry.files)
            if url.startswith("http://"):
                item["allow_http"] = True
            locked.append(item)
        return locked

    # phases -------------------------------------------------------------------

    def _each(self, plans: Sequence[_Plan], step: Callable[[_Plan], None]) -> None:
        def guarded(plan: _Plan) -> None:
            try:
                step(plan)
            except FetchError as error:
                self._fail(plan, error)
            except OSError as error:
                self._fail(plan, self._os_error(plan, error))

        if len(plans) <= 1 or self.options.parallel <= 1:
            for plan in plans:
                guarded(plan)
            return
        with ThreadPoolExecutor(max_workers=min(self.options.parallel, len(plans))) as pool:
            list(pool.map(guarded, plans))

    def _fail(self, plan: _Plan, error: FetchError) -> None:
        plan.result.action = "failed"
        plan.result.changed = False
        plan.result.msg = str(error) if error.entry else f"{plan.entry.name}: {error}"
        plan.needs_fetch = False

    def _os_error(self, plan: _Plan, error: OSError) -> FetchError:
        where = error.filename or self.store.root
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return DiskFullError(f"disk full while writing {where}; free space and run again", plan.entry.name)
        return FetchError(f"{error.strerror or error} ({where})", plan.entry.name)

    def _inspect(self, plan: _Plan) -> None:
        """Decide from the store alone: present (trusted or re-hashed), absent, or to fetch."""
        entry, result = plan.entry, plan.result
        relpath = entry.dest.rstrip("/") if not entry.folder or entry.extract else self.store.name_for(entry.key)
        plan.relpath = relpath
        if entry.state == "absent":
            self._remove(plan)
            return
        if relpath is None:
            plan.needs_fetch = True
            return
        path = self.store.path(relpath)
        result.path = path
        if entry.extract:
            if self._archive_present(plan, path):
                result.action = "present"
            else:
                plan.needs_fetch = True
            return
        if not os.path.lexists(path):
            plan.needs_fetch = True
            return
        if not os.path.isfile(path):
            raise PathError(f"{path} exists and is not a regular file; remove it or choose another dest", entry.name)
        record = self.store.file_record(relpath)
        # Without a hash in the manifest, a record vouches only for the source it came from.
        vouched = record is not None and (
            entry.sha256 == record.get("sha256")
            or (entry.sha256 is None and record.get("source") == _source_label(entry.url))
        )
        if vouched and record is not None and self.options.verify == "recorded" and stat_matches(path, record):
            if entry.size is not None and entry.size != record.get("size"):
                plan.needs_fetch = True
                return
            result.action, result.sha256, result.size = "present", record["sha256"], record["size"]
            return
        expected = entry.sha256 or (record.get("sha256") if vouched and record is not None else None)
        if expected is None:
            plan.needs_fetch = True  # the source's published hash decides, after the probe
            return
        digest, size = plan.local = hash_file(path)
        if digest == expected and entry.size in (None, size):
            self._record_file(relpath, path, digest, entry)
            result.action, result.sha256, result.size = "present", digest, size
            return
        if self.options.verify == "full" and record is not None and digest != record.get("sha256"):
            self.warn(
                f"{entry.name}: sha256 changed on disk since it was verified ({record.get('sha256')} -> {digest})"
            )
        plan.needs_fetch = True

    def _archive_present(self, plan: _Plan, path: str) -> bool:
        relpath = plan.where()
        record = self.store.archive_record(relpath)
        entry = plan.entry
        if record is None or record.get("source") != _source_label(entry.url):
            return False
        if entry.sha256 not in (None, record.get("sha256")):
            return False
        files: dict[str, Any] = record.get("files") or {}
        if any(name not in files for name in entry.files):
            return False
        for name, info in files.items():
            member = os.path.join(path, name)
            if self.options.verify == "full":
                if not os.path.isfile(member) or hash_file(member)[0] != info.get("sha256"):
                    return False
            elif not stat_matches(member, info):
                return False
        plan.result.sha256 = record.get("sha256")
        plan.result.files = sorted(files)
        return True

    def _remove(self, plan: _Plan) -> None:
        entry, result, relpath = plan.entry, plan.result, plan.relpath
        result.action = "absent"
        if relpath is None:
            return  # a folder dest that was never fetched here: nothing to remove
        path = self.store.path(relpath)
        result.path = path
        if not os.path.lexists(path):
            return
        result.action, result.changed = "removed", True
        if self.options.check_mode:
            result.action = "would_remove"
            return
        with self.store.locked(relpath):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
                self.store.record("archives", relpath, None)
            else:
                os.unlink(path)
                self.store.record("files", relpath, None)
            if entry.folder and not entry.extract:
                self.store.record("names", entry.key, None)

    def _probe(self, plan: _Plan) -> None:
        """Learn name, size, validators and published SHA-256 without transferring the body."""
        entry = plan.entry
        origin = self._origin_remote(entry)
        if not entry.url.startswith("file://"):
            self._head(origin, entry)
        if plan.relpath is None:
            exact = not entry.folder or entry.extract
            plan.relpath = (
                entry.dest.rstrip("/") if exact else entry.dest + sanitize_filename(origin.filename or "", entry)
            )
        plan.result.path = self.store.path(plan.relpath)
        if entry.sha256 and origin.sha256 and entry.sha256 != origin.sha256:
            raise ChecksumError(
                f"sha256 mismatch for {entry.name}: expected {entry.sha256}, the source publishes {origin.sha256}; "
                "update the manifest (or its lock) if the model changed upstream",
                entry.name,
            )
        if entry.size is not None and origin.size is not None and entry.size != origin.size:
            raise ChecksumError(
                f"size mismatch for {entry.name}: the manifest says {entry.size} bytes, the source has {origin.size}",
                entry.name,
            )
        if origin.size is None:
            origin.size = entry.size
        plan.expected = entry.sha256 or origin.sha256
        plan.remote = origin
        plan.sources = [Remote(url=f"{base.rstrip('/')}/{plan.relpath}", mirror=True) for base in self.options.mirrors]
        if not plan.expected:
            plan.sources = []  # a mirror's bytes are trusted only against a known hash
        plan.sources.append(origin)

    def _settle(self, plan: _Plan) -> None:
        """After the probe: refuse unverifiable entries; keep a local file that has the published hash."""
        entry = plan.entry
        relpath = plan.where()
        if plan.expected is None and not entry.allow_unverified:
            raise ChecksumError(
                f"no sha256 for {entry.name}: the manifest gives none and {display_url(entry.url)} publishes none; "
                "add sha256 (or run `comfybake models lock`), or set allow_unverified: true",
                entry.name,
            )
        path = self.store.path(relpath)
        if entry.extract or not plan.expected or not os.path.isfile(path):
            return
        record = self.store.file_record(relpath)
        if plan.local is not None:
            digest, size = plan.local
        elif self.options.verify == "recorded" and record and stat_matches(path, record):
            digest, size = plan.local = record.get("sha256", ""), record["size"]
        else:
            digest, size = plan.local = hash_file(path)
        if digest == plan.expected:
            self._record_file(relpath, path, digest, entry)
            self._remember_name(plan)
            plan.result.action, plan.result.sha256, plan.result.size = "present", digest, size
            plan.needs_fetch = False

    def _origin_remote(self, entry: Entry) -> Remote:
        url = entry.url
        if url.startswith("hf://"):
            repo, path, revision = parse_hf_url(url)
            base = self.options.hf_endpoint.rstrip("/")
            quoted = urllib.parse.quote(revision, safe="")
            return Remote(url=f"{base}/{repo}/resolve/{quoted}/{path}", filename=path.rsplit("/", 1)[-1])
        if url.startswith("civitai://"):
            return self._civitai_remote(entry, parse_civitai_url(url))
        if url.startswith("file://"):
            source = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
            try:
                size = os.stat(source).st_size
            except OSError as error:
                raise NotFoundError(f"cannot read {source}: {error.strerror}; check the file url", entry.name) from None
            return Remote(url=url, size=size, filename=os.path.basename(source))
        return Remote(url=url, filename=urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1]))

    def _civitai_remote(self, entry: Entry, version: int) -> Remote:
        base = self.options.civitai_endpoint.rstrip("/")
        response = self.client.request("GET", f"{base}/api/v1/model-versions/{version}", entry)
        if response.status_code != 200:
            raise self.client.status_error(response, entry)
        try:
            data = response.json()
            files = data.get("files") or []
            chosen = next((f for f in files if f.get("primary")), files[0] if files else None)
        except (ValueError, AttributeError):
            chosen = None
        if not isinstance(chosen, dict):
            raise NotFoundError(f"civitai model version {version} lists no files", entry.name)
        published = (chosen.get("hashes") or {}).get("SHA256")
        return Remote(
            url=f"{base}/api/download/models/{version}",
            sha256=published.lower() if isinstance(published, str) and _HEX64.match(published) else None,
            filename=chosen.get("name"),
        )

    def _head(self, remote: Remote, entry: Entry) -> None:
        """HEAD the source (GET of byte 0 when HEAD is refused) and read size, validators, HF headers."""

        def hub_headers(response: requests.Response) -> None:
            linked = response.headers.get("X-Linked-Etag", "").strip('"')
            if _HEX64.match(linked):
                remote.sha256 = linked.lower()
            if response.headers.get("X-Linked-Size", "").isdigit():
                remote.size = int(response.headers["X-Linked-Size"])
            remote.commit = response.headers.get("X-Repo-Commit") or remote.commit

        response = self.client.request("HEAD", remote.url, entry, on_redirect=hub_headers)
        if response.status_code in (405, 501):
            response = self.client.request("GET", remote.url, entry, headers={"Range": "bytes=0-0"}, stream=True)
            response.close()
        if response.status_code not in (200, 206):
            raise self.client.status_error(response, entry)
        hub_headers(response)
        headers = response.headers
        remote.final_url = response.url
        remote.etag = headers.get("ETag")
        remote.last_modified = headers.get("Last-Modified")
        remote.ranges = headers.get("Accept-Ranges", "").lower() == "bytes"
        remote.content_type = headers.get("Content-Type")
        if response.status_code == 206 and "/" in headers.get("Content-Range", ""):
            total = headers["Content-Range"].rsplit("/", 1)[1]
            remote.size = remote.size or (int(total) if total.isdigit() else None)
        elif remote.size is None and headers.get("Content-Length", "").isdigit():
            remote.size = int(headers["Content-Length"])
        disposition = filename_from_disposition(headers.get("Content-Disposition", ""))
        if entry.folder and disposition and not entry.url.startswith(("civitai://", "hf://")):
            remote.filename = disposition  # sanitised by the caller; ignored for exact dests
        response.close()

    def _hash_remote(self, plan: _Plan) -> None:
        """For the lock: stream a source that publishes no SHA-256 through the hash, writing nothing."""
        remote = plan.probed()
        entry, digest = plan.entry, hashlib.sha256()
        if entry.url.startswith("file://"):
            plan.expected = hash_file(urllib.parse.unquote(urllib.parse.urlsplit(entry.url).path))[0]
            return
        response = self.client.request("GET", remote.url, entry, stream=True)
        if response.status_code != 200:
            raise self.client.status_error(response, entry)
        total = 0
        for chunk in response.iter_content(BLOCK):
            digest.update(chunk)
            total += len(chunk)
        if remote.size is not None and total != remote.size:
            raise TransferError(f"incomplete read {human(total)} of {human(remote.size)}", entry.name)
        remote.size = total
        plan.expected = digest.hexdigest()

    def _preflight_space(self, plans: Sequence[_Plan]) -> None:
        """Fail before the first GET when the downloads cannot fit."""
        need: dict[int, list[Any]] = {}
        for plan in plans:
            if plan.relpath is None or plan.remote is None or plan.remote.size is None:
                continue
            path = self.store.path(plan.relpath)
            existing = path
            while not os.path.exists(existing):
                existing = os.path.dirname(existing)
            device = os.stat(existing).st_dev
            partial = 0
            with contextlib.suppress(OSError):
                partial = os.stat(staging_path(path, plan.entry.extract)).st_size
            slot = need.setdefault(device, [0, existing, []])
            slot[0] += max(0, plan.remote.size - partial)
            slot[2].append(plan.entry.name)
        for amount, where, names in need.values():
            info = os.statvfs(where)
            free = info.f_bavail * info.f_frsize
            if amount > free:
                raise DiskFullError(
                    f"need {human(amount)} on {where} (free {human(free)}) for {', '.join(names)}; "
                    "free space or grow the volume, then run again"
                )

    # transfer -----------------------------------------------------------------

    def _fetch(self, plan: _Plan) -> None:
        relpath = plan.where()
        entry, result = plan.entry, plan.result
        path = self.store.path(relpath)
        self.store.makedirs(os.path.dirname(path))
        with self.store.locked(relpath):
            self.store.refresh()
            if not entry.extract:
                record = self.store.file_record(relpath)
                fresh = plan.local is None  # a file this run hashed and found wrong is not trusted by stat
                if fresh and record and stat_matches(path, record) and record.get("sha256") == plan.expected:
                    result.action, result.sha256, result.size = "present", record["sha256"], record["size"]
                    return  # another run fetched it while we waited for the lock
            staging = staging_path(path, entry.extract)
            last_error: FetchError | None = None
            for source in plan.sources:
                try:
                    digest, size, transferred = self._transfer(plan, source, staging)
                    break
                except FetchError as error:
                    if not source.mirror:
                        raise
                    last_error = error
                    self.warn(f"{entry.name}: mirror {display_url(source.url)} failed ({error.reason}); trying next")
            else:  # pragma: no cover - the origin is always last and raises
                raise last_error or FetchError("no source", entry.name)
            result.bytes += transferred
            result.sha256, result.size = digest, size
            if entry.extract:
                self._extract(plan, staging, digest)
                result.action, result.changed = "extracted", True
            else:
                os.replace(staging, path)
                _fsync_dir(os.path.dirname(path))
                self._record_file(relpath, path, digest, entry)
                self._remember_name(plan)
                result.action, result.changed = "downloaded", True
        self.progress.finish(entry.name, result.action)

    def _transfer(self, plan: _Plan, source: Remote, staging: str) -> tuple[str, int, int]:
        """Fill `staging` from `source` and verify it; returns (sha256, size, bytes transferred)."""
        entry = plan.entry
        if source.mirror:
            self._head(source, replace(entry, auth="none"))
        elif source.final_url is None and not source.url.startswith("file://"):
            self._head(source, entry)
        sidecar = staging + ".json"
        state = self._resume_state(plan, source, staging, sidecar)
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(staging, flags, 0o600)
        keep = False
        try:
            offset = state.get("prefix", 0) if state else 0
            done: list[int] = list(state.get("segments", [])) if state else []
            if not state:
                os.ftruncate(fd, 0)
            hasher = StreamHasher(fd, offset)
            for index in done:
                start = index * self.options.segment_size
                hasher.done(start, min(start + self.options.segment_size, source.size or 0))
            job = _Transfer(self, plan, source, fd, hasher, sidecar, offset, done)
            self.progress.start(entry.name, source.size)
            try:
                job.run()
            except BaseException as error:
                transient = isinstance(error, (TransferError, HTTPStatusError)) or not isinstance(error, Exception)
                keep = job.resumable and transient
                if keep:
                    job.checkpoint(force=True)
                hasher.abort()
                raise
            digest, size = hasher.finish()
            if source.size is not None and size != source.size:
                raise TransferError(f"incomplete read {human(size)} of {human(source.size)}", entry.name)
            expected = plan.expected
            if expected and digest != expected:
                if state:  # the kept bytes may be stale: discard them and fetch once from the first byte
                    self.warn(f"{entry.name}: the resumed download did not verify ({digest}); fetching it again")
                    os.ftruncate(fd, 0)
                    with contextlib.suppress(OSError):
                        os.unlink(sidecar)
                    return self._transfer(plan, source, staging)
                raise ChecksumError(f"sha256 mismatch for {entry.name}: expected {expected} got {digest}", entry.name)
            if not entry.extract:
                check_model_header(staging, plan.relpath or entry.dest, source.content_type)
            os.fsync(fd)
            self.store.apply_attributes(staging, self.options.mode, fd)
            return digest, size, job.transferred
        except BaseException:
            if not keep:
                with contextlib.suppress(OSError):
                    os.unlink(staging)
                with contextlib.suppress(OSError):
                    os.unlink(sidecar)
            raise
        finally:
            os.close(fd)
            if not keep:
                with contextlib.suppress(OSError):
                    os.unlink(sidecar)

    def _resume_state(self, plan: _Plan, source: Remote, staging: str, sidecar: str) -> dict[str, Any] | None:
        """The checkpoint of an earlier interrupted transfer, if it can be trusted for this source."""
        try:
            with open(sidecar, encoding="utf-8") as handle:
                state = json.load(handle)
            partial = os.stat(staging).st_size
        except (OSError, ValueError):
            for leftover in (staging, sidecar):
                with contextlib.suppress(OSError):
                    os.unlink(leftover)
            return None
        why = None
        if state.get("url") != display_url(source.url) or state.get("sha256") != plan.expected:
            why = "it belongs to another source"
        elif state.get("size") != source.size or partial > (source.size or 0):
            why = f"the remote size changed ({state.get('size')} -> {source.size})"
        elif state.get("validator") != source.validator:
            why = f"the remote changed (validator {state.get('validator')} -> {source.validator})"
        elif not source.ranges and state.get("prefix", 0) < (source.size or 0):
            why = "the server no longer accepts Range requests"
        if why:
            self.warn(f"{plan.entry.name}: discarding the partial download: {why}; fetching again")
            os.unlink(staging)
            os.unlink(sidecar)
            return None
        return dict(state)

    def _extract(self, plan: _Plan, archive: str, digest: str) -> None:
        relpath = plan.where()
        target = self.store.path(relpath)
        parent = os.path.dirname(target)
        work = os.path.join(parent, f".{os.path.basename(target)}.comfybake-extract")
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(work)
        try:
            files = extract_archive(archive, work, plan.entry, self.options, self.store)
            missing = [name for name in plan.entry.files if name not in files]
            if missing:
                raise ArchiveError(
                    f"the archive lacks expected file(s) {', '.join(missing)}; it holds {', '.join(sorted(files))}",
                    plan.entry.name,
                )
            old = None
            if os.path.lexists(target):
                old = os.path.join(parent, f".{os.path.basename(target)}.comfybake-old")
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(old)
                os.rename(target, old)
            os.rename(work, target)
            _fsync_dir(parent)
            if old:
                shutil.rmtree(old)
        finally:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(work)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(archive)
        records = {}
        for name, sha in files.items():
            info = stat_record(os.path.join(target, name))
            records[name] = {**info, "sha256": sha}
        self.store.record(
            "archives", relpath, {"sha256": digest, "source": _source_label(plan.entry.url), "files": records}
        )
        plan.result.files = sorted(files)

    def _record_file(self, relpath: str, path: str, digest: str, entry: Entry) -> None:
        self.store.record("files", relpath, {**stat_record(path), "sha256": digest, "source": _source_label(entry.url)})

    def _remember_name(self, plan: _Plan) -> None:
        if plan.entry.folder and not plan.entry.extract and plan.relpath:
            self.store.record("names", plan.entry.key, plan.relpath)


class _Transfer:
    """One file's transfer: a single stream, or parallel ranges when the server allows them."""

    def __init__(
        self,
        fetcher: Fetcher,
        plan: _Plan,
        source: Remote,
        fd: int,
        hasher: StreamHasher,
        sidecar: str,
        offset: int,
        done: list[int],
    ) -> None:
        self.fetcher, self.plan, self.source, self.fd = fetcher, plan, source, fd
        self.hasher, self.sidecar = hasher, sidecar
        self.entry = plan.entry
        self.offset = offset
        self.done = set(done)
        self.transferred = 0
        self.resumable = False
        self._lock = threading.Lock()
        self._last_checkpoint = 0.0
        options = fetcher.options
        self.segment = options.segment_size
        self.url = source.final_url or source.url

    def run(self) -> int:
        source, options = self.source, self.fetcher.options
        if source.url.startswith("file://"):
            self._copy_file()
            return self.transferred
        self.resumable = bool(source.ranges and source.size and (source.validator or self.plan.expected))
        split = (
            self.resumable
            and options.connections > 1
            and source.size is not None
            and source.size - self.offset >= options.min_split_size
        )
        if split or self.done:
            try:
                self._parallel()
                return self.transferred
            except _RangeIgnoredError:
                self._restart("server ignored Range; restarting")
        self._stream()
        return self.transferred

    # single stream ---------------------------------------------------------------

    def _stream(self) -> None:
        attempts = 0
        while True:
            try:
                self._stream_once()
                return
            except _RangeIgnoredError:
                self._restart("server ignored Range; restarting")
            except TransferError as error:
                attempts += 1
                if attempts > self.fetcher.options.retries:
                    raise
                if not self.resumable:
                    self._restart(f"{error.reason}; the server cannot resume, restarting from the first byte")
                self.fetcher.client.sleep(attempts, None)

    def _stream_once(self) -> None:
        headers: dict[str, str] = {}
        start = self.hasher.watermark
        size = self.source.size
        if start and size is not None and start >= size:
            return  # complete on disk already (the process died before the rename)
        if start:
            headers["Range"] = f"bytes={start}-"
            if self.source.validator:
                headers["If-Range"] = self.source.validator
        response = self._get(headers)
        with response:
            if start and response.status_code == 200:
                raise _RangeIgnoredError
            if response.status_code == 416:
                self._complete_416(response, start)
                return
            if response.status_code not in (200, 206):
                raise self.fetcher.client.status_error(response, self.entry)
            self._check_type(response)
            expected = self._expected_length(response, start)
            position = start
            for chunk in self._chunks(response, start):
                self._write(position, chunk, feed=True)
                position += len(chunk)
                self.checkpoint(position)
            self.checkpoint(force=True)
            if expected is not None and position - start < expected:
                raise TransferError(
                    f"incomplete read {human(position)} of {human(start + expected)}; run again to resume",
                    self.entry.name,
                )

    def _complete_416(self, response: requests.Response, start: int) -> None:
        """416 on a partial that is already whole: finalise it after the hash check (no refetch)."""
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
        size = int(total) if total.isdigit() else self.source.size or self.entry.size
        if size is not None and start == size:
            return
        raise TransferError(f"the server refused the resume at byte {start} (416); run again", self.entry.name)

    # parallel ranges -----------------------------------------------------------------

    def _parallel(self) -> None:
        size = self.source.size or 0
        os.ftruncate(self.fd, size)
        count = (size + self.segment - 1) // self.segment
        first = self.offset // self.segment
        queue = [i for i in range(first, count) if i not in self.done]
        cursor = iter(queue)
        cursor_lock = threading.Lock()
        errors: list[BaseException] = []
        stop = threading.Event()

        def worker() -> None:
            while not stop.is_set():
                with cursor_lock:
                    index = next(cursor, None)
                if index is None:
                    return
                try:
                    self._segment(index, size)
                except BaseException as error:  # noqa: BLE001 - collected and re-raised below
                    errors.append(error)
                    stop.set()
                    return

        threads = [threading.Thread(target=worker, daemon=True) for _worker in range(self.fetcher.options.connections)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            for error in errors:
                if isinstance(error, _RangeIgnoredError):
                    raise error
            raise errors[0]

    def _segment(self, index: int, size: int) -> None:
        start = max(index * self.segment, self.offset if index == self.offset // self.segment else 0)
        end = min((index + 1) * self.segment, size)
        position, attempts = start, 0
        while position < end:
            headers = {"Range": f"bytes={position}-{end - 1}"}
            if self.source.validator:
                headers["If-Range"] = self.source.validator
            try:
                response = self._get(headers)
                with response:
                    if response.status_code == 200:
                        raise _RangeIgnoredError
                    if response.status_code != 206:
                        raise self.fetcher.client.status_error(response, self.entry)
                    self._check_type(response)
                    for chunk in self._chunks(response, position, limit=end - position):
                        self._write(position, chunk, feed=True)
                        position += len(chunk)
                    if position < end:
                        raise TransferError(
                            f"incomplete read {human(position - start)} of {human(end - start)} in a range",
                            self.entry.name,
                        )
            except TransferError:
                attempts += 1
                if attempts > self.fetcher.options.retries:
                    raise
                self.fetcher.client.sleep(attempts, None)
        with self._lock:
            self.done.add(index)
        self.checkpoint(force=True)

    # shared ---------------------------------------------------------------------------

    def _get(self, headers: Mapping[str, str]) -> requests.Response:
        entry = self.entry if not self.source.mirror else replace(self.entry, auth="none")
        for _attempt in range(3):
            url = self.url
            try:
                response = self.fetcher.client.request("GET", url, entry, headers=headers, stream=True)
            except requests.RequestException as error:
                raise TransferError(f"request failed: {type(error).__name__}", self.entry.name) from None
            if response.status_code not in (401, 403, 404) or url == self.source.url:
                return response
            # A presigned URL (Hub, Civitai CDNs) that expired mid-transfer: ask the source again.
            response.close()
            with self._lock:
                if self.url == url:
                    self.fetcher.warn(f"{self.entry.name}: the download URL expired; asking the source for a new one")
                    self.fetcher._head(self.source, entry)
                    self.url = self.source.final_url or self.source.url
        return self.fetcher.client.request("GET", self.url, entry, headers=headers, stream=True)

    def _chunks(self, response: requests.Response, offset: int, limit: int | None = None) -> Iterator[bytes]:
        received = 0
        try:
            for chunk in response.iter_content(BLOCK):
                if limit is not None and received + len(chunk) > limit:
                    chunk = chunk[: limit - received]
                received += len(chunk)
                if chunk:
                    yield chunk
                if limit is not None and received >= limit:
                    return
        except requests.RequestException as error:
            total = f" of {human(self.source.size)}" if self.source.size is not None else ""
            raise TransferError(
                f"incomplete read {human(offset + received)}{total}: the connection broke ({type(error).__name__})",
                self.entry.name,
            ) from None

    def _write(self, position: int, chunk: bytes, feed: bool) -> None:
        view = memoryview(chunk)
        written = 0
        while written < len(chunk):
            written += os.pwrite(self.fd, view[written:], position + written)
        if feed:
            self.hasher.feed(position, chunk)
        else:
            self.hasher.done(position, position + len(chunk))
        with self._lock:
            self.transferred += len(chunk)
        self.fetcher.progress.advance(self.entry.name, len(chunk))

    def _check_type(self, response: requests.Response) -> None:
        kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind:
            self.source.content_type = kind
        if kind == "text/html" and (self.plan.relpath or "").lower().endswith(MODEL_EXTENSIONS):
            raise ContentError(
                "not a safetensors file (Content-Type text/html; header invalid): the server sent a web page, "
                "often a login or error page; check the url and the token",
                self.entry.name,
            )

    def _expected_length(self, response: requests.Response, start: int) -> int | None:
        if response.status_code == 206:
            content_range = response.headers.get("Content-Range", "")
            match = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", content_range)
            if not match or int(match.group(1)) != start:
                raise TransferError(f"unexpected Content-Range {content_range!r} for a resume", self.entry.name)
        length = response.headers.get("Content-Length")
        if length and length.isdigit():
            return int(length)
        if self.source.size is not None:
            return self.source.size - start
        return None

    def checkpoint(self, position: int | None = None, force: bool = False) -> None:
        """Record resume state every segment so a killed run re-fetches at most the in-flight window."""
        if not self.resumable:
            return
        now = time.monotonic()
        if not force and position is not None and position % self.segment >= BLOCK and now - self._last_checkpoint < 1:
            return
        with self._lock:
            self._last_checkpoint = now
            state = {
                "url": display_url(self.source.url),
                "size": self.source.size,
                "validator": self.source.validator,
                "sha256": self.plan.expected,
                "prefix": self.hasher.watermark,
                "segments": sorted(self.done),
            }
            temporary = self.sidecar + ".tmp"
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump(state, handle)
            os.replace(temporary, self.sidecar)

    def _restart(self, message: str) -> None:
        self.fetcher.warn(f"{self.entry.name}: {message}")
        self.hasher.reset()
        os.ftruncate(self.fd, 0)
        self.offset = 0
        self.done = set()
        self.resumable = False

    def _copy_file(self) -> None:
        source = urllib.parse.unquote(urllib.parse.urlsplit(self.source.url).path)
        position = 0
        with open(source, "rb") as handle:
            while True:
                chunk = handle.read(BLOCK)
                if not chunk:
                    break
                self._write(position, chunk, feed=True)
                position += len(chunk)


class _RangeIgnoredError(Exception):
    """The server answered a Range request with the whole body."""


# --------------------------------------------------------------------------- helpers


def staging_path(path: str, archive: bool = False) -> str:
    directory, name = os.path.split(path.rstrip("/"))
    return os.path.join(directory, f".{name}{'.archive' if archive else ''}{PARTIAL_SUFFIX}")


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def filename_from_disposition(value: str) -> str | None:
    match = re.search(r"filename\*=(?:UTF-8'')?([^;]+)", value, re.IGNORECASE)
    if match:
        return urllib.parse.unquote(match.group(1).strip().strip('"'))
    match = re.search(r'filename="?([^";]+)"?', value, re.IGNORECASE)
    return match.group(1) if match else None


def sanitize_filename(name: str, entry: Entry) -> str:
    """A server- or source-given file name made safe: its last component, plain characters only."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1].replace("\x00", "")
    base = _SAFE_NAME.sub("_", base).lstrip(".")
    if not base or base in (".", ".."):
        raise ManifestError(
            f"cannot tell a file name for {display_url(entry.url)}; "
            f"give dest as a file path, e.g. {entry.dest}model.safetensors",
            entry.name,
        )
    return base[:255]


def extract_archive(archive: str, work: str, entry: Entry, options: Options, store: Store) -> dict[str, str]:
    """Check every member first, then extract regular files only; returns name -> sha256."""
    try:
        return _extract_archive(archive, work, entry, options, store)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as error:
        raise ArchiveError(f"corrupt archive ({error}); nothing extracted", entry.name) from None


def _extract_archive(archive: str, work: str, entry: Entry, options: Options, store: Store) -> dict[str, str]:
    with open(archive, "rb") as handle:
        magic = handle.read(4)
    members: list[tuple[str, int, Callable[[], IO[bytes]]]]
    closer: contextlib.ExitStack = contextlib.ExitStack()
    with closer:
        if magic.startswith(b"PK"):
            zip_file = closer.enter_context(zipfile.ZipFile(archive))
            members = _safe_members(_zip_members(zip_file, entry, options), entry, options)
        else:
            try:
                tar = closer.enter_context(tarfile.open(archive, "r:*"))  # noqa: SIM115 - closed by the ExitStack
            except tarfile.TarError:
                raise ArchiveError("not a zip or tar archive; check the url or drop extract", entry.name) from None
            members = _safe_members(_tar_members(tar, entry, options), entry, options)
        prefix = _strip_prefix([name for name, _size, _open in members], entry)
        parent = os.path.dirname(work)
        info = os.statvfs(parent)
        needed, free = sum(size for _name, size, _open in members), info.f_bavail * info.f_frsize
        if needed > free:
            raise DiskFullError(f"need {human(needed)} on {parent} to extract (free {human(free)})", entry.name)
        os.mkdir(work, 0o700)
        hashes: dict[str, str] = {}
        total = 0
        for name, _size, opener in members:
            relative = name[len(prefix) :]
            if not relative:
                continue
            target = os.path.join(work, relative)
            store.makedirs(os.path.dirname(target))
            digest = hashlib.sha256()
            with opener() as source, open(target, "wb") as out:
                while True:
                    chunk = source.read(BLOCK)
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > options.archive_max_bytes:
                        raise ArchiveError(
                            f"archive expands past {human(options.archive_max_bytes)}; refusing it (raise "
                            "archive_max_bytes if it is genuine)",
                            entry.name,
                        )
                    digest.update(chunk)
                    out.write(chunk)
                store.apply_attributes(target, options.mode, out.fileno())
            hashes[relative] = digest.hexdigest()
        store.apply_attributes(work, options.directory_mode)
    return hashes


def _member_problem(name: str) -> str | None:
    try:
        check_relative_path(name.rstrip("/"), "member")
    except ManifestError:
        return "escapes the target"
    return None


# (name, is a folder, is a link or special file, declared size, opener)
_Member = tuple[str, bool, bool, int, Callable[[], IO[bytes]]]


def _zip_members(archive: zipfile.ZipFile, entry: Entry, options: Options) -> Iterator[_Member]:
    infos = archive.infolist()
    if len(infos) > options.archive_max_members:
        raise ArchiveError(
            f"archive holds {len(infos)} members, over the limit of {options.archive_max_members}", entry.name
        )
    for info in infos:
        kind = stat.S_IFMT(info.external_attr >> 16)
        special = bool(kind) and kind not in (stat.S_IFREG, stat.S_IFDIR)
        yield info.filename, info.is_dir(), special, info.file_size, functools.partial(archive.open, info)


def _tar_members(archive: tarfile.TarFile, entry: Entry, options: Options) -> Iterator[_Member]:
    for count, info in enumerate(archive, 1):
        if count > options.archive_max_members:
            raise ArchiveError(f"archive holds more than {options.archive_max_members} members", entry.name)

        def opener(info: tarfile.TarInfo = info) -> IO[bytes]:
            handle = archive.extractfile(info)
            return handle if handle is not None else io.BytesIO()

        yield info.name, info.isdir(), not (info.isfile() or info.isdir()), info.size, opener


def _safe_members(members: Iterator[_Member], entry: Entry, options: Options) -> list[tuple[str, int, Any]]:
    """Every member checked before anything is extracted; one bad member rejects the archive."""
    bad: list[str] = []
    files: list[tuple[str, int, Any]] = []
    declared = 0
    for name, folder, special, size, opener in members:
        problem = "is a link or special file" if special else _member_problem(name)
        if problem:
            bad.append(f"{name!r} {problem}")
        elif not folder:
            declared += size
            files.append((name, size, opener))
    if bad:
        raise ArchiveError("unsafe archive members, nothing extracted: " + "; ".join(bad), entry.name)
    if declared > options.archive_max_bytes:
        raise ArchiveError(
            f"archive expands to {human(declared)}, over the limit of {human(options.archive_max_bytes)}", entry.name
        )
    return files


def _strip_prefix(names: Sequence[str], entry: Entry) -> str:
    """Drop one wrapping folder named like the target (antelopev2.zip holds antelopev2/*)."""
    target = entry.dest.rstrip("/").rsplit("/", 1)[-1]
    tops = {name.split("/", 1)[0] for name in names}
    if tops == {target} and all("/" in name for name in names):
        return target + "/"
    return ""
