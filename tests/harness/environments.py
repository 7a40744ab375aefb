"""Helpers for the environment tests: the engine, what a root holds, and ad-hoc node repositories."""

from __future__ import annotations

from pathlib import Path

from comfybake.engine import environment as engine
from harness.repos import git

__all__ = ["GITHUB", "engine", "live", "node_repo", "releases"]

GITHUB = "https://github.com/comfybake-fixtures"


def releases(spec: engine.Spec) -> list[str]:
    """Every folder under releases/ (finished or not)."""
    folder = Path(spec.root) / "releases"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def live(spec: engine.Spec) -> str:
    return str((Path(spec.root) / "current").resolve())


def node_repo(parent: Path, name: str, files: dict[str, str]) -> tuple[str, str]:
    """A bare repository `parent/<name>.git` with one commit of `files`; returns (url, commit)."""
    work = parent / f"{name}-work"
    work.mkdir(parents=True)
    git(work, "init", "--quiet", "--initial-branch=main")
    for path, text in files.items():
        (work / path).write_text(text)
    git(work, "add", "--all")
    git(work, "commit", "--quiet", "--no-gpg-sign", "-m", "node")
    commit = git(work, "rev-parse", "HEAD")
    bare = parent / f"{name}.git"
    git(parent, "clone", "--quiet", "--bare", str(work), str(bare))
    return bare.as_uri(), commit
