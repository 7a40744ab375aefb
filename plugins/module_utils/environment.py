# Copyright: comfybake contributors
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""Build ComfyUI environments as releases: pinned ComfyUI, pinned custom nodes, one venv.

Private to comfybake: the `comfybake.core.environment` module runs it on managed hosts and the
`comfybake` package imports it on the controller (through a link), so it needs only the
standard library, `git` and `uv`, and runs on Python 3.10+.

An environment lives in `<root>`:

    <root>/current -> releases/<id>         the live release, switched atomically
    <root>/releases/<id>/ComfyUI/            ComfyUI checkout, custom_nodes/<name>/ checkouts
    <root>/releases/<id>/venv/               the release's own venv
    <root>/releases/<id>/comfybake.lock.json what was built (read by the status tooling)
    <root>/releases/<id>/requirements.lock.txt  the resolved set with hashes (uv pip compile)

`<id>` is derived from every input that shapes the build (the fingerprint), so a run whose
inputs match the live release's lock changes nothing. A release is built next to the live
one, checked (one resolution of all requirements with torch held as a constraint, `uv pip
check`, and ComfyUI's `--quick-test-for-ci` import gate) and only then made live. A release
still being built carries the marker file `.comfybake-building` and is removed when its
build fails.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

SCHEMA = 1
LOCK_NAME = "comfybake.lock.json"
RESOLVED_NAME = "requirements.lock.txt"
BUILDING_MARKER = ".comfybake-building"
DEFAULT_PROTECTED = ("torch", "torchvision", "torchaudio", "xformers")

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_REQ_NAME = re.compile(r"^\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)")
_USERINFO = re.compile(r"(://)[^/@\s]+@")
_IMPORT_FAILED = re.compile(r"\(IMPORT FAILED\):\s*(\S.*?)\s*$")
_CANNOT_IMPORT = re.compile(r"Cannot import (\S.*?) module for custom nodes:\s*(.*)$")


class EnvError(Exception):
    """A failure the user can act on; the message names the item, the cause and the fix."""


def redact(text: str) -> str:
    """Drop credentials embedded in URLs (`https://user:token@host` -> `https://***@host`)."""
    return _USERINFO.sub(r"\1***@", text)


def canonical_name(name: str) -> str:
    """PEP 503 normalisation of a distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(line: str) -> str | None:
    match = _REQ_NAME.match(line)
    return canonical_name(match.group(1)) if match else None


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# --------------------------------------------------------------------------- the inputs


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
        if not _COMMIT.match(node.version) and not spec.allow_moving_refs:
            raise EnvError(
                f"{label}: version must be a full 40-hex commit (got {node.version!r}); pin the commit,"
                " or set allow_moving_refs: true for this environment"
            )
    for entry in spec.torch_packages:
        _torch_constraint(where, entry)
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


def _torch_constraint(where: str, entry: str) -> str:
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


# --------------------------------------------------------------------------- processes


def run(
    args: Sequence[str],
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    user: str | None = None,
    merge: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output (stderr into stdout with `merge`); the caller judges failure."""
    kwargs: dict[str, Any] = {}
    if user is not None and os.geteuid() == 0:
        kwargs.update(user=user, group=_primary_group(user), extra_groups=[])
    try:
        process = subprocess.Popen(
            list(args),
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge else subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
            **kwargs,
        )
    except OSError as exc:
        raise EnvError(f"cannot run {args[0]}: {exc}") from exc
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise EnvError(f"{args[0]} did not finish within {timeout} s; output:\n{_tail(stdout or '')}") from None
    return subprocess.CompletedProcess(list(args), process.returncode, stdout or "", stderr or "")


def _primary_group(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_gid


# --------------------------------------------------------------------------- git


class Git:
    """Pinned checkouts through a cache of bare repositories (one per URL) on the host."""

    def __init__(self, cache: str, mirrors: Mapping[str, str], ca_bundle: str | None) -> None:
        self.cache = cache
        self.config: list[str] = []
        for prefix, target in sorted(mirrors.items()):
            self.config += ["-c", f"url.{target}.insteadOf={prefix}"]
        self.env = {
            **os.environ,
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_ASKPASS": "/bin/false",
            "LC_ALL": "C",
        }
        if ca_bundle:
            self.env["GIT_SSL_CAINFO"] = ca_bundle

    def git(self, *args: str, cwd: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = run(["git", *self.config, *args], cwd=cwd, env=self.env)
        if check and done.returncode != 0:
            raise EnvError(redact(f"git {' '.join(args)} failed: {_tail(done.stderr)}"))
        return done

    def bare(self, repo: str) -> str:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", node_name_from_repo(repo))[:48]
        return os.path.join(self.cache, f"{slug}-{hashlib.sha256(repo.encode()).hexdigest()[:12]}.git")

    def _has_commit(self, bare: str, rev: str) -> str | None:
        if not os.path.isdir(bare):
            return None
        done = self.git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", cwd=bare, check=False)
        return done.stdout.strip() if done.returncode == 0 else None

    def _fetch(self, bare: str, repo: str, *refspecs: str) -> subprocess.CompletedProcess[str]:
        if not os.path.isdir(bare):
            os.makedirs(os.path.dirname(bare), mode=0o700, exist_ok=True)
            self.git("init", "--quiet", "--bare", bare)
        specs = refspecs or ("+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*")
        return self.git("fetch", "--quiet", "--prune", "--no-write-fetch-head", repo, *specs, cwd=bare, check=False)

    def resolve(self, what: str, source: Source, allow_moving: bool, dry_run: bool) -> tuple[str, str]:
        """The commit a pin names, and its kind (commit, tag or branch); fetches only when needed."""
        repo, version = source.repo, source.version
        bare = self.bare(repo)
        if _COMMIT.match(version):
            if self._has_commit(bare, version) or dry_run:
                return version, "commit"
            fetched = self._fetch(bare, repo)
            if not self._has_commit(bare, version):
                self._fetch(bare, repo, version)
            if not self._has_commit(bare, version):
                cause = f"; git said: {_tail(fetched.stderr, 3)}" if fetched.returncode else ""
                raise EnvError(
                    redact(
                        f"{what}: commit {version} not found in {repo} (repository deleted or history rewritten)"
                        f"{cause}. Pin a commit that exists, or point a git mirror at a copy that still has it"
                    )
                )
            return version, "commit"
        tag = self._has_commit(bare, f"refs/tags/{version}")
        if tag and not allow_moving:
            return tag, "tag"
        if dry_run:
            return self._ls_remote(what, repo, version, allow_moving)
        fetched = self._fetch(bare, repo)
        if fetched.returncode != 0:
            raise EnvError(redact(f"{what}: cannot fetch {repo}: {_tail(fetched.stderr, 5)}"))
        tag = self._has_commit(bare, f"refs/tags/{version}")
        if tag:
            return tag, "tag"
        branch = self._has_commit(bare, f"refs/heads/{version}")
        if branch:
            if not allow_moving:
                raise EnvError(_moving(what, version))
            return branch, "branch"
        raise EnvError(f"{what}: {repo} has no tag or branch {version!r}; pin an existing tag or a full commit")

    def _ls_remote(self, what: str, repo: str, version: str, allow_moving: bool) -> tuple[str, str]:
        done = self.git("ls-remote", repo, f"refs/tags/{version}", f"refs/tags/{version}^{{}}", f"refs/heads/{version}")
        refs: dict[str, str] = {}
        for line in done.stdout.splitlines():
            sha, _tab, ref = line.partition("\t")
            refs[ref] = sha
        for ref, kind in ((f"refs/tags/{version}^{{}}", "tag"), (f"refs/tags/{version}", "tag")):
            if ref in refs:
                return refs[ref], kind
        if f"refs/heads/{version}" in refs:
            if not allow_moving:
                raise EnvError(_moving(what, version))
            return refs[f"refs/heads/{version}"], "branch"
        raise EnvError(f"{what}: {repo} has no tag or branch {version!r}; pin an existing tag or a full commit")

    def checkout(self, repo: str, commit: str, dest: str, exclude: Sequence[str] = ()) -> None:
        """A detached work tree at `commit`, cloned from the cache (objects are hard-linked)."""
        self.git("clone", "--quiet", "--no-checkout", self.bare(repo), dest)
        self.git("checkout", "--quiet", "--detach", commit, cwd=dest)
        self.git("remote", "set-url", "origin", repo, cwd=dest)
        if os.path.isfile(os.path.join(dest, ".gitmodules")):
            done = self.git("submodule", "update", "--init", "--recursive", "--quiet", cwd=dest, check=False)
            if done.returncode != 0:
                raise EnvError(redact(f"{dest}: submodules of {repo} cannot be fetched: {_tail(done.stderr, 5)}"))
        with open(os.path.join(dest, ".git", "info", "exclude"), "a", encoding="utf-8") as handle:
            handle.write("\n# comfybake\n__pycache__/\n*.py[co]\n" + "".join(f"{line}\n" for line in exclude))

    def state(self, path: str) -> tuple[str, list[str]]:
        """HEAD and the changed files of a work tree (untracked ones included)."""
        head = self.git("rev-parse", "HEAD", cwd=path).stdout.strip()
        status = self.git("status", "--porcelain", "--untracked-files=all", cwd=path).stdout
        return head, [line[3:] for line in status.splitlines() if line.strip()]


def _moving(what: str, version: str) -> str:
    return (
        f"{what}: version {version!r} is a branch, which moves; pin a tag or a full commit,"
        " or set allow_moving_refs: true for this environment"
    )


# --------------------------------------------------------------------------- requirements


@dataclass
class Requirements:
    """One requirement source: a label for messages, the file given to uv, its lines."""

    label: str
    file: str
    lines: list[str]

    def names(self) -> set[str]:
        return {name for name in map(requirement_name, self.lines) if name}


def read_requirements(label: str, path: str, spec: Spec) -> list[str]:
    """The requirement lines of a file, refusing installer options and (by default) direct references."""
    if not os.path.isfile(path):
        return []
    lines: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, raw in enumerate(handle, 1):
            line = re.sub(r"(^|\s)#.*$", "", raw).strip()
            if not line:
                continue
            where = f"{label}: {os.path.basename(path)} line {number} {line!r}"
            if line.startswith("-"):
                raise EnvError(
                    f"{where} is an installer option; comfybake resolves every environment against its own"
                    " indexes. Add what it needs to pip_packages (or an index to the environment), and drop the line"
                    " by pinning a fork of the node"
                )
            direct = "://" in line or line.startswith(("git+", ".", "/")) or re.search(r"\s@\s", line)
            if direct and not spec.allow_direct_references:
                raise EnvError(
                    f"{where} is a direct reference (URL or path), which bypasses the indexes and hashes;"
                    " set allow_direct_references: true for this environment to accept it"
                )
            lines.append(line)
    return lines


@dataclass
class Resolved:
    """One package of the resolved set."""

    name: str
    version: str
    hashes: list[str]
    via: list[str]


def parse_compiled(text: str) -> dict[str, Resolved]:
    """Read `uv pip compile --generate-hashes` output."""
    found: dict[str, Resolved] = {}
    current: Resolved | None = None
    for raw in text.splitlines():
        line = raw.strip()
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*(?:==\s*([^\s\\;]+)|@\s*(\S+))", raw)
        if match:
            version = match.group(2) or match.group(3)
            current = Resolved(canonical_name(match.group(1)), version, [], [])
            found[current.name] = current
        elif current and line.startswith("--hash="):
            current.hashes.append(line.split("=", 1)[1].rstrip(" \\"))
        elif current and line.startswith("#"):
            via = line.lstrip("#").strip()
            via = via[4:] if via.startswith("via ") else via
            if via and via != "via":
                current.via.append(via)
    return found


# --------------------------------------------------------------------------- the build


@dataclass
class Pins:
    """The resolved git pins of one run."""

    comfyui: str
    comfyui_kind: str
    nodes: dict[str, str]

    def summary(self, spec: Spec) -> dict[str, Any]:
        """The part of a lock these pins determine (also what a diff shows)."""
        return {
            "comfyui": {
                "repo": spec.comfyui.repo,
                "version": spec.comfyui.version,
                "kind": self.comfyui_kind,
                "commit": self.comfyui,
            },
            "custom_nodes": [
                {"name": node.name, "repo": node.repo, "version": node.version, "commit": self.nodes[node.name]}
                for node in spec.custom_nodes
            ],
            "torch": {"flavor": spec.torch_flavor, "packages": spec.torch_packages, "index_url": spec.torch_index_url},
            "pip_constraints": spec.pip_constraints,
            "pip_packages": spec.pip_packages,
        }


@dataclass
class Result:
    changed: bool
    release: str
    fingerprint: str
    previous: str | None
    lock: dict[str, Any]
    diff: dict[str, str] | None = None
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


class Builder:
    """Brings one environment in line with its Spec."""

    def __init__(self, spec: Spec) -> None:
        # uv runs from inside releases: a relative or bare name must not depend on the cwd.
        spec.uv = os.path.abspath(shutil.which(spec.uv) or spec.uv)
        self.spec = spec
        self.root = spec.root
        self.releases = os.path.join(spec.root, "releases")
        self.current = os.path.join(spec.root, "current")
        self.git = Git(
            spec.git_cache or os.path.join(spec.root, ".git-cache"),
            spec.git_mirrors,
            spec.ca_bundle,
        )
        self.warnings: list[str] = []
        self.timings: dict[str, float] = {}

    # ----------------------------------------------------------------- public

    def run(self, check_mode: bool = False) -> Result:
        validate(self.spec, check_mode)
        with self._locked(check_mode):
            pins = self._timed("resolve pins", lambda: self._pins(dry_run=check_mode))
            fingerprint = self.fingerprint(pins)
            live = self.live_lock()
            if live and live.get("fingerprint") == fingerprint:
                self._timed("verify live release", lambda: self._verify_live(live))
                return self._result(False, live, None)
            diff = {
                "before": describe(live) if live else "",
                "after": describe(pins.summary(self.spec)),
                "before_header": f"{self.spec.name} (live)",
                "after_header": f"{self.spec.name} (wanted)",
            }
            if check_mode:
                lock = {"fingerprint": fingerprint, "release": os.path.join(self.releases, fingerprint[:16])}
                return self._result(True, lock, diff)
            lock = self._build(pins, fingerprint)
            self._switch(lock["release"])
            self._prune(lock["release"])
            return self._result(True, lock, diff, previous=live.get("release") if live else None)

    def fingerprint(self, pins: Pins) -> str:
        spec = self.spec
        hook = ""
        if spec.hook and os.path.isfile(spec.hook):
            with open(spec.hook, "rb") as handle:
                hook = hashlib.sha256(handle.read()).hexdigest()
        inputs = {
            "schema": SCHEMA,
            "python": _python_identity(spec.python),
            "comfyui": [spec.comfyui.repo, pins.comfyui],
            "custom_nodes": [[node.name, node.repo, pins.nodes[node.name]] for node in spec.custom_nodes],
            "torch": [spec.torch_flavor, spec.torch_packages],
            "protected": sorted(self.protected()),
            "pip_constraints": spec.pip_constraints,
            "pip_packages": spec.pip_packages,
            "allow_source_builds": spec.allow_source_builds,
            "allow_direct_references": spec.allow_direct_references,
            "hook": hook,
            "revision": spec.revision,
        }
        return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()

    def protected(self) -> set[str]:
        names = {canonical_name(n) for n in (*DEFAULT_PROTECTED, *self.spec.protected_packages)}
        names.update(n for n in map(requirement_name, self.spec.torch_packages) if n)
        return names

    def live_lock(self) -> dict[str, Any] | None:
        path = os.path.join(self.current, LOCK_NAME)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as handle:
            lock: dict[str, Any] = json.load(handle)
        lock["release"] = os.path.realpath(self.current)
        return lock

    # ----------------------------------------------------------------- steps

    def _timed(self, what: str, step: Any) -> Any:
        started = time.monotonic()
        try:
            return step()
        finally:
            self.timings[what] = round(time.monotonic() - started, 3)

    @contextmanager
    def _locked(self, check_mode: bool) -> Iterator[None]:
        if check_mode and not os.path.isdir(self.root):
            yield
            return
        os.makedirs(self.root, mode=0o755, exist_ok=True)
        with open(os.path.join(self.root, ".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def _pins(self, dry_run: bool) -> Pins:
        spec = self.spec
        where = f"environment {spec.name}"
        if dry_run and shutil.which("git") is None:
            # A fresh host in check mode: the comfyui role installs git first.
            self.warnings.append("git is not installed yet, so check mode could not resolve tags and branches")
            return Pins(spec.comfyui.version, "unresolved", {node.name: node.version for node in spec.custom_nodes})
        commit, kind = self.git.resolve(f"{where}: ComfyUI", spec.comfyui, spec.allow_moving_refs, dry_run)
        nodes = {
            node.name: self.git.resolve(f"{where}: custom node {node.name}", node, spec.allow_moving_refs, dry_run)[0]
            for node in spec.custom_nodes
        }
        return Pins(commit, kind, nodes)

    def _verify_live(self, lock: dict[str, Any]) -> None:
        release = lock["release"]
        comfyui = os.path.join(release, "ComfyUI")
        trees = [("ComfyUI", comfyui, lock["comfyui"]["commit"])]
        trees += [
            (f"custom_nodes/{node['name']}", os.path.join(comfyui, "custom_nodes", node["name"]), node["commit"])
            for node in lock["custom_nodes"]
        ]
        for label, path, commit in trees:
            head, changed = self.git.state(path)
            if head != commit or changed:
                detail = f"HEAD is {head}, the lock says {commit}" if head != commit else ", ".join(changed[:10])
                raise EnvError(
                    f"environment {self.spec.name}: local modifications in {label} ({path}): {detail}."
                    " comfybake never overwrites them: commit them to a fork and pin it, or undo them"
                    " (git -C <path> checkout -- . && git clean -fd), then re-run"
                )
        if not os.access(os.path.join(release, "venv", "bin", "python"), os.X_OK):
            raise EnvError(
                f"environment {self.spec.name}: the live release {release} has no venv; set revision: to rebuild"
            )

    def _build(self, pins: Pins, fingerprint: str) -> dict[str, Any]:
        release = os.path.join(self.releases, fingerprint[:16])
        if os.path.lexists(release):
            shutil.rmtree(release)  # an unfinished build, or an old release that is not live
        os.makedirs(release, mode=0o755)
        with open(os.path.join(release, BUILDING_MARKER), "w", encoding="utf-8") as marker:
            marker.write(f"pid {os.getpid()} started {_now()}\n")
        try:
            lock = self._build_into(release, pins, fingerprint)
        except BaseException:
            shutil.rmtree(release, ignore_errors=True)
            raise
        os.unlink(os.path.join(release, BUILDING_MARKER))
        return lock

    def _build_into(self, release: str, pins: Pins, fingerprint: str) -> dict[str, Any]:
        spec = self.spec
        comfyui = os.path.join(release, "ComfyUI")

        def checkout() -> None:
            names = [f"/custom_nodes/{node.name}/" for node in spec.custom_nodes]
            self.git.checkout(spec.comfyui.repo, pins.comfyui, comfyui, exclude=names)
            for node in spec.custom_nodes:
                self.git.checkout(node.repo, pins.nodes[node.name], os.path.join(comfyui, "custom_nodes", node.name))
                if os.path.isfile(os.path.join(comfyui, "custom_nodes", node.name, "install.py")):
                    self.warnings.append(
                        f"custom node {node.name} has an install.py, which comfybake does not run;"
                        " declare what it installs in pip_packages"
                    )

        self._timed("checkout", checkout)
        sources = self._timed("collect requirements", lambda: self._collect(release, comfyui))
        venv = os.path.join(release, "venv")
        self._timed("create venv", lambda: self._uv("venv", "--quiet", "--relocatable", "--python", spec.python, venv))
        python = os.path.join(venv, "bin", "python")
        compiled = self._timed("resolve", lambda: self._resolve(release, python, sources))
        self._timed(
            "install",
            lambda: self._uv(
                "pip", "sync", "--quiet", "--python", python, *self._index_args(), RESOLVED_NAME, cwd=release
            ),
        )
        if spec.hook:
            self._timed("hook", lambda: self._hook(release, venv, comfyui))
        self._timed("dependency check", lambda: self._pip_check(python))
        run([python, "-m", "compileall", "-q", "-j", "0", comfyui], env=self._env())
        if spec.import_gate:
            self._timed("import gate", lambda: self._gate(release, python, comfyui))
        installed = json.loads(self._uv("pip", "list", "--format", "json", "--python", python).stdout or "[]")
        lock = {
            "schema": SCHEMA,
            "environment": spec.name,
            "fingerprint": fingerprint,
            "built_at": _now(),
            "python": _python_identity(spec.python),
            **pins.summary(spec),
            "protected_packages": sorted(self.protected()),
            "packages": [
                {
                    "name": canonical_name(item["name"]),
                    "version": item["version"],
                    "hashes": compiled[key].hashes if (key := canonical_name(item["name"])) in compiled else [],
                    "via": compiled[key].via if key in compiled else ["installed outside the resolution (hook)"],
                }
                for item in sorted(installed, key=lambda item: canonical_name(item["name"]))
            ],
            "warnings": self.warnings,
        }
        _write_json(os.path.join(release, LOCK_NAME), lock)
        lock["release"] = release
        return lock

    def _collect(self, release: str, comfyui: str) -> list[Requirements]:
        """Write the inputs of the resolution under `<release>/inputs/`, one file per source."""
        spec = self.spec
        where = f"environment {spec.name}"
        inputs = os.path.join(release, "inputs")
        os.makedirs(inputs)
        constraints = [_torch_constraint(where, entry) for entry in spec.torch_packages] + spec.pip_constraints
        _write_lines(os.path.join(inputs, "constraints.txt"), constraints)
        sources = [
            Requirements("torch flavour " + (spec.torch_flavor or "override"), "inputs/torch.txt", spec.torch_packages)
        ]
        sources.append(
            Requirements(
                "ComfyUI",
                "inputs/comfyui.txt",
                read_requirements(f"{where}: ComfyUI", os.path.join(comfyui, "requirements.txt"), spec),
            )
        )
        sources.append(Requirements("pip_packages", "inputs/pip_packages.txt", spec.pip_packages))
        for node in spec.custom_nodes:
            path = os.path.join(comfyui, "custom_nodes", node.name, "requirements.txt")
            lines = read_requirements(f"{where}: custom node {node.name}", path, spec)
            sources.append(Requirements(f"custom node {node.name}", f"inputs/node-{node.name}.txt", lines))
        for source in sources:
            _write_lines(os.path.join(release, source.file), source.lines)
        return sources

    def _resolve(self, release: str, python: str, sources: list[Requirements]) -> dict[str, Resolved]:
        """One resolution of every source together; on failure, find and name who conflicts."""
        args = ["pip", "compile", "--quiet", "--python", python, "--generate-hashes", "--no-header"]
        args += ["--constraints", "inputs/constraints.txt", *self._index_args()]
        done = self._uv(*args, "--output-file", RESOLVED_NAME, *(s.file for s in sources), cwd=release, check=False)
        if done.returncode != 0:
            raise EnvError(self._explain_conflict(release, args, sources, done.stderr))
        with open(os.path.join(release, RESOLVED_NAME), encoding="utf-8") as handle:
            return parse_compiled(handle.read())

    def _explain_conflict(self, release: str, args: list[str], sources: list[Requirements], error: str) -> str:
        where = f"environment {self.spec.name}"

        def attempt(subset: Sequence[Requirements]) -> str | None:
            done = self._uv(*args, *(s.file for s in subset), cwd=release, check=False)
            return None if done.returncode == 0 else _uv_error(done.stderr)

        base = [s for s in sources if not s.label.startswith("custom node ")]
        nodes = [s for s in sources if s.label.startswith("custom node ") and s.lines]
        failure = attempt(base)
        if failure:
            return (
                f"{where}: the torch flavour, ComfyUI's requirements and pip_packages do not resolve together:"
                f" {failure}"
            )
        pins = ", ".join(_torch_constraint(where, e) for e in self.spec.torch_packages) or "-"
        problems: list[str] = []
        accepted: list[Requirements] = []
        for node in nodes:
            if attempt([*base, *accepted, node]) is None:
                accepted.append(node)
                continue
            alone = attempt([*base, node])
            if alone:
                touched = [line for line in node.lines if requirement_name(line) in self.protected()]
                if touched:
                    problems.append(
                        f"{node.label} requires {', '.join(touched)}, but this environment pins {pins}"
                        f" ({', '.join(sorted(self.protected()))} are protected and never changed by a node): {alone}"
                    )
                else:
                    problems.append(
                        f"{node.label} does not resolve with ComfyUI's requirements and the torch flavour: {alone}"
                    )
                continue
            partners = [(other, why) for other in accepted if (why := attempt([*base, other, node]))]
            for other, why in partners or [(accepted[-1], alone or "")]:
                shared = sorted(node.names() & other.names())
                on = f" on {', '.join(shared)}" if shared else ""
                problems.append(f"{other.label} and {node.label} conflict{on}: {why}")
        if not problems:
            problems.append(_uv_error(error))
        fix = (
            "pin a node commit that accepts this torch, or pick another torch flavour"
            if any(" protected and never changed" in problem for problem in problems)
            else "pin compatible node commits, or add a pin to pip_constraints that every node accepts"
        )
        return (
            f"{where}: the requirements do not resolve together, so nothing was installed and the live release"
            " is untouched.\n- " + "\n- ".join(problems) + f"\nFix: {fix}"
        )

    def _hook(self, release: str, venv: str, comfyui: str) -> None:
        hook = self.spec.hook or ""
        command = [hook] if os.access(hook, os.X_OK) else ["/bin/sh", hook]
        env = {
            **self._env(),
            "VIRTUAL_ENV": venv,
            "PATH": ":".join(
                (os.path.join(venv, "bin"), os.path.dirname(self.spec.uv), os.environ.get("PATH", "/usr/bin:/bin"))
            ),
            "COMFYUI_PATH": comfyui,
            "COMFYBAKE_ENVIRONMENT": self.spec.name,
            "COMFYBAKE_RELEASE": release,
        }
        done = run(command, cwd=release, env=env)
        if done.returncode != 0:
            raise EnvError(
                f"environment {self.spec.name}: hook {hook} failed with exit code {done.returncode}:"
                f"\n{redact(_tail(done.stdout + done.stderr))}"
            )

    def _pip_check(self, python: str) -> None:
        done = self._uv("pip", "check", "--python", python, check=False)
        if done.returncode != 0:
            report = [
                line
                for line in (done.stdout + done.stderr).splitlines()
                if line.strip() and not line.startswith(("Using Python", "Checked "))
            ]
            raise EnvError(
                f"environment {self.spec.name}: the dependency check (uv pip check) failed after install: "
                f"{redact(' '.join(report[-20:]))}"
            )

    def _gate(self, release: str, python: str, comfyui: str) -> None:
        """Import everything with `--quick-test-for-ci --cpu`; fail naming each node that did not import."""
        spec = self.spec
        scratch = os.path.join(release, ".gate")
        for sub in ("user", "input", "output", "temp"):
            os.makedirs(os.path.join(scratch, sub), exist_ok=True)
        for relative, source in spec.user_files.items():
            target = os.path.normpath(os.path.join(scratch, "user", relative))
            if not target.startswith(os.path.join(scratch, "user") + os.sep):
                raise EnvError(f"environment {spec.name}: user file {relative!r} must stay inside the user directory")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(source, target)
        if spec.run_as and os.geteuid() == 0:
            import pwd

            account = pwd.getpwnam(spec.run_as)
            for folder, _subdirs, _files in os.walk(scratch):
                os.chown(folder, account.pw_uid, account.pw_gid)
        args = [python, "main.py", "--quick-test-for-ci", "--cpu", "--disable-auto-launch"]
        args += [f"--{sub}-directory={os.path.join(scratch, sub)}" for sub in ("user", "input", "output", "temp")]
        args += [f"--database-url=sqlite:///{os.path.join(scratch, 'comfyui.db')}"]
        if spec.extra_model_paths:
            args += ["--extra-model-paths-config", spec.extra_model_paths]
        env = {**self._env(), "HOME": scratch, "PYTHONDONTWRITEBYTECODE": "1"}
        try:
            done = run(args, cwd=comfyui, env=env, timeout=spec.gate_timeout, user=spec.run_as, merge=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        output = done.stdout
        failed = gate_failures(output, comfyui)
        configured = {node.name for node in spec.custom_nodes}
        ours = {name: error for name, error in failed.items() if name in configured}
        if ours:
            lines = [f"- custom node {name} failed to import: {error}" for name, error in sorted(ours.items())]
            raise EnvError(
                f"environment {spec.name}: the import gate (main.py --quick-test-for-ci --cpu) failed; the live"
                " release is untouched.\n" + "\n".join(lines) + "\nFix: pin a node commit that imports, add the"
                " missing package to pip_packages, or remove the node"
            )
        if done.returncode != 0:
            raise EnvError(
                f"environment {spec.name}: ComfyUI exited with code {done.returncode} during the import gate"
                f" (main.py --quick-test-for-ci --cpu); its last lines:\n{redact(_tail(output))}"
            )
        for name in sorted(set(failed) - configured):
            self.warnings.append(f"{name} (not a configured custom node) failed to import: {failed[name]}")

    def _switch(self, release: str) -> None:
        """Point `current` at the new release in one rename."""
        link = os.path.join(self.root, ".current.new")
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(os.path.relpath(release, self.root), link)
        os.replace(link, self.current)
        _fsync_dir(self.root)

    def _prune(self, live: str) -> None:
        releases = []
        for entry in os.listdir(self.releases):
            path = os.path.join(self.releases, entry)
            if path != live and os.path.exists(os.path.join(path, BUILDING_MARKER)):
                # Left by a run that was killed; no build runs beside this one (the root is locked).
                shutil.rmtree(path, ignore_errors=True)
            elif path != live and os.path.isfile(os.path.join(path, LOCK_NAME)):
                releases.append((os.stat(os.path.join(path, LOCK_NAME)).st_mtime, path))
        for _mtime, path in sorted(releases, reverse=True)[self.spec.keep_releases - 1 :]:
            shutil.rmtree(path, ignore_errors=True)

    def _result(
        self, changed: bool, lock: dict[str, Any], diff: dict[str, str] | None, previous: str | None = None
    ) -> Result:
        return Result(changed, lock["release"], lock["fingerprint"], previous, lock, diff, self.warnings, self.timings)

    # ----------------------------------------------------------------- uv

    def _env(self) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "UV_NO_CONFIG": "1",
            "UV_PYTHON_DOWNLOADS": "never",
            "UV_NO_PROGRESS": "1",
            "UV_LINK_MODE": "hardlink",
        }
        if self.spec.cache_dir:
            env["UV_CACHE_DIR"] = self.spec.cache_dir
        if self.spec.ca_bundle:
            env["SSL_CERT_FILE"] = self.spec.ca_bundle
        spec = self.spec
        if not spec.wheelhouse:
            # URLs travel in the environment, not in argv (visible in /proc), and may hold credentials.
            if spec.index_url:
                env["UV_DEFAULT_INDEX"] = spec.index_url
            extra = [url for url in (spec.torch_index_url, *spec.extra_index_urls) if url]
            if extra:
                env["UV_INDEX"] = " ".join(extra)
        return env

    def _index_args(self) -> list[str]:
        spec = self.spec
        args = [] if spec.allow_source_builds else ["--no-build"]
        if spec.wheelhouse:
            args += ["--no-index", "--find-links", spec.wheelhouse]
        for path in spec.find_links:
            args += ["--find-links", path]
        return args

    def _uv(self, *args: str, cwd: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = run([self.spec.uv, *args], cwd=cwd, env=self._env())
        if check and done.returncode != 0:
            raise EnvError(
                f"environment {self.spec.name}: uv {args[0]} {args[1] if len(args) > 1 else ''} failed:"
                f" {redact(_tail(done.stderr or done.stdout, 20))}"
            )
        return done


# --------------------------------------------------------------------------- helpers


def gate_failures(output: str, comfyui: str) -> dict[str, str]:
    """Custom nodes ComfyUI reported as `IMPORT FAILED`, each with its error and traceback."""
    lines = output.splitlines()
    errors: dict[str, str] = {}
    for index, line in enumerate(lines):
        cannot = _CANNOT_IMPORT.search(line)
        if cannot:
            start = index
            while start > 0 and not lines[start - 1].lstrip().startswith("Traceback"):
                start -= 1
                if index - start > 40:
                    break
            trace = [text for text in lines[max(start - 1, 0) : index] if text.strip()]
            detail = cannot.group(2)
            if trace:
                detail += "\n    " + "\n    ".join(trace[-12:])
            errors[os.path.basename(cannot.group(1).rstrip("/"))] = detail
    failed: dict[str, str] = {}
    for line in lines:
        match = _IMPORT_FAILED.search(line)
        if match:
            name = os.path.basename(match.group(1).rstrip("/"))
            failed[name] = errors.get(name, "see the output of main.py --quick-test-for-ci")
    return failed


def describe(lock: dict[str, Any]) -> str:
    """A lock's pins as lines, for diffs."""
    lines = [f"ComfyUI {lock['comfyui']['version']} ({lock['comfyui']['commit']})"]
    lines += [f"custom_nodes/{node['name']} {node['commit']}" for node in lock["custom_nodes"]]
    lines += [f"torch flavour {lock['torch']['flavor'] or '-'}: {' '.join(lock['torch']['packages']) or '-'}"]
    lines += [f"pip_constraints: {' '.join(lock['pip_constraints']) or '-'}"]
    lines += [f"pip_packages: {' '.join(lock['pip_packages']) or '-'}"]
    return "\n".join(lines) + "\n"


def _uv_error(stderr: str) -> str:
    text = " ".join(line.strip() for line in stderr.strip().splitlines() if line.strip())
    return redact(re.sub(r"^error:\s*", "", text))


_PYTHON_IDS: dict[str, str] = {}


def _python_identity(python: str) -> str:
    """`<realpath> <version>` of the interpreter the venv is built on."""
    if python not in _PYTHON_IDS:
        path = shutil.which(python) or python
        done = run([path, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"])
        if done.returncode != 0:
            raise EnvError(f"python {python!r} does not run: {_tail(done.stderr, 3)}; set python: to an interpreter")
        _PYTHON_IDS[python] = f"{os.path.realpath(path)} {done.stdout.strip()}"
    return _PYTHON_IDS[python]


def _write_lines(path: str, lines: Sequence[str]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("".join(f"{line}\n" for line in lines))


def _write_json(path: str, data: Mapping[str, Any]) -> None:
    temp = f"{path}.tmp"
    with open(temp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def as_dict(result: Result) -> dict[str, Any]:
    return dataclasses.asdict(result)
