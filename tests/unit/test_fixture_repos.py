"""The fixture repositories are real git repositories, rebuilt identically every time."""

from __future__ import annotations

from pathlib import Path

from harness import repos
from harness.repos import git


def test_comfyui_repo_has_releases_and_a_moving_branch(fixture_repos: dict[str, repos.Repo], tmp_path: Path) -> None:
    comfyui = fixture_repos["ComfyUI"]
    assert git(Path(comfyui.path), "tag", "--list").split() == ["v0.8.0", "v0.8.1"]
    assert git(Path(comfyui.path), "rev-parse", "v0.8.0^{commit}") == comfyui.commits["v0.8.0"]
    assert git(Path(comfyui.path), "rev-parse", "master") == comfyui.commits["master"]
    clone = tmp_path / "c"
    git(tmp_path, "clone", "--quiet", "--branch", "v0.8.1", comfyui.url, str(clone))
    assert (clone / "comfyui_version.py").read_text() == '__version__ = "0.8.1"\n'
    assert (clone / "models" / "checkpoints" / "put_checkpoints_here").exists()


def test_every_fixture_node_is_a_repo_with_two_commits(fixture_repos: dict[str, repos.Repo]) -> None:
    nodes = {name: repo for name, repo in fixture_repos.items() if name != "ComfyUI"}
    assert sorted(nodes) == [
        "ComfyUI-Comfybake-Basic",
        "ComfyUI-Comfybake-Broken",
        "ComfyUI-Comfybake-SixNew",
        "ComfyUI-Comfybake-SixOld",
        "ComfyUI-Comfybake-TorchChanger",
        "ComfyUI-Comfybake-Undeclared",
        "ComfyUI-Comfybake-Writer",
        "ComfyUI-Manager",
    ]
    for repo in nodes.values():
        log = git(Path(repo.path), "log", "--format=%H", repo.branch).split()
        assert log == [repo.commits["update"], repo.commits["initial"]]


def test_conflicting_nodes_pin_one_package_to_two_versions(fixture_repos: dict[str, repos.Repo]) -> None:
    def requirements(name: str) -> str:
        return git(Path(fixture_repos[name].path), "show", "main:requirements.txt").strip()

    assert requirements("ComfyUI-Comfybake-SixOld") == "six==1.16.0"
    assert requirements("ComfyUI-Comfybake-SixNew") == "six==1.17.0"
    assert requirements("ComfyUI-Comfybake-TorchChanger") == "torch==2.1.0"


def test_builds_are_reproducible(fixture_repos: dict[str, repos.Repo], tmp_path: Path) -> None:
    again = repos.build(tmp_path / "again")
    assert {k: v.commits for k, v in again.items()} == {k: v.commits for k, v in fixture_repos.items()}
    assert (tmp_path / "again" / "fixtures.json").is_file()
