# Copyright: comfybake contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""ComfyUI's log: which custom nodes, and which of ComfyUI's own optional nodes, failed to import, and why.

ComfyUI imports every module with one function and logs a failure the same way for all of them
(its traceback, then `Cannot import <path> module for custom nodes: <error>`). It then tells
them apart: a custom node gets `<seconds> seconds (IMPORT FAILED): <path>` in the import times,
while its own optional nodes (`comfy_extras/`, `comfy_api_nodes/`) are listed after a
`WARNING: some comfy_extras/ nodes did not import correctly` line, one `IMPORT FAILED: <file>`
each, and start-up goes on without them.
"""

from __future__ import annotations

import os
import re

_IMPORT_FAILED = re.compile(r"\(IMPORT FAILED\):\s*(\S.*?)\s*$")
_CANNOT_IMPORT = re.compile(r"Cannot import (\S.*?) module for custom nodes:\s*(.*)$")
_OPTIONAL_HEADER = re.compile(r"WARNING: some (\w+)/? nodes did not import correctly")
_OPTIONAL_FAILED = re.compile(r"(?<!\()IMPORT FAILED:\s*(\S.*?)\s*$")
_OPTIONAL_END = re.compile(r"This issue might be caused|WARNING: some ")


def _import_errors(lines: list[str]) -> dict[str, str]:
    """Every `Cannot import` line, by module path, with its error and traceback."""
    errors: dict[str, str] = {}
    for index, line in enumerate(lines):
        cannot = _CANNOT_IMPORT.search(line)
        if cannot:
            start = index
            while start > 0 and not lines[start - 1].lstrip().startswith("Traceback"):
                start -= 1
                if index - start > 40:
                    break
            trace = [text for text in lines[max(start - 1, 0) : index] if text.strip()]
            detail = cannot.group(2)
            if trace:
                detail += "\n    " + "\n    ".join(trace[-12:])
            errors[cannot.group(1).rstrip("/")] = detail
    return errors


def gate_failures(output: str, comfyui: str) -> dict[str, str]:
    """Custom nodes ComfyUI reported as `IMPORT FAILED`, each with its error and traceback."""
    lines = output.splitlines()
    errors = {os.path.basename(path): detail for path, detail in _import_errors(lines).items()}
    failed: dict[str, str] = {}
    for line in lines:
        match = _IMPORT_FAILED.search(line)
        if match:
            name = os.path.basename(match.group(1).rstrip("/"))
            failed[name] = errors.get(name, "see the output of main.py --quick-test-for-ci")
    return failed


def optional_node_failures(output: str) -> dict[str, str]:
    """ComfyUI's own optional nodes that did not import (`comfy_extras/nodes_audio.py`, ...), with their errors."""
    lines = output.splitlines()
    errors = {
        f"{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}": detail
        for path, detail in _import_errors(lines).items()
    }
    failed: dict[str, str] = {}
    folder = ""
    for line in lines:
        header = _OPTIONAL_HEADER.search(line)
        if header:
            folder = header.group(1)
            continue
        if folder and _OPTIONAL_END.search(line):
            folder = ""
            continue
        match = _OPTIONAL_FAILED.search(line) if folder else None
        if match:
            name = f"{folder}/{os.path.basename(match.group(1))}"
            failed[name] = errors.get(name, "see the output of main.py --quick-test-for-ci")
    return failed
