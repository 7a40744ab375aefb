# Copyright: comfybake contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Running the tools a build needs (git, uv, python) with bounded output and clear errors.

Every command runs in a session (and process group) of its own, and dies with the build: the
kernel sends it SIGKILL when the process that started it ends, however that ends (SIGKILL
included), through prctl(PR_SET_PDEATHSIG) set in the child between fork and exec. (A pipe the
child watches would need a watcher process of ours between the build and the command, itself one
more thing to kill; the kernel's signal needs none. It fires when the *thread* that started the
child ends: the engine runs every command from its one thread.) That covers
the command itself; what it started in turn (a node that spawns a helper at import) stays in its
session, which `journal` records in the release being built so the next run stops it
(`stop_sessions`) before it removes the half-built release (`leftovers`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import IO, Any

from .errors import EnvError

_PR_SET_PDEATHSIG = 1
_JOURNALS: list[str] = []
_PRCTL: list[Any] = []  # libc's prctl, looked up once


class TimeLimitError(EnvError):
    """A command ran past its time limit (it was killed, with its process group); `output` is its last lines."""

    def __init__(self, message: str, output: str) -> None:
        super().__init__(f"{message}; output:\n{output}")
        self.output = output


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
    The command is killed when this process dies, and its session is written to the journal
    in force (`journal`).
    """
    kwargs: dict[str, Any] = {}
    if user is not None and os.geteuid() == 0:
        kwargs.update(user=user, group=_primary_group(user), extra_groups=[])
    die = _die_with(os.getpid())
    if die is not None:
        kwargs.update(preexec_fn=die)
    # Output goes to files, not pipes: a process the command leaves running (a helper a node starts)
    # keeps its copy of the output open, and must not keep this call waiting once the command ended.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            process = subprocess.Popen(
                list(args),
                cwd=cwd,
                env=dict(env) if env is not None else None,
                stdout=out,
                stderr=subprocess.STDOUT if merge else err,
                start_new_session=True,
                **kwargs,
            )
        except OSError as exc:
            raise EnvError(f"cannot run {args[0]}: {exc}") from exc
        for path in _JOURNALS[-1:]:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(f"session {process.pid} {os.path.basename(args[0])}\n")
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise TimeLimitError(f"{args[0]} did not finish within {timeout} s", tail(_read(out))) from None
        if kill_group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        return subprocess.CompletedProcess(list(args), process.returncode, _read(out), _read(err))


def _read(handle: IO[bytes]) -> str:
    handle.seek(0)
    return handle.read().decode(errors="replace")


@contextlib.contextmanager
def journal(path: str) -> Iterator[None]:
    """Append the session id of every command run meanwhile to the file `path` (`session <id> <tool>`
    lines), so a later run can stop what a killed run left behind (`stop_sessions`)."""
    _JOURNALS.append(path)
    try:
        yield
    finally:
        _JOURNALS.remove(path)


def journal_sessions(path: str) -> list[int]:
    """The session ids a journal recorded."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    return [
        int(words[1])
        for words in map(str.split, lines)
        if len(words) > 1 and words[0] == "session" and words[1].isdigit()
    ]


def stop_sessions(sessions: Iterable[int], inside: str) -> list[int]:
    """SIGKILL every process still running in these sessions, started by a build under `inside`.

    A session whose leader (the command run) is gone holds only what that command started: its
    id cannot be reused while a member lives. A session whose leader lives is stopped only when
    the leader is still ours (it runs from, or in, `inside`), not a process that reused the id.
    Zombies (dead, not yet reaped) are left alone. Returns the pids killed.
    """
    wanted = set(sessions) - {os.getsid(0)}
    members: dict[int, list[int]] = {}
    for entry in _proc_entries():
        sid = _live_session_of(entry)
        if sid in wanted:
            members.setdefault(sid, []).append(entry)
    killed: list[int] = []
    for sid, pids in members.items():
        if sid in pids and not _runs_inside(sid, inside):
            continue
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return sorted(killed)


def _proc_entries() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []


def _live_session_of(pid: int) -> int | None:
    """The session id of a live process (not a zombie) from /proc/<pid>/stat: the fields after the
    command name, which may hold spaces, are state, ppid, pgrp, session."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else int(fields[3])
    except (OSError, IndexError, ValueError):
        return None


def _runs_inside(pid: int, inside: str) -> bool:
    """Whether a process works in `inside` or runs a program or script from it."""
    top = os.path.realpath(inside)
    places: list[str] = []
    with contextlib.suppress(OSError):
        places.append(os.readlink(f"/proc/{pid}/cwd").removesuffix(" (deleted)"))
    with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as handle:
        places += [arg.decode(errors="replace") for arg in handle.read().split(b"\0") if arg.startswith(b"/")]
    return any(place == top or place.startswith(top + os.sep) for place in places)


def _die_with(parent: int) -> Any:
    """A preexec function that makes the child get SIGKILL when `parent` ends (Linux), or None.

    It runs in the child after the switch to `user` (the kernel clears the setting on a change
    of credentials, so it must come after), and kills the child at once when the parent already
    ended before the setting took effect.
    """
    if not _PRCTL:
        if not sys.platform.startswith("linux"):
            return None
        try:
            _PRCTL.append(ctypes.CDLL(None, use_errno=True).prctl)
        except (OSError, AttributeError):
            return None
    prctl = _PRCTL[0]

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


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
