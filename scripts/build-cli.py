#!/usr/bin/env python3
"""Build the host's `comfybake` command as one file: a zipapp of src/comfybake with the engines
(plugins/module_utils, as comfybake.engine), run by the host's system python3.

The base role installs it from roles/comfyui/files/comfybake.pyz (the default output), so a
collection built after this step carries it. The archive is reproducible: entries are sorted
and dated 1980-01-01, so the same sources give the same bytes, and a host that has it
already reports no change. Standard library only; `scripts/bootstrap.sh` runs it.

It also carries picklescan (the pinned wheel, pure Python, with its licence), which scans the
pickle-based model files a manifest allows, on hosts where no one installs it: the command
uses it, and the module runs `comfybake models scan` when it cannot import it. The wheel is
downloaded once by pip into build/wheels (or given with --picklescan-wheel) and its SHA-256
is checked against PICKLESCAN_SHA256 before a byte of it goes in.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import os
import stat
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "comfybake"
ENGINES = ROOT / "plugins" / "module_utils"  # src/comfybake/engine in a checkout
OUTPUT = ROOT / "roles" / "comfyui" / "files" / "comfybake.pyz"
INTERPRETER = "/usr/bin/python3 -s"  # the system python3 (python3-requests, python3-yaml), no user site
MAIN = b"import sys\n\nfrom comfybake.cli import main\n\nsys.exit(main())\n"
EPOCH = (1980, 1, 1, 0, 0, 0)


def pinned_picklescan() -> str:
    """PICKLESCAN_VERSION from the engine's pickles.py, the one place the pin is written."""
    tree = ast.parse((ENGINES / "fetch" / "pickles.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["PICKLESCAN_VERSION"]:
            return str(ast.literal_eval(node.value))
    sys.exit(f"build-cli: no PICKLESCAN_VERSION in {ENGINES / 'fetch' / 'pickles.py'}")


PICKLESCAN_VERSION = pinned_picklescan()
PICKLESCAN = f"picklescan=={PICKLESCAN_VERSION}"
PICKLESCAN_WHEEL = f"picklescan-{PICKLESCAN_VERSION}-py3-none-any.whl"
# The published wheel's hash: change it together with PICKLESCAN_VERSION.
PICKLESCAN_SHA256 = "2abb3d4959a7ee9ccb1e1296db7c56f624bf6d345b93a0a9cf4185bc650dc2fd"
WHEELS = ROOT / "build" / "wheels"


def sources() -> list[tuple[str, bytes]]:
    """(name in the archive, content) of every module: the package, then its engines."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    found = [(f"comfybake/{path.name}", path.read_bytes()) for path in PACKAGE.glob("*.py")]
    found.append(("comfybake/VERSION", f"{version}\n".encode()))
    found += [
        (f"comfybake/engine/{path.relative_to(ENGINES).as_posix()}", path.read_bytes())
        for path in ENGINES.rglob("*.py")
        if "__pycache__" not in path.parts
    ]
    if not any(name == "comfybake/engine/fetch/__init__.py" for name, _content in found):
        sys.exit(f"build-cli: no engines in {ENGINES}")
    return sorted(found)


def picklescan_wheel(given: Path | None) -> Path:
    """The pinned picklescan wheel: the one given, else build/wheels', else pip downloads it there."""
    wheel = given or WHEELS / PICKLESCAN_WHEEL
    if given is None and not wheel.exists():
        WHEELS.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=WHEELS) as folder:  # then renamed: parallel builds see a whole file
            download = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
            done = subprocess.run([*download, "--dest", folder, PICKLESCAN], check=False)
            if done.returncode != 0 or not (Path(folder) / PICKLESCAN_WHEEL).exists():
                sys.exit(f"build-cli: pip could not download {PICKLESCAN}; give the wheel with --picklescan-wheel FILE")
            os.replace(Path(folder) / PICKLESCAN_WHEEL, wheel)
    try:
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    except OSError as error:
        sys.exit(f"build-cli: cannot read {wheel}: {error.strerror}")
    if digest != PICKLESCAN_SHA256:
        fix = "give the published wheel" if given else "remove it and build again"
        sys.exit(f"build-cli: {wheel} has sha256 {digest}, not {PICKLESCAN_SHA256} ({PICKLESCAN}); {fix}")
    return wheel


def vendored(wheel: Path) -> list[tuple[str, bytes]]:
    """picklescan's modules, its metadata (the version the engine checks) and licence, as the wheel holds them."""
    with zipfile.ZipFile(wheel) as archive:
        return [
            (name, archive.read(name))
            for name in archive.namelist()
            if (name.startswith("picklescan/") and name.endswith(".py"))
            or "/licenses/" in name
            or name.endswith(".dist-info/METADATA")
        ]


def build(output: Path, wheel: Path) -> bool:
    """Write the archive if its bytes differ from what is there; return whether it changed."""
    buffer = io.BytesIO()
    buffer.write(f"#!{INTERPRETER}\n".encode())
    with zipfile.ZipFile(buffer, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in [("__main__.py", MAIN), *sources(), *sorted(vendored(wheel))]:
            entry = zipfile.ZipInfo(name, date_time=EPOCH)
            entry.external_attr = (stat.S_IFREG | 0o644) << 16
            entry.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(entry, content)
    data = buffer.getvalue()
    if output.exists() and output.read_bytes() == data:
        return False
    output.parent.mkdir(parents=True, exist_ok=True)
    staged = output.with_name(f".{output.name}.tmp")
    staged.write_bytes(data)
    staged.chmod(0o755)
    os.replace(staged, output)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"where to write it (default: {OUTPUT})")
    parser.add_argument(
        "--picklescan-wheel",
        type=Path,
        help=f"{PICKLESCAN_WHEEL} to bundle, for builds without an index (default: pip downloads it)",
    )
    args = parser.parse_args()
    changed = build(args.output, picklescan_wheel(args.picklescan_wheel))
    print(f"build-cli: {args.output} {'written' if changed else 'is up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
