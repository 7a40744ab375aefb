# PRIVATE to comfybake: not a public API; it may change without notice.
"""The model store: paths inside it, its verification records, locks and staging names."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from .errors import ManifestError, PathError
from .options import Options

STATE_DIR = ".comfybake"  # per-store records and locks, at the store root
RECORDS_FILE = "verified.json"  # its temporary name is in STATE_DIR, not next to a model
LAST_RUN_FILE = "last-run.json"  # what the last real run did (Store.save_last_run), for the exporter
PARTIAL_SUFFIX = ".comfybake-partial"  # staging files: hidden, no model extension
SIDECAR_SUFFIX = PARTIAL_SUFFIX + ".json"  # a staging file's resume checkpoint
ARCHIVE_INFIX = ".archive"  # .<name>.archive.comfybake-partial: an archive downloaded for the folder <name>
TEMP_SUFFIX = ".tmp"  # a checkpoint is written as <sidecar>.tmp, then renamed
EXTRACT_SUFFIX = ".comfybake-extract"  # .<folder>.comfybake-extract: an archive unpacked before the rename
OLD_SUFFIX = ".comfybake-old"  # .<folder>.comfybake-old: the folder it replaces, until the rename is done
NAME_MAX = 255  # bytes (UTF-8, not characters) in one file name on ext4, xfs, btrfs, tmpfs
# Every name derived from a store name <name> is "." + <name> + one of these; the longest sets the room.
STAGING_RESERVE = len(".") + max(
    len(ARCHIVE_INFIX + SIDECAR_SUFFIX + TEMP_SUFFIX), len(EXTRACT_SUFFIX), len(OLD_SUFFIX)
)
NAME_BYTES = NAME_MAX - STAGING_RESERVE  # the longest name of a file or extract folder in the store: 219


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
        path = self.lock_path(relpath)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with open(path, "a") as handle:
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

    def names_of(self, relpath: str) -> list[str]:
        """The folder dests (`url -> dest` keys) whose remembered name is `relpath`."""
        with self._lock:
            return [key for key, name in self.records["names"].items() if name == relpath]

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

    def last_run(self) -> dict[str, Any]:
        """The record of the last real run (`{}` when there is none or it cannot be read)."""
        with contextlib.suppress(FileNotFoundError, ValueError):
            with open(os.path.join(self.state_dir, LAST_RUN_FILE), encoding="utf-8") as handle:
                loaded = json.load(handle)
            if isinstance(loaded, dict) and loaded.get("version") == 1:
                return loaded
        return {}

    def save_last_run(self, record: Mapping[str, Any]) -> None:
        """Replace the last-run record in one rename, as readable as the verification records."""
        os.makedirs(self.state_dir, mode=0o750, exist_ok=True)
        path = os.path.join(self.state_dir, LAST_RUN_FILE)
        temporary = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump(record, handle, indent=1, sort_keys=True)
                handle.write("\n")
            os.replace(temporary, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)

    def lock_path(self, relpath: str) -> str:
        """The lock file of one destination (Store.locked takes it)."""
        name = hashlib.sha1(relpath.encode(), usedforsecurity=False).hexdigest()
        return os.path.join(self.state_dir, "locks", name + ".lock")

    @contextlib.contextmanager
    def try_locked(self, relpath: str) -> Iterator[bool]:
        """Store.locked without waiting: yields False (and holds nothing) while another run holds it."""
        path = self.lock_path(relpath)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with open(path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def forget(self, relpaths: Iterable[str]) -> None:
        """Drop the records of removed paths in one save: their `files` records, the `names` that
        point at them, and the `archives` record of an extract folder left with no file."""
        gone = set(relpaths)
        with self._lock:
            changes = [("files", key) for key in self.records["files"] if key in gone]
            changes += [("names", key) for key, name in self.records["names"].items() if name in gone]
            for folder in self.records["archives"]:
                full = os.path.join(self.root, folder)
                if not os.path.isdir(full) or not any(names for _base, _dirs, names in os.walk(full)):
                    changes.append(("archives", folder))
            for section, key in changes:
                self.records[section].pop(key, None)
                if not self.options.check_mode:
                    self._dirty[section][key] = None
            if changes and not self.options.check_mode:
                self._save()


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


def staging_path(path: str, archive: bool = False) -> str:
    directory, name = os.path.split(path.rstrip("/"))
    return os.path.join(directory, f".{name}{ARCHIVE_INFIX if archive else ''}{PARTIAL_SUFFIX}")


def work_path(path: str, suffix: str) -> str:
    """The hidden sibling of a store path an extraction works in: EXTRACT_SUFFIX or OLD_SUFFIX."""
    directory, name = os.path.split(path.rstrip("/"))
    return os.path.join(directory, f".{name}{suffix}")


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Every staging name beside a destination, for telling them apart from models (staging_target).
STAGING_SUFFIXES = (SIDECAR_SUFFIX + TEMP_SUFFIX, SIDECAR_SUFFIX, PARTIAL_SUFFIX, EXTRACT_SUFFIX, OLD_SUFFIX)


def staging_target(name: str) -> str | None:
    """The destination name a staging name belongs to (the inverse of staging_path, the sidecar
    and its temporary name, and work_path), or None when `name` is not a staging name."""
    if not name.startswith("."):
        return None
    for suffix in STAGING_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix) + 1:
            base = name[1 : -len(suffix)]
            if suffix not in (EXTRACT_SUFFIX, OLD_SUFFIX) and base.endswith(ARCHIVE_INFIX):
                base = base[: -len(ARCHIVE_INFIX)]
            return base or None
    return None
