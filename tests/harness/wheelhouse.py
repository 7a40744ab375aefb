"""The local wheelhouse and git mirrors that environment tests install from.

Tests never reach GitHub, and hosts under test never reach an index: the controller downloads
the wheels once (`pip download`, the documented offline path) into a cache keyed by the
requirement list, and builds the fixture repositories (`harness.repos`). Run
`python -m harness.wheelhouse DEST` (from `tests/`) to write both under DEST and print the
JSON description also written to `DEST/environments.json`.

The wheelhouse holds a CPU build of torch (the environments pin it like a real flavour), both
versions of six the fixture nodes fight over, and the uv the role installs on the host.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import asdict
from pathlib import Path

import yaml

from harness import repos
from harness.tools import ROOT

TORCH = "torch==2.13.0+cpu"
UV_VERSION = yaml.safe_load((ROOT / "roles/comfyui_environments/defaults/main.yml").read_text())[
    "comfyui_environments_uv_version"
]
# Resolved with their dependencies, then the wheels fetched on their own.
REQUIREMENTS = (TORCH, "six==1.16.0", f"uv=={UV_VERSION}")
NO_DEPS = ("six==1.17.0",)
CACHE = Path(os.environ.get("COMFYBAKE_TEST_CACHE", Path.home() / ".cache" / "comfybake-tests"))


def wheelhouse(requirements: tuple[str, ...] = REQUIREMENTS, no_deps: tuple[str, ...] = NO_DEPS) -> Path:
    """The cached wheelhouse for these requirements, downloaded on first use."""
    key = hashlib.sha256(json.dumps([requirements, no_deps, sys.version_info[:2]]).encode()).hexdigest()[:12]
    dest = CACHE / f"wheelhouse-{key}"
    if (dest / ".complete").exists():
        return dest
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / f"wheelhouse-{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # tests running in parallel download it once
        if not (dest / ".complete").exists():
            _download(dest, requirements, no_deps)
    return dest


def _download(dest: Path, requirements: tuple[str, ...], no_deps: tuple[str, ...]) -> None:
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary", ":all:", "--dest", str(partial)]
    for args in ([*requirements], ["--no-deps", *no_deps]):
        done = subprocess.run([*pip, *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"pip download {' '.join(args)} failed: {done.stderr[-3000:]}")
    (partial / ".complete").write_text("\n".join(sorted(p.name for p in partial.glob("*.whl"))) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)


def stand_in(folder: Path, name: str, version: str, files: dict[str, str], requires: tuple[str, ...] = ()) -> Path:
    """A small pure-Python wheel `name==version` with these files and Requires-Dist lines: a
    stand-in for a package too large to download in a test (torch), shaped like it for pip and
    uv (a name, a version, the dependencies that tie a release set together)."""
    distribution = name.replace("-", "_")
    wheel = folder / f"{distribution}-{version}-py3-none-any.whl"
    info = f"{distribution}-{version}.dist-info"
    metadata = "".join(
        [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", *(f"Requires-Dist: {r}\n" for r in requires)]
    )
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
        archive.writestr(f"{info}/METADATA", metadata)
        archive.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: comfybake-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        archive.writestr(f"{info}/RECORD", "")
    return wheel


def build(dest: Path) -> dict[str, object]:
    """Fixture repositories under `dest/repos` and the wheelhouse; returns (and writes) their description."""
    dest = dest.resolve()
    fixtures = repos.build(dest / "repos")
    description = {
        "repos": str(dest / "repos"),
        "wheelhouse": str(wheelhouse()),
        "torch": TORCH,
        "commits": {name: repo.commits for name, repo in fixtures.items()},
        "fixtures": {name: asdict(repo) for name, repo in fixtures.items()},
    }
    (dest / "environments.json").write_text(json.dumps(description, indent=2) + "\n")
    return description


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m harness.wheelhouse DEST", file=sys.stderr)
        return 2
    print(json.dumps(build(Path(argv[0])), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
