# Copyright: comfybake contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""What an environment is made of: its sources and settings, validated in full."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import EnvError, redact
from .requirements import canonical_name

COMMIT = re.compile(r"^[0-9a-f]{40}$")
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Source:
    """A git repository pinned to a version (a full commit, a tag, or an allowed branch)."""

    name: str
    repo: str
    version: str


@dataclass
class Spec:
    """Everything that describes one environment and how to build it."""

    name: str
    root: str
    comfyui: Source
    uv: str
    custom_nodes: list[Source] = field(default_factory=list)
    allow_moving_refs: bool = False
    allowed_repos: list[str] = field(default_factory=list)
    torch_flavor: str = ""
    torch_packages: list[str] = field(default_factory=list)
    torch_index_url: str | None = None
    protected_packages: list[str] = field(default_factory=list)
    pip_constraints: list[str] = field(default_factory=list)
    pip_packages: list[str] = field(default_factory=list)
    allow_source_builds: bool = False
    allow_direct_references: bool = False
    hook: str | None = None
    revision: str = ""
    python: str = "python3"
    index_url: str | None = None
    extra_index_urls: list[str] = field(default_factory=list)
    find_links: list[str] = field(default_factory=list)
    wheelhouse: str | None = None
    cache_dir: str | None = None
    git_cache: str | None = None
    git_mirrors: dict[str, str] = field(default_factory=dict)
    ca_bundle: str | None = None
    extra_model_paths: str | None = None
    user_files: dict[str, str] = field(default_factory=dict)
    import_gate: bool = True
    gate_timeout: int = 900
    run_as: str | None = None
    keep_releases: int = 2


def node_name_from_repo(repo: str) -> str:
    base = repo.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    return base[:-4] if base.endswith(".git") else base


def validate(spec: Spec, check_mode: bool = False) -> None:
    """Refuse what must never be built, before any git or network access.

    Check mode on a fresh host runs before the role pushed the hook and the wheelhouse, so their
    presence is checked only when building.
    """
    where = f"environment {spec.name}"
    if not _NODE_NAME.match(spec.name):
        raise EnvError(f"{where}: the name must be letters, digits, '.', '_' or '-'")
    _check_repo(where, "ComfyUI", spec.comfyui.repo, [])
    if not spec.comfyui.version:
        raise EnvError(f"{where}: comfyui_version is empty; pin a tag (v0.8.0) or a full commit")
    seen: dict[str, str] = {}
    for node in spec.custom_nodes:
        label = f"{where}: custom node {node.name}"
        if not _NODE_NAME.match(node.name) or node.name in {"__pycache__"}:
            raise EnvError(f"{label}: invalid directory name; set name: to letters, digits, '.', '_' or '-'")
        if node.name in seen:
            raise EnvError(
                f"{where}: custom nodes {seen[node.name]} and {node.repo} both install as {node.name}; set name: on one"
            )
        seen[node.name] = node.repo
        _check_repo(where, f"custom node {node.name}", node.repo, spec.allowed_repos)
        if not COMMIT.match(node.version) and not spec.allow_moving_refs:
            raise EnvError(
                f"{label}: version must be a full 40-hex commit (got {node.version!r}); pin the commit,"
                " or set allow_moving_refs: true for this environment"
            )
    for entry in spec.torch_packages:
        torch_constraint(where, entry)
    if spec.keep_releases < 1:
        raise EnvError(f"{where}: keep_releases must be at least 1 (got {spec.keep_releases})")
    if check_mode:
        return
    if spec.hook and not os.path.isfile(spec.hook):
        raise EnvError(f"{where}: hook {spec.hook} does not exist on the host")
    if spec.wheelhouse and not os.path.isdir(spec.wheelhouse):
        raise EnvError(f"{where}: wheelhouse {spec.wheelhouse} is not a directory on the host; push it first")


def _check_repo(where: str, what: str, repo: str, allowed: Sequence[str]) -> None:
    if not repo:
        raise EnvError(f"{where}: {what} has no repository URL")
    if re.match(r"^[a-z][a-z0-9+.-]*://[^/@\s]*:[^/@\s]*@", repo):
        raise EnvError(
            f"{where}: {what} repository {redact(repo)} embeds credentials in its URL; use an SSH key"
            " or a git credential helper instead"
        )
    if allowed and not any(repo.startswith(prefix) for prefix in allowed):
        raise EnvError(
            f"{where}: {what} repository {repo} is not allowlisted (allowed_repos: {', '.join(allowed)});"
            " check the owner name, or add the prefix to allowed_repos"
        )


def torch_constraint(where: str, entry: str) -> str:
    """`torch==2.13.0+cpu` stays as is; a wheel path or URL becomes `name==version`."""
    base = entry.rsplit("/", 1)[-1]
    if base.endswith(".whl"):
        parts = base.split("-")
        if len(parts) < 5:
            raise EnvError(f"{where}: torch package {entry!r} is not a wheel file name (name-version-tags.whl)")
        return f"{canonical_name(parts[0])}=={parts[1]}"
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[^=<>!~,;\s]+$", entry):
        raise EnvError(
            f"{where}: torch package {entry!r} must be an exact pin such as torch==2.13.0+cpu, or a wheel file"
        )
    return entry
