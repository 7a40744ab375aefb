# Copyright: comfybake contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Paths that node packs write inside their own folder, and how every process gets its own copy.

A release's code is read-only to the processes that run it, but many popular node packs write
into their own folder: a settings file at import, a cache or history folder later. A path
declared writable (a node's `writable` key, the site's `writable_paths`, or KNOWN below; relative
to the node's folder, or with ../../ to ComfyUI's, for packs that write there) becomes a link in
the release:

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
import posixpath
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence

from .errors import EnvError

LINK_BASE = "/proc/self/cwd"
SEEDS = "writable"

# Node folder or repository name -> the paths the pack writes, relative to its folder (a
# trailing / for a folder; ../../ climbs to ComfyUI's folder). Data only: a site adds or
# overrides rows with writable_paths (the role's comfyui_environments_writable_paths), a node
# with its own `writable` key. Each row was read in the pack's source, at the place named.
KNOWN: dict[str, list[str]] = {
    "ComfyUI-Custom-Scripts": [
        "pysssss.json",  # at import: pysssss.py, get_extension_config() copies pysssss.default.json
        "user/autocomplete.txt",  # py/autocomplete.py
        "../../web/extensions/pysssss/",  # at import: pysssss.py, get_web_ext_dir() makes it
        "../../pysssss-workflows/",  # py/workflows.py
    ],
    "was-node-suite-comfyui": [
        "was_suite_config.json",  # at import (a failure is swallowed): WAS_Node_Suite.py
        "was_suite_settings.json",
        "was_history.json",
        "nsp_pantry.json",
        "styles.json",  # at import when webui_styles is set
        "wildcards/",
        "cache/",
    ],
    "rgthree-comfy": [
        "rgthree_config.json",  # py/config.py, through the settings route; at import when migrating
        "userdata/",  # py/utils_userdata.py
    ],
    "ComfyUI-Inspire-Pack": [
        "resources/prompt-builder.yaml",  # at import (a failure is swallowed): inspire/prompt_support.py
    ],
    "ComfyUI-Easy-Use": [
        "wildcards/",  # at import: __init__.py
        "styles/",  # at import: __init__.py
        "config.yaml",  # at import when present; py/libs/api/stability.py
    ],
    "ComfyUI-KJNodes": [
        "models/",  # model downloads: nodes/nodes.py
    ],
    "comfyui_controlnet_aux": [
        "ckpts/",  # annotator downloads: utils.py (or set AUX_ANNOTATOR_CKPTS_PATH to a shared folder)
    ],
    "comfyui-tooling-nodes": [
        "safetychecker/",  # a download renamed into place: nsfw.py
    ],
}

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DENIED = re.compile(r"Permission denied: '([^']+)'")


def in_comfyui(node: str, path: str) -> str:
    """A node's writable path relative to the ComfyUI folder: custom_nodes/<node>/<path>, ../../ climbing out."""
    relative = posixpath.normpath(posixpath.join("custom_nodes", node, path.rstrip("/")))
    return relative + ("/" if path.endswith("/") else "")


def problem(node: str, path: object) -> str | None:
    """Why `path` cannot be a writable path of `node`, or None: relative, inside ComfyUI's folder."""
    if not isinstance(path, str) or not path.strip("/"):
        return "must be a non-empty path, a string"
    if _CONTROL.search(path):
        return "must not contain control characters"
    if path.startswith("/"):
        return "must be relative to the node's folder"
    if any(part in ("", ".") for part in path.rstrip("/").split("/")):
        return "must be normalised (no empty or '.' parts)"
    parts = in_comfyui(node, path).rstrip("/").split("/")
    if parts[0] == ".." or parts == ["custom_nodes"]:
        return "must stay inside ComfyUI's folder"
    if parts[0] == "custom_nodes" and (len(parts) < 3 or parts[1] != node):
        return "must not reach into the folder of another custom node"
    if ".git" in parts or "__pycache__" in parts:
        return "must not be inside .git or __pycache__"
    return None


def declared(node: str, repo: str, own: Sequence[str], site: Mapping[str, Sequence[str]]) -> list[str]:
    """A node's writable paths: its own, then the site's and KNOWN's by folder or repository name."""
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
    linked: list[str] = []
    for path in sorted(paths):
        relative = path.rstrip("/")
        if any(relative.startswith(done + "/") for done in linked):
            continue  # inside a declared folder, which every process has whole
        target = os.path.join(comfyui, relative)
        parent = os.path.dirname(relative)
        while parent:  # never follow a link of the checkout (root writes here)
            if os.path.islink(os.path.join(comfyui, parent)):
                raise EnvError(f"writable path {path} lies below {parent}, which is a link in the checkout")
            parent = os.path.dirname(parent)
        linked.append(relative)
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


def permission_hint(error: str, comfyui: str, node: str) -> str | None:
    """For a `Permission denied: '<path>'` in the release's ComfyUI folder, the setting that makes it writable.

    A path that does not exist in the release was being created: by os.makedirs, which names the
    first folder it could not create, or by open(), which names the file; a folder is declared
    with a trailing /.
    """
    match = _DENIED.search(error)
    if not match:
        return None
    denied = os.path.normpath(match.group(1))
    if not denied.startswith(comfyui + os.sep):
        return None
    folder = os.path.join(comfyui, "custom_nodes", node)
    path = os.path.relpath(denied, folder)
    if not os.path.lexists(denied) and re.search(r"\b(makedirs|mkdir)\b", error):
        path += "/"
    where = "inside its own folder" if denied.startswith(folder + os.sep) else "inside ComfyUI's folder"
    return (
        f"  custom node {node} writes {path} {where}, which is read-only code. Add writable: [{path}] to this"
        f" custom node, or {node}: [{path}] to comfyui_environments_writable_paths (relative to the node's"
        " folder, a trailing / for a folder), so that each instance and the import gate get their own copy"
        " (docs/environments.md, writable paths)"
    )
