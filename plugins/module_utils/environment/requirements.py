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


# A requirement that names a package on an index, as PEP 508 writes it: a name, optional
# extras, an optional version specifier (bare or in parentheses), optional markers after `;`.
# Anything else that uv or pip accept on a line is a direct reference (a URL, a path, a wheel or
# archive file, `name @ <url>` and `name@file:<path>` alike) or an option. The engine needs only
# the standard library on hosts (the system python3 may lack `packaging`), so it matches this
# grammar itself and treats whatever does not match as a direct reference; the compiled lock is
# checked as well (`direct_entries`), with uv's own reading of every line.
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_EXTRAS = r"\[\s*(?:" + _NAME + r"(?:\s*,\s*" + _NAME + r")*)?\s*\]"
_CLAUSE = r"(?:===|==|!=|~=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+"
_SPECIFIER = _CLAUSE + r"(?:\s*,\s*" + _CLAUSE + r")*"
_NAMED = re.compile(
    r"(" + _NAME + r")\s*(?:" + _EXTRAS + r")?\s*(?:" + _SPECIFIER + r"|\(\s*" + _SPECIFIER + r"\s*\))?\s*"
)
_MARKER = re.compile(r"[A-Za-z0-9_.\s'\"()<>=!~,+*-]*")
_HASH_OPTION = re.compile(r"\s+--hash[=\s]\s*[A-Za-z0-9]+:[0-9A-Fa-f]+")
_ARCHIVES = (".whl", ".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tar.xz", ".txz", ".tar.lz", ".tlz")


def direct_reference(line: str) -> str | None:
    """Why a requirement line does not name a package on an index, or None when it does."""
    text = _HASH_OPTION.sub("", line).strip()
    if re.search(r"(^|\s)-", text):
        return "is an installer option"
    requirement, _semicolon, marker = text.partition(";")
    match = _NAMED.fullmatch(requirement)
    if not match or match.group(1).lower().endswith(_ARCHIVES) or not _MARKER.fullmatch(marker):
        return "is a direct reference (URL or path)"
    return None


def read_requirements(label: str, path: str, spec: Spec) -> list[str]:
    """The requirement lines of a file, refusing installer options and (by default) direct references.

    Lines ending in a backslash continue on the next, as pip and uv read them.
    """
    if not os.path.isfile(path):
        return []
    lines: list[str] = []
    pending: list[str] = []
    start = 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, raw in enumerate(handle, 1):
            text = raw.rstrip("\r\n")
            if not pending:
                start = number
            if text.endswith("\\"):
                pending.append(text[:-1])
                continue
            joined = "".join([*pending, text]) if pending else text
            pending = []
            line = re.sub(r"(^|\s)#.*$", "", joined).strip()
            if not line:
                continue
            where = f"{label}: {os.path.basename(path)} line {start} {line!r}"
            why = direct_reference(line)
            if why == "is an installer option":
                raise EnvError(
                    f"{where} is an installer option; comfybake resolves every environment against its own"
                    " indexes. Add what it needs to pip_packages (or an index to the environment), and drop the line"
                    " by pinning a fork of the node"
                )
            if why and not spec.allow_direct_references:
                raise EnvError(
                    f"{where} is a direct reference (URL or path), which bypasses the indexes and hashes;"
                    " set allow_direct_references: true for this environment to accept it"
                )
            lines.append(line)
    if pending:
        raise EnvError(f"{label}: {os.path.basename(path)} ends with a line continuation (a final backslash)")
    return lines


_LOCKED = re.compile(r"(" + _NAME + r")(?:\[[^\]]*\])?\s*==\s*[A-Za-z0-9.+!_-]+\s*(?:;.*)?")


def direct_entries(text: str) -> list[tuple[str, str]]:
    """The entries of a compiled lock (`uv pip compile` output) that are not `name==version`:
    (name, line) for each package uv resolved from a URL or a path."""
    found = []
    for raw in text.splitlines():
        if not raw.strip() or raw[0].isspace() or raw.lstrip().startswith(("#", "-")):
            continue
        line = raw.rstrip().rstrip("\\").strip()
        if not _LOCKED.fullmatch(line):
            found.append((_direct_name(line), line))
    return found


def _direct_name(line: str) -> str:
    """The package a direct reference installs: `name @ <url>`, or a wheel file's name."""
    named = re.match(r"(" + _NAME + r")\s*(?:\[[^\]]*\])?\s*@", line)
    if named:
        return canonical_name(named.group(1))
    base = line.split(";", 1)[0].strip().rstrip("/").rsplit("/", 1)[-1]
    return canonical_name(base.split("-", 1)[0]) if base.endswith(".whl") else line


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
