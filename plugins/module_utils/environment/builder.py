# Copyright: comfybake contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""The build of a release: resolve, install, check, gate, lock, then switch `current`."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..comfyui_log import gate_failures, optional_node_failures
from ..redaction import redact_data, scrub, url_credentials
from .errors import EnvError, redact
from .gitcache import Git, Submodule, SubmoduleCheck
from .imports import likely_missing, site_packages
from .leftovers import sweep
from .process import TimeLimitError, journal, python_identity, run, tail
from .releases import BUILDING_MARKER, LOCK_NAME, in_use, locked, moved_refs, switch
from .requirements import (
    Requirements,
    Resolved,
    canonical_name,
    direct_entries,
    parse_compiled,
    read_requirements,
    requirement_name,
)
from .spec import (
    Source,
    Spec,
    allowlist_entries,
    check_node_folder,
    check_repo,
    comfyui_modules,
    torch_constraint,
    validate,
)
from .writable import SEEDS, in_comfyui, keep_as_seeds, link_release, permission_hint, provide

SCHEMA = 1
RESOLVED_NAME = "requirements.lock.txt"
BUILD_RECORD = "last-build.json"  # <root>/last-build.json: what the last build did (Builder._record_build)
DEFAULT_PROTECTED = ("torch", "torchvision", "torchaudio", "xformers")


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
                {
                    "name": node.name,
                    "repo": node.repo,
                    "version": node.version,
                    "commit": self.nodes[node.name],
                    **_writable(node),
                }
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
        # The interpreter the release's venv was made from, found before anything is installed in it:
        # the one root runs (isolated) where the build needs a python, never a file of the venv.
        self.interpreter = ""

    # ----------------------------------------------------------------- public

    def run(self, check_mode: bool = False) -> Result:
        validate(self.spec, check_mode)
        with self._locked(check_mode):
            if check_mode:
                return self._converge(True)
            started = time.time()
            try:
                result = self._converge(False)
            except Exception as error:
                self._record_build(started, None, error)
                raise
            self._record_build(started, result, None)
            return result

    def _converge(self, check_mode: bool) -> Result:
        """Build and switch to a new release when the inputs changed (run holds the lock)."""
        if not check_mode:
            self.warnings += sweep(self.releases)  # what a killed run left, before anything else
        pins = self._timed("resolve pins", lambda: self._pins(dry_run=check_mode))
        fingerprint = self.fingerprint(pins)
        live = self.live_lock()
        if live and live.get("fingerprint") == fingerprint:
            self._timed("verify live release", lambda: self._verify_live(live))
            return self._result(False, live, None)
        if pins.comfyui_kind != "unresolved":
            self.warnings += moved_refs(self.spec.name, live, pins.summary(self.spec))
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
            "python": python_identity(spec.python),
            "comfyui": [spec.comfyui.repo, pins.comfyui],
            # Writable paths change the release's layout; without any, the fingerprint is as before.
            "custom_nodes": [
                [node.name, node.repo, pins.nodes[node.name], *_writable(node).values()] for node in spec.custom_nodes
            ],
            "torch": [spec.torch_flavor, spec.torch_packages],
            "protected": sorted(self.protected()),
            "pip_constraints": spec.pip_constraints,
            "pip_packages": spec.pip_packages,
            "allow_source_builds": spec.allow_source_builds,
            "allow_direct_references": spec.allow_direct_references,
            "hook": hook,
            "revision": spec.revision,
        }
        if spec.hook and spec.hook_as_root:
            inputs["hook_as_root"] = True  # who runs the hook shapes what it can do
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
        with locked(self.root):
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
        trees = [("ComfyUI", "", lock["comfyui"]["commit"])]
        trees += [
            (f"custom_nodes/{node['name']}", f"custom_nodes/{node['name']}/", node["commit"])
            for node in lock["custom_nodes"]
        ]
        # A writable path is a link in the release by design (writable.py).
        links = [written.rstrip("/") for written in lock.get("writable", [])]
        for label, prefix, commit in trees:
            path = os.path.join(comfyui, prefix)
            head, changed = self.git.state(path)
            changed = [name for name in changed if not any(_within(prefix + name.rstrip("/"), link) for link in links)]
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
            with journal(os.path.join(release, BUILDING_MARKER)):
                lock = self._build_into(release, pins, fingerprint)
        except BaseException:
            shutil.rmtree(release, ignore_errors=True)
            raise
        os.unlink(os.path.join(release, BUILDING_MARKER))
        return lock

    def _build_into(self, release: str, pins: Pins, fingerprint: str) -> dict[str, Any]:
        spec = self.spec
        comfyui = os.path.join(release, "ComfyUI")

        where = f"environment {spec.name}"
        submodules: list[dict[str, str]] = []

        def checkout() -> None:
            names = [f"/custom_nodes/{node.name}/" for node in spec.custom_nodes]
            policy = self._submodule_policy
            found = self.git.checkout(
                spec.comfyui.repo,
                pins.comfyui,
                comfyui,
                exclude=names,
                submodules=policy("ComfyUI"),
                what=f"{where}: ComfyUI",
            )
            submodules.extend(_submodule_entry("ComfyUI", sub) for sub in found)
            taken = comfyui_modules(comfyui)
            for node in spec.custom_nodes:
                check_node_folder(where, node, taken)
            for node in spec.custom_nodes:
                found = self.git.checkout(
                    node.repo,
                    pins.nodes[node.name],
                    os.path.join(comfyui, "custom_nodes", node.name),
                    submodules=policy(f"custom node {node.name}"),
                    what=f"{where}: custom node {node.name}",
                )
                submodules.extend(_submodule_entry(f"custom_nodes/{node.name}", sub) for sub in found)
                if os.path.isfile(os.path.join(comfyui, "custom_nodes", node.name, "install.py")):
                    self.warnings.append(
                        f"custom node {node.name} has an install.py, which comfybake does not run;"
                        " declare what it installs in pip_packages"
                    )

        self._timed("checkout", checkout)
        link_release(comfyui, os.path.join(release, SEEDS), self._writable_paths())
        sources = self._timed("collect requirements", lambda: self._collect(release, comfyui))
        venv = os.path.join(release, "venv")
        self._timed("create venv", lambda: self._uv("venv", "--quiet", "--relocatable", "--python", spec.python, venv))
        python = os.path.join(venv, "bin", "python")
        self.interpreter = os.path.realpath(python)
        if _within(self.interpreter, os.path.realpath(venv)):
            self.interpreter = os.path.realpath(shutil.which(spec.python) or spec.python)
        compiled = self._timed("resolve", lambda: self._resolve(release, python, sources))
        self._timed(
            "install",
            lambda: self._uv(
                "pip", "sync", "--quiet", "--python", python, *self._index_args(), RESOLVED_NAME, cwd=release
            ),
        )
        if spec.hook:
            self._timed("hook", lambda: self._hook(release, venv, comfyui))
        self._timed("dependency check", lambda: self._pip_check(release, python))
        # Bytecode for the read-only tree, written as root: by the interpreter the venv was made from,
        # isolated (-I) and without site (-S), so no .pth file or module of any package runs.
        run([self.interpreter, "-I", "-S", "-m", "compileall", "-q", "-j", "0", comfyui], cwd=release, env=self._env())
        if spec.import_gate:
            self._timed("import gate", lambda: self._gate(release, python, comfyui))
        installed = _installed(venv)
        lock = {
            "schema": SCHEMA,
            "environment": spec.name,
            "fingerprint": fingerprint,
            "built_at": _now(),
            "python": python_identity(spec.python),
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
            "writable": self._writable_paths(),
            "warnings": self.warnings,
        }
        if submodules:
            lock["submodules"] = submodules
        lock = dict(redact_data(lock))  # the lock is world-readable, printed and copied into image BOMs
        _write_json(os.path.join(release, LOCK_NAME), lock)
        lock["release"] = release
        return lock

    def _collect(self, release: str, comfyui: str) -> list[Requirements]:
        """Write the inputs of the resolution under `<release>/inputs/`, one file per source."""
        spec = self.spec
        where = f"environment {spec.name}"
        inputs = os.path.join(release, "inputs")
        os.makedirs(inputs)
        constraints = [torch_constraint(where, entry) for entry in spec.torch_packages] + spec.pip_constraints
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
            text = handle.read()
        self._check_direct(text)
        return parse_compiled(text)

    def _check_direct(self, compiled: str) -> None:
        """Refuse a resolved package that comes from a URL or a path, unless allowed: uv's own reading of
        every requirement, whatever form a line took. Wheel files named in torch_packages are the
        operator's own and always accepted."""
        spec = self.spec
        if spec.allow_direct_references:
            return
        where = f"environment {spec.name}"
        files = {
            canonical_name(torch_constraint(where, entry).split("==")[0])
            for entry in spec.torch_packages
            if entry.endswith(".whl")
        }
        found = [(name, line) for name, line in direct_entries(compiled) if name not in files]
        if found:
            resolved = parse_compiled(compiled)
            lines = [
                f"- {line} (via {', '.join(resolved[name].via) if name in resolved else 'unknown'})"
                for name, line in found
            ]
            raise EnvError(
                f"{where}: the resolution installs packages from a URL or a path (direct references), which bypass"
                " the indexes and their hashes:\n" + redact("\n".join(lines)) + "\nset allow_direct_references:"
                " true for this environment to accept them"
            )

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
        pins = ", ".join(torch_constraint(where, e) for e in self.spec.torch_packages) or "-"
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
        """Run the environment's hook: as the service account (run_as), which owns the venv for the hook's
        duration only, unless hook_as_root; the venv then belongs to root again, with no group or other
        write and no setuid or setgid bit, before anything else runs."""
        spec = self.spec
        hook = spec.hook or ""
        command = [hook] if os.access(hook, os.X_OK) else ["/bin/sh", hook]
        as_account = bool(spec.run_as) and not spec.hook_as_root and os.geteuid() == 0
        scratch = os.path.join(release, ".hook")
        os.makedirs(scratch, mode=0o700)
        env = {
            **self._env(),
            **self._index_env(),
            "VIRTUAL_ENV": venv,
            "PATH": ":".join(
                (os.path.join(venv, "bin"), os.path.dirname(spec.uv), os.environ.get("PATH", "/usr/bin:/bin"))
            ),
            "COMFYUI_PATH": comfyui,
            "COMFYBAKE_ENVIRONMENT": spec.name,
            "COMFYBAKE_RELEASE": release,
        }
        if as_account:
            # uv's shared cache belongs to root: the account's installs use a cache of their own.
            env.update(HOME=scratch, UV_CACHE_DIR=os.path.join(scratch, "uv-cache"), TMPDIR=scratch)
            _lend(scratch, spec.run_as or "")
            _lend(venv, spec.run_as or "")
        elif os.geteuid() == 0:
            self.warnings.append(
                f"the hook {hook} ran as root ("
                + ("hook_as_root is set" if spec.hook_as_root else "run_as is not set")
                + "): it, and any package code it runs, had full control of the host"
            )
        try:
            done = run(command, cwd=release, env=env, user=spec.run_as if as_account else None, kill_group=True)
        finally:
            if as_account:
                _reclaim(venv, spec.run_as or "")
            shutil.rmtree(scratch, ignore_errors=True)
        if done.returncode != 0:
            raise EnvError(
                f"environment {spec.name}: hook {hook} failed with exit code {done.returncode}:"
                f"\n{redact(tail(done.stdout + done.stderr))}"
            )

    def _submodule_policy(self, label: str) -> SubmoduleCheck | None:
        """What the checkout of a tree does with its submodules: refuse them, unless allow_submodules;
        then check each URL as the tree's own (known kinds only, and the allowlist)."""
        spec = self.spec
        if not spec.allow_submodules:
            return None
        where = f"environment {spec.name}"
        allowlist = allowlist_entries(where, spec.allowed_repos)

        def check(sub: Submodule) -> None:
            check_repo(where, f"{label}: submodule {sub.path}", sub.url, allowlist)

        return check

    def _pip_check(self, release: str, python: str) -> None:
        """`uv pip check`. uv runs the venv's interpreter to read it, with site, so every .pth file of
        the installed packages runs: as the service account (run_as), never root, with no cache."""
        env = self._env()
        user = None
        if self.spec.run_as and os.geteuid() == 0:
            user = self.spec.run_as
            env.pop("UV_CACHE_DIR", None)
            env["UV_NO_CACHE"] = "1"
        done = run([self.spec.uv, "pip", "check", "--python", python], cwd=release, env=env, user=user)
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
        """Import everything with `--quick-test-for-ci --cpu`; fail naming each node that did not import.

        The gate runs in a scratch folder, as an instance runs in its state folder: its working
        directory holds its own copy of the writable paths, and what a pack writes there at import
        becomes the seed of a path that had none.
        """
        spec = self.spec
        scratch = os.path.join(release, ".gate")
        seeds = os.path.join(release, SEEDS)
        for sub in ("user", "input", "output", "temp"):
            os.makedirs(os.path.join(scratch, sub), exist_ok=True)
        provide(seeds, scratch, self._writable_paths())
        for relative, source in spec.user_files.items():
            target = os.path.normpath(os.path.join(scratch, "user", relative))
            if not target.startswith(os.path.join(scratch, "user") + os.sep):
                raise EnvError(f"environment {spec.name}: user file {relative!r} must stay inside the user directory")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(source, target)
        if spec.run_as and os.geteuid() == 0:
            import pwd

            account = pwd.getpwnam(spec.run_as)
            for folder, _subdirs, files in os.walk(scratch):
                for path in (folder, *(os.path.join(folder, name) for name in files)):
                    os.lchown(path, account.pw_uid, account.pw_gid)
        main = os.path.join(comfyui, "main.py")
        args = [python, main, "--quick-test-for-ci", "--cpu", "--disable-auto-launch"]
        args += [f"--{sub}-directory={os.path.join(scratch, sub)}" for sub in ("user", "input", "output", "temp")]
        args += [f"--database-url=sqlite:///{os.path.join(scratch, 'comfyui.db')}"]
        if spec.extra_model_paths:
            args += ["--extra-model-paths-config", spec.extra_model_paths]
        env = {**self._env(), "HOME": scratch, "PYTHONDONTWRITEBYTECODE": "1"}
        if os.geteuid() == 0 and not spec.run_as:
            self.warnings.append(
                "the import gate ran ComfyUI and every custom node as root (run_as is not set); set run_as to the"
                " service account"
            )
        try:
            done = run(
                args, cwd=scratch, env=env, timeout=spec.gate_timeout, user=spec.run_as, merge=True, kill_group=True
            )
            keep_as_seeds(scratch, seeds, self._writable_paths())
        except TimeLimitError as late:
            raise EnvError(
                f"environment {spec.name}: the import gate (main.py --quick-test-for-ci --cpu) did not finish within"
                f" {spec.gate_timeout} s (gate_timeout: the role's comfyui_environments_gate_timeout), so it was"
                " stopped with everything it started; the live release is untouched. A node that blocks while it is"
                " imported (a download, a prompt, a server) hangs it: fix or remove that node, or raise"
                f" comfyui_environments_gate_timeout. Its last lines:\n{redact(late.output)}"
            ) from None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        output = done.stdout
        failed = gate_failures(output, comfyui)
        configured = {node.name for node in spec.custom_nodes}
        ours = {name: error for name, error in failed.items() if name in configured}
        env = self._env()
        packages = site_packages(os.path.dirname(os.path.dirname(python)))

        def causes(folder: str, error: str) -> list[str]:
            return likely_missing(folder, comfyui, self.interpreter, error, env, spec.import_names, packages)

        if ours:
            lines = []
            for name, error in sorted(ours.items()):
                lines.append(f"- custom node {name} failed to import: {error}")
                hint = permission_hint(error, comfyui, name)
                lines += [hint] if hint else []
                lines += causes(os.path.join(comfyui, "custom_nodes", name), error)
            raise EnvError(
                f"environment {spec.name}: the import gate (main.py --quick-test-for-ci --cpu) failed; the live"
                " release is untouched.\n" + "\n".join(lines) + "\nFix: pin a node commit that imports, add the"
                " missing package to pip_packages, or remove the node"
            )
        if done.returncode != 0:
            raise EnvError(
                f"environment {spec.name}: ComfyUI exited with code {done.returncode} during the import gate"
                f" (main.py --quick-test-for-ci --cpu); its last lines:\n{redact(tail(output))}"
            )
        for name in sorted(set(failed) - configured):
            self.warnings.append(f"{name} (not a configured custom node) failed to import: {failed[name]}")
        for name, error in sorted(optional_node_failures(output).items()):
            # ComfyUI starts without its own optional nodes; so does the gate, but it says so.
            self.warnings.append(
                f"ComfyUI's optional node {name} failed to import, so its node classes are missing: {error}"
                + "".join(f"\n{line}" for line in causes(os.path.join(comfyui, name), error))
            )

    def _writable_paths(self) -> list[str]:
        """Every declared writable path, relative to the ComfyUI folder."""
        spec = self.spec
        return [in_comfyui(node.name, path) for node in spec.custom_nodes for path in node.writable]

    def _switch(self, release: str) -> None:
        """Point `current` at the new release in one rename."""
        switch(self.root, release)

    def _prune(self, live: str) -> None:
        used = in_use(self.root)  # a release a running process uses is kept, whatever its age
        releases = []
        for entry in os.listdir(self.releases):
            path = os.path.join(self.releases, entry)
            if path != live and os.path.isfile(os.path.join(path, LOCK_NAME)):
                releases.append((os.stat(os.path.join(path, LOCK_NAME)).st_mtime, path))
        for _mtime, path in sorted(releases, reverse=True)[self.spec.keep_releases - 1 :]:
            if os.path.realpath(path) in used:
                self.warnings.append(
                    f"kept release {path}: running processes use it (pids {used[os.path.realpath(path)]})"
                )
                continue
            shutil.rmtree(path, ignore_errors=True)

    def _result(
        self, changed: bool, lock: dict[str, Any], diff: dict[str, str] | None, previous: str | None = None
    ) -> Result:
        return Result(changed, lock["release"], lock["fingerprint"], previous, lock, diff, self.warnings, self.timings)

    def _record_build(self, started: float, result: Result | None, error: Exception | None) -> None:
        """`<root>/last-build.json`, for the exporter and node_exporter's textfile collector. A build
        (or a run that failed at any step after validation) writes when it started and ended, whether
        it succeeded, the release it made live and the first line of its error, scrubbed of secrets.
        A converged run builds nothing: it keeps the last build's numbers and sets `checked`."""
        path = os.path.join(self.root, BUILD_RECORD)
        finished = time.time()
        if result is not None and not result.changed:
            record = _read_record(path)
            if "success" not in record:  # the live release was built before the records were
                record = {"started": None, "finished": None, "duration": None, "success": True, "error": None}
                record["release"] = os.path.basename(result.release)
        else:
            message = str(error).strip().splitlines() if error is not None else []
            record = {
                "started": round(started, 3),
                "finished": round(finished, 3),
                "duration": round(finished - started, 3),
                "success": error is None,
                "release": os.path.basename(result.release) if result is not None else None,
                "error": None,
            }
            if error is not None:
                first = message[0] if message else type(error).__name__
                record["error"] = scrub(first, url_credentials(dataclasses.asdict(self.spec)))
        record.update(version=1, checked=round(finished, 3))
        try:
            _write_json(path, record)
        except OSError as failure:
            self.warnings.append(f"could not write the build record {path}: {failure.strerror or failure}")

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
        return env

    def _index_env(self) -> dict[str, str]:
        """The indexes, for uv and the hook only: URLs travel in the environment, never in argv (visible
        in /proc to every user), and may hold credentials, which the import gate and the dependency
        check (run as the service account, beside its running instances) must not carry."""
        spec = self.spec
        env: dict[str, str] = {}
        if not spec.wheelhouse:
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
        done = run([self.spec.uv, *args], cwd=cwd, env={**self._env(), **self._index_env()})
        if check and done.returncode != 0:
            raise EnvError(
                f"environment {self.spec.name}: uv {args[0]} {args[1] if len(args) > 1 else ''} failed:"
                f" {redact(tail(done.stderr or done.stdout, 20))}"
            )
        return done


def _submodule_entry(tree: str, sub: Submodule) -> dict[str, str]:
    return {"tree": tree, "path": sub.path, "url": sub.url, "commit": sub.commit}


def _installed(venv: str) -> list[dict[str, str]]:
    """Name and version of each distribution in the venv, read from its metadata files (no
    interpreter runs, so no package code does)."""
    import importlib.metadata

    found: dict[str, dict[str, str]] = {}
    for dist in importlib.metadata.distributions(path=site_packages(venv)):
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonical_name(name), {"name": name, "version": dist.version})
    return list(found.values())


def _lend(top: str, user: str) -> None:
    """Let `user` add, replace and remove entries in a tree: its folders become the user's, its files
    stay root's. Files of a venv are hard links into uv's shared cache (so into other releases);
    the user can replace a file, never change one of those in place."""
    import pwd

    account = pwd.getpwnam(user)
    for folder, _dirs, _files in os.walk(top):
        os.lchown(folder, account.pw_uid, account.pw_gid)


def _reclaim(top: str, user: str) -> None:
    """Take a lent tree back: everything root's, no group or other write, no setuid or setgid bit.
    A file the user made that has other links is copied first, so no other path changes owner.
    Links are changed themselves, never followed."""
    import pwd

    uid = pwd.getpwnam(user).pw_uid
    for folder, dirs, files in os.walk(top):
        links = [os.path.join(folder, name) for name in dirs if os.path.islink(os.path.join(folder, name))]
        for path in (folder, *links, *(os.path.join(folder, name) for name in files)):
            stat = os.lstat(path)
            if stat.st_uid == uid and stat.st_nlink > 1 and os.path.isfile(path) and not os.path.islink(path):
                copy = f"{path}.comfybake-copy"
                shutil.copy2(path, copy, follow_symlinks=False)
                os.replace(copy, path)
                stat = os.lstat(path)
            os.lchown(path, 0, 0)
            if not os.path.islink(path):
                os.chmod(path, stat.st_mode & 0o7777 & ~0o6022)


def _writable(tree: Source) -> dict[str, list[str]]:
    """A tree's writable paths for its lock entry, or nothing when it has none."""
    return {"writable": list(tree.writable)} if tree.writable else {}


def _within(name: str, path: str) -> bool:
    return name == path or name.startswith(path + "/")


def describe(lock: dict[str, Any]) -> str:
    """A lock's pins as lines, for diffs."""
    lines = [f"ComfyUI {lock['comfyui']['version']} ({lock['comfyui']['commit']})"]
    for node in lock["custom_nodes"]:
        writable = f" writable {' '.join(node['writable'])}" if "writable" in node else ""
        lines.append(f"custom_nodes/{node['name']} {node['commit']}{writable}")
    lines += [f"torch flavour {lock['torch']['flavor'] or '-'}: {' '.join(lock['torch']['packages']) or '-'}"]
    lines += [f"pip_constraints: {' '.join(lock['pip_constraints']) or '-'}"]
    lines += [f"pip_packages: {' '.join(lock['pip_packages']) or '-'}"]
    return "\n".join(lines) + "\n"


def _uv_error(stderr: str) -> str:
    text = " ".join(line.strip() for line in stderr.strip().splitlines() if line.strip())
    return redact(re.sub(r"^error:\s*", "", text))


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


def _read_record(path: str) -> dict[str, Any]:
    """A build record (`{}` when there is none or it cannot be read)."""
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) and record.get("version") == 1 else {}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def as_dict(result: Result) -> dict[str, Any]:
    return dataclasses.asdict(result)
