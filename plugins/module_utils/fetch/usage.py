# PRIVATE to comfybake: not a public API; it may change without notice.
"""What a store holds and who uses it (`models du|ls`), pruning (`models prune`, the module's
prune option) and the disk budget.

One walk of the store (os.scandir, lstat only, nothing hashed) classifies every file:
referenced by a manifest entry (an exact dest, the `names` record of a folder dest, or a file
inside an extract folder), unreferenced, or partial (a staging file of a download; in use while
the lock of its destination is held). Environments see a file when one of the folders of their
extra_model_paths.yaml holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import BudgetError, ManifestError
from .manifest import Entry, human
from .options import Options, how_to_set
from .report import Report
from .store import EXTRACT_SUFFIX, OLD_SUFFIX, STATE_DIR, Store, staging_target, stat_matches


@dataclass
class StoreFile:
    """One file (or staging folder) of the store."""

    path: str  # relative to the store root
    size: int
    atime: float
    mtime: float
    state: str = "unreferenced"  # verified | unverified | unreferenced | partial | link
    entry: str | None = None  # the manifest entry that references it
    environments: list[str] = field(default_factory=list)
    in_use: bool = False  # a partial whose destination's lock is held: a download is running
    target: str | None = None  # a partial's destination
    folder: bool = False  # a staging folder (extraction under way or left over)

    def as_dict(self) -> dict[str, Any]:
        item: dict[str, Any] = {
            "path": self.path,
            "size": self.size,
            "state": self.state,
            "entry": self.entry,
            "environments": self.environments,
        }
        if self.state == "partial":
            item.update(in_use=self.in_use, target=self.target)
        return item


@dataclass
class Usage:
    root: str
    files: list[StoreFile]
    free: int
    environments: dict[str, list[str]]

    @property
    def total(self) -> int:
        """The bytes the store holds; a symbolic link counts nothing (what it points at is elsewhere)."""
        return sum(item.size for item in self.files if item.state != "link")

    def summary(self) -> dict[str, Any]:
        """Bytes and files by folder, by entry, by environment; unreferenced, partials and free space."""
        folders: dict[str, list[int]] = {}
        entries: dict[str, list[int]] = {}
        seen: dict[str, list[int]] = {name: [0, 0] for name in self.environments}
        for item in self.files:
            if item.state in ("partial", "link"):
                continue
            _add(folders, item.path.split("/", 1)[0] if "/" in item.path else ".", item.size)
            if item.entry:
                _add(entries, item.entry, item.size)
            for name in item.environments:
                _add(seen, name, item.size)
        unreferenced = [item for item in self.files if item.state == "unreferenced"]
        partial = [item for item in self.files if item.state == "partial"]
        return {
            "store": self.root,
            "total": {"bytes": self.total, "files": sum(1 for i in self.files if i.state != "link")},
            "links": sum(1 for i in self.files if i.state == "link"),
            "free": self.free,
            "folders": _table(folders),
            "entries": _table(entries),
            "environments": _table(seen),
            "unreferenced": {"bytes": sum(i.size for i in unreferenced), "files": len(unreferenced)},
            "partial": {
                "bytes": sum(i.size for i in partial),
                "files": len(partial),
                "in_use": sum(1 for i in partial if i.in_use),
            },
        }


def _add(table: dict[str, list[int]], key: str, size: int) -> None:
    slot = table.setdefault(key, [0, 0])
    slot[0] += size
    slot[1] += 1


def _table(table: Mapping[str, list[int]]) -> dict[str, dict[str, int]]:
    return {key: {"bytes": value[0], "files": value[1]} for key, value in sorted(table.items())}


def environment_folders(document: Any, root: str) -> list[str]:
    """The store folders one extra_model_paths.yaml points ComfyUI at, relative to the store root.

    A key maps to one folder (C(loras/)) or to several, one a line; paths are relative to the
    section's base_path, which must be the store for them to count.
    """
    folders: list[str] = []
    if not isinstance(document, Mapping):
        return folders
    for section in document.values():
        if not isinstance(section, Mapping):
            continue
        base = os.path.realpath(str(section.get("base_path") or root))
        for key, value in section.items():
            if key in ("base_path", "is_default") or not isinstance(value, str):
                continue
            for line in value.splitlines():
                line = line.strip().rstrip("/")
                if not line:
                    continue
                full = os.path.normpath(os.path.join(base, line))
                if full == root or full.startswith(root + os.sep):
                    folders.append(os.path.relpath(full, root))
    return sorted(set(folders))


def _referenced(
    entries: Sequence[Entry], store: Store, unknown_whole: bool = False
) -> tuple[dict[str, str], dict[str, str]]:
    """Exact files and extract folders the manifests reference, each with the entry's name.

    With `unknown_whole` (prune), a folder dest whose file name is not known yet references its
    whole folder: the file it would name may be any of them.
    """
    files: dict[str, str] = {}
    folders: dict[str, str] = {}
    for entry in entries:
        if entry.state != "present":
            continue
        if entry.extract:
            folders[entry.dest.rstrip("/")] = entry.name
        elif not entry.folder:
            files[entry.dest] = entry.name
        else:
            name = store.name_for(entry.key)
            if name:
                files[name] = entry.name
            elif unknown_whole:
                folders[entry.dest.rstrip("/")] = entry.name
    return files, folders


def _lock_held(store: Store, relpath: str) -> bool:
    """Whether a run holds the lock of `relpath` (Store.locked), tested without waiting or creating it."""
    try:
        fd = os.open(store.lock_path(relpath), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def scan(
    options: Options,
    entries: Sequence[Entry],
    environments: Mapping[str, Sequence[str]] | None = None,
    store: Store | None = None,
    fetched: Mapping[str, str] | None = None,
) -> Usage:
    """Walk the store once and classify every file; `environments` maps a name to its store folders.

    `store` and `fetched` (relpath -> entry name, the paths a run just resolved) come from the
    run that prune follows, so that check mode and the real run see the same names.
    """
    store = store or Store(options)
    files, folders = _referenced(entries, store, unknown_whole=fetched is not None)
    files.update(fetched or {})
    archives: dict[str, Any] = store.records["archives"]
    envs = {name: list(paths) for name, paths in (environments or {}).items()}
    found: list[StoreFile] = []

    def walk(directory: str, relative: str) -> None:
        with os.scandir(directory) as items:
            for item in items:
                relpath = f"{relative}/{item.name}" if relative else item.name
                if not relative and item.name == STATE_DIR:
                    continue
                info = item.stat(follow_symlinks=False)
                if item.is_symlink():  # never followed, counted, nor pruned: it may point at a NAS
                    link = StoreFile(relpath, 0, info.st_atime, info.st_mtime, state="link")
                    link.entry = files.get(relpath)
                    found.append(link)
                    continue
                base = staging_target(item.name)  # the destination of a staging name (store.py)
                target = (f"{relative}/{base}" if relative else base) if base else None
                if item.is_dir(follow_symlinks=False):
                    if target and item.name.endswith((EXTRACT_SUFFIX, OLD_SUFFIX)):
                        size = sum(_sizes(item.path))
                        found.append(_partial(store, relpath, target, size, info, folder=True))
                    else:
                        walk(item.path, relpath)
                    continue
                if target:
                    found.append(_partial(store, relpath, target, info.st_size, info))
                    continue
                record = StoreFile(relpath, info.st_size, info.st_atime, info.st_mtime)
                _classify(record, store, files, folders, archives)
                record.environments = sorted(n for n, paths in envs.items() if _visible(relpath, paths))
                found.append(record)

    if os.path.isdir(store.root):
        walk(store.root, "")
    space = os.statvfs(store.root)
    found.sort(key=lambda item: item.path)
    return Usage(store.root, found, space.f_bavail * space.f_frsize, envs)


def _sizes(directory: str) -> Iterable[int]:
    for base, _dirs, names in os.walk(directory):
        for name in names:
            with contextlib.suppress(OSError):
                yield os.lstat(os.path.join(base, name)).st_size


def _partial(
    store: Store, relpath: str, target: str, size: int, info: os.stat_result, folder: bool = False
) -> StoreFile:
    item = StoreFile(relpath, size, info.st_atime, info.st_mtime, state="partial", target=target, folder=folder)
    item.in_use = _lock_held(store, target)
    return item


def _classify(
    item: StoreFile, store: Store, files: Mapping[str, str], folders: Mapping[str, str], archives: Mapping[str, Any]
) -> None:
    relpath = item.path
    if relpath in files:
        item.entry = files[relpath]
        record = store.file_record(relpath)
        good = record is not None and record.get("verified", True) and stat_matches(store.path(relpath), record)
        item.state = "verified" if good else "unverified"
        return
    for folder, name in folders.items():
        if relpath.startswith(folder + "/"):
            item.entry = name
            member = (archives.get(folder) or {}).get("files", {}).get(relpath[len(folder) + 1 :])
            full = os.path.join(store.root, relpath)
            item.state = "verified" if member and stat_matches(full, member) else "unverified"
            return


def _visible(relpath: str, folders: Sequence[str]) -> bool:
    return any(folder == "." or relpath.startswith(folder + "/") for folder in folders)


# pruning -------------------------------------------------------------------------------


@dataclass
class Pruned:
    """What prune removed (or, in a dry run, would remove), and what it kept and why."""

    removed: list[dict[str, Any]] = field(default_factory=list)  # path, bytes, why
    kept: list[dict[str, Any]] = field(default_factory=list)  # path, bytes, why
    dry_run: bool = True
    budget: int | None = None
    usage: int = 0  # the store's bytes before pruning
    skipped: str | None = None  # why prune did not run at all
    unmatched: list[str] = field(default_factory=list)  # protected globs that match no file
    gone: list[str] = field(default_factory=list)  # removed by someone else meanwhile

    @property
    def freed(self) -> int:
        return sum(item["bytes"] for item in self.removed)

    @property
    def changed(self) -> bool:
        return bool(self.removed)

    def as_dict(self) -> dict[str, Any]:
        item = {
            "dry_run": self.dry_run,
            "removed": self.removed,
            "kept": self.kept,
            "freed": self.freed,
            "usage": self.usage,
            "budget": self.budget,
        }
        if self.skipped:
            item["skipped"] = self.skipped
        if self.unmatched:
            item["unmatched_protected"] = self.unmatched
        if self.gone:
            item["gone"] = self.gone
        return item


BLIND = "cannot tell which files running processes have open ({}); run prune as root"


@dataclass
class OpenFiles:
    """The files processes on this host have open or mapped, by (st_dev, st_ino)."""

    ids: set[tuple[int, int]] = field(default_factory=set)
    unreadable: list[str] = field(default_factory=list)  # /proc paths this user may not read

    def holds(self, path: str) -> bool:
        try:
            info = os.stat(path)
        except OSError:
            return False
        return (info.st_dev, info.st_ino) in self.ids


def open_files(proc: str = "/proc") -> OpenFiles:
    """Every file a process has open (/proc/PID/fd) or mapped (/proc/PID/maps: mmapped safetensors).

    Files are compared by device and inode, not by path (a container or a bind mount shows
    another path). What this user may not read is listed in `unreadable`: another user's
    processes, or all of them when /proc hides them (hidepid, systemd's ProtectProc=invisible).
    Root reads every process of its host; one the kernel refuses even to root (a sandbox's
    supervisor, outside this system's services) cannot be a ComfyUI and is not counted.
    """
    found = OpenFiles()
    root = os.geteuid() == 0
    if not root and _hidden(proc):
        found.unreadable.append(f"{proc} (mounted hidepid: other users' processes are invisible)")
    for pid in os.listdir(proc):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        fds = f"{proc}/{pid}/fd"
        try:
            numbers = os.listdir(fds)
        except PermissionError:
            if not root:
                found.unreadable.append(fds)
            continue
        except OSError:  # the process ended
            continue
        refused = False
        for number in numbers:
            try:
                info = os.stat(f"{fds}/{number}")
            except PermissionError:
                refused = True
                continue
            except OSError:
                continue
            found.ids.add((info.st_dev, info.st_ino))
        try:
            with open(f"{proc}/{pid}/maps", encoding="utf-8", errors="replace") as maps:
                lines = maps.read().splitlines()
        except PermissionError:
            lines, refused = [], True
        except OSError:
            continue
        if refused and not root:
            found.unreadable.append(f"{proc}/{pid}")
        for line in lines:
            fields = line.split(None, 5)
            if len(fields) < 6 or not fields[5].startswith("/") or fields[4] == "0":
                continue
            major, minor = fields[3].split(":")
            found.ids.add((os.makedev(int(major, 16), int(minor, 16)), int(fields[4])))
            with contextlib.suppress(OSError):
                info = os.stat(fields[5].removesuffix(" (deleted)"))
                found.ids.add((info.st_dev, info.st_ino))
    return found


def _hidden(proc: str) -> bool:
    """Whether /proc is mounted with hidepid (other users' processes invisible or unreadable)."""
    try:
        with open(f"{proc}/self/mountinfo", encoding="utf-8") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) > 4 and fields[4] == proc and "hidepid=" in line:
                    value = line.split("hidepid=", 1)[1].split(",", 1)[0].split()[0]
                    return value not in ("0", "off")
    except OSError:
        return True
    return False


def prune(
    options: Options,
    entries: Sequence[Entry],
    apply: bool,
    budget: int | None = None,
    report: Report | None = None,
    store: Store | None = None,
    sources: Sequence[str] = (),
) -> Pruned:
    """Remove what no entry references: unreferenced files (with their records) and stale partials.

    Never a path matching an O(protected) glob, never a file a process has open or mapped, never a
    partial whose download is running, never a symbolic link. With `budget`, unreferenced files go
    least recently used first (atime, then mtime) only until the store fits; stale partials always
    go. After a fetch, `report` and `store` are that run's: its paths count as referenced, and a
    run with failed entries prunes nothing. `sources` names the manifests, for the errors.
    """
    if not any(entry.state == "present" for entry in entries):
        where = ", ".join(sources) or "the manifest"
        raise ManifestError(
            f"prune refuses: {where} lists no model in use, and pruning against it would remove every "
            "file in the store; list the models in use (protect the rest with protected), or remove files by hand"
        )
    result = Pruned(dry_run=not apply, budget=budget)
    if report is not None and report.failed:
        names = ", ".join(item.name for item in report.failed)
        result.skipped = (
            f"prune skipped: {len(report.failed)} entry(ies) failed ({names}), so what they use is not known; "
            "fix them and run again"
        )
        return result
    store = store or Store(options)
    protected = protected_globs(options.protected, store.root)
    fetched: dict[str, str] = {}
    for done in report.results if report is not None else ():
        if done.path and done.action != "failed":
            fetched[os.path.relpath(done.path, store.root)] = done.name
    usage = scan(options, entries, store=store, fetched=fetched)
    result.usage = usage.total
    busy = open_files()
    blind = (
        BLIND.format(f"{len(busy.unreadable)} unreadable, such as {busy.unreadable[0]}") if busy.unreadable else None
    )
    candidates: list[tuple[StoreFile, str]] = []
    for item in usage.files:
        if item.state == "partial":
            if item.in_use:
                result.kept.append({"path": item.path, "bytes": item.size, "why": "download in progress"})
            else:
                candidates.append((item, "stale partial download"))
        elif item.state == "unreferenced":
            candidates.append((item, "unreferenced"))
    partials = [c for c in candidates if c[0].state == "partial"]
    unreferenced = sorted((c for c in candidates if c[0].state != "partial"), key=lambda c: (c[0].atime, c[0].mtime))
    remaining = usage.total
    for item, why in [*partials, *unreferenced]:
        if budget is not None and item.state != "partial" and remaining <= budget:
            break
        full = os.path.join(store.root, item.path)
        keep = blind or _keep_reason(item, full, protected, busy)
        if keep:
            result.kept.append({"path": item.path, "bytes": item.size, "why": keep})
            continue
        outcome = _remove(store, item, full) if apply else "removed"
        if outcome == "gone":
            result.gone.append(item.path)
            remaining -= item.size
            continue
        if outcome != "removed":
            how = "changed while pruning" if outcome == "changed" else "a run holds its lock"
            result.kept.append({"path": item.path, "bytes": item.size, "why": how})
            continue
        result.removed.append({"path": item.path, "bytes": item.size, "why": why})
        remaining -= item.size
    if apply and (result.removed or result.gone):
        paths = [item["path"] for item in result.removed] + result.gone
        store.refresh()
        store.forget(paths)
        _remove_empty_folders(store, paths)
    paths = [item.path for item in usage.files]
    result.unmatched = [
        original for original, pattern in protected if not any(_protects(pattern, path) for path in paths)
    ]
    return result


def protected_globs(patterns: Sequence[str], root: str) -> list[tuple[str, str]]:
    """Each O(protected) glob with its form relative to the store: C(./) and the store's own path
    stripped, C(/) at the end dropped. An absolute path outside the store is refused."""
    found: list[tuple[str, str]] = []
    for original in patterns:
        pattern = original
        if os.path.isabs(pattern):
            real = os.path.realpath(root)
            for base in dict.fromkeys((root.rstrip("/"), real)):
                if pattern == base or pattern.startswith(base + "/"):
                    pattern = pattern[len(base) :].lstrip("/") or "*"
                    break
            else:
                raise ManifestError(
                    f"protected glob {original!r} is an absolute path outside the store {root}; "
                    "give paths relative to the store, such as 'loras/keep/'"
                )
        while pattern.startswith("./"):
            pattern = pattern[2:]
        found.append((original, pattern.rstrip("/") or "*"))
    return found


def _protects(pattern: str, path: str) -> bool:
    """A glob matches the path itself, or names a folder that holds it."""
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, pattern + "/*")


def _keep_reason(item: StoreFile, full: str, protected: Sequence[tuple[str, str]], busy: OpenFiles) -> str | None:
    for original, pattern in protected:
        if _protects(pattern, item.path) or (item.target and _protects(pattern, item.target)):
            return f"protected ({original})"
    if item.folder:
        inside = (os.path.join(base, name) for base, _dirs, names in os.walk(full) for name in names)
        if any(busy.holds(path) for path in inside):
            return "open by a running process"
    elif busy.holds(full):
        return "open by a running process"
    return None


def _remove(store: Store, item: StoreFile, full: str) -> str:
    """Remove one file (or staging folder) under its destination's lock, without waiting for it.

    Returns removed, gone (someone else removed it), changed (a run wrote it since the walk) or
    busy (a run holds its lock). The records are dropped afterwards, all in one save.
    """
    with store.try_locked(item.target or item.path) as held:
        if not held:
            return "busy"
        try:
            info = os.lstat(full)
            if not item.folder and (info.st_size, info.st_mtime) != (item.size, item.mtime):
                return "changed"
            if item.folder:
                shutil.rmtree(full)
            else:
                os.unlink(full)
        except FileNotFoundError:
            return "gone"
    return "removed"


def _remove_empty_folders(store: Store, paths: Iterable[str]) -> None:
    """Remove the folders the removals emptied, below the top-level ones (ComfyUI's model folders stay)."""
    folders = {os.path.dirname(path) for path in paths}
    for folder in sorted(folders, key=lambda f: -f.count("/")):
        while "/" in folder:
            try:
                os.rmdir(os.path.join(store.root, folder))
            except OSError:  # not empty, or gone
                break
            folder = os.path.dirname(folder)


# the budget ------------------------------------------------------------------------------


def check_budget(
    options: Options, usage: int, needs: Sequence[tuple[str, int]], unknown: Sequence[str], prunable: int = 0
) -> None:
    """Fail before the first byte when usage plus what the run will add exceeds O(budget).

    `prunable`: the bytes this run's own prune (O(prune)) will remove, not counted.
    """
    if options.budget is None:
        return
    need = sum(size for _name, size in needs)
    kept = usage - prunable
    if kept + need <= options.budget:
        return
    names = ", ".join(name for name, _size in needs)
    extra = f" ({len(unknown)} more of unknown size: {', '.join(unknown)})" if unknown else ""
    pruned = f", {human(prunable)} of it pruned by this run" if prunable else ""
    # With prune on, what prune can remove is counted out already: only the budget can help.
    hint = "" if options.prune else ", or free space with `comfybake models prune` (it removes unreferenced files)"
    raise BudgetError(
        f"the store would hold {human(kept + need)} ({human(usage)} now{pruned} + {human(need)} for {names}{extra}), "
        f"over its budget of {human(options.budget)}; raise {how_to_set('budget')}{hint}"
    )


def held_bytes(path: str) -> int:
    """The bytes a destination holds now: a regular file, or every file of a folder; a link holds none."""
    try:
        info = os.lstat(path)
    except OSError:
        return 0
    if os.path.isdir(path) and not os.path.islink(path):
        return sum(_sizes(path))
    return info.st_size if os.path.isfile(path) and not os.path.islink(path) else 0


def prunable(options: Options, entries: Sequence[Entry], sources: Sequence[str]) -> int:
    """The bytes O(prune) will remove after this fetch (its dry run), for the budget; 0 without prune or budget."""
    if not options.prune or options.budget is None:
        return 0
    return prune(options, entries, apply=False, sources=sources).freed
