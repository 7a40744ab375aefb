# Copyright: comfybake contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Running the tools a build needs (git, uv, python) with bounded output and clear errors."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import EnvError


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run(
    args: Sequence[str],
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    user: str | None = None,
    merge: bool = False,
    kill_group: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output (stderr into stdout with `merge`); the caller judges failure.

    `user` runs it as that account (when running as root), with its primary group and no other.
    `kill_group` kills what the command left running in its process group once it exits.
    """
    kwargs: dict[str, Any] = {}
    if user is not None and os.geteuid() == 0:
        kwargs.update(user=user, group=_primary_group(user), extra_groups=[])
    try:
        process = subprocess.Popen(
            list(args),
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge else subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
            **kwargs,
        )
    except OSError as exc:
        raise EnvError(f"cannot run {args[0]}: {exc}") from exc
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise EnvError(f"{args[0]} did not finish within {timeout} s; output:\n{tail(stdout or '')}") from None
    if kill_group:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(list(args), process.returncode, stdout or "", stderr or "")


def _primary_group(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_gid


_PYTHON_IDS: dict[str, str] = {}


def python_identity(python: str) -> str:
    """`<realpath> <version>` of the interpreter the venv is built on."""
    if python not in _PYTHON_IDS:
        path = shutil.which(python) or python
        done = run([path, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"])
        if done.returncode != 0:
            raise EnvError(f"python {python!r} does not run: {tail(done.stderr, 3)}; set python: to an interpreter")
        _PYTHON_IDS[python] = f"{os.path.realpath(path)} {done.stdout.strip()}"
    return _PYTHON_IDS[python]
