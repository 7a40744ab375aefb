# Copyright: comfybake contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""What an environment is made of: the keys a user writes (ENVIRONMENT_KEYS, the one list of
them), read with the site-wide settings into a Spec (`environment_spec`), validated in full."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .errors import EnvError, redact
from .requirements import canonical_name, direct_reference
from .writable import declared
from .writable import problem as writable_problem

COMMIT = re.compile(r"^[0-9a-f]{40}\Z")  # \Z, not $: $ also matches before a final line break
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")


@dataclass(frozen=True)
class Source:
    """A git repository pinned to a version (a full commit, a tag, or an allowed branch)."""

    name: str
    repo: str
    version: str
    # Paths a node writes, relative to its folder (writable.py), a trailing / for a folder.
    writable: tuple[str, ...] = ()


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
    allow_submodules: bool = False
    hook: str | None = None
    hook_as_root: bool = False
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
    # Import name -> distribution, for the import gate's diagnosis (beside imports.DISTRIBUTIONS).
    import_names: dict[str, str] = field(default_factory=dict)
    # Node folder or repository name -> paths it writes, before writable.KNOWN.
    writable_paths: dict[str, list[str]] = field(default_factory=dict)
    run_as: str | None = None
    keep_releases: int = 2


# Files the role puts in an environment's configuration folder (`config_dir`).
HOOK_FILE = "hook"
MODEL_PATHS_FILE = "extra_model_paths.yaml"


class _WrongValueError(Exception):
    """A written value of the wrong kind (the caller names the key and what it accepts)."""


def _text(value: Any) -> str:
    if isinstance(value, str) and value.strip():
        return value
    raise _WrongValueError


def _text_or_empty(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise _WrongValueError


def _version(value: Any) -> str:
    """A string; a number YAML read from an unquoted value is taken as its text, as before."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool) and str(value).strip():
        return str(value).strip()
    raise _WrongValueError


def _revision(value: Any) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise _WrongValueError


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise _WrongValueError


def _texts(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)) and all(isinstance(entry, str) for entry in value):
        return list(value)
    raise _WrongValueError


def _mappings(value: Any) -> list[Mapping[str, Any]]:
    if isinstance(value, (list, tuple)) and all(isinstance(entry, Mapping) for entry in value):
        return list(value)
    raise _WrongValueError


# The keys an environment may have, as written in `comfyui_environments` (docs/environments.md),
# each with how its value is read and what it accepts. This is the one list of them: the role
# passes each environment as written, and any other key is refused here.
ENVIRONMENT_KEYS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "comfyui_repo": (_text, "the git URL of ComfyUI, a string"),
    "comfyui_version": (_version, "a tag or a full 40-hex commit, a string"),
    "torch_flavor": (_text, "the name of a torch flavour, a string"),
    "torch_packages": (_texts, "a list of exact pins (torch==2.13.0+cpu) or wheel files, strings"),
    "torch_index_url": (_text_or_empty, 'the URL of the index that serves the torch packages, or "" for none'),
    "xformers": (_flag, "true or false"),
    "custom_nodes": (_mappings, "a list of mappings with repo, version and optionally name"),
    "pip_constraints": (_texts, "a list of constraints (numpy<2), strings"),
    "pip_packages": (_texts, "a list of requirements, strings"),
    "protected_packages": (_texts, "a list of package names, strings"),
    "allow_moving_refs": (_flag, "true or false"),
    "allow_source_builds": (_flag, "true or false"),
    "allow_direct_references": (_flag, "true or false"),
    "allow_submodules": (_flag, "true or false"),
    "hook": (_text, "the path of a script on the controller, a string"),
    "hook_as_root": (_flag, "true or false"),
    "revision": (_revision, "any string"),
    "extra_model_folders": (_texts, "a list of model folder keys, strings"),
    "required_node_classes": (_texts, "a list of node class names, strings"),
    "import_gate": (_flag, "true or false"),
}
REQUIRED_KEYS = ("comfyui_repo", "comfyui_version")
NODE_KEYS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "repo": (_text, "a git URL, a string"),
    "version": (_version, "a full 40-hex commit, a string"),
    "name": (_text, "a folder name under custom_nodes/, a string"),
    "writable": (_texts, "a list of paths inside the node's folder that it writes (a trailing / for a folder)"),
}
FLAVOR_KEYS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "index_url": (_text_or_empty, "a URL, a string"),
    "packages": (_texts, "a list of exact pins or wheel files, strings"),
    "xformers": (_text, "the pin of xformers, a string"),
}


def yaml_kind(value: Any) -> str:
    """How YAML would name a value, for messages: `'yes' (a string)`, `3 (an integer)`, `null`, `a list`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, str):
        shown = repr(str(value))
        return f"{shown if len(shown) <= 60 else shown[:56] + '...'} (a string)"
    if isinstance(value, int):
        return f"{value} (an integer)"
    if isinstance(value, float):
        return f"{value} (a number)"
    return type(value).__name__


def _read(
    written: Mapping[str, Any],
    keys: Mapping[str, tuple[Callable[[Any], Any], str]],
    what: str,
    problems: list[str],
) -> dict[str, Any]:
    """The known keys of `written`, each read by its reader; a problem for each unknown key or wrong value."""
    values: dict[str, Any] = {}
    for key, value in written.items():
        if key not in keys:
            close = difflib.get_close_matches(str(key), list(keys), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"unknown key {key!r}{hint}; {what} takes {', '.join(keys)}")
            continue
        reader, allowed = keys[key]
        try:
            values[key] = reader(value)
        except _WrongValueError:
            problems.append(f"{key} must be {allowed}, got {yaml_kind(value)}")
    return values


def environment_spec(
    name: str,
    written: Any,
    *,
    torch_flavors: Mapping[str, Any] | None = None,
    default_torch_flavor: str = "",
    protected_packages: Sequence[str] = (),
    import_gate: bool = True,
    config_dir: str | None = None,
    **settings: Any,
) -> Spec:
    """The Spec of environment `name` as the user wrote it (a mapping of ENVIRONMENT_KEYS).

    The site-wide settings fill in what an environment leaves out: its torch flavour comes from
    `torch_flavors` (`default_torch_flavor` when it names none), `protected_packages` come before
    its own, and `import_gate` is the default of its own. With `config_dir` (where the role puts
    the environment's files on the host), a `hook` runs as `<config_dir>/hook` and the import gate
    reads `<config_dir>/extra_model_paths.yaml`; without it, `hook` is a path on the host.
    `settings` are the other fields of Spec (root, uv, indexes, caches, ...), passed through.

    Every problem of the written environment is reported at once, in one EnvError that names
    the environment, each key at fault and what it accepts.
    """
    where = f"environment {name}"
    if not isinstance(written, Mapping):
        raise EnvError(f"{where} must be a mapping of keys (docs/environments.md), got {yaml_kind(written)}")
    problems: list[str] = []
    env = _read(written, ENVIRONMENT_KEYS, "an environment", problems)
    for key in REQUIRED_KEYS:
        if key not in written:
            problems.append(f"{key} is missing; it must be {ENVIRONMENT_KEYS[key][1]}")
    nodes: list[Source] = []
    for index, node in enumerate(env.get("custom_nodes", [])):
        label = f"custom_nodes[{index}]"
        node_problems: list[str] = []
        read = _read(node, NODE_KEYS, "a custom node", node_problems)
        node_problems += [f"{key} is missing" for key in ("repo", "version") if key not in node]
        problems += [f"{label}: {problem}" for problem in node_problems]
        if not node_problems:
            folder = read.get("name") or node_name_from_repo(read["repo"])
            site = settings.get("writable_paths") or {}
            writable = declared(folder, node_name_from_repo(read["repo"]), read.get("writable", []), site)
            nodes.append(Source(folder, read["repo"], read["version"], tuple(writable)))
    flavors = torch_flavors or {}
    flavor_name = env.get("torch_flavor", default_torch_flavor)
    flavor: dict[str, Any] = {}
    if flavor_name in flavors:
        entry = flavors[flavor_name]
        flavor_problems: list[str] = []
        if isinstance(entry, Mapping):
            flavor = _read(entry, FLAVOR_KEYS, "a torch flavour", flavor_problems)
            if "packages" not in entry:
                flavor_problems.append("packages is missing")
        else:
            flavor_problems.append(f"must be a mapping of {', '.join(FLAVOR_KEYS)}, got {yaml_kind(entry)}")
        problems += [f"torch flavour {flavor_name} (torch_flavors): {problem}" for problem in flavor_problems]
    elif "torch_packages" not in written:
        problems.append(
            f"torch flavour {flavor_name or '(none)'} is not in torch_flavors ({', '.join(flavors) or 'none'});"
            " pick one with torch_flavor, or set torch_packages"
        )
    if problems:
        raise EnvError(f"{where}: {problems[0]}" if len(problems) == 1 else f"{where}:\n- " + "\n- ".join(problems))
    xformers = [flavor["xformers"]] if env.get("xformers") and "xformers" in flavor else []
    hook = None
    if "hook" in env:
        hook = os.path.join(config_dir, HOOK_FILE) if config_dir else env["hook"]
    return Spec(
        name=name,
        comfyui=Source("ComfyUI", env["comfyui_repo"], env["comfyui_version"]),
        custom_nodes=nodes,
        allow_moving_refs=env.get("allow_moving_refs", False),
        torch_flavor=flavor_name,
        torch_packages=env.get("torch_packages", flavor.get("packages", []) + xformers),
        torch_index_url=env.get("torch_index_url", flavor.get("index_url")),
        protected_packages=[*protected_packages, *env.get("protected_packages", [])],
        pip_constraints=env.get("pip_constraints", []),
        pip_packages=env.get("pip_packages", []),
        allow_source_builds=env.get("allow_source_builds", False),
        allow_direct_references=env.get("allow_direct_references", False),
        allow_submodules=env.get("allow_submodules", False),
        hook=hook,
        hook_as_root=env.get("hook_as_root", False),
        revision=env.get("revision", ""),
        extra_model_paths=os.path.join(config_dir, MODEL_PATHS_FILE) if config_dir else None,
        import_gate=env.get("import_gate", import_gate),
        **settings,
    )


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
    allowlist = allowlist_entries(where, spec.allowed_repos)
    check_mirrors(where, spec.git_mirrors)
    check_repo(where, "ComfyUI", spec.comfyui.repo, [])
    if not spec.comfyui.version:
        raise EnvError(f"{where}: comfyui_version is empty; pin a tag (v0.8.0) or a full commit")
    _check_version(where, "ComfyUI", spec.comfyui.version)
    seen: dict[str, str] = {}
    for node in spec.custom_nodes:
        label = f"{where}: custom node {node.name}"
        if not _NODE_NAME.match(node.name) or node.name in {"__pycache__"}:
            raise EnvError(f"{label}: invalid directory name; set name: to letters, digits, '.', '_' or '-'")
        check_node_folder(where, node, COMFYUI_MODULES)
        if node.name in seen:
            raise EnvError(
                f"{where}: custom nodes {seen[node.name]} and {node.repo} both install as {node.name}; set name: on one"
            )
        seen[node.name] = node.repo
        check_repo(where, f"custom node {node.name}", node.repo, allowlist)
        _check_version(where, f"custom node {node.name}", node.version)
        if not COMMIT.match(node.version) and not spec.allow_moving_refs:
            raise EnvError(
                f"{label}: version must be a full 40-hex commit (got {node.version!r}); pin the commit,"
                " or set allow_moving_refs: true for this environment"
            )
    for name, paths in spec.writable_paths.items():
        if not (isinstance(paths, (list, tuple)) and all(isinstance(path, str) for path in paths)):
            raise EnvError(
                f"{where}: writable_paths (comfyui_environments_writable_paths) must map a node folder or"
                f" repository name to a list of paths, got {name!r}: {yaml_kind(paths)}"
            )
    for node in spec.custom_nodes:
        for path in node.writable:
            why = writable_problem(node.name, path)
            if why:
                raise EnvError(
                    f"{where}: writable path {path!r} of custom node {node.name} {why}; declare paths such as"
                    " settings.json, cache/ or ../../web/extensions/<name>/ (custom node writable:, or"
                    " comfyui_environments_writable_paths)"
                )
    for entry in spec.torch_packages:
        torch_constraint(where, entry)
    for key, lines in (("pip_packages", spec.pip_packages), ("pip_constraints", spec.pip_constraints)):
        for line in lines:
            why = direct_reference(line)
            if why and (line.lstrip().startswith("-") or not spec.allow_direct_references):
                raise EnvError(
                    f"{where}: {key} entry {line!r} {why}; write a requirement such as numpy<2"
                    + ("" if line.lstrip().startswith("-") else ", or set allow_direct_references: true")
                )
    if spec.keep_releases < 1:
        raise EnvError(f"{where}: keep_releases must be at least 1 (got {spec.keep_releases})")
    for module, package in spec.import_names.items():
        if not (isinstance(module, str) and module.isidentifier() and isinstance(package, str) and package.strip()):
            raise EnvError(
                f"{where}: import_names (comfyui_environments_import_names) must map a top-level import name"
                f" to the distribution that provides it (cv2: opencv-python), got {module!r}: {package!r}"
            )
    if check_mode:
        return
    if spec.hook and not os.path.isfile(spec.hook):
        raise EnvError(f"{where}: hook {spec.hook} does not exist on the host")
    if spec.wheelhouse and not os.path.isdir(spec.wheelhouse):
        raise EnvError(f"{where}: wheelhouse {spec.wheelhouse} is not a directory on the host; push it first")


# Folder names a custom node must not take: ComfyUI's own top-level modules and packages (and the
# folders it keeps beside them). ComfyUI imports a custom node under its folder name, so a node
# called `comfy` or `nodes` replaces ComfyUI's module of that name and breaks it without an error
# that names the cause. This list is checked before any checkout; the build checks the top level of
# the checked-out ComfyUI as well (`comfyui_modules`), so names a later ComfyUI adds are refused too.
COMFYUI_MODULES = frozenset(
    {
        "alembic_db", "api_server", "app", "comfy", "comfy_api", "comfy_api_nodes", "comfy_config",
        "comfy_execution", "comfy_extras", "comfyui_version", "cuda_malloc", "custom_nodes", "execution",
        "folder_paths", "hook_breaker_ac10a0", "latent_preview", "main", "middleware", "model_management",
        "new_updater", "node_helpers", "nodes", "protocol", "server", "utils",
    }
)  # fmt: skip


def comfyui_modules(comfyui: str) -> set[str]:
    """The top-level modules and packages of a ComfyUI checkout: its `.py` files and folders."""
    names: set[str] = set()
    for entry in os.listdir(comfyui):
        if entry.startswith("."):
            continue
        if entry.endswith(".py"):
            names.add(entry[:-3])
        elif os.path.isdir(os.path.join(comfyui, entry)):
            names.add(entry)
    return names


def check_node_folder(where: str, node: Source, taken: Sequence[str] | frozenset[str] | set[str]) -> None:
    """Refuse a node folder that shadows one of ComfyUI's modules, or that ComfyUI skips."""
    if node.name in taken:
        raise EnvError(
            f"{where}: custom node {node.name} ({node.repo}) would be installed as custom_nodes/{node.name}, the name"
            f" of ComfyUI's own module {node.name}, which the node would replace and so break ComfyUI without a"
            f" clear error; set name: on this custom node to another folder name (for example ComfyUI-{node.name})"
        )
    if node.name.endswith(".disabled"):
        raise EnvError(
            f"{where}: custom node {node.name} ({node.repo}): ComfyUI skips folders whose name ends in .disabled;"
            " set name: on this custom node to another folder name, or remove the node"
        )


# Git URLs comfybake accepts. https, ssh (ssh:// and scp-like user@host:path) and local repositories
# (file:// or an absolute path); http:// and git:// are refused, as neither authenticates the server
# nor protects what it sends. Git itself is held to the same list (GIT_ALLOW_PROTOCOL in gitcache).
GIT_PROTOCOLS = ("https", "ssh", "file")
_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*$")
_IPV6 = re.compile(r"^\[[0-9A-Fa-f:.]+\]$")
_SCP = re.compile(r"^(?:(?P<user>[A-Za-z0-9._-]+)@)?(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):(?P<path>.*)$")
_USER = re.compile(r"^[A-Za-z0-9._-]+$")
_UNSAFE = re.compile(r"[\x00-\x20\x7f\\%?#]")
_DEFAULT_PORTS = {"https": "443", "ssh": "22"}


@dataclass(frozen=True)
class RepoUrl:
    """A git URL taken apart: what the allowlist compares. `path` has no empty, '.' or '..' segment,
    and its last segment no `.git`."""

    scheme: str
    user: str
    host: str  # lower case, with a port other than the scheme's default
    path: tuple[str, ...]


def parse_repo_url(url: str, *, prefix: bool = False) -> RepoUrl:
    """A git URL of a known kind, or ValueError saying why not.

    `prefix` accepts a URL that stops at a host or a folder (an allowlist entry, a mirror target).
    """
    if not isinstance(url, str) or not url:
        raise ValueError("is empty")
    if url.startswith("-"):
        raise ValueError("starts with '-', which git would read as an option")
    if _UNSAFE.search(url):
        raise ValueError("contains a space, a control character, a backslash, '%', '?' or '#'")
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*::", url):
        raise ValueError("names a git remote helper (<transport>::<address>), which runs a program")
    if "://" in url:
        scheme = url.split("://", 1)[0].lower()
        if scheme not in GIT_PROTOCOLS:
            raise ValueError(
                f"uses {scheme}://; comfybake accepts https://, ssh:// (or user@host:path), file:// and absolute paths"
            )
        parts = urlsplit(url)
        user = parts.username or ""
        if parts.password is not None or (user and scheme != "ssh"):
            raise ValueError("embeds credentials in its URL")
        if scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise ValueError("names a host; a file:// URL is file:///absolute/path")
            host = ""
        else:
            host = _host(parts.hostname or "", parts.netloc)
            try:
                port = parts.port
            except ValueError:
                raise ValueError("has an invalid port") from None
            if port is not None and str(port) != _DEFAULT_PORTS[scheme]:
                host = f"{host}:{port}"
        if user and not _USER.fullmatch(user):
            raise ValueError("has an invalid user name")
        return RepoUrl(scheme, user, host, _segments(parts.path, prefix))
    if url.startswith("/"):
        return RepoUrl("file", "", "", _segments(url, prefix))
    match = _SCP.fullmatch(url)
    if match and "/" not in url.split(":", 1)[0]:
        path = match.group("path")
        if path.startswith("-"):
            raise ValueError("has a path that starts with '-'")
        return RepoUrl("ssh", match.group("user") or "", _host(match.group("host"), url), _segments(path, prefix))
    raise ValueError(
        "is not a git URL comfybake accepts: https://host/path, ssh://host/path, user@host:path, file:///path or /path"
    )


def _host(host: str, written: str) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # urlsplit drops an IPv6 address's brackets
    if not host or not (_HOST.fullmatch(host) or _IPV6.fullmatch(host)):
        raise ValueError(f"has no valid host name ({written.split('/')[0] or written})")
    return host.lower()


def _segments(path: str, prefix: bool) -> tuple[str, ...]:
    parts = path.strip("/").split("/") if path.strip("/") else []
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError("has an empty, '.' or '..' segment in its path")
    if not parts and not prefix:
        raise ValueError("names no repository")
    if parts and parts[-1].endswith(".git"):
        parts[-1] = parts[-1][:-4]
    return tuple(parts)


def allowed(url: RepoUrl, entry: RepoUrl) -> bool:
    """Whether an allowlist entry admits a URL: same scheme, user (when the entry names one) and
    host, and the entry's path segments are the URL's first ones, each matched exactly."""
    return (
        url.scheme == entry.scheme
        and (not entry.user or url.user == entry.user)
        and url.host == entry.host
        and url.path[: len(entry.path)] == entry.path
    )


def allowlist_entries(where: str, written: Sequence[str]) -> list[tuple[str, RepoUrl]]:
    entries = []
    for entry in written:
        try:
            entries.append((entry, parse_repo_url(entry, prefix=True)))
        except ValueError as why:
            raise EnvError(
                f"{where}: allowed_repos entry {redact(str(entry))!r} {why}; write an entry such as"
                " https://github.com/owner (an owner) or https://github.com/owner/repo (one repository)"
            ) from None
    return entries


def check_repo(where: str, what: str, repo: str, allowlist: Sequence[tuple[str, RepoUrl]]) -> RepoUrl:
    """Refuse a repository URL of an unknown kind, with credentials, or outside the allowlist."""
    if not repo:
        raise EnvError(f"{where}: {what} has no repository URL")
    try:
        url = parse_repo_url(repo)
    except ValueError as why:
        if "credentials" in str(why):
            raise EnvError(
                f"{where}: {what} repository {redact(repo)} embeds credentials in its URL; use an SSH key"
                " or a git credential helper instead"
            ) from None
        raise EnvError(f"{where}: {what} repository {redact(repo)!r} {why}") from None
    if allowlist and not any(allowed(url, entry) for _written, entry in allowlist):
        raise EnvError(
            f"{where}: {what} repository {repo} is not allowlisted (allowed_repos:"
            f" {', '.join(written for written, _entry in allowlist)}); an entry admits its scheme, host and path"
            " segments exactly (https://github.com/owner admits that owner's repositories, not owner-other's):"
            " check the owner name, or add the repository to allowed_repos"
        )
    return url


def check_mirrors(where: str, mirrors: Mapping[str, str]) -> None:
    """A mirror rewrites URL prefixes (git's insteadOf): its target must be a git URL of a known kind."""
    for prefix, target in mirrors.items():
        try:
            if not isinstance(prefix, str) or not prefix or prefix.startswith("-") or _UNSAFE.search(prefix):
                raise ValueError(f"has a prefix {prefix!r} that is empty, starts with '-' or holds unsafe characters")
            if not isinstance(target, str):
                raise ValueError("must be a string")
            parse_repo_url(target, prefix=True)
            if "=" in target:
                raise ValueError("must be a string without '='")
        except ValueError as why:
            raise EnvError(
                f"{where}: git mirror {redact(str(prefix))} -> {redact(str(target))} {why}"
                " (comfyui_environments_git_mirrors maps URL prefixes to https://, ssh:// or file:// mirrors)"
            ) from None


_REF = re.compile(r"^[^\x00-\x20\x7f~^:?*\[\\-][^\x00-\x20\x7f~^:?*\[\\]*$")


def _check_version(where: str, what: str, version: str) -> None:
    if not _REF.fullmatch(version) or ".." in version or version.endswith((".", "/", ".lock")):
        raise EnvError(
            f"{where}: {what}: version {version!r} is not a tag, branch or commit name"
            " (it must not start with '-' or hold spaces or any of ~^:?*[\\)"
        )


def torch_constraint(where: str, entry: str) -> str:
    """`torch==2.13.0+cpu` stays as is; a wheel path or URL becomes `name==version`."""
    base = entry.rsplit("/", 1)[-1]
    if base.endswith(".whl"):
        parts = base.split("-")
        if len(parts) < 5:
            raise EnvError(f"{where}: torch package {entry!r} is not a wheel file name (name-version-tags.whl)")
        return f"{canonical_name(parts[0])}=={parts[1]}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[^=<>!~,;\s]+", entry):
        raise EnvError(
            f"{where}: torch package {entry!r} must be an exact pin such as torch==2.13.0+cpu, or a wheel file"
        )
    return entry
