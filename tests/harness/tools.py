"""Where the tests find their tools and images."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = os.environ.get("COMFYBAKE_BASE_IMAGE", "comfybake/test-base:bookworm")


def venv_bin(tool: str) -> str:
    """A tool of the running interpreter's venv (molecule, ansible-playbook, ...)."""
    candidate = Path(sys.executable).parent / tool
    found = str(candidate) if candidate.exists() else shutil.which(tool)
    if found is None:
        pytest.fail(f"{tool} is not installed; run scripts/bootstrap.sh to create the venv")
    return found


LOGS = ROOT / "build" / "test-logs"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# What Packer ("    comfybake.docker.comfybake: ") and molecule ("  │ ") put before Ansible's lines
_PREFIX = re.compile(r"^\s*(?:[│┃]\s?|[\w-]+(?:\.[\w-]+)+: )")
_OTHER_ERRORS = ("ERROR!", "[ERROR]", "Error:", "CRITICAL", "Traceback (most recent call last)", "error:")


def save_log(name: str, text: str) -> Path:
    """Keep a failed step's whole log under build/test-logs/, for the reader of a red run."""
    LOGS.mkdir(parents=True, exist_ok=True)
    path = LOGS / f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}.log"
    path.write_text(text)
    return path


def _clean(log: str) -> list[str]:
    return [_PREFIX.sub("", _ANSI.sub("", line)).rstrip() for line in log.splitlines()]


def _last_fatal(lines: list[str]) -> int | None:
    fatal = [index for index, line in enumerate(lines) if re.search(r"\b(fatal|failed): \[", line)]
    return fatal[-1] if fatal else None


def failure_excerpt(log: str, limit: int = 25) -> str:
    """The lines of the task that ended the run (from its `TASK [` line), at most `limit` of them."""
    lines = _clean(log)
    end = _last_fatal(lines)
    if end is None:
        return "\n".join(lines[-limit:])
    tasks = (index for index in range(end, max(end - 40, -1), -1) if lines[index].lstrip().startswith("TASK ["))
    start = next(tasks, end)
    return "\n".join(lines[start : start + limit])


def failure_reason(log: str, limit: int = 600) -> str:
    """One line saying why a run of Ansible, Packer or molecule failed.

    Ansible prints `fatal: [host]: FAILED!` for tasks that a rescue or `ignore_errors` catches
    too, so the task that ended the run is the last one; its task name and `msg` are the reason.
    Otherwise the first line that reads as an error, else the last line.
    """
    lines = _clean(log)
    start = _last_fatal(lines)
    if start is not None:
        task = next((line.strip(" *") for line in reversed(lines[:start]) if line.lstrip().startswith("TASK [")), "")
        detail = lines[start].strip()
        payload = detail.partition("=> ")[2]
        with contextlib.suppress(ValueError, AttributeError):  # the JSON result format: all on one line
            detail = str(json.loads(payload).get("msg", detail))
        for index in range(start, min(start + 80, len(lines)) if payload[:1] != "{" else start):
            key, _, value = lines[index].strip().partition("msg")
            if key in ("", '"') and value[:2] in (": ", '":'):
                value = value[2:].strip().rstrip(",")
                if value in ("|", "|-", ">", ">-"):  # a block scalar: its first lines
                    value = " ".join(line.strip() for line in lines[index + 1 : index + 4])
                elif value[:1] in ("'", '"'):  # a quoted YAML or JSON string
                    with contextlib.suppress(yaml.YAMLError):
                        value = str(yaml.safe_load(value))
                detail = value
                break
        reason = f"{task}: {detail}" if task else detail
    else:
        found = (line.strip() for line in lines if any(marker in line for marker in _OTHER_ERRORS))
        reason = next(found, next((line.strip() for line in reversed(lines) if line.strip()), "no output"))
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."
