# Copyright: comfybake contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""The releases of one environment on a host: which exist, which is live, which running processes
use, the switch of `current`, and what a new resolution changes in the live release's pins.

A process uses a release when the kernel says so: its executable, its working directory or a file
it has mapped (the compiled modules of torch, numpy, ...) lies in `<root>/releases/<id>/`, or a path
on its command line resolves there. Instances start through their own link
(`<code root>/instances/<name> -> ../envs/<env>/releases/<id>`), which the instances role and
`comfybake environments rollback` change only together with a restart, so the path on an
instance's command line names the release it loaded. Reading another user's executable, working
directory and maps needs CAP_SYS_PTRACE (root on a host has it, root in a container usually not);
the command line is readable by everyone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import EnvError

RELEASES = "releases"
CURRENT = "current"
LOCK_NAME = "comfybake.lock.json"
BUILDING_MARKER = ".comfybake-building"


@contextlib.contextmanager
def locked(root: str) -> Iterator[None]:
    """The environment's own lock (`<root>/.lock`): one build, rollback or sweep of it at a time."""
    with open(os.path.join(root, ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@dataclass
class Release:
    """One complete release of an environment."""

    id: str
    path: str
    built: float  # when its lock was written (seconds since the epoch)
    live: bool
    pids: list[int] = field(default_factory=list)


def live(root: str) -> str | None:
    """The real path of the live release, or None when `current` is missing."""
    link = os.path.join(root, CURRENT)
    return os.path.realpath(link) if os.path.islink(link) and os.path.isdir(link) else None


def releases(root: str, proc: str = "/proc") -> list[Release]:
    """The complete releases (a lock, no build marker), oldest first, each with the processes using it."""
    folder = os.path.join(root, RELEASES)
    now = live(root)
    used = in_use(root, proc)
    found = []
    for entry in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.realpath(os.path.join(folder, entry))
        lock = os.path.join(path, LOCK_NAME)
        if os.path.isfile(lock) and not os.path.exists(os.path.join(path, BUILDING_MARKER)):
            found.append(Release(entry, path, os.stat(lock).st_mtime, path == now, used.get(path, [])))
    return sorted(found, key=lambda release: (release.built, release.id))


def previous(root: str) -> Release | None:
    """The newest complete release built before the live one (what a rollback goes back to)."""
    known = releases(root)
    current = next((release for release in known if release.live), None)
    older = [release for release in known if not release.live and (current is None or release.built < current.built)]
    return older[-1] if older else None


def find(root: str, name: str) -> Release:
    """A complete release by its id (or its path); the error lists the ones there are."""
    known = releases(root)
    wanted = os.path.basename(os.path.normpath(name))
    for release in known:
        if release.id == wanted:
            return release
    there = ", ".join(release.id for release in known) or "none"
    raise EnvError(f"{root} has no complete release {name!r} (releases: {there})")


def switch(root: str, release: str) -> None:
    """Point `current` at `release` in one rename."""
    link = os.path.join(root, ".current.new")
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(os.path.relpath(release, root), link)
    os.replace(link, os.path.join(root, CURRENT))
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def in_use(root: str, proc: str = "/proc") -> dict[str, list[int]]:
    """Release path to the ids of the running processes that use it (see the module's text)."""
    base = os.path.join(os.path.realpath(os.path.join(root, RELEASES)), "")
    found: dict[str, set[int]] = {}
    for entry in os.listdir(proc):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        for path in _paths(os.path.join(proc, entry)):
            if path.startswith(base):
                release = base + path[len(base) :].split(os.sep, 1)[0]
                found.setdefault(release, set()).add(int(entry))
    return {release: sorted(pids) for release, pids in found.items()}


def _paths(folder: str) -> list[str]:
    """The real paths a process holds or names: the absolute paths on its command line, its
    executable, working directory and mapped files (those it is allowed to read)."""
    try:
        with open(os.path.join(folder, "cmdline"), "rb") as handle:
            argv = handle.read().split(b"\0")
    except OSError:
        return []
    # The folder resolved, not the file: a venv's bin/python is a link out of the release.
    named = [os.fsdecode(arg) for arg in argv if arg.startswith(b"/")]
    paths = [os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path)) for path in named]
    for name in ("exe", "cwd"):
        with contextlib.suppress(OSError):
            paths.append(os.readlink(os.path.join(folder, name)))
    with contextlib.suppress(OSError), open(os.path.join(folder, "maps"), "rb") as handle:
        for line in handle:
            mapped = line.split(None, 5)
            if len(mapped) == 6 and mapped[5].startswith(b"/"):
                paths.append(os.fsdecode(mapped[5].strip().removesuffix(b" (deleted)")))
    return paths


def moved_refs(name: str, lock: Mapping[str, Any] | None, summary: Mapping[str, Any]) -> list[str]:
    """A warning for each tag or branch that resolves to another commit than the live release's lock
    has for the same repository and version: the ref moved upstream (or in a mirror) since then."""
    if not lock:
        return []
    before = {("ComfyUI", lock["comfyui"]["repo"], lock["comfyui"]["version"]): lock["comfyui"]["commit"]}
    before.update(
        {
            (f"custom node {node['name']}", node["repo"], node["version"]): node["commit"]
            for node in lock["custom_nodes"]
        }
    )
    now = {("ComfyUI", summary["comfyui"]["repo"], summary["comfyui"]["version"]): summary["comfyui"]["commit"]}
    now.update(
        {
            (f"custom node {node['name']}", node["repo"], node["version"]): node["commit"]
            for node in summary["custom_nodes"]
        }
    )
    warnings = []
    for (what, repo, version), commit in now.items():
        old = before.get((what, repo, version))
        if old and old != commit and old != version:
            warnings.append(
                f"environment {name}: {what} {version} ({repo}) now resolves to {commit}, but the live"
                f" release's lock has {old}: the ref moved since that build, so hosts that resolve it at"
                f" different times run different code. Pin commits with `comfybake environments lock`"
                f" (or set the version to {old} to keep the live code)"
            )
    return warnings
