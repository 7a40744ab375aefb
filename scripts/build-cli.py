#!/usr/bin/env python3
"""Build the host's `comfybake` command as one file: a zipapp of src/comfybake with the engines
(plugins/module_utils, as comfybake.engine), run by the host's system python3.

The base role installs it from roles/comfyui/files/comfybake.pyz (the default output), so a
collection built after this step carries it. The archive is reproducible: entries are sorted
and dated 1980-01-01, so the same sources give the same bytes, and a host that has it
already reports no change. Standard library only; `scripts/bootstrap.sh` runs it.
"""

from __future__ import annotations

import argparse
import io
import os
import stat
import sys
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


def build(output: Path) -> bool:
    """Write the archive if its bytes differ from what is there; return whether it changed."""
    buffer = io.BytesIO()
    buffer.write(f"#!{INTERPRETER}\n".encode())
    with zipfile.ZipFile(buffer, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in [("__main__.py", MAIN), *sources()]:
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
    args = parser.parse_args()
    changed = build(args.output)
    print(f"build-cli: {args.output} {'written' if changed else 'is up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
