"""Where the tests find their tools and images."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = os.environ.get("COMFYBAKE_BASE_IMAGE", "comfybake/test-base:bookworm")


def venv_bin(tool: str) -> str:
    """A tool of the running interpreter's venv (molecule, ansible-playbook, ...)."""
    candidate = Path(sys.executable).parent / tool
    found = str(candidate) if candidate.exists() else shutil.which(tool)
    if found is None:
        pytest.fail(f"{tool} is not installed; run scripts/bootstrap.sh to create the venv")
    return found
