# Copyright: comfybake contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""ComfyUI's log: which custom nodes failed to import, and why."""

from __future__ import annotations

import os
import re

_IMPORT_FAILED = re.compile(r"\(IMPORT FAILED\):\s*(\S.*?)\s*$")
_CANNOT_IMPORT = re.compile(r"Cannot import (\S.*?) module for custom nodes:\s*(.*)$")


def gate_failures(output: str, comfyui: str) -> dict[str, str]:
    """Custom nodes ComfyUI reported as `IMPORT FAILED`, each with its error and traceback."""
    lines = output.splitlines()
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
            errors[os.path.basename(cannot.group(1).rstrip("/"))] = detail
    failed: dict[str, str] = {}
    for line in lines:
        match = _IMPORT_FAILED.search(line)
        if match:
            name = os.path.basename(match.group(1).rstrip("/"))
            failed[name] = errors.get(name, "see the output of main.py --quick-test-for-ci")
    return failed
