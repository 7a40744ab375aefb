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

from .errors import EnvError, redact
from .requirements import canonical_name
from .writable import COMFYUI, declared
from .writable import problem as writable_problem

COMMIT = re.compile(r"^[0-9a-f]{40}\Z")  # \Z, not $: $ also matches before a final line break
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")


@dataclass(frozen=True)
class Source:
    """A git repository pinned to a version (a full commit, a tag, or an allowed branch)."""

    name: str
    repo: str
    version: str
    # Paths the tree writes inside its own folder (writable.py), a trailing / for a folder.
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
    # Import name -> distribution, for the import gate's diagnosis (beside imports.DISTRIBUTIONS).
    import_names: dict[str, str] = field(default_factory=dict)
    # Node folder or repository name (or ComfyUI) -> paths it writes, before writable.KNOWN.
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
    "hook": (_text, "the path of a script on the controller, a string"),
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
        comfyui=Source(
            "ComfyUI",
            env["comfyui_repo"],
            env["comfyui_version"],
            tuple(declared(COMFYUI, "", [], settings.get("writable_paths") or {})),
        ),
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
        hook=hook,
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
    for name, paths in spec.writable_paths.items():
        if not (isinstance(paths, (list, tuple)) and all(isinstance(path, str) for path in paths)):
            raise EnvError(
                f"{where}: writable_paths (comfyui_environments_writable_paths) must map a node folder or"
                f" repository name (or ComfyUI) to a list of paths, got {name!r}: {yaml_kind(paths)}"
            )
    for tree in (spec.comfyui, *spec.custom_nodes):
        for path in tree.writable:
            why = writable_problem(path)
            if why:
                raise EnvError(
                    f"{where}: writable path {path!r} of {tree.name} {why}; declare paths such as settings.json"
                    " or cache/ (custom node writable:, or comfyui_environments_writable_paths)"
                )
    for entry in spec.torch_packages:
        torch_constraint(where, entry)
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
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[^=<>!~,;\s]+", entry):
        raise EnvError(
            f"{where}: torch package {entry!r} must be an exact pin such as torch==2.13.0+cpu, or a wheel file"
        )
    return entry
