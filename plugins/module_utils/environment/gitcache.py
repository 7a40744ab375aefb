# Copyright: comfybake contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""The cache of bare git repositories, and checkouts of pinned commits from it."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from .errors import EnvError, redact
from .process import run, tail
from .spec import COMMIT, GIT_PROTOCOLS, Source, node_name_from_repo


@dataclass(frozen=True)
class Submodule:
    """A submodule of a checkout: its path (relative to the top checkout), its URL as .gitmodules
    has it (a relative one resolved against the superproject's), and the commit the superproject pins."""

    path: str
    url: str
    commit: str


class SubmoduleCheck(Protocol):
    """What a checkout does with a submodule it finds before fetching it: check its URL against
    the scheme rules and the allowlist (raising EnvError). A checkout without one refuses them."""

    def __call__(self, submodule: Submodule, /) -> None: ...


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
            # Only the transports comfybake accepts, for every URL git meets (insteadOf rewrites,
            # redirects and submodules included): no ext::, fd::, http:// or git://.
            "GIT_ALLOW_PROTOCOL": ":".join(GIT_PROTOCOLS),
        }
        if ca_bundle:
            self.env["GIT_SSL_CAINFO"] = ca_bundle

    def git(self, *args: str, cwd: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = run(["git", *self.config, *args], cwd=cwd, env=self.env)
        if check and done.returncode != 0:
            raise EnvError(redact(f"git {' '.join(args)} failed: {tail(done.stderr)}"))
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
            self.git("init", "--quiet", "--bare", "--", bare)
        specs = refspecs or ("+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*")
        return self.git(
            "fetch", "--quiet", "--prune", "--no-write-fetch-head", "--", repo, *specs, cwd=bare, check=False
        )

    def resolve(self, what: str, source: Source, allow_moving: bool, dry_run: bool) -> tuple[str, str]:
        """The commit a pin names, and its kind (commit, tag or branch); fetches only when needed."""
        repo, version = source.repo, source.version
        bare = self.bare(repo)
        if COMMIT.match(version):
            if self._has_commit(bare, version) or dry_run:
                return version, "commit"
            fetched = self._fetch(bare, repo)
            if not self._has_commit(bare, version):
                self._fetch(bare, repo, version)
            if not self._has_commit(bare, version):
                cause = f"; git said: {tail(fetched.stderr, 3)}" if fetched.returncode else ""
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
            raise EnvError(redact(f"{what}: cannot fetch {repo}: {tail(fetched.stderr, 5)}"))
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
        done = self.git(
            "ls-remote", "--", repo, f"refs/tags/{version}", f"refs/tags/{version}^{{}}", f"refs/heads/{version}"
        )
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

    def checkout(
        self,
        repo: str,
        commit: str,
        dest: str,
        exclude: Sequence[str] = (),
        submodules: SubmoduleCheck | None = None,
        what: str = "",
    ) -> list[Submodule]:
        """A detached work tree at `commit`, cloned from the cache (objects are hard-linked).

        Submodules are never fetched by git from the URLs in `.gitmodules`: each is refused
        (`submodules` is None) or checked by `submodules`, then resolved through this cache like
        any pinned repository (so mirrors apply and a cached commit needs no network) and checked
        out in place, recursively. Returns the submodules checked out.
        """
        self.git("clone", "--quiet", "--no-checkout", "--", self.bare(repo), dest)
        self.git("checkout", "--quiet", "--detach", commit, cwd=dest)
        self.git("remote", "set-url", "--", "origin", repo, cwd=dest)
        with open(os.path.join(dest, ".git", "info", "exclude"), "a", encoding="utf-8") as handle:
            handle.write("\n# comfybake\n__pycache__/\n*.py[co]\n" + "".join(f"{line}\n" for line in exclude))
        found: list[Submodule] = []
        for sub in self.submodules(repo, dest):
            if submodules is None:
                raise EnvError(
                    redact(
                        f"{what or repo}: {repo} has git submodules ({sub.path} from {sub.url}), which comfybake"
                        " does not fetch unless allowed; set allow_submodules: true for this environment (each"
                        " submodule URL is then checked against allowed_repos and fetched through the git cache and"
                        " mirrors)"
                    )
                )
            submodules(sub)
            self.resolve(f"{repo}: submodule {sub.path}", Source(sub.path, sub.url, sub.commit), False, False)
            inner = self.checkout(
                sub.url,
                sub.commit,
                os.path.join(dest, sub.path),
                submodules=submodules,
                what=f"{what}: submodule {sub.path}",
            )
            found += [sub, *(Submodule(f"{sub.path}/{i.path}", i.url, i.commit) for i in inner)]
        return found

    def submodules(self, repo: str, dest: str) -> list[Submodule]:
        """The submodules a checkout pins: gitlinks in its tree that `.gitmodules` names."""
        links = self.git("ls-files", "--stage", "-z", cwd=dest).stdout.split("\0")
        pinned = {}
        for entry in links:
            meta, _tab, path = entry.partition("\t")
            if meta.startswith("160000 "):
                pinned[path] = meta.split()[1]
        if not pinned:
            return []
        if not os.path.isfile(os.path.join(dest, ".gitmodules")):
            raise EnvError(f"{repo}: gitlinks {', '.join(sorted(pinned))} have no .gitmodules entry")
        done = self.git(
            "config", "--file", ".gitmodules", "--null", "--get-regexp", r"^submodule\..*\.(path|url)$",
            cwd=dest, check=False,
        )  # fmt: skip
        names: dict[str, dict[str, str]] = {}
        for item in done.stdout.split("\0"):
            key, _newline, value = item.partition("\n")
            if not key.startswith("submodule."):
                continue
            name, _dot, field = key[len("submodule.") :].rpartition(".")
            names.setdefault(name, {})[field] = value
        found = []
        by_path = {entry.get("path"): entry.get("url", "") for entry in names.values()}
        for path, commit in sorted(pinned.items()):
            if path not in by_path:
                raise EnvError(f"{repo}: the gitlink {path} has no entry in .gitmodules")
            found.append(Submodule(path, resolve_relative(repo, by_path[path]), commit))
        return found

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


def resolve_relative(repo: str, url: str) -> str:
    """A submodule URL as git reads it: `./x` and `../x` are relative to the superproject's URL."""
    if not url.startswith(("./", "../")):
        return url
    base = repo.rstrip("/")
    scp = "://" not in base and not base.startswith("/") and ":" in base
    head, path = base.split(":", 1) if scp else ("", base)
    for part in url.split("/"):
        if part == "..":
            path = path.rsplit("/", 1)[0] if "/" in path.strip("/") else ""
        elif part not in ("", "."):
            path = f"{path}/{part}" if path else part
    return f"{head}:{path}" if scp else path
