"""Environment builds under attack: what a node repository, a resolved package or a written URL
may not do (issue 15, items 4 to 8).

No code of a resolved package or a node runs as root at any step; git never reads a URL as an
option or over a transport comfybake does not accept, and the allowlist compares hosts and path
segments, not string prefixes; no requirement installs from a URL or a path unless allowed, in
whatever form it is written; submodules are refused unless allowed, checked and cached; a node
folder never takes the name of one of ComfyUI's modules. Real git, real uv, real wheels.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import wheelhouse
from harness.environments import engine, live, releases
from harness.repos import git
from harness.tools import venv_bin

from comfybake.engine.environment import requirements as reqs
from comfybake.engine.environment import spec as specs

BASIC = ("ComfyUI-Comfybake-Basic", "initial")
BROKEN = ("ComfyUI-Comfybake-Broken", "initial")
ACCOUNT = "nobody"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="builds switch to the service account only as root")


def build_fails(spec: engine.Spec) -> str:
    with pytest.raises(engine.EnvError) as failure:
        engine.Builder(spec).run()
    return str(failure.value)


def repository(parent: Path, name: str, files: dict[str, str | bytes], links: dict[str, str] | None = None) -> str:
    """A bare repository `parent/<name>.git` with one commit of `files` and gitlinks (path -> commit)."""
    work = parent / f"{name}-work"
    work.mkdir(parents=True)
    git(work, "init", "--quiet", "--initial-branch=main")
    for path, content in files.items():
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            (work / path).write_bytes(content)
        else:
            (work / path).write_text(content)
    git(work, "add", "--all")
    for path, commit in (links or {}).items():
        git(work, "update-index", "--add", "--cacheinfo", f"160000,{commit},{path}")
    git(work, "commit", "--quiet", "--no-gpg-sign", "-m", name)
    bare = parent / f"{name}.git"
    git(parent, "clone", "--quiet", "--bare", str(work), str(bare))
    shutil.rmtree(work)
    return git(bare, "rev-parse", "HEAD")


def node(name: str, url: str, commit: str) -> engine.Source:
    return engine.Source(name, url, commit)


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder the service account can traverse (pytest's own is private to its user)."""
    folder = Path(tempfile.mkdtemp(prefix="comfybake-hardening-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def account_spec(make_spec: Any, shared: Path, *nodes: tuple[str, str], **overrides: Any) -> engine.Spec:
    # The venv's interpreter must be one the account may run: the system's, not the test runner's.
    settings: dict[str, Any] = {"root": str(shared / "envs" / "comm"), "python": "/usr/bin/python3", "run_as": ACCOUNT}
    return make_spec(*nodes, **{**settings, **overrides})


def canary(folder: Path, marker: Path, name: str = "comfybake-pth-canary") -> Path:
    """A real wheel whose .pth file appends the uid of every interpreter that starts with site to `marker`."""
    folder.mkdir(parents=True, exist_ok=True)
    module = name.replace("-", "_")
    line = f"import os; open({str(marker)!r}, 'a').write('%d\\n' % os.getuid())\n"
    return wheelhouse.stand_in(folder, name, "1.0", {f"{module}.py": "", f"{module}.pth": line})


def uids(marker: Path) -> list[str]:
    return marker.read_text().split() if marker.exists() else []


# ---------------------------------------------------------------- 4: no package code as root


@as_root
def test_a_pth_file_of_a_resolved_package_never_runs_as_root(make_spec: Any, shared: Path) -> None:
    """compileall, `uv pip check`, the package list and the import gate's diagnosis all ran the
    venv's python as root with site, so a .pth file ran as root; now only the gate runs it, as the
    service account."""
    tray = shared / "marks"
    tray.mkdir(mode=0o777)
    tray.chmod(0o777)
    marker = tray / "uids"
    links = shared / "links"
    canary(links, marker)
    common = {"pip_packages": ["comfybake-pth-canary"], "find_links": [str(links)]}

    # A node that fails the gate: its diagnosis asks which imports nothing in the venv provides.
    message = build_fails(account_spec(make_spec, shared, BASIC, BROKEN, **common))
    assert "custom node ComfyUI-Comfybake-Broken failed to import" in message
    assert "likely missing package comfybake_fixture_missing_module" in message
    seen = uids(marker)
    assert "0" not in seen, f"a .pth file of a resolved package ran as root: {seen}"
    uid = str(subprocess.run(["id", "-u", ACCOUNT], capture_output=True, text=True).stdout.strip())
    assert uid in seen, "the canary is real: the gate, as the service account, ran it"

    marker.unlink()
    built = engine.Builder(account_spec(make_spec, shared, BASIC, **common)).run()
    assert {p["name"]: p["version"] for p in built.lock["packages"]}["comfybake-pth-canary"] == "1.0"
    assert "0" not in uids(marker) and uid in uids(marker)
    compiled = Path(built.release) / "ComfyUI" / "__pycache__"
    assert any(compiled.glob("main.*.pyc")), "compileall still wrote the bytecode"


@as_root
def test_the_hook_runs_as_the_service_account_and_the_venv_is_root_s_again(make_spec: Any, shared: Path) -> None:
    tray = shared / "marks"
    tray.mkdir()
    tray.chmod(0o777)
    links = shared / "links"
    extra = canary(links, tray / "uids", "comfybake-hook-extra")
    hook = shared / "hook.sh"
    hook.write_text(
        "#!/bin/sh\nset -e\n"
        f'id -u > "{tray}/hook-uid"\n'
        f'uv pip install --quiet --python "$VIRTUAL_ENV/bin/python" --no-index --find-links "{extra.parent}"'
        " comfybake-hook-extra\n"
    )
    hook.chmod(0o755)
    uid = str(subprocess.run(["id", "-u", ACCOUNT], capture_output=True, text=True).stdout.strip())

    built = engine.Builder(account_spec(make_spec, shared, BASIC, hook=str(hook))).run()
    assert (tray / "hook-uid").read_text().strip() == uid
    packages = {p["name"]: p for p in built.lock["packages"]}
    assert packages["comfybake-hook-extra"]["via"] == ["installed outside the resolution (hook)"]
    assert "0" not in uids(tray / "uids"), "the package the hook installed never ran as root"
    venv = Path(built.release) / "venv"
    for path in [venv, *venv.rglob("*")]:
        info = path.lstat()
        assert info.st_uid == 0 and info.st_gid == 0, f"{path} is not root's after the hook"
        if not stat.S_ISLNK(info.st_mode):
            assert not info.st_mode & 0o6022, f"{path} is writable by others or setuid after the hook"
    assert not (Path(built.release) / ".hook").exists()

    (tray / "hook-uid").unlink()
    spec = account_spec(make_spec, shared, BASIC, hook=str(hook), hook_as_root=True)
    as_root_build = engine.Builder(spec).run()
    assert (tray / "hook-uid").read_text().strip() == "0"
    assert as_root_build.fingerprint != built.fingerprint
    assert any("ran as root (hook_as_root is set)" in warning for warning in as_root_build.warnings)


def test_hook_as_root_is_a_key_of_an_environment() -> None:
    written = {"comfyui_repo": "https://github.com/comfyanonymous/ComfyUI.git", "comfyui_version": "v0.8.0"}
    flavors = {"cpu": {"packages": ["torch==2.13.0+cpu"]}}
    site = {"torch_flavors": flavors, "default_torch_flavor": "cpu", "root": "/r", "uv": "uv"}
    assert engine.environment_spec("comm", {**written, "hook_as_root": True}, **site).hook_as_root
    assert not engine.environment_spec("comm", written, **site).hook_as_root
    with pytest.raises(engine.EnvError, match="hook_as_root must be true or false, got 'yes'"):
        engine.environment_spec("comm", {**written, "hook_as_root": "yes"}, **site)


# ---------------------------------------------------------------- 5: URLs and the allowlist


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("--upload-pack=touch${IFS}PWNED", "starts with '-', which git would read as an option"),
        ("-uhttps://github.com/comfybake-fixtures/x.git", "starts with '-', which git would read as an option"),
        ("ext::sh -c touch% PWNED", "contains a space"),
        ("ext::sh", "names a git remote helper"),
        ("http://github.com/comfybake-fixtures/x.git", "uses http://"),
        ("git://github.com/comfybake-fixtures/x.git", "uses git://"),
        ("https://github.com@evil.example/comfybake-fixtures/x.git", "embeds credentials in its URL"),
        ("https://github.com/comfybake-fixtures/../evil/x.git", "has an empty, '.' or '..' segment"),
        ("git@-oProxyCommand=touch:x/y.git", "is not a git URL comfybake accepts"),
    ],
)
def test_repository_urls_git_would_misread_are_refused_before_any_git(
    make_spec: Any, tmp_path: Path, url: str, expected: str
) -> None:
    pwned = tmp_path / "pwned"  # what the command in a URL would create (before, git ran it as root)
    spec = make_spec()
    spec.custom_nodes = [node("Sneaky", url.replace("PWNED", str(pwned)), COMMIT)]
    message = build_fails(spec)
    assert "environment comm: custom node Sneaky repository" in message and expected in message
    assert not Path(spec.git_cache).exists(), "nothing reached git"
    assert not pwned.exists()


@pytest.mark.parametrize(
    ("entry", "url", "admitted"),
    [
        ("https://github.com/comfyanonymous", "https://github.com/comfyanonymous/ComfyUI.git", True),
        ("https://github.com/comfyanonymous", "https://github.com/comfyanonymous/ComfyUI", True),
        ("https://github.com/comfyanonymous/", "https://GitHub.com:443/comfyanonymous/x.git", True),
        ("https://github.com/comfyanonymous", "https://github.com/comfyanonymous-evil/ComfyUI.git", False),
        ("https://github.com/comfyanonymous/ComfyUI", "https://github.com/comfyanonymous/ComfyUI-evil.git", False),
        ("https://github.com/comfyanonymous/ComfyUI.git", "https://github.com/comfyanonymous/ComfyUI.git", True),
        ("https://github.com", "https://github.com/anyone/x.git", True),
        ("https://github.com", "https://github.com.evil.example/comfyanonymous/x.git", False),
        ("https://github.com", "https://github.com:8443/comfyanonymous/x.git", False),
        ("https://github.com/comfyanonymous", "git@github.com:comfyanonymous/x.git", False),
        ("git@github.com:comfyanonymous", "git@github.com:comfyanonymous/x.git", True),
        ("git@github.com:comfyanonymous", "ssh://git@github.com/comfyanonymous/x.git", True),
        ("file:///srv/git/", "/srv/git/nodes/x.git", True),
        ("file:///srv/git", "file:///srv/gitevil/x.git", False),
    ],
)
def test_the_allowlist_matches_scheme_host_and_whole_path_segments(entry: str, url: str, admitted: bool) -> None:
    spec = engine.Spec(
        name="comm",
        root="/r",
        comfyui=engine.Source("ComfyUI", "https://github.com/comfyanonymous/ComfyUI.git", "v0.8.0"),
        uv="uv",
        custom_nodes=[node("Node", url, COMMIT)],
        allowed_repos=[entry],
    )
    if admitted:
        specs.validate(spec, check_mode=True)
    else:
        with pytest.raises(engine.EnvError) as failure:
            specs.validate(spec, check_mode=True)
        assert "is not allowlisted" in str(failure.value) or "embeds credentials" in str(failure.value)


@pytest.mark.parametrize(
    ("mirrors", "expected"),
    [
        ({"https://github.com/": "--upload-pack=touch${IFS}x"}, "starts with '-'"),
        ({"https://github.com/": "http://mirror.internal/github/"}, "uses http://"),
        ({"-c": "https://mirror.internal/github/"}, "has a prefix '-c'"),
        ({"https://github.com/": "https://mirror.internal/a=b/"}, "must be a string without '='"),
    ],
)
def test_git_mirrors_must_be_urls_of_known_kinds(make_spec: Any, mirrors: dict[str, str], expected: str) -> None:
    spec = make_spec(git_mirrors=mirrors)
    message = build_fails(spec)
    assert "git mirror" in message and expected in message
    assert not Path(spec.git_cache).exists()


def test_an_allowlisted_owner_builds_through_its_mirror(make_spec: Any) -> None:
    spec = make_spec(BASIC, allowed_repos=["https://github.com/comfybake-fixtures"])
    assert engine.Builder(spec).run().changed
    refused = make_spec(BASIC, allowed_repos=["https://github.com/comfybake-fixture"])
    assert "is not allowlisted" in build_fails(refused)


# ---------------------------------------------------------------- 6: direct references


@pytest.mark.parametrize(
    "line",
    [
        "comfybake-shipped@file:ComfyUI/custom_nodes/Shipper/comfybake_shipped-1.0-py3-none-any.whl",
        "comfybake-shipped @file:///srv/x.whl",
        "comfybake-shipped[extra]@https://example.invalid/x.whl",
        "comfybake_shipped-1.0-py3-none-any.whl",
        "vendor/comfybake_shipped-1.0-py3-none-any.whl",
        "six ;@ file:x",
        "six==1.16.0@file:x",
        "${WHEEL}",
    ],
)
def test_every_form_of_a_direct_reference_is_refused(tmp_path: Path, make_spec: Any, line: str) -> None:
    path = tmp_path / "requirements.txt"
    path.write_text(f"six\n{line}\n")
    with pytest.raises(engine.EnvError) as failure:
        reqs.read_requirements("custom node X", str(path), make_spec())
    assert f"custom node X: requirements.txt line 2 {line!r} is a direct reference" in str(failure.value)
    assert reqs.read_requirements("custom node X", str(path), make_spec(allow_direct_references=True))[1] == line


def test_a_continued_line_is_read_as_pip_and_uv_read_it(tmp_path: Path, make_spec: Any) -> None:
    path = tmp_path / "requirements.txt"
    path.write_text("six==1.16.0 \\\n    --hash=sha256:0123abcd\nfilelock \\\n@ file:///srv/filelock.whl\n")
    with pytest.raises(engine.EnvError, match=r"requirements.txt line 3 'filelock @ file:///srv/filelock.whl'"):
        reqs.read_requirements("custom node X", str(path), make_spec())


@pytest.mark.parametrize(
    "line",
    [
        "six",
        "six==1.16.0",
        "Pillow>=9,<11",
        "foo[bar, baz] >= 1.0 ; python_version >= '3.8'",
        'mediapipe; platform_system != "Darwin"',
        "torch (>=2)",
        "numpy==1.26.*",
        "pydantic~=2.0",
    ],
)
def test_named_requirements_pass_as_packaging_reads_them(line: str) -> None:
    from packaging.requirements import Requirement

    assert reqs.direct_reference(line) is None
    assert Requirement(line).url is None


def test_a_node_cannot_install_a_wheel_it_ships(make_spec: Any, tmp_path: Path) -> None:
    wheel = wheelhouse.stand_in(tmp_path, "comfybake-shipped", "1.0", {"comfybake_shipped.py": "SHIPPED = True\n"})
    line = f"comfybake-shipped@file:ComfyUI/custom_nodes/Shipper/{wheel.name}"
    files: dict[str, str | bytes] = {
        "__init__.py": "import comfybake_shipped\nNODE_CLASS_MAPPINGS = {}\n",
        "requirements.txt": f"{line}\n",
        wheel.name: wheel.read_bytes(),
    }
    commit = repository(tmp_path / "repos", "Shipper", files)
    url = (tmp_path / "repos" / "Shipper.git").as_uri()
    spec = make_spec()
    spec.custom_nodes = [node("Shipper", url, commit)]
    message = build_fails(spec)
    assert f"custom node Shipper: requirements.txt line 1 {line!r} is a direct reference" in message
    assert releases(spec) == []

    allowed = make_spec(allow_direct_references=True)
    allowed.custom_nodes = spec.custom_nodes
    built = engine.Builder(allowed).run()
    assert "comfybake-shipped" in {p["name"] for p in built.lock["packages"]}


def test_the_compiled_lock_is_checked_with_uv_s_own_reading(tmp_path: Path, wheels: Path, make_spec: Any) -> None:
    wheel = wheelhouse.stand_in(tmp_path, "comfybake-shipped", "1.0", {"comfybake_shipped.py": ""})
    (tmp_path / "in.txt").write_text(f"six==1.16.0\ncomfybake-shipped @ {wheel.as_uri()}\n")
    compile_ = ["pip", "compile", "--quiet", "--no-header", "--generate-hashes", "--no-index", "--no-cache"]
    done = subprocess.run(
        [venv_bin("uv"), *compile_, "--find-links", str(wheels), "--python", "/usr/bin/python3", "in.txt"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert [name for name, _line in reqs.direct_entries(done.stdout)] == ["comfybake-shipped"]
    assert f"comfybake-shipped @ {wheel.as_uri()}" in reqs.direct_entries(done.stdout)[0][1]


def test_torch_packages_as_wheel_files_pass_the_lock_check(make_spec: Any, wheels: Path) -> None:
    [torch] = wheels.glob("torch-*.whl")
    built = engine.Builder(make_spec(torch_packages=[str(torch)])).run()
    assert {p["name"]: p["version"] for p in built.lock["packages"]}["torch"] == "2.13.0+cpu"


@pytest.mark.parametrize(
    ("key", "line"), [("pip_packages", "comfybake-shipped@file:/srv/x.whl"), ("pip_constraints", "-r other.txt")]
)
def test_pip_packages_and_constraints_follow_the_same_rule(make_spec: Any, key: str, line: str) -> None:
    spec = make_spec(**{key: [line]})
    message = build_fails(spec)
    assert f"environment comm: {key} entry {line!r} is" in message
    assert not Path(spec.git_cache).exists()


# ---------------------------------------------------------------- 7: submodules


def with_submodule(parent: Path, url: str | None = None) -> tuple[str, str, str]:
    """Repositories Inner (a module) and Outer (a node with Inner as submodule vendor/inner).
    Returns (Outer's URL, Outer's commit, Inner's URL)."""
    inner = repository(parent / "other", "Inner", {"inner.py": "VALUE = 'from the submodule'\n"})
    inner_url = (parent / "other" / "Inner.git").as_uri()
    modules = f'[submodule "inner"]\n\tpath = vendor/inner\n\turl = {url or inner_url}\n'
    code = (
        "import os, sys\nsys.path.insert(0, os.path.join(os.path.dirname(__file__), 'vendor', 'inner'))\n"
        "import inner\nNODE_CLASS_MAPPINGS = {}\n"
    )
    files: dict[str, str | bytes] = {"__init__.py": code, ".gitmodules": modules}
    outer = repository(parent / "nodes", "Outer", files, links={"vendor/inner": inner})
    return (parent / "nodes" / "Outer.git").as_uri(), outer, inner_url


def test_submodules_are_refused_unless_allowed(make_spec: Any, tmp_path: Path) -> None:
    url, commit, inner = with_submodule(tmp_path)
    spec = make_spec()
    spec.custom_nodes = [node("Outer", url, commit)]
    message = build_fails(spec)
    assert f"{url} has git submodules (vendor/inner from {inner})" in message
    assert "set allow_submodules: true" in message
    assert releases(spec) == []


def test_submodule_urls_are_checked_like_a_node_s(make_spec: Any, tmp_path: Path) -> None:
    url, commit, inner = with_submodule(tmp_path)
    spec = make_spec(allow_submodules=True, allowed_repos=[(tmp_path / "nodes").as_uri()])
    spec.custom_nodes = [node("Outer", url, commit)]
    message = build_fails(spec)
    assert f"custom node Outer: submodule vendor/inner repository {inner} is not allowlisted" in message

    pwned = tmp_path / "pwned"
    sneaky_url, sneaky, _inner = with_submodule(tmp_path / "sneaky", f"--upload-pack=touch${{IFS}}{pwned}")
    spec = make_spec(allow_submodules=True)
    spec.custom_nodes = [node("Outer", sneaky_url, sneaky)]
    message = build_fails(spec)
    assert "custom node Outer: submodule vendor/inner repository" in message and "starts with '-'" in message
    assert not pwned.exists()


def test_allowed_submodules_come_from_the_git_cache_and_build_offline(make_spec: Any, tmp_path: Path) -> None:
    url, commit, inner = with_submodule(tmp_path)
    spec = make_spec(allow_submodules=True, allowed_repos=[tmp_path.as_uri()])
    spec.custom_nodes = [node("Outer", url, commit)]
    built = engine.Builder(spec).run()
    vendored = Path(built.release) / "ComfyUI" / "custom_nodes" / "Outer" / "vendor" / "inner" / "inner.py"
    assert vendored.read_text() == "VALUE = 'from the submodule'\n"
    inner_commit = git(tmp_path / "other" / "Inner.git", "rev-parse", "HEAD")
    assert built.lock["submodules"] == [
        {"tree": "custom_nodes/Outer", "path": "vendor/inner", "url": inner, "commit": inner_commit}
    ]
    assert not engine.Builder(spec).run().changed, "the live tree with its submodule is clean"

    # Upstream gone (an air-gapped host): a rebuild takes both from the git cache.
    shutil.rmtree(tmp_path / "other")
    shutil.rmtree(tmp_path / "nodes")
    rebuilt = engine.Builder(dataclasses.replace(spec, revision="2")).run()
    assert rebuilt.changed and live(spec) == rebuilt.release
    assert (Path(rebuilt.release) / "ComfyUI" / "custom_nodes" / "Outer" / "vendor" / "inner" / "inner.py").exists()


# ---------------------------------------------------------------- 8: node folders named like ComfyUI's modules


@pytest.mark.parametrize("name", ["comfy", "nodes", "folder_paths", "server", "utils", "custom_nodes"])
def test_a_node_folder_named_like_a_comfyui_module_is_refused(make_spec: Any, name: str) -> None:
    spec = make_spec(BASIC)
    spec.custom_nodes = [dataclasses.replace(spec.custom_nodes[0], name=name)]
    message = build_fails(spec)
    assert f"custom node {name} (" in message and f"installed as custom_nodes/{name}" in message
    assert f"ComfyUI's own module {name}" in message and "set name: on this custom node" in message
    assert not Path(spec.git_cache).exists(), "refused before any checkout"


def test_the_top_level_of_the_checked_out_comfyui_is_refused_too(make_spec: Any) -> None:
    spec = make_spec(BASIC)
    spec.custom_nodes = [dataclasses.replace(spec.custom_nodes[0], name="models")]
    specs.validate(spec, check_mode=True)  # not a name the fixed list knows
    message = build_fails(spec)
    assert "custom node models (" in message and "ComfyUI's own module models" in message
    assert releases(spec) == []
