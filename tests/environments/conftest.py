"""Environments built in-process by the engine, from the fixture repositories and the wheelhouse."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from harness import repos, wheelhouse
from harness.environments import GITHUB, engine
from harness.tools import venv_bin


@pytest.fixture(scope="session")
def wheels() -> Path:
    return wheelhouse.wheelhouse()


@pytest.fixture(scope="session")
def uv_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("uv-cache")


@pytest.fixture
def make_spec(tmp_path: Path, fixture_repos: dict[str, repos.Repo], wheels: Path, uv_cache: Path) -> Any:
    """Build a Spec for an environment under tmp_path; nodes are (name, commit label) pairs."""
    mirrors = {
        "https://github.com/comfyanonymous/": f"{Path(fixture_repos['ComfyUI'].path).parent.as_uri()}/",
        f"{GITHUB}/": f"{Path(fixture_repos['ComfyUI-Comfybake-Basic'].path).parent.as_uri()}/",
    }

    def make(*nodes: tuple[str, str], name: str = "comm", **overrides: Any) -> engine.Spec:
        settings: dict[str, Any] = {
            "name": name,
            "root": str(tmp_path / "envs" / name),
            "comfyui": engine.Source("ComfyUI", "https://github.com/comfyanonymous/ComfyUI.git", "v0.8.0"),
            "uv": venv_bin("uv"),
            "custom_nodes": [
                engine.Source(node, f"{GITHUB}/{node}.git", fixture_repos[node].commits.get(label, label))
                for node, label in nodes
            ],
            "torch_flavor": "cpu",
            "torch_packages": [wheelhouse.TORCH],
            "wheelhouse": str(wheels),
            "cache_dir": str(uv_cache),
            "git_cache": str(tmp_path / "git-cache"),
            "git_mirrors": mirrors,
            "python": sys.executable,
        }
        settings.update(overrides)
        return engine.Spec(**settings)

    return make
