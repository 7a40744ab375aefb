"""scripts/preflight.py, the check `make up` and `make provision` run before anything long.

Every source is real and on this machine: a package index and a git remote over http from
servers on 127.0.0.1 (git's dumb http protocol, from a repository made with git), a git remote as
a file:// path, a port nothing listens on (refused) and one that accepts and never answers (no
answer). The offline folder is made of a git mirror, a wheelhouse of small wheels and a saved
base image's manifest.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from harness.wheelhouse import stand_in

ABSENT_IMAGE = "comfybake/preflight-absent:none"  # never built: the base image row must name it
GIT_ENV = {
    "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t.invalid", "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t.invalid", "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
}  # fmt: skip


def git(*args: str, cwd: Path | None = None) -> str:
    env = {**os.environ, **GIT_ENV}
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout


def bare_repo(path: Path, requirements: str = "") -> Path:
    """A bare repository at `path` with one commit tagged v0.8.0 (and a requirements.txt)."""
    work = path.with_name(path.name + ".work")
    git("init", "--quiet", "--initial-branch=master", str(work))
    (work / "requirements.txt").write_text(requirements)
    git("add", "requirements.txt", cwd=work)
    git("commit", "--quiet", "-m", "one", cwd=work)
    git("tag", "v0.8.0", cwd=work)
    git("clone", "--quiet", "--mirror", str(work), str(path))
    git("update-server-info", cwd=path)  # what git's dumb http protocol reads
    return path


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over http on 127.0.0.1, and its base URL."""
    folder = tmp_path / "www"
    folder.mkdir()
    handler = partial(SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on: connections are refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield server.getsockname()[1]


def preflight(root: Path, *args: str, packer_args: str = "", env: dict[str, str] | None = None) -> tuple[int, str]:
    run_env = {**os.environ, "COMFYBAKE_PACKER_ARGS": packer_args, "COMFYBAKE_PREFLIGHT_TIMEOUT": "2", **(env or {})}
    done = subprocess.run([sys.executable, str(root / "scripts" / "preflight.py"), *args],
                          cwd=root, env=run_env, capture_output=True, text=True, timeout=120)  # fmt: skip
    return done.returncode, done.stdout + done.stderr


def row(output: str, source: str) -> str:
    """The status table's line of a source (the first table, before the settings)."""
    table = output.partition("what replaces each")[0]
    lines = [line for line in table.splitlines() if source in line]
    assert lines, f"no row for {source} in:\n{output}"
    return lines[0]


def fix(output: str, source: str) -> str:
    """The line of the what-replaces-it table for a source."""
    lines = [line for line in output.partition("what replaces each")[2].splitlines() if source in line]
    assert lines, f"no replacement named for {source} in:\n{output}"
    return lines[0]


def inventory(folder: Path, settings: dict) -> Path:
    (folder / "group_vars").mkdir(parents=True)
    (folder / "group_vars" / "comfybake.yml").write_text(yaml.safe_dump(settings))
    return folder


def test_the_table_names_each_unreachable_source_and_the_setting_that_replaces_it(
    root: Path, tmp_path: Path, http_root: tuple[Path, str], closed_port: int, silent_port: int
) -> None:
    www, base = http_root
    (www / "simple" / "uv").mkdir(parents=True)
    (www / "simple" / "uv" / "index.html").write_text("<html></html>")
    bare_repo(www / "ComfyUI.git")  # served over http
    local = bare_repo(tmp_path / "Local.git")  # a file:// remote
    refused = f"http://127.0.0.1:{closed_port}"
    silent = f"http://127.0.0.1:{silent_port}"
    settings = {
        "comfyui_environments_index_url": f"{base}/simple",
        "comfyui_environments_extra_index_urls": [f"{silent}/extra"],
        "comfyui_environments_torch_flavors": {"cpu": {"index_url": f"{refused}/whl/cpu", "packages": ["torch"]}},
        "comfyui_environments_git_mirrors": {"https://github.com/comfyanonymous/": f"{base}/"},
        "comfyui_environments": {
            "main": {
                "comfyui_repo": "https://github.com/comfyanonymous/ComfyUI.git",
                "comfyui_version": "v0.8.0",
                "custom_nodes": [
                    {"repo": f"file://{local}", "version": "v0.8.0"},
                    {"repo": f"{refused}/nodes/Gone.git", "version": "v1"},
                ],
            }
        },
        "comfyui_models": [{"url": "hf://org/repo/model.safetensors@main", "dest": "checkpoints/model.safetensors"}],
        "comfyui_models_hf_endpoint": refused,
    }
    folder = inventory(tmp_path / "inventory", settings)
    args = f"-var inventory_dir={folder} -var base_image={ABSENT_IMAGE} -var docker_pull=false"
    status, output = preflight(root, "--target", "cpu", packer_args=args)

    assert status == 1, output
    assert row(output, f"{base}/simple").endswith(" ok")
    assert row(output, "https://github.com/comfyanonymous/ComfyUI.git").endswith(" ok")  # through the mirror
    assert row(output, f"file://{local}").endswith(" ok")
    assert "refused" in row(output, f"{refused}/whl/cpu").lower()
    assert "no answer within 2 s" in row(output, f"{silent}/extra")
    assert " ok" not in row(output, f"{refused}/nodes/Gone.git")
    assert "not in Docker, and docker_pull is false" in row(output, ABSENT_IMAGE)

    assert "comfyui_environments_torch_flavors.cpu.index_url" in fix(output, f"{refused}/whl/cpu")
    assert "comfyui_environments_extra_index_urls" in fix(output, f"{silent}/extra")
    assert f'comfyui_environments_git_mirrors: {{"{refused}/nodes/"' in fix(output, f"{refused}/nodes/Gone.git")
    assert "comfyui_models_hf_endpoint" in fix(output, refused + " ")
    assert "-var base_image=" in fix(output, ABSENT_IMAGE)
    assert f"{base}/simple" not in output.partition("what replaces each")[2]  # reachable: not in the fixes
    assert "what to do next:" in output
    assert "make up OFFLINE=<folder>" in output


def test_an_inventory_that_reaches_everything_passes(root: Path, tmp_path: Path, http_root: tuple[Path, str]) -> None:
    www, base = http_root
    (www / "simple").mkdir()
    bare_repo(www / "ComfyUI.git")
    settings = {
        "comfyui_environments_index_url": f"{base}/simple",
        "comfyui_environments_torch_flavors": {"cpu": {"index_url": f"{base}/simple", "packages": ["torch"]}},
        "comfyui_environments": {"main": {"comfyui_repo": f"{base}/ComfyUI.git", "comfyui_version": "v0.8.0"}},
    }
    folder = inventory(tmp_path / "inventory", settings)
    args = f"-var inventory_dir={folder} -var base_image={ABSENT_IMAGE} -var docker_pull=false"
    status, output = preflight(root, "--target", "cpu", packer_args=args)
    rows = [line for line in output.splitlines() if base in line]
    assert len(rows) == 2 and all(line.endswith(" ok") for line in rows), output
    # Only the base image, which no test builds, is left to replace.
    fixes = output.partition("what replaces each:")[2].partition("what to do next")[0].strip().splitlines()
    assert status == 1 and len(fixes) == 2 and ABSENT_IMAGE in fixes[1], output


def test_index_credentials_are_not_printed_nor_sent_in_the_probe(
    root: Path, tmp_path: Path, http_root: tuple[Path, str]
) -> None:
    """An index URL with credentials is probed without them (a 401 would still mean reachable)
    and printed as https://***@host."""
    www, base = http_root
    (www / "simple" / "uv").mkdir(parents=True)
    (www / "simple" / "uv" / "index.html").write_text("<html></html>")
    private = base.replace("://", "://builder:preflightCANARY@") + "/simple"
    settings = {
        "comfyui_environments_index_url": private,
        "comfyui_environments_torch_flavors": {"cpu": {"index_url": "", "packages": ["torch"]}},
        "comfyui_environments": {"main": {"comfyui_repo": f"{base}/ComfyUI.git", "comfyui_version": "v0.8.0"}},
    }
    bare_repo(www / "ComfyUI.git")
    folder = inventory(tmp_path / "inventory", settings)
    args = f"-var inventory_dir={folder} -var base_image={ABSENT_IMAGE} -var docker_pull=false"
    _status, output = preflight(root, "--target", "cpu", packer_args=args)
    assert "preflightCANARY" not in output
    assert row(output, base.replace("://", "://***@") + "/simple").endswith(" ok")


def test_make_provision_checks_mirrors_where_mounts_put_them(root: Path, tmp_path: Path) -> None:
    mirrors = tmp_path / "mirrors"
    bare_repo(mirrors / "ComfyUI.git")
    folder = tmp_path / "inventory"
    folder.mkdir()
    (folder / "hosts.yml").write_text(yaml.safe_dump({"comfybake": {"hosts": {"box": None}}}))
    (folder / "host_vars").mkdir()
    (folder / "host_vars" / "box.yml").write_text(yaml.safe_dump({
        "comfyui_environments_git_mirrors": {"https://github.com/comfyanonymous/": "file:///srv/mirrors/"},
        "comfyui_environments_wheelhouse": "/srv/wheelhouse",
        "comfyui_environments": {"main": {"comfyui_repo": "https://github.com/comfyanonymous/ComfyUI.git"}},
    }))  # fmt: skip
    status, output = preflight(root, "--inventory", str(folder), "--mounts", f"{mirrors}:/srv/mirrors:ro")
    assert row(output, "file:///srv/mirrors/ComfyUI.git").endswith(" ok")
    assert "/srv/wheelhouse" not in output  # not mounted: on the host, not this machine's to check
    assert status == 0, output
    status, output = preflight(root, "--inventory", str(folder), "--mounts", f"{tmp_path / 'elsewhere'}:/srv/mirrors")
    assert status == 1
    assert "comfyui_environments_git_mirrors" in fix(output, "file:///srv/mirrors/ComfyUI.git")
    assert "MOUNTS=" in output


# -- scripts/up.sh ---------------------------------------------------------------------------------


def up(root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("COMFYBAKE_FIXTURES", "COMFYBAKE_ORIGIN")}
    return subprocess.run([str(root / "scripts" / "up.sh")], cwd=root, env={**clean, **env},
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_make_up_of_the_test_target_says_what_it_needs_before_any_bake(root: Path) -> None:
    done = up(root, COMFYBAKE_TARGET="test")
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "COMFYBAKE_FIXTURES" in output and "COMFYBAKE_ORIGIN" in output
    assert "what to do next:" in output
    assert "pytest tests/packer" in output and "make up OFFLINE=<folder>" in output
    assert "stopped before the bake" in output
    assert "up: baking" not in output  # Packer never ran


def test_make_up_of_an_unknown_target_lists_the_targets(root: Path) -> None:
    done = up(root, COMFYBAKE_TARGET="no-such-target")
    assert done.returncode == 2
    assert "no target 'no-such-target'" in done.stderr
    assert "what to do next: choose one of cpu " in done.stderr


def test_make_up_offline_from_a_folder_that_does_not_exist(root: Path, tmp_path: Path) -> None:
    done = up(root, COMFYBAKE_OFFLINE=str(tmp_path / "none"))
    assert done.returncode == 2
    assert "does not exist" in done.stderr and "docs/bake.md" in done.stderr


# -- the offline folder ----------------------------------------------------------------------------


def saved_image(path: Path, tag: str) -> None:
    """The manifest.json of a `docker save` archive, which is all the preflight reads of it."""
    manifest = json.dumps([{"Config": "config.json", "RepoTags": [tag], "Layers": []}]).encode()
    with tarfile.open(path, "w") as archive:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        archive.addfile(info, io.BytesIO(manifest))


def test_the_offline_folder_names_each_missing_piece_then_maps_onto_the_settings(root: Path, tmp_path: Path) -> None:
    uv = yaml.safe_load((root / "roles/comfyui_environments/defaults/main.yml").read_text())[
        "comfyui_environments_uv_version"
    ]
    folder = tmp_path / "offline"
    folder.mkdir()
    saved_image(folder / "base-image.tar", ABSENT_IMAGE)
    bare_repo(folder / "git" / "github.com" / "comfyanonymous" / "ComfyUI.git", requirements="six>=1.16\n")
    wheelhouse = folder / "wheelhouse"
    wheelhouse.mkdir()
    stand_in(wheelhouse, "uv", uv, {})
    stand_in(wheelhouse, "torch", "2.13.0+cpu", {})
    settings = {
        "comfyui_environments_torch_flavors": {"cpu": {"index_url": "", "packages": ["torch==2.13.0+cpu"]}},
        "comfyui_environments": {
            "main": {
                "comfyui_repo": "https://github.com/comfyanonymous/ComfyUI.git",
                "comfyui_version": "v0.8.0",
                "custom_nodes": [{"repo": "https://github.com/someone/ComfyUI-Node.git", "version": "v1"}],
            }
        },
    }
    out = tmp_path / "out"
    args = ["--target", "cpu", "--offline", str(folder), "--out", str(out)]
    packer_args = f"-var inventory_dir={inventory(tmp_path / 'inventory', settings)}"
    status, output = preflight(root, *args, packer_args=packer_args)

    assert status == 1, output
    node = "git/github.com/someone/ComfyUI-Node.git"
    assert row(output, node).endswith("missing")
    assert f"git clone --mirror https://github.com/someone/ComfyUI-Node.git {folder / node}" in fix(output, node)
    assert row(output, "ComfyUI.git (main: v0.8.0)").endswith(" ok")
    assert row(output, "requirements of ComfyUI.git v0.8.0").endswith("no wheel for six")
    assert row(output, "torch==2.13.0+cpu").endswith(" ok")
    assert row(output, f"{ABSENT_IMAGE})").endswith(" ok")
    assert not out.exists()  # nothing to bake from yet

    bare_repo(folder / node, requirements="")
    git("tag", "v1", cwd=folder / node)
    stand_in(wheelhouse, "six", "1.17.0", {})
    status, output = preflight(root, *args, packer_args=packer_args)
    assert status == 0, output
    assert "all" in output.splitlines()[-1]

    packer = (out / "packer.args").read_text().splitlines()
    assert f"-var=base_image={ABSENT_IMAGE}" in packer
    assert "-var=docker_pull=false" in packer
    assert f"-var=docker_volumes={json.dumps({str(folder): '/srv/comfybake-offline'})}" in packer
    assert f"-var=extra_vars_files={json.dumps([str(out / 'vars.json')])}" in packer
    assert (out / "load").read_text().strip() == str(folder / "base-image.tar")
    ansible = json.loads((out / "vars.json").read_text())
    assert ansible["comfyui_environments_wheelhouse"] == "/srv/comfybake-offline/wheelhouse"
    # The mirrors map every remote into the mounted folder: git finds both repositories there.
    mirrors = ansible["comfyui_environments_git_mirrors"]
    assert mirrors == {"https://github.com/": "file:///srv/comfybake-offline/git/github.com/"}
    for repo in ("https://github.com/comfyanonymous/ComfyUI.git", "https://github.com/someone/ComfyUI-Node.git"):
        here = mirrors["https://github.com/"].replace("/srv/comfybake-offline", str(folder))
        assert git("-c", f"url.{here}.insteadOf=https://github.com/", "ls-remote", repo, "HEAD").strip()


def test_make_up_of_a_cuda_target_says_up_front_that_it_needs_a_gpu(root: Path, tmp_path: Path) -> None:
    runtimes = subprocess.run(["docker", "info", "--format", "{{json .Runtimes}}"], capture_output=True, text=True)
    # An inventory that does not exist stops a machine with a GPU in the preflight, before any bake.
    done = up(root, COMFYBAKE_TARGET="cu128-py312", COMFYBAKE_PACKER_ARGS=f"-var inventory_dir={tmp_path / 'none'}")
    assert done.returncode == 2, done.stdout + done.stderr
    if '"nvidia"' in runtimes.stdout:
        assert "does not exist" in done.stderr
    else:
        assert "its instances need an NVIDIA GPU" in done.stderr
        assert "what to do next: make up (the cpu target runs without a GPU)" in done.stderr
    assert "up: baking" not in done.stdout
