"""Releases on a host: pruning keeps what running processes use, `comfybake environments
list|rollback` switch between them, a moved tag is reported, and `environments lock` pins refs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness.environments import engine, live, releases
from harness.repos import git

from comfybake import cli

BASIC = ("ComfyUI-Comfybake-Basic", "initial")
UPDATE = ("ComfyUI-Comfybake-Basic", "update")


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Any]:
    """Start a process as an instance starts: through its own link to a release."""
    started: list[subprocess.Popen[bytes]] = []

    def start(release: str, name: str = "a") -> subprocess.Popen[bytes]:
        link = tmp_path / "instances" / name
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(os.path.relpath(release, link.parent))
        process = subprocess.Popen([str(link / "venv" / "bin" / "python"), "-c", "import time; time.sleep(300)"])
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


def test_a_release_a_running_instance_uses_is_kept_whatever_its_age(make_spec: Any, running: Any) -> None:
    first = engine.Builder(make_spec(BASIC, keep_releases=1)).run()
    process = running(first.release)
    second = engine.Builder(make_spec(UPDATE, keep_releases=1)).run()
    assert releases(make_spec(BASIC)) == sorted(Path(path).name for path in (first.release, second.release)), (
        "the release instance a runs was pruned"
    )
    assert any(
        f"kept release {first.release}" in warning and str(process.pid) in warning for warning in second.warnings
    )
    # Once nothing runs it, the next build prunes it as before.
    process.kill()
    process.wait()
    third = engine.Builder(make_spec(UPDATE, keep_releases=1, revision="2")).run()
    assert releases(make_spec(BASIC)) == [Path(third.release).name]


def host_files(tmp_path: Path, spec: engine.Spec, release: str) -> Path:
    """instances.json and the files of instance a (environment comm), as the instances role writes them."""
    config = tmp_path / "etc"
    (config / "instances").mkdir(parents=True)
    env_file = config / "instances" / "a.env"
    env_file.write_text(f"COMFYUI_INSTANCE=a\nCOMFYUI_RELEASE=releases/{Path(release).name}\n")
    link = tmp_path / "instances" / "a"
    if not link.is_symlink():
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(f"../envs/{spec.name}/releases/{Path(release).name}")
    record = {
        "name": "a",
        "environment": spec.name,
        "port": 18188,
        "code_dir": str(link),
        "env_file": str(env_file),
        "unit": "comfybake-test-missing@a.service",
    }
    host = {"format": 1, "manager": "systemd", "code_root": str(tmp_path), "instances": [record]}
    (config / "instances.json").write_text(json.dumps(host))
    return config


def environments(config: Path, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["environments", "--config-root", str(config), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_list_shows_the_live_release_and_rollback_switches_back(
    make_spec: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = make_spec(BASIC)
    first = engine.Builder(spec).run()
    second = engine.Builder(make_spec(UPDATE)).run()
    config = host_files(tmp_path, spec, second.release)
    old, new = Path(first.release).name, Path(second.release).name

    code, out, _err = environments(config, "list", "--json", capsys=capsys)
    rows = json.loads(out)["releases"]
    assert code == 0 and [(row["release"], row["live"]) for row in rows] == [(old, False), (new, True)]

    code, out, err = environments(config, "rollback", "comm", "--json", capsys=capsys)
    assert code == 0, err
    assert json.loads(out) | {"results": None} == {
        "environment": "comm",
        "previous": new,
        "release": old,
        "changed": True,
        "restarted": [],
        "results": None,
    }
    assert live(spec) == first.release
    # The instance's link and its environment file name the release, as the role writes them.
    assert os.readlink(tmp_path / "instances" / "a") == f"../envs/comm/releases/{old}"
    assert f"COMFYUI_RELEASE=releases/{old}\n" in (config / "instances" / "a.env").read_text()

    code, _out, err = environments(config, "rollback", "comm", capsys=capsys)
    assert code == 2 and f"no release built before the live one ({old})" in err
    code, _out, err = environments(config, "rollback", "comm", "--to", "0123456789abcdef", capsys=capsys)
    assert code == 2 and f"has no complete release '0123456789abcdef' (releases: {old}, {new})" in err
    code, out, _err = environments(config, "rollback", "comm", "--to", new, capsys=capsys)
    assert code == 0 and f"live release {old} -> {new}" in out
    assert live(spec) == second.release


def moved_tag_repo(tmp_path: Path, fixture_repos: Any) -> Path:
    """A copy of the ComfyUI fixture repository, whose tags a test may move."""
    copy = tmp_path / "mirror" / "ComfyUI.git"
    shutil.copytree(fixture_repos["ComfyUI"].path, copy)
    return copy


def test_a_tag_that_moved_since_the_live_lock_is_reported(make_spec: Any, fixture_repos: Any, tmp_path: Path) -> None:
    copy = moved_tag_repo(tmp_path, fixture_repos)
    mirrors = {**make_spec(BASIC).git_mirrors, "https://github.com/comfyanonymous/": f"{copy.parent.as_uri()}/"}
    first = engine.Builder(make_spec(BASIC, git_mirrors=mirrors)).run()
    assert not any("now resolves to" in warning for warning in first.warnings)
    old = fixture_repos["ComfyUI"].commits["v0.8.0"]
    new = fixture_repos["ComfyUI"].commits["v0.8.1"]
    git(copy, "tag", "--no-sign", "-f", "-a", "v0.8.0", new, "-m", "moved")
    # Another host (a fresh git cache) resolves the tag anew.
    second = engine.Builder(make_spec(BASIC, git_mirrors=mirrors, git_cache=str(tmp_path / "other-cache"))).run()
    assert second.lock["comfyui"]["commit"] == new
    assert any(
        f"ComfyUI v0.8.0 (https://github.com/comfyanonymous/ComfyUI.git) now resolves to {new}, but the live"
        f" release's lock has {old}" in warning
        for warning in second.warnings
    ), second.warnings


def test_environments_lock_pins_tags_to_the_commits_they_name(
    fixture_repos: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = moved_tag_repo(tmp_path, fixture_repos)
    node = fixture_repos["ComfyUI-Comfybake-Basic"].commits["initial"]
    vars_file = tmp_path / "environments.yml"
    document = {
        "comfyui_environments_git_mirrors": {"https://github.com/comfyanonymous/": f"{copy.parent.as_uri()}/"},
        "comfyui_environments": {
            "comm": {
                "comfyui_repo": "https://github.com/comfyanonymous/ComfyUI.git",
                "comfyui_version": "v0.8.0",
                "torch_flavor": "cpu",
                "custom_nodes": [
                    {"repo": "https://github.com/comfybake-fixtures/ComfyUI-Comfybake-Basic.git", "version": node}
                ],
            }
        },
    }
    vars_file.write_text(yaml.safe_dump(document))
    vars_file.chmod(0o600)  # a vars file may hold a token: so may its lock
    assert cli.main(["environments", "lock", str(vars_file)]) == 0
    err = capsys.readouterr().err
    assert (tmp_path / "environments.lock.yml").stat().st_mode & 0o777 == 0o600
    locked = yaml.safe_load((tmp_path / "environments.lock.yml").read_text())
    commit = fixture_repos["ComfyUI"].commits["v0.8.0"]
    assert locked["comfyui_environments"]["comm"]["comfyui_version"] == commit
    assert locked["comfyui_environments"]["comm"]["custom_nodes"][0]["version"] == node
    assert locked["comfyui_environments"]["comm"]["torch_flavor"] == "cpu"
    assert f"pinned comm: ComfyUI tag v0.8.0 = {commit}" in err
    # A ref that does not exist fails naming it, and writes nothing.
    document["comfyui_environments"]["comm"]["comfyui_version"] = "v9.9.9"
    vars_file.write_text(yaml.safe_dump(document))
    assert cli.main(["environments", "lock", str(vars_file), "-o", str(tmp_path / "other.yml")]) == 2
    assert "has no tag or branch 'v9.9.9'" in capsys.readouterr().err
    assert not (tmp_path / "other.yml").exists()
