# PRIVATE to comfybake: not a public API; it may change without notice.
"""The manifest: entries, their validation, and the names of sources and files."""

from __future__ import annotations

import hashlib
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ManifestError
from .options import ENTRY, Options
from .pickles import kind_by_name, refusal
from .store import NAME_BYTES, NAME_MAX, check_relative_path

MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".pkl", ".sft", ".onnx", ".gguf")
ENTRY_KEYS = frozenset(ENTRY)
SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}\Z")  # \Z, not $: $ also matches before a final line break
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._+-]")
_EXTENSION_BYTES = 16  # a longer last suffix is part of the name, not an extension to keep


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
    allow_pickle: bool = False  # the entry's allow_pickle or the run's
    extracted_size: int | None = None  # bytes an archive takes once unpacked, for the budget

    @property
    def name(self) -> str:
        return self.dest

    @property
    def folder(self) -> bool:
        return self.dest.endswith("/")

    @property
    def key(self) -> str:
        return f"{self.url} -> {self.dest}"


def parse_manifest(items: Sequence[Any], options: Options) -> list[Entry]:
    """Validate every entry before any I/O; raise one ManifestError listing every problem."""
    problems: list[str] = []
    entries: list[Entry] = []
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
        entries.append(entry)
    problems += path_conflicts([(entry.dest.rstrip("/"), entry) for entry in entries if exact_dest(entry)])
    if problems:
        raise ManifestError("invalid model manifest:\n  " + "\n  ".join(problems))
    return entries


def _parse_entry(index: int, item: Mapping[str, Any], options: Options) -> Entry:
    unknown = sorted(str(key) for key in set(item) - ENTRY_KEYS)  # YAML keys may be numbers
    if unknown:
        raise ManifestError(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(ENTRY_KEYS))}")
    url, dest = item.get("url"), item.get("dest")
    if not isinstance(url, str) or not url:
        raise ManifestError("url is required (https://, hf://, civitai:// or file://)")
    if not isinstance(dest, str) or not dest:
        raise ManifestError("dest is required: a folder key such as 'checkpoints/' or a path under the store")
    check_relative_path(dest, "dest")
    *folders, last = dest.rstrip("/").split("/")
    for part, limit in [*((folder, NAME_MAX) for folder in folders), (last, NAME_BYTES)]:
        if len(part.encode()) > limit:
            raise ManifestError(
                f"dest {dest!r}: the name {part[:24]!r}... is {len(part.encode())} bytes long; a name in the store "
                f"may have at most {limit} bytes (UTF-8; {NAME_MAX} less room for its staging name); shorten it"
            )
    state = item.get("state", "present")
    if state not in ("present", "absent"):
        raise ManifestError(f"state must be present or absent, got {state!r}")
    sha256 = item.get("sha256")
    if sha256 is not None:
        if not isinstance(sha256, str) or not SHA256_HEX.match(sha256):
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
    allow_pickle = _flag(item, "allow_pickle") or options.allow_pickle
    kind = kind_by_name(dest) if not dest.endswith("/") and state == "present" and not allow_pickle else None
    if kind:
        raise ManifestError(refusal(f"dest {dest!r}", kind))
    extracted_size = item.get("extracted_size")
    if extracted_size is not None and (
        not isinstance(extracted_size, int) or isinstance(extracted_size, bool) or extracted_size < 0 or not extract
    ):
        raise ManifestError(f"extracted_size must be a number of bytes (with extract: true), got {extracted_size!r}")
    allow_http = _flag(item, "allow_http") or options.allow_http
    try:
        source = urllib.parse.urlsplit(url)
        _port = source.port  # urlsplit checks the host's brackets, .port its range
    except ValueError as error:
        raise ManifestError(f"url is not a valid URL ({error}); check its host and port") from None
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
        allow_pickle=allow_pickle,
        extracted_size=extracted_size,
    )


def exact_dest(entry: Entry) -> bool:
    """The path of the entry in the store is its dest: a file path, or the folder an archive extracts to."""
    return not entry.folder or entry.extract


def describe(entry: Entry) -> str:
    """An entry as messages name it: its index, dest and a printable url."""
    return f"models[{entry.index}] (dest {entry.dest!r}, url {source_label(entry.url)})"


def path_conflicts(claims: Sequence[tuple[str, Entry]]) -> list[str]:
    """Entries whose paths in the store are one path, or one inside the other (a file under another
    entry's file or extract folder): the second would overwrite, or be overwritten by, the first."""
    owners: dict[str, Entry] = {}
    problems: list[str] = []
    fix = "give each a dest of its own (a file path where a folder dest's name collides)"
    for relpath, entry in claims:
        if relpath in owners:
            problems.append(
                f"{describe(owners[relpath])} and {describe(entry)} both resolve to {relpath!r} in the store; {fix}"
            )
        else:
            owners[relpath] = entry
    for relpath, entry in claims:
        parts = relpath.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            outer = owners.get(parent)
            if outer is not None and outer.index != entry.index:
                where = (
                    f"the folder {describe(outer)} extracts to" if outer.extract else f"the file of {describe(outer)}"
                )
                problems.append(f"{describe(entry)} resolves to {relpath!r}, inside {parent!r}, {where}; {fix}")
                break
    return problems


def _flag(item: Mapping[str, Any], key: str) -> bool:
    value = item.get(key, False)
    if not isinstance(value, bool):
        raise ManifestError(f"{key} must be true or false, got {value!r}")
    return value


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
        origin = origin_of(url)
        if origin == origin_of(options.hf_endpoint):
            return "hf"
        if origin == origin_of(options.civitai_endpoint):
            return "civitai"
    return "none"


def origin_of(url: str) -> tuple[str, int | None]:
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


def source_label(url: str) -> str:
    return url if url.split(":", 1)[0] in ("hf", "civitai", "file") else display_url(url)


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover - unreachable


def filename_from_disposition(value: str) -> str | None:
    match = re.search(r"filename\*=(?:UTF-8'')?([^;]+)", value, re.IGNORECASE)
    if match:
        return urllib.parse.unquote(match.group(1).strip().strip('"'))
    match = re.search(r'filename="?([^";]+)"?', value, re.IGNORECASE)
    return match.group(1) if match else None


def sanitize_filename(name: str, entry: Entry) -> str:
    """A server- or source-given file name made safe: its last component, plain characters only, with
    a letter or digit before its extension, and short enough (NAME_BYTES) that its staging names fit
    too. A longer name keeps its extension and gets a hash of the whole name, so that a second run
    finds the same name and two names that differ only past the cut stay apart."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1].replace("\x00", "")
    base = _SAFE_NAME.sub("_", base).lstrip(".")
    stem, ext = _split_extension(base)
    if not re.search(r"[A-Za-z0-9]", stem):  # empty, only dots, only unsafe characters
        given = f"calls it {name[:80]!r}, which" if name else "gives no name, which"
        raise ManifestError(
            f"cannot tell a file name for {display_url(entry.url)}: the source {given} has no letter or digit "
            f"once made safe; give dest as a file path, e.g. {entry.dest}model.safetensors",
            entry.name,
        )
    if len(base.encode()) <= NAME_BYTES:
        return base
    tag = "-" + hashlib.sha256(base.encode()).hexdigest()[:10]
    room = NAME_BYTES - len(tag) - len(ext.encode())
    return stem.encode()[:room].decode("utf-8", "ignore") + tag + ext


def _split_extension(name: str) -> tuple[str, str]:
    stem, dot, suffix = name.rpartition(".")
    if not dot or not stem or len(suffix.encode()) + 1 > _EXTENSION_BYTES:
        return name, ""
    return stem, dot + suffix
