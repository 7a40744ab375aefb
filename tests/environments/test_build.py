"""Environment builds: releases, one resolution with torch held, the import gate, locks, pins.

Each test builds real venvs with uv from the local wheelhouse and real git checkouts of the
fixture repositories; nothing is mocked. Every failure must name its cause and leave the live
release serving with no half-built release beside it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import repos, wheelhouse
from harness.environments import engine, live, node_repo, releases
from harness.mockhub import MockHub
from harness.serve_models import serve_packages
from harness.tools import ROOT, venv_bin

BASIC = ("ComfyUI-Comfybake-Basic", "initial")
SIX_OLD = ("ComfyUI-Comfybake-SixOld", "initial")
SIX_NEW = ("ComfyUI-Comfybake-SixNew", "initial")
TORCH_CHANGER = ("ComfyUI-Comfybake-TorchChanger", "initial")
BROKEN = ("ComfyUI-Comfybake-Broken", "initial")
UNDECLARED = ("ComfyUI-Comfybake-Undeclared", "initial")


def venv_six(spec: engine.Spec) -> str:
    python = Path(spec.root) / "current" / "venv" / "bin" / "python"
    return subprocess.run([python, "-c", "import six; print(six.__version__)"], capture_output=True, text=True).stdout


def build_fails(spec: engine.Spec) -> str:
    with pytest.raises(engine.EnvError) as failure:
        engine.Builder(spec).run()
    return str(failure.value)


def test_a_build_writes_a_lock_and_a_rerun_changes_nothing(make_spec: Any, fixture_repos: Any) -> None:
    spec = make_spec(BASIC, SIX_OLD)
    first = engine.Builder(spec).run()
    assert first.changed and live(spec) == first.release
    lock = json.loads((Path(first.release) / "comfybake.lock.json").read_text())
    assert lock["comfyui"] == {
        "repo": spec.comfyui.repo,
        "version": "v0.8.0",
        "kind": "tag",
        "commit": fixture_repos["ComfyUI"].commits["v0.8.0"],
    }
    assert [(n["name"], n["commit"]) for n in lock["custom_nodes"]] == [
        (node.name, node.version) for node in spec.custom_nodes
    ]
    packages = {p["name"]: p for p in lock["packages"]}
    assert packages["torch"]["version"] == "2.13.0+cpu" and packages["six"]["version"] == "1.16.0"
    assert all(p["hashes"] for p in lock["packages"]), "every package of the resolution has a hash"
    assert "-r inputs/node-ComfyUI-Comfybake-SixOld.txt" in packages["six"]["via"]
    assert venv_six(spec).strip() == "1.16.0"

    built = json.loads((Path(spec.root) / "last-build.json").read_text())  # the exporter's
    assert {k: built[k] for k in ("version", "success", "release", "error")} == {
        "version": 1,
        "success": True,
        "release": Path(first.release).name,
        "error": None,
    }
    assert built["started"] < built["finished"] == built["checked"]
    assert built["duration"] == pytest.approx(built["finished"] - built["started"], abs=0.002)
    assert (Path(spec.root) / "last-build.json").stat().st_mode == (Path(spec.root) / ".lock").stat().st_mode

    again = engine.Builder(spec).run()
    assert not again.changed and again.release == first.release
    assert set(again.timings) == {"resolve pins", "verify live release"}, "a converged run builds nothing"
    checked = json.loads((Path(spec.root) / "last-build.json").read_text())
    assert checked.pop("checked") > built.pop("checked")
    assert checked == built, "a converged run keeps the last build's numbers"


def test_conflicting_nodes_are_named_and_the_live_release_keeps_serving(make_spec: Any) -> None:
    good = make_spec(BASIC, SIX_OLD)
    built = engine.Builder(good).run()
    message = build_fails(make_spec(BASIC, SIX_OLD, SIX_NEW))
    assert "custom node ComfyUI-Comfybake-SixOld and custom node ComfyUI-Comfybake-SixNew conflict on six" in message
    assert "six==1.16.0" in message and "six==1.17.0" in message
    assert "live release is untouched" in message
    assert live(good) == built.release and releases(good) == [Path(built.release).name]
    failed = json.loads((Path(good.root) / "last-build.json").read_text())
    assert (failed["success"], failed["release"]) == (False, None)
    assert failed["error"] == message.splitlines()[0] and "do not resolve together" in failed["error"]
    assert failed["finished"] - failed["started"] == pytest.approx(failed["duration"], abs=0.002)
    assert venv_six(good).strip() == "1.16.0"


def test_a_node_asking_for_another_torch_is_named(make_spec: Any) -> None:
    message = build_fails(make_spec(BASIC, TORCH_CHANGER))
    assert "custom node ComfyUI-Comfybake-TorchChanger requires torch==2.1.0" in message
    assert "pins torch==2.13.0+cpu" in message and "another torch flavour" in message
    assert releases(make_spec()) == []


def test_a_node_that_fails_to_import_is_named_with_its_error_and_likely_missing_package(make_spec: Any) -> None:
    good = make_spec(BASIC)
    built = engine.Builder(good).run()
    # ComfyUI's own audio nodes need torchaudio, which these torch_packages leave out: ComfyUI
    # starts without them, and so does the gate, with a warning that says why and what adds it.
    [audio] = [warning for warning in built.warnings if "comfy_extras/nodes_audio.py" in warning]
    assert audio.startswith(
        "ComfyUI's optional node comfy_extras/nodes_audio.py failed to import, so its node classes are missing:"
        " No module named 'torchaudio'"
    )
    assert "likely missing package torchaudio: `import torchaudio` (nodes_audio.py line 4)" in audio
    assert "add torchaudio to torch_packages, or pick a torch flavour that includes it" in audio
    assert audio in built.lock["warnings"]

    message = build_fails(make_spec(BASIC, BROKEN, UNDECLARED))
    assert "custom node ComfyUI-Comfybake-Broken failed to import" in message
    assert "ModuleNotFoundError: No module named 'comfybake_fixture_missing_module'" in message
    # A pack that swallows the ImportError of a package it never declared: ComfyUI only says
    # `name 'yaml' is not defined`; the gate reads the pack's imports and names the distribution.
    assert "custom node ComfyUI-Comfybake-Undeclared failed to import: name 'yaml' is not defined" in message
    assert (
        "likely missing package PyYAML: `import yaml` (__init__.py line 15, inside a try that swallows its"
        " ImportError), and nothing installed in the venv provides yaml; add PyYAML to the environment's pip_packages"
    ) in message
    # Only what nothing provides: not jinja2 (installed, undeclared), the pack's lib/ module, ComfyUI's, the stdlib.
    likely = [line.split(":")[0].strip() for line in message.splitlines() if line.startswith("  likely missing")]
    assert likely == [
        "likely missing package comfybake_fixture_missing_module",
        "likely missing package PyYAML",
    ]
    assert live(good) == built.release and releases(good) == [Path(built.release).name]


def test_moving_branches_are_refused_unless_allowed(make_spec: Any, fixture_repos: Any) -> None:
    master = engine.Source("ComfyUI", "https://github.com/comfyanonymous/ComfyUI.git", "master")
    message = build_fails(make_spec(comfyui=master))
    assert "ComfyUI: version 'master' is a branch, which moves" in message and "allow_moving_refs" in message
    spec = make_spec(comfyui=master, allow_moving_refs=True)
    result = engine.Builder(spec).run()
    assert result.lock["comfyui"]["commit"] == fixture_repos["ComfyUI"].commits["master"]
    assert result.lock["comfyui"]["kind"] == "branch"


@pytest.mark.parametrize("version", ["main", "v1.2", "2c293ab5"])
def test_node_versions_must_be_full_commits(make_spec: Any, version: str) -> None:
    spec = make_spec(("ComfyUI-Comfybake-Basic", version))
    message = build_fails(spec)
    assert f"custom node ComfyUI-Comfybake-Basic: version must be a full 40-hex commit (got {version!r})" in message
    assert not Path(spec.git_cache).exists(), "nothing is cloned before the pins are valid"


def test_a_commit_missing_upstream_is_reported(make_spec: Any) -> None:
    message = build_fails(make_spec(("ComfyUI-Comfybake-Basic", "1" * 40)))
    assert (
        f"commit {'1' * 40} not found in https://github.com/comfybake-fixtures/ComfyUI-Comfybake-Basic.git" in message
    )
    assert "repository deleted or history rewritten" in message


def test_local_modifications_fail_instead_of_being_overwritten(make_spec: Any) -> None:
    spec = make_spec(BASIC)
    built = engine.Builder(spec).run()
    node = Path(built.release) / "ComfyUI" / "custom_nodes" / "ComfyUI-Comfybake-Basic"
    (node / "__init__.py").write_text((node / "__init__.py").read_text() + "\n# edited on the host\n")
    (node / "cache.json").write_text("{}")
    message = build_fails(spec)
    assert "local modifications in custom_nodes/ComfyUI-Comfybake-Basic" in message
    assert "__init__.py" in message and "cache.json" in message
    assert "edited on the host" in (node / "__init__.py").read_text(), "nothing was clobbered"


def test_a_failed_build_records_its_error_without_the_secrets_it_holds(make_spec: Any) -> None:
    """The record's error is scrubbed of the run's credentials, as given and in URLs, whatever echoed them."""
    spec = make_spec(index_url="https://user:s3cret-index-pass@127.0.0.1:9/simple")
    message = build_fails(make_spec(("ComfyUI-Comfybake-Basic", "1" * 40), index_url=spec.index_url))
    record = json.loads((Path(spec.root) / "last-build.json").read_text())
    assert (record["success"], record["release"], record["error"]) == (False, None, message.splitlines()[0])
    echoed = engine.EnvError("uv: 401 for https://user:s3cret-index-pass@127.0.0.1:9/simple (s3cret-index-pass)\nmore")
    builder = engine.Builder(spec)
    builder._record_build(0.0, None, echoed)
    record = json.loads((Path(spec.root) / "last-build.json").read_text())
    assert record["error"] == "uv: 401 for https://<redacted>@127.0.0.1:9/simple (<redacted>)"


def test_repositories_outside_the_allowlist_and_urls_with_credentials_are_refused(make_spec: Any) -> None:
    spec = make_spec(BASIC, allowed_repos=["https://github.com/trusted-owner/"])
    assert "is not allowlisted (allowed_repos: https://github.com/trusted-owner/)" in build_fails(spec)
    secret = engine.Source("ComfyUI", "https://user:hf_CANARY_secret@github.com/comfyanonymous/ComfyUI.git", "v0.8.0")
    message = build_fails(make_spec(comfyui=secret))
    assert "embeds credentials in its URL" in message and "hf_CANARY_secret" not in message


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("--extra-index-url https://example.invalid/simple", "is an installer option"),
        ("six @ https://example.invalid/six-1.17.0-py2.py3-none-any.whl", "is a direct reference"),
        ("git+https://example.invalid/six.git", "is a direct reference"),
    ],
)
def test_requirement_lines_that_bypass_the_indexes_are_refused(
    make_spec: Any, tmp_path: Path, line: str, expected: str
) -> None:
    url, commit = node_repo(
        tmp_path / "repos", "Sneaky", {"__init__.py": "NODE_CLASS_MAPPINGS = {}\n", "requirements.txt": f"{line}\n"}
    )
    spec = make_spec()
    spec.custom_nodes = [engine.Source("Sneaky", url, commit)]
    message = build_fails(spec)
    assert f"custom node Sneaky: requirements.txt line 1 {line!r} {expected}" in message
    assert releases(spec) == []


def test_the_hook_runs_and_the_dependency_check_catches_what_it_breaks(make_spec: Any, tmp_path: Path) -> None:
    hook = tmp_path / "hook.sh"
    hook.write_text('#!/bin/sh\nset -e\nuv pip uninstall --quiet --python "$VIRTUAL_ENV/bin/python" filelock\n')
    hook.chmod(0o755)
    message = build_fails(make_spec(BASIC, hook=str(hook)))
    assert "the dependency check (uv pip check) failed after install" in message
    assert "The package `torch` requires `filelock`, but it's not installed" in message

    hook.write_text('#!/bin/sh\nset -e\necho "$COMFYBAKE_ENVIRONMENT" > "$COMFYUI_PATH/../hook-ran"\n')
    spec = make_spec(BASIC, hook=str(hook))
    result = engine.Builder(spec).run()
    assert (Path(result.release) / "hook-ran").read_text() == "comm\n"


def test_pip_constraints_and_packages_join_the_one_resolution(make_spec: Any) -> None:
    message = build_fails(make_spec(SIX_NEW, pip_constraints=["six<1.17"]))
    assert "custom node ComfyUI-Comfybake-SixNew does not resolve" in message
    spec = make_spec(BASIC, pip_packages=["six==1.17.0"])
    engine.Builder(spec).run()
    assert venv_six(spec).strip() == "1.17.0"


def test_old_releases_are_pruned_and_the_previous_one_is_kept(make_spec: Any) -> None:
    first = engine.Builder(make_spec(BASIC)).run()
    killed = Path(first.release).parent / "0123456789abcdef"
    (killed / "ComfyUI").mkdir(parents=True)
    (killed / ".comfybake-building").write_text("pid 1\n")  # a build whose run was killed
    second = engine.Builder(make_spec(("ComfyUI-Comfybake-Basic", "update"))).run()
    assert second.previous == first.release
    third_spec = make_spec(("ComfyUI-Comfybake-Basic", "update"), revision="2")
    third = engine.Builder(third_spec).run()
    assert releases(third_spec) == sorted([Path(second.release).name, Path(third.release).name])


def test_check_mode_reports_a_due_build_and_builds_nothing(make_spec: Any, fixture_repos: Any) -> None:
    spec = make_spec(BASIC)
    built = engine.Builder(spec).run()
    record = (Path(spec.root) / "last-build.json").read_bytes()
    assert not engine.Builder(spec).run(check_mode=True).changed
    moved = make_spec(BASIC, comfyui=engine.Source("ComfyUI", spec.comfyui.repo, "v0.8.1"))
    result = engine.Builder(moved).run(check_mode=True)
    assert result.changed and result.diff is not None
    assert (Path(spec.root) / "last-build.json").read_bytes() == record, "check mode writes no record"
    assert f"ComfyUI v0.8.1 ({fixture_repos['ComfyUI'].commits['v0.8.1']})" in result.diff["after"]
    assert live(spec) == built.release and releases(spec) == [Path(built.release).name]


def test_comfyui_manager_imports_only_with_the_locked_down_settings(make_spec: Any, tmp_path: Path) -> None:
    manager = ("ComfyUI-Manager", "initial")
    message = build_fails(make_spec(manager))
    assert "custom node ComfyUI-Manager failed to import: ComfyUI-Manager settings missing" in message
    config = tmp_path / "comfyui-manager.ini"
    config.write_text("[default]\nnetwork_mode = offline\nsecurity_level = strong\n")
    spec = make_spec(manager, user_files={"__manager/config.ini": str(config)})
    assert engine.Builder(spec).run().changed


def cpu_recipe() -> tuple[dict[str, Any], str]:
    """The settings (the yaml block) and the wheelhouse commands (the sh block) of the section
    "CPU torch from PyPI" in docs/environments.md, as a user copies them."""
    text = (ROOT / "docs" / "environments.md").read_text()
    section = text.split("\n## CPU torch from PyPI\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```(\w+)\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    [settings] = [yaml.safe_load(body) for language, body in blocks if language == "yaml"]
    [commands] = [body for language, body in blocks if language == "sh"]
    return settings, commands


def test_the_documented_cpu_recipe_builds_offline_from_the_documented_wheelhouse(
    fixture_repos: dict[str, repos.Repo], wheels: Path, uv_cache: Path, tmp_path: Path
) -> None:
    """docs/environments.md's CPU recipe as written: its commands download the wheelhouse from a
    package index (a local one serving stand-ins for torch, torchvision and torchaudio, and the
    real uv), its environment builds from that folder with no index, and its torch set imports."""
    settings, commands = cpu_recipe()
    [(name, written)] = settings["comfyui_environments"].items()
    versions = dict(pin.split("==") for pin in written["torch_packages"])
    assert f"uv=={wheelhouse.UV_VERSION}" in commands, "the docs download the uv the role installs"
    assert set(re.findall(r"uv==([\w.]+)", (ROOT / "docs" / "environments.md").read_text())) == {wheelhouse.UV_VERSION}

    index = tmp_path / "index"
    index.mkdir()
    torch = versions["torch"]
    wheelhouse.stand_in(index, "torch", torch, {"torch/__init__.py": f"__version__ = {torch!r}\n"})
    vision = {
        "torchvision/__init__.py": "from . import ops\n",
        "torchvision/ops.py": "def nms(*args):\n    return []\n",
    }
    wheelhouse.stand_in(index, "torchvision", versions["torchvision"], vision, requires=(f"torch=={torch}",))
    wheelhouse.stand_in(
        index, "torchaudio", versions["torchaudio"], {"torchaudio/__init__.py": ""}, (f"torch=={torch}",)
    )
    shutil.copy(next(wheels.glob(f"uv-{wheelhouse.UV_VERSION}-*.whl")), index)

    work = tmp_path / "controller"
    work.mkdir()
    github = f"{Path(fixture_repos['ComfyUI'].path).parent.as_uri()}/"
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # python3 with pip
        "HOME": str(tmp_path / "home"),
        "PIP_CONFIG_FILE": os.devnull,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_COUNT": "1",  # GitHub is the fixture repositories
        "GIT_CONFIG_KEY_0": f"url.{github}.insteadOf",
        "GIT_CONFIG_VALUE_0": "https://github.com/comfyanonymous/",
    }
    with MockHub() as hub:
        serve_packages(hub, index)
        env["PIP_INDEX_URL"] = f"{hub.url}/simple"  # PyPI
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", commands], cwd=work, env=env, capture_output=True, text=True
        )
    assert done.returncode == 0, f"the documented commands failed: {done.stdout}{done.stderr}"
    folder = work / settings["comfyui_environments_wheelhouse_src"]
    assert sorted(p.name.split("-")[0] for p in folder.glob("*.whl")) == ["torch", "torchaudio", "torchvision", "uv"]

    flavors = yaml.safe_load((ROOT / "roles/comfyui_environments/defaults/main.yml").read_text())
    spec = engine.environment_spec(
        name,
        written,
        torch_flavors=flavors["comfyui_environments_torch_flavors"],
        root=str(tmp_path / "envs" / name),
        uv=venv_bin("uv"),
        wheelhouse=str(folder),  # what the role passes once it pushed comfyui_environments_wheelhouse_src
        cache_dir=str(uv_cache),
        git_cache=str(tmp_path / "git-cache"),
        git_mirrors={"https://github.com/comfyanonymous/": github},
        python=sys.executable,
    )
    built = engine.Builder(spec).run()
    packages = {p["name"]: p["version"] for p in built.lock["packages"]}
    assert {key: packages[key] for key in versions} == versions
    assert built.lock["torch"]["index_url"] == "" and not any("nodes_audio" in w for w in built.warnings)
    python = Path(built.release) / "venv" / "bin" / "python"
    check = "import torch, torchvision, torchaudio; torchvision.ops.nms; print(torch.__version__)"
    assert subprocess.run([python, "-c", check], capture_output=True, text=True).stdout.strip() == torch
