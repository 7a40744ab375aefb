# Copyright: comfybake contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Paths that node packs write inside their own folder, and how every process gets its own copy.

A release's code is read-only to the processes that run it, but many popular node packs write
into their own folder: a settings file at import, a cache or history folder later. A path
declared writable (a node's `writable` key, the site's `writable_paths`, or KNOWN below) becomes
a link in the release:

    <release>/ComfyUI/custom_nodes/<node>/<path>  ->  /proc/self/cwd/custom_nodes/<node>/<path>

so each process that runs ComfyUI finds the path in its own working directory: an instance in
its state folder, the import gate in its scratch folder. Instances never share a copy, the code
around the path stays read-only, and no bind mount or privilege is needed, so the same release
works under systemd, under supervisord in a container and in the gate. The release keeps the
pack's own content of each path, or what the pack wrote there during the import gate, as the
seed under `<release>/writable/`; `comfybake instances prepare` copies a seed into an instance
that lacks the path, and never overwrites what an instance wrote.

A pack that replaces a declared file by renaming a temporary file over it needs its folder
declared instead (a rename cannot replace the link).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence

LINK_BASE = "/proc/self/cwd"
SEEDS = "writable"
COMFYUI = "ComfyUI"  # the key of ComfyUI's own tree in KNOWN and in writable_paths

# Node folder or repository name -> the paths the pack writes inside its folder (a trailing /
# for a folder). Data only: a site adds or overrides entries with writable_paths (the role's
# comfyui_environments_writable_paths), and a node with its own `writable` key. Each entry was
# read in the pack's source (docs/environments.md lists where).
KNOWN: dict[str, list[str]] = {}

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DENIED = re.compile(r"Permission denied: '([^']+)'")


def problem(path: object) -> str | None:
    """Why `path` cannot be a writable path, or None: relative, normalised, inside the tree."""
    if not isinstance(path, str) or not path.strip("/"):
        return "must be a non-empty path, a string"
    if _CONTROL.search(path):
        return "must not contain control characters"
    if path.startswith("/"):
        return "must be relative to the node's folder"
    parts = path.rstrip("/").split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "must be normalised (no empty, '.' or '..' parts)"
    if ".git" in parts or "__pycache__" in parts:
        return "must not be inside .git or __pycache__"
    return None


def declared(node: str, repo: str, own: Sequence[str], site: Mapping[str, Sequence[str]]) -> list[str]:
    """A tree's writable paths: its own, then the site's and KNOWN's by folder or repository name."""
    names = [node] + ([repo] if repo and repo != node else [])
    paths = list(own)
    for table in (site, KNOWN):
        for name in names:
            entry = table.get(name)
            paths += entry if isinstance(entry, (list, tuple)) else []  # validate() names a wrong entry
    return sorted(set(paths))


def link_release(comfyui: str, seeds: str, paths: Iterable[str]) -> None:
    """Move each path's content to its seed and put the link to the working directory in its place.

    `paths` are relative to the ComfyUI folder (custom_nodes/<node>/settings.json).
    """
    for path in paths:
        relative = path.rstrip("/")
        target = os.path.join(comfyui, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.lexists(target):
            seed = os.path.join(seeds, relative)
            os.makedirs(os.path.dirname(seed), exist_ok=True)
            os.replace(target, seed)
        os.symlink(f"{LINK_BASE}/{relative}", target)


def provide(seeds: str, workdir: str, paths: Iterable[str]) -> list[str]:
    """Give a working directory each path it lacks: a copy of the seed, else an empty folder (a
    declared folder) or the folder that will hold the file. Returns the paths copied from seeds."""
    copied = []
    for path in paths:
        relative = path.rstrip("/")
        dest = os.path.join(workdir, relative)
        if os.path.lexists(dest):
            continue
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        seed = os.path.join(seeds, relative)
        if os.path.isdir(seed) and not os.path.islink(seed):
            shutil.copytree(seed, dest, symlinks=True)
        elif os.path.lexists(seed):
            shutil.copy2(seed, dest, follow_symlinks=False)
        else:
            if path.endswith("/"):
                os.makedirs(dest)
            continue
        copied.append(path)
    return copied


def keep_as_seeds(workdir: str, seeds: str, paths: Iterable[str]) -> None:
    """Keep what a process wrote at paths that have no seed yet (the gate's first import) as their seeds.

    The links are copied as links, never followed: the writer was an unprivileged process.
    """
    for path in paths:
        relative = path.rstrip("/")
        seed = os.path.join(seeds, relative)
        written = os.path.join(workdir, relative)
        if os.path.lexists(seed) or not os.path.lexists(written):
            continue
        if os.path.isdir(written) and not os.path.islink(written):
            if not os.listdir(written):
                continue  # an empty folder is what provide() makes anyway
            os.makedirs(os.path.dirname(seed), exist_ok=True)
            shutil.copytree(written, seed, symlinks=True)
        else:
            os.makedirs(os.path.dirname(seed), exist_ok=True)
            shutil.copy2(written, seed, follow_symlinks=False)


def permission_hint(error: str, comfyui: str, node: str | None = None) -> str | None:
    """For a `Permission denied: '<path>'` in the release's ComfyUI folder, the setting that makes it writable.

    `node` is the custom node that failed; a path outside its folder is one of ComfyUI's own.
    """
    match = _DENIED.search(error)
    if not match:
        return None
    denied = os.path.normpath(match.group(1))
    folder = os.path.join(comfyui, "custom_nodes", node) if node else comfyui
    if node and denied.startswith(folder + os.sep):
        path = os.path.relpath(denied, folder)
        what, where = (
            f"custom node {node} writes {path} inside its own folder",
            f"writable: [{path}] to this custom node, or {node}: [{path}]",
        )
    elif denied.startswith(comfyui + os.sep):
        path = os.path.relpath(denied, comfyui)
        who = f"custom node {node}" if node else "ComfyUI"
        what, where = f"{who} writes {path} inside ComfyUI's folder", f"{COMFYUI}: [{path}]"
    else:
        return None
    return (
        f"  {what}, which is read-only code. Add {where} to comfyui_environments_writable_paths (a trailing /"
        " declares a folder), so that each instance and the import gate get their own copy"
        " (docs/environments.md, writable paths)"
    )
