# Copyright: comfybake contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Which packages a node that failed to import most likely lacks: what its source imports, less
what the environment's venv provides.

Node packs often import a package they never declare, and many hide the failure
(`try: import yaml` / `except ImportError: pass`), so ComfyUI reports a later
`name 'yaml' is not defined` instead. This reads the pack's Python files with `ast` (imports
at module level, inside `try`/`if`/`with` blocks too; relative imports left out), drops the
standard library, the pack's own modules, ComfyUI's modules and the other custom nodes, and asks
the venv's own interpreter which of the rest it cannot import (the installed distributions'
metadata: `packages_distributions()`, `top_level.txt` and their files; then `find_spec`). An
import name is not always its distribution's name: `DISTRIBUTIONS` maps the common ones, a
site adds its own (`import_names`, the role's `comfyui_environments_import_names`), and any
other name is suggested as it is written.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .errors import EnvError
from .process import run, tail

# Import name -> the distribution that provides it, where the two differ. Data only: add a row
# for a package that nodes import under another name (or set import_names for one site).
DISTRIBUTIONS: dict[str, str] = {
    "attr": "attrs",
    "bs4": "beautifulsoup4",
    "cairo": "pycairo",
    "cv2": "opencv-python",
    "Crypto": "pycryptodome",
    "dateutil": "python-dateutil",
    "docx": "python-docx",
    "dotenv": "python-dotenv",
    "fitz": "PyMuPDF",
    "gi": "PyGObject",
    "git": "GitPython",
    "jwt": "PyJWT",
    "magic": "python-magic",
    "mpl_toolkits": "matplotlib",
    "nacl": "PyNaCl",
    "OpenSSL": "pyOpenSSL",
    "PIL": "pillow",
    "serial": "pyserial",
    "skimage": "scikit-image",
    "sklearn": "scikit-learn",
    "socks": "PySocks",
    "usb": "pyusb",
    "websocket": "websocket-client",
    "yaml": "PyYAML",
    "zmq": "pyzmq",
}

# Packages that come with the torch flavour: a node that lacks one needs it in torch_packages.
TORCH_FAMILY = ("torch", "torchvision", "torchaudio", "xformers")

_SKIP_DIRS = {".git", "__pycache__", "node_modules", ".venv", "venv"}
_MAX_FILES = 2000
_NO_MODULE = re.compile(r"No module named '([^']+)'")
_NOT_DEFINED = re.compile(r"name '([^']+)' is not defined")

# Run isolated (-I: the working directory and PYTHON* variables ignored) and without site (-S: no
# .pth file runs, no sitecustomize): argv[1] is a JSON list of the venv's site-packages folders,
# put at the end of sys.path, so the standard library comes first and no module of a package is
# ever imported (only its metadata files are read); the other arguments are the candidate names.
# Prints those it cannot import.
_PROBE = """
import sys
sys.path += __import__("json").loads(sys.argv.pop(1))
import importlib.metadata as md, importlib.util, inspect, json
names = set(md.packages_distributions())
for dist in md.distributions():
    names.update(line.strip() for line in (dist.read_text("top_level.txt") or "").splitlines() if line.strip())
    for path in dist.files or ():
        parts = path.parts
        if not parts or parts[0] == ".." or parts[0].endswith((".dist-info", ".egg-info", ".data")):
            continue
        name = parts[0] if len(parts) > 1 else inspect.getmodulename(parts[0])
        if name:
            names.add(name)
def importable(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
missing = [n for n in sys.argv[1:] if n not in sys.stdlib_module_names and n not in names and not importable(n)]
print(json.dumps(missing))
"""


@dataclass(frozen=True)
class Import:
    """One module-level import statement of a node's source."""

    module: str  # the top-level name: `matplotlib` for `import matplotlib.pyplot as plt`
    statement: str  # as written: `import matplotlib.pyplot as plt`
    binds: tuple[str, ...]  # the names it defines in the module: ("plt",)
    file: str  # relative to the node's folder
    line: int
    swallowed: bool  # inside a `try` whose handlers catch ImportError (or everything)


def module_names(folder: str) -> set[str]:
    """Names importable from a folder: its `.py` files and subfolders, at any depth (packs put
    their subfolders on sys.path and import them by plain name)."""
    names: set[str] = set()
    for _root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".")]
        names.update(dirs)
        names.update(f[:-3] for f in files if f.endswith(".py"))
    return names


def python_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path] if path.endswith(".py") else []
    found: list[str] = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        found.extend(os.path.join(root, f) for f in sorted(files) if f.endswith(".py"))
        if len(found) >= _MAX_FILES:
            break
    return found[:_MAX_FILES]


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    names = list(handler.type.elts) if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(
        isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError", "Exception", "BaseException")
        for n in names
    )


def _module_level(body: Iterable[ast.stmt], swallowed: bool = False) -> Iterable[tuple[ast.stmt, bool]]:
    """Statements run when the module is imported: into try/if/with/loops, not into functions or classes."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, swallowed
        elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":  # TryStar: Python 3.11+
            handlers: list[ast.ExceptHandler] = getattr(node, "handlers", [])
            catches = swallowed or any(_catches_import_error(h) for h in handlers)
            yield from _module_level(getattr(node, "body", []), catches)
            for part in (getattr(node, "orelse", []), getattr(node, "finalbody", [])):
                yield from _module_level(part, swallowed)
            for handler in handlers:
                yield from _module_level(handler.body, swallowed)
        elif isinstance(node, (ast.If, ast.For, ast.While)):
            yield from _module_level(node.body, swallowed)
            yield from _module_level(node.orelse, swallowed)
        elif isinstance(node, ast.With):
            yield from _module_level(node.body, swallowed)


def imports(path: str) -> list[Import]:
    """The absolute module-level imports of a node (a folder or one file); unreadable files are skipped."""
    base = path if os.path.isdir(path) else os.path.dirname(path)
    found: list[Import] = []
    for file in python_files(path):
        try:
            with open(file, "rb") as handle:
                tree = ast.parse(handle.read(), filename=file)
        except (OSError, SyntaxError, ValueError):
            continue
        relative = os.path.relpath(file, base)
        for node, swallowed in _module_level(tree.body):
            if isinstance(node, ast.ImportFrom):
                if node.level or not node.module:
                    continue
                written = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
                binds = tuple(a.asname or a.name for a in node.names)
                found.append(
                    Import(
                        node.module.split(".")[0],
                        f"from {node.module} import {written}",
                        binds,
                        relative,
                        node.lineno,
                        swallowed,
                    )
                )
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    written = alias.name + (f" as {alias.asname}" if alias.asname else "")
                    binds = (alias.asname or alias.name.split(".")[0],)
                    found.append(
                        Import(alias.name.split(".")[0], f"import {written}", binds, relative, node.lineno, swallowed)
                    )
    return found


def site_packages(venv: str) -> list[str]:
    """The site-packages folders of a venv (or any prefix laid out as one)."""
    return sorted(glob.glob(os.path.join(glob.escape(venv), "lib", "python*", "site-packages")))


def missing_modules(
    python: str,
    names: Iterable[str],
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
    site: Sequence[str] | None = None,
) -> list[str]:
    """Which of these top-level module names an environment cannot import.

    `site` are the environment's site-packages folders, read by `python` (the interpreter the venv
    was made from, or the venv's own) with no package code run; by default those of the venv
    `python` belongs to, else that interpreter's own.
    """
    candidates = sorted({n for n in names if n.isidentifier()})
    if not candidates:
        return []
    if site is None:
        prefix = os.path.dirname(os.path.dirname(os.path.abspath(python)))
        site = site_packages(prefix) if os.path.isfile(os.path.join(prefix, "pyvenv.cfg")) else None
    if site is None:
        query = "import site, json; print(json.dumps(site.getsitepackages()))"
        done = run([python, "-I", "-S", "-c", query], env=env, timeout=timeout)
        site = json.loads(done.stdout) if done.returncode == 0 else []
    done = run([python, "-I", "-S", "-c", _PROBE, json.dumps(list(site)), *candidates], env=env, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{python} could not list its installed packages: {tail(done.stderr, 5)}")
    missing: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return missing


def distribution(module: str, names: Mapping[str, str] | None = None) -> str:
    """The distribution to install for a missing import name: from `names` (the site's
    `import_names`), else from DISTRIBUTIONS, else the name itself."""
    return (names or {}).get(module) or DISTRIBUTIONS.get(module, module)


def likely_missing(
    node: str,
    comfyui: str,
    python: str,
    error: str,
    env: Mapping[str, str] | None = None,
    names: Mapping[str, str] | None = None,
    site: Sequence[str] | None = None,
) -> list[str]:
    """Lines naming the packages a failed node most likely lacks, each with the setting that adds it.

    `node` is the node's folder (or file); `comfyui` the checkout whose own modules, and whose
    other custom nodes, are not packages; `error` what ComfyUI logged (its names go first);
    `names` more import names whose distribution is named otherwise.
    """
    found = imports(node)
    if not found:
        return []
    local = module_names(node) if os.path.isdir(node) else {os.path.basename(node)[:-3]}
    local |= module_names_at(comfyui) | module_names_at(os.path.join(comfyui, "comfy"))
    local |= module_names_at(os.path.join(comfyui, "custom_nodes"))
    wanted = {item.module for item in found if item.module not in local}
    try:
        missing = set(missing_modules(python, wanted, env, site=site))
    except (EnvError, RuntimeError, ValueError, IndexError) as failure:
        return [f"  (could not check its imports against the venv: {failure})"]
    if not missing:
        return []
    named = set(_NO_MODULE.findall(error))
    undefined = set(_NOT_DEFINED.findall(error))

    def rank(item: Import) -> tuple[int, str, int]:
        hit = any(n.split(".")[0] == item.module for n in named) or bool(undefined & set(item.binds))
        return (0 if hit else 1, item.file, item.line)

    lines: list[str] = []
    seen: set[str] = set()
    for item in sorted((i for i in found if i.module in missing), key=rank):
        if item.module in seen:
            continue
        seen.add(item.module)
        package = distribution(item.module, names)
        where = f"{item.file} line {item.line}"
        if item.swallowed:
            where += ", inside a try that swallows its ImportError"
        if package in TORCH_FAMILY:
            fix = f"add {package} to torch_packages, or pick a torch flavour that includes it"
        else:
            fix = f"add {package} to the environment's pip_packages"
        lines.append(
            f"  likely missing package {package}: `{item.statement}` ({where}), and nothing installed in"
            f" the venv provides {item.module}; {fix}"
        )
    return lines


def module_names_at(folder: str) -> set[str]:
    """Names importable from the top of one folder (its `.py` files and subfolders)."""
    try:
        entries = os.listdir(folder)
    except OSError:
        return set()
    return {e[:-3] if e.endswith(".py") else e for e in entries if not e.startswith(".")}
