#!/usr/bin/env python3
"""Build the host's `comfybake` command as one file: a zipapp of src/comfybake (its subpackages, such as
comfybake.jobs, included) with the engines (plugins/module_utils, as comfybake.engine), run by the host's
system python3.

The base role installs it from roles/comfyui/files/comfybake.pyz (the default output), so a
collection built after this step carries it. The archive is reproducible: entries are sorted
and dated 1980-01-01, so the same sources give the same bytes, and a host that has it
already reports no change. Standard library only; `scripts/bootstrap.sh` runs it.

It also carries pinned pure-Python wheels (BUNDLED: their modules, metadata and licences) that
hosts then need not install: picklescan, which scans the pickle-based model files a manifest
allows (the command uses it, and the module runs `comfybake models scan` when it cannot import
it), the exporter's prometheus_client and nvidia-ml-py (`comfybake exporter`), and the job
service's aiohttp with its dependencies (`comfybake jobs`: SERVE). Each wheel is downloaded once by
pip into build/wheels (or given with --wheel FILE) and its SHA-256 is checked against the published
one before a byte of it goes in. Every one is a pure-Python wheel (py3-none-any) that runs on
Python 3.10, the oldest system python3 of the hosts: aiohttp's and its dependencies' compiled
speedups are optional (each falls back to its Python code when it cannot import them), so hosts
need no compiler, no venv and no AIOHTTP_NO_EXTENSIONS.
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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "comfybake"
ENGINES = ROOT / "plugins" / "module_utils"  # src/comfybake/engine in a checkout
OUTPUT = ROOT / "roles" / "comfyui" / "files" / "comfybake.pyz"
INTERPRETER = "/usr/bin/python3 -s"  # the system python3 (python3-requests, python3-yaml), no user site
MAIN = b"import sys\n\nfrom comfybake.cli import main\n\nsys.exit(main())\n"
EPOCH = (1980, 1, 1, 0, 0, 0)


EXPORTER = PACKAGE / "exporter.py"


def pinned(source: Path, constant: str) -> str:
    """A module-level string constant of a source file, the one place that pin is written."""
    tree = ast.parse(source.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [constant]:
            return str(ast.literal_eval(node.value))
    sys.exit(f"build-cli: no {constant} in {source}")


@dataclass(frozen=True)
class Wheel:
    """A pinned pure-Python wheel the archive carries: which top-level modules of it, and its published hash."""

    requirement: str  # project==version, as pip takes it
    sha256: str  # the published wheel's: change it together with the pin
    modules: tuple[str, ...]  # top-level packages or modules to bundle (not the wheel's examples or tests)

    @property
    def filename(self) -> str:
        project, _equals, version = self.requirement.partition("==")
        return f"{project.replace('-', '_').lower()}-{version}-py3-none-any.whl"


def extra_pin(extra: str, project: str) -> str:
    """The `project==version` pin of pyproject.toml's optional dependencies `extra`, the one place it is written."""
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][extra]
    found = [pin for pin in pins if pin.partition("==")[0] == project]
    if len(found) != 1:
        sys.exit(f"build-cli: pyproject.toml's optional dependencies {extra!r} pin no {project}==VERSION")
    return str(found[0])


PICKLESCAN_VERSION = pinned(ENGINES / "fetch" / "pickles.py", "PICKLESCAN_VERSION")
PICKLESCAN = f"picklescan=={PICKLESCAN_VERSION}"
# The exporter's (`comfybake exporter`): prometheus_client always, nvidia-ml-py (pynvml) only where
# a GPU's NVML is asked for; both imported only by that command.
PROMETHEUS_CLIENT = pinned(EXPORTER, "PROMETHEUS_CLIENT")
NVML = f"nvidia-ml-py=={pinned(EXPORTER, 'NVML_VERSION')}"
# The job service's (`comfybake jobs`, docs/serving.md): aiohttp at pyproject.toml's `serve` pin and
# what its METADATA requires, the Python 3.10 ones (async-timeout below 3.11, typing_extensions below
# 3.13) always, since the archive is one for every host. The versions are those of the constraints
# but multidict's: 7.2 needs Python 3.11, so the archive carries 7.1.0, the newest for 3.10.
AIOHTTP = extra_pin("serve", "aiohttp")
SERVE = (
    Wheel(AIOHTTP, "efc21a454892828368b11c2c780de0ff8bc991f73f6b99c6b66e56205470929b", ("aiohttp",)),
    Wheel(
        "aiohappyeyeballs==2.7.1",
        "9243213661e29250eb41368e5daa826fc017156c3b8a11440826b2e3ed376472",
        ("aiohappyeyeballs",),
    ),
    Wheel("aiosignal==1.4.0", "053243f8b92b990551949e63930a839ff0cf0b0ebbe0597b0f3fb19e1a0fe82e", ("aiosignal",)),
    Wheel(
        "async-timeout==5.0.1", "39e3809566ff85354557ec2398b55e096c8364bacac9405a7a1fa429e77fe76c", ("async_timeout",)
    ),
    Wheel("attrs==26.1.0", "c647aa4a12dfbad9333ca4e71fe62ddc36f4e63b2d260a37a8b83d2f043ac309", ("attr", "attrs")),
    Wheel("frozenlist==1.8.0", "0c18a16eab41e82c295618a77502e17b195883241c563b00f0aa5106fc4eaa0d", ("frozenlist",)),
    Wheel("idna==3.20", "ab7ae7122974553370f0bdb919e1a960b2cd1bc1ef0276416d896db81c14582c", ("idna",)),
    Wheel("multidict==7.1.0", "d9ef29cfd98e17085b4f91bba8fa1570bec6787d5c52ce653ed33a58785585d0", ("multidict",)),
    Wheel("propcache==0.5.4", "62c60aec739ed00124573cce1178138fd690c7676352d67a37328c1cf51d7468", ("propcache",)),
    Wheel(
        "typing_extensions==4.16.0",
        "481caa481374e813c1b176ada14e97f1f67a4539ce9cfeb3f350d78d6370c2e8",
        ("typing_extensions",),
    ),
    Wheel("yarl==1.25.1", "681c758b0490f9e96b78e5fa8e8dc6e648e9185bb6eaebe73183c33ea0c445f3", ("yarl",)),
)
BUNDLED = (
    Wheel(PICKLESCAN, "2abb3d4959a7ee9ccb1e1296db7c56f624bf6d345b93a0a9cf4185bc650dc2fd", ("picklescan",)),
    Wheel(
        PROMETHEUS_CLIENT, "fa93d06737aa02bacd05794768508bb97d2fbee28cb3bca04eaae92f0ca953d6", ("prometheus_client",)
    ),
    Wheel(NVML, "959bf4adf6fe1308e4bd739e722236b0d1ec8392e2cefad33ff70c311380b9b6", ("pynvml",)),
    *SERVE,
)
WHEELS = ROOT / "build" / "wheels"


def sources() -> list[tuple[str, bytes]]:
    """(name in the archive, content) of every module: the package and its subpackages, then its engines."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    found = [(f"comfybake/{path.relative_to(PACKAGE).as_posix()}", path.read_bytes()) for path in package_modules()]
    found.append(("comfybake/VERSION", f"{version}\n".encode()))
    found += [
        (f"comfybake/engine/{path.relative_to(ENGINES).as_posix()}", path.read_bytes())
        for path in ENGINES.rglob("*.py")
        if "__pycache__" not in path.parts
    ]
    if not any(name == "comfybake/engine/fetch/__init__.py" for name, _content in found):
        sys.exit(f"build-cli: no engines in {ENGINES}")
    return sorted(found)


def package_modules() -> list[Path]:
    """The package's modules, subpackages (comfybake.jobs) included: not the engines' link nor caches."""
    found: list[Path] = []
    for folder, subfolders, files in os.walk(PACKAGE):  # os.walk does not follow the `engine` link
        subfolders[:] = sorted(name for name in subfolders if name not in ("__pycache__", "engine"))
        found += [Path(folder) / name for name in sorted(files) if name.endswith(".py")]
    return found


def given_wheels(given: list[Path]) -> dict[str, Path]:
    """The wheels given on the command line, by the name of the pinned wheel each one is."""
    expected = {wheel.filename for wheel in BUNDLED}
    found: dict[str, Path] = {}
    for path in given:
        if path.name not in expected:
            names = ", ".join(sorted(expected))
            sys.exit(f"build-cli: {path} is not one of the pinned wheels ({names}); give those files")
        found[path.name] = path
    return found


def fetched(wheel: Wheel, given: Path | None) -> Path:
    """The pinned wheel: the one given, else build/wheels', else pip downloads it there; its SHA-256 checked."""
    path = given or WHEELS / wheel.filename
    if given is None and not path.exists():
        WHEELS.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=WHEELS) as folder:  # then renamed: parallel builds see a whole file
            download = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
            # The pure wheel, not this machine's compiled one (aiohttp publishes both).
            download += ["--implementation", "py", "--abi", "none", "--platform", "any"]
            done = subprocess.run([*download, "--dest", folder, wheel.requirement], check=False)
            if done.returncode != 0 or not (Path(folder) / wheel.filename).exists():
                sys.exit(f"build-cli: pip could not download {wheel.requirement}; give the wheel with --wheel FILE")
            os.replace(Path(folder) / wheel.filename, path)
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as error:
        sys.exit(f"build-cli: cannot read {path}: {error.strerror}")
    if digest != wheel.sha256:
        fix = "give the published wheel" if given else "remove it and build again"
        sys.exit(f"build-cli: {path} has sha256 {digest}, not {wheel.sha256} ({wheel.requirement}); {fix}")
    return path


def licence(name: str) -> bool:
    """Whether a wheel's entry is a licence or notice: under .dist-info/licenses/, or older wheels' LICENSE*."""
    folder, _slash, base = name.rpartition("/")
    return ".dist-info/licenses/" in name or (
        folder.endswith(".dist-info") and base.upper().startswith(("LICENSE", "LICENCE", "COPYING", "NOTICE"))
    )


def vendored(wheel: Wheel, path: Path) -> list[tuple[str, bytes]]:
    """The wheel's modules, its metadata (the version a caller may check) and licence, as the wheel holds them."""
    with zipfile.ZipFile(path) as archive:
        return [
            (name, archive.read(name))
            for name in archive.namelist()
            if (name.endswith(".py") and (name.split("/")[0] in wheel.modules or name[: -len(".py")] in wheel.modules))
            or licence(name)
            or name.endswith(".dist-info/METADATA")
        ]


def bundled(given: list[Path]) -> list[tuple[str, bytes]]:
    """Every pinned wheel's entries for the archive."""
    paths = given_wheels(given)
    return [entry for wheel in BUNDLED for entry in vendored(wheel, fetched(wheel, paths.get(wheel.filename)))]


def build(output: Path, wheels: list[tuple[str, bytes]]) -> bool:
    """Write the archive if its bytes differ from what is there; return whether it changed."""
    buffer = io.BytesIO()
    buffer.write(f"#!{INTERPRETER}\n".encode())
    with zipfile.ZipFile(buffer, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in [("__main__.py", MAIN), *sources(), *sorted(wheels)]:
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
    names = ", ".join(wheel.filename for wheel in BUNDLED)
    parser.add_argument(
        "--wheel",
        dest="wheels",
        type=Path,
        action="append",
        default=[],
        help=f"a pinned wheel to bundle, for builds without an index (repeat it; one of {names}; "
        "default: build/wheels, or pip downloads it there)",
    )
    parser.add_argument("--picklescan-wheel", dest="wheels", type=Path, action="append", help="the same as --wheel")
    args = parser.parse_args()
    changed = build(args.output, bundled(args.wheels))
    print(f"build-cli: {args.output} {'written' if changed else 'is up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
