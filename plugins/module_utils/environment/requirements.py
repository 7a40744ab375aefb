# Copyright: comfybake contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Requirement files: what each part asks for, and what one resolution gave."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import EnvError

if TYPE_CHECKING:
    from .spec import Spec

_REQ_NAME = re.compile(r"^\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)")


def canonical_name(name: str) -> str:
    """PEP 503 normalisation of a distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(line: str) -> str | None:
    match = _REQ_NAME.match(line)
    return canonical_name(match.group(1)) if match else None


@dataclass
class Requirements:
    """One requirement source: a label for messages, the file given to uv, its lines."""

    label: str
    file: str
    lines: list[str]

    def names(self) -> set[str]:
        return {name for name in map(requirement_name, self.lines) if name}


def read_requirements(label: str, path: str, spec: Spec) -> list[str]:
    """The requirement lines of a file, refusing installer options and (by default) direct references."""
    if not os.path.isfile(path):
        return []
    lines: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, raw in enumerate(handle, 1):
            line = re.sub(r"(^|\s)#.*$", "", raw).strip()
            if not line:
                continue
            where = f"{label}: {os.path.basename(path)} line {number} {line!r}"
            if line.startswith("-"):
                raise EnvError(
                    f"{where} is an installer option; comfybake resolves every environment against its own"
                    " indexes. Add what it needs to pip_packages (or an index to the environment), and drop the line"
                    " by pinning a fork of the node"
                )
            direct = "://" in line or line.startswith(("git+", ".", "/")) or re.search(r"\s@\s", line)
            if direct and not spec.allow_direct_references:
                raise EnvError(
                    f"{where} is a direct reference (URL or path), which bypasses the indexes and hashes;"
                    " set allow_direct_references: true for this environment to accept it"
                )
            lines.append(line)
    return lines


@dataclass
class Resolved:
    """One package of the resolved set."""

    name: str
    version: str
    hashes: list[str]
    via: list[str]


def parse_compiled(text: str) -> dict[str, Resolved]:
    """Read `uv pip compile --generate-hashes` output."""
    found: dict[str, Resolved] = {}
    current: Resolved | None = None
    for raw in text.splitlines():
        line = raw.strip()
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*(?:==\s*([^\s\\;]+)|@\s*(\S+))", raw)
        if match:
            version = match.group(2) or match.group(3)
            current = Resolved(canonical_name(match.group(1)), version, [], [])
            found[current.name] = current
        elif current and line.startswith("--hash="):
            current.hashes.append(line.split("=", 1)[1].rstrip(" \\"))
        elif current and line.startswith("#"):
            via = line.lstrip("#").strip()
            via = via[4:] if via.startswith("via ") else via
            if via and via != "via":
                current.via.append(via)
    return found
