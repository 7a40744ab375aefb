"""Writable paths: a node pack that writes into its own folder at import (the Writer fixture).

The import gate runs as an unprivileged account, as the role runs it, so the release's code is
read-only to it exactly as it is to an instance. Undeclared, the pack's write fails and the
gate names the path and the setting; declared, each path is a link to the working directory of
the process that runs ComfyUI, the release keeps a seed, and every process writes its own copy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness.environments import engine

from comfybake.engine.environment import writable

WRITER = ("ComfyUI-Comfybake-Writer", "initial")
NODE = "custom_nodes/ComfyUI-Comfybake-Writer"
ACCOUNT = "nobody"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the import gate switches to another account only as root")


@pytest.fixture
def root() -> Iterator[Path]:
    """A folder the unprivileged account can traverse (pytest's own is private to its user)."""
    folder = Path(tempfile.mkdtemp(prefix="comfybake-writable-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def service_spec(make_spec: Any, root: Path, *declared: str, **overrides: Any) -> engine.Spec:
    # The venv's interpreter must be one the account may run: the system's, not the test runner's.
    spec = make_spec(WRITER, root=str(root / "envs" / "comm"), python="/usr/bin/python3", run_as=ACCOUNT, **overrides)
    spec.custom_nodes = [dataclasses.replace(node, writable=tuple(declared)) for node in spec.custom_nodes]
    return spec


def test_an_undeclared_write_fails_the_gate_naming_the_path_and_the_setting(make_spec: Any, root: Path) -> None:
    with pytest.raises(engine.EnvError) as failure:
        engine.Builder(service_spec(make_spec, root)).run()
    message = str(failure.value)
    assert "custom node ComfyUI-Comfybake-Writer failed to import: [Errno 13] Permission denied:" in message
    assert (
        "custom node ComfyUI-Comfybake-Writer writes settings.json inside its own folder, which is read-only code."
        " Add writable: [settings.json] to this custom node, or ComfyUI-Comfybake-Writer: [settings.json] to"
        " comfyui_environments_writable_paths"
    ) in message
    assert not (root / "envs" / "comm" / "current").exists()


def test_declared_paths_are_links_with_seeds_and_each_process_writes_its_own_copy(make_spec: Any, root: Path) -> None:
    spec = service_spec(make_spec, root, "history/", "settings.json")
    built = engine.Builder(spec).run()
    release = Path(built.release)
    code = release / "ComfyUI" / NODE
    assert os.readlink(code / "settings.json") == f"/proc/self/cwd/{NODE}/settings.json"
    assert os.readlink(code / "history") == f"/proc/self/cwd/{NODE}/history"
    assert built.lock["custom_nodes"][0]["writable"] == ["history/", "settings.json"]
    assert built.lock["writable"] == [f"{NODE}/history/", f"{NODE}/settings.json"]

    # The seeds: the pack's own history/ from its repository, and the settings file the pack
    # wrote at import in the gate's copy (it had none); nothing the gate appended to history/.
    seeds = release / "writable" / NODE
    assert json.loads((seeds / "settings.json").read_text()) == {"greeting": "hello from the writer"}
    assert sorted(p.name for p in (seeds / "history").iterdir()) == ["README.md"]

    # Two processes, each in its own working directory as instances are, import the pack.
    python = release / "venv" / "bin" / "python"
    for name in ("one", "two"):
        workdir = root / name
        assert (
            writable.provide(str(release / "writable"), str(workdir), built.lock["writable"]) == built.lock["writable"]
        )
        env = {**os.environ, "COMFYUI_INSTANCE": name}
        subprocess.run([python, code / "__init__.py"], cwd=workdir, env=env, check=True)
    for name in ("one", "two"):
        assert (root / name / NODE / "history" / "imports.log").read_text() == f"{name}\n"
        assert (root / name / NODE / "history" / "README.md").is_file()
    assert sorted(p.name for p in (seeds / "history").iterdir()) == ["README.md"]

    # A re-run finds the links as built: nothing to do.
    again = engine.Builder(service_spec(make_spec, root, "history/", "settings.json")).run()
    assert not again.changed and again.release == built.release


def test_known_cases_and_the_site_table_declare_paths_by_folder_or_repository_name() -> None:
    site = {"ComfyUI-Comfybake-Writer": ["settings.json"], "Renamed": ["cache/"]}
    assert writable.declared("Renamed", "ComfyUI-Comfybake-Writer", ["own.txt"], site) == [
        "cache/",
        "own.txt",
        "settings.json",
    ]
    for name, paths in writable.KNOWN.items():
        assert paths and all(writable.problem(name, path) is None for path in paths), name
    assert writable.in_comfyui("Renamed", "../../web/extensions/renamed/") == "web/extensions/renamed/"


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/etc/passwd", "must be relative to the node's folder"),
        ("../ComfyUI-Other/settings.json", "must not reach into the folder of another custom node"),
        ("../../../settings.json", "must stay inside ComfyUI's folder"),
        ("a//b", "must be normalised"),
        (".git/config", "must not be inside .git"),
        ("settings.json\nExecStartPre=+/bin/sh", "must not contain control characters"),
    ],
)
def test_writable_paths_outside_the_node_or_with_control_characters_are_refused(
    make_spec: Any, root: Path, path: str, why: str
) -> None:
    with pytest.raises(engine.EnvError) as failure:
        engine.Builder(service_spec(make_spec, root, path)).run()
    assert f"writable path {path!r} of custom node ComfyUI-Comfybake-Writer {why}" in str(failure.value)


def test_a_folder_made_in_comfyuis_own_folder_is_named_relative_to_the_node_as_a_folder(tmp_path: Path) -> None:
    # os.makedirs names the first folder it cannot create; the hint declares it as a folder.
    comfyui = str(tmp_path / "ComfyUI")
    error = (
        f'  File "/usr/lib/python3.11/os.py", line 225, in makedirs\n'
        f"PermissionError: [Errno 13] Permission denied: '{comfyui}/web'"
    )
    assert writable.permission_hint(error, comfyui, "ComfyUI-Example") == (
        "  custom node ComfyUI-Example writes ../../web/ inside ComfyUI's folder, which is read-only code. Add"
        " writable: [../../web/] to this custom node, or ComfyUI-Example: [../../web/] to"
        " comfyui_environments_writable_paths (relative to the node's folder, a trailing / for a folder), so"
        " that each instance and the import gate get their own copy (docs/environments.md, writable paths)"
    )
    assert writable.permission_hint(error.replace(comfyui, "/home/user"), comfyui, "ComfyUI-Example") is None
