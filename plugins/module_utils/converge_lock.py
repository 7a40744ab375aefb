# Copyright: comfybake contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""The host-wide converge lock: one comfybake converge step at a time on a host.

Private to comfybake. Two converges at once on one host (two operators, a timer and a person,
two controllers) would otherwise race on what every environment shares (the git cache's refs,
uv's cache) and on the instances (their units and restarts). Each step that changes those holds
this lock for its whole run (the `environment` module, and the `converge_lock` module across
the tasks of the instances role): an exclusive `flock` on one file (`<state root>/converge.lock`),
which the kernel releases when the holder ends, however it ends, so a killed run leaves no
stale lock. The holder writes `<pid> <what it does> since <time>` into the file; a contender
reads it and says whom it waits for, waits up to a time limit, then fails naming the holder.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

POLL_SECONDS = 0.25
TIMEOUT_SETTING = "comfyui_converge_lock_timeout"


class ConvergeLockError(Exception):
    """The lock could not be taken: its file cannot be opened, or its holder kept it too long."""


@dataclass
class Held:
    """The lock, held: how long taking it waited, and for whom (empty when it was free)."""

    path: str
    waited: float = 0.0
    holder: str = ""

    def note(self) -> str:
        """A line saying whom the run waited for, or empty when it did not wait."""
        if not self.holder:
            return ""
        return f"waited {self.waited:.0f} s for {self.holder} to release the converge lock {self.path}"


def holder(path: str) -> str:
    """Who holds the lock as its file says: `<pid> (<what it does> since <time>)`."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            line = handle.readline().strip()
    except OSError:
        line = ""
    pid, what = [*line.split(" ", 1), ""][:2]
    if not pid.isdigit():
        return "another converge (it has not written its pid yet)"
    return f"{pid} ({what})" if what else pid


@contextlib.contextmanager
def converge_lock(path: str, what: str, timeout: float, on_wait: Callable[[str], None] | None = None) -> Iterator[Held]:
    """Hold the lock at `path` while the block runs, as `what` (what this process does).

    When another process holds it, `on_wait` gets `waiting for <pid> (<what it does>)` (again
    when the holder changes) and the call waits up to `timeout` seconds, then raises
    ConvergeLockError naming the holder and the setting that sets the time limit.
    """
    fd, held = take(path, what, timeout, on_wait)
    try:
        yield held
    finally:
        os.ftruncate(fd, 0)  # a contender that reads it now sees no stale holder
        os.close(fd)  # releases the lock


def take(path: str, what: str, timeout: float, on_wait: Callable[[str], None] | None = None) -> tuple[int, Held]:
    """Take the lock (as `converge_lock` does) and return the descriptor that holds it."""
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ConvergeLockError(f"cannot open the converge lock {path}: {exc}") from exc
    try:
        held = _take(fd, path, timeout, on_wait)
    except BaseException:
        os.close(fd)
        raise
    _write(fd, os.getpid(), what)
    return fd, held


def hand_over(fd: int, what: str, lease: int) -> int:
    """Give the lock held by `fd` to a process of its own that keeps it after this one ends (across
    the tasks of a play), for `lease` seconds at most, until `end_holder`; returns its pid."""
    holder_process = subprocess.Popen(
        ["sleep", str(lease)],
        pass_fds=(fd,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    _write(
        fd,
        holder_process.pid,
        f"{what} (held across tasks by this process until the play releases it, {lease} s at most)",
    )
    os.close(fd)
    return holder_process.pid


def end_holder(path: str, pid: int) -> bool:
    """End the process `hand_over` started, when it is still the one that holds `path` open; the
    lock is then free. Returns whether there was one to end."""
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            argv = cmdline.read().split(b"\0")
    except OSError:
        return False
    # A contender (an environment build, another play's take) holds the file open too, and may
    # have reused the pid of a holder whose lease ran out: only a `sleep` holder is ended.
    if os.path.realpath(path) not in links or os.path.basename(argv[0]) != b"sleep":
        return False
    with open(path, "r+b") as handle:
        handle.truncate(0)
    os.kill(pid, signal.SIGKILL)
    return True


def _write(fd: int, pid: int, what: str) -> None:
    since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{pid} {what} since {since}\n".encode(), 0)


def _take(fd: int, path: str, timeout: float, on_wait: Callable[[str], None] | None) -> Held:
    started = time.monotonic()
    said = ""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            return Held(path, time.monotonic() - started, said)
        who = holder(path)
        if who != said:
            said = who
            if on_wait is not None:
                on_wait(f"waiting for {who} to release the converge lock {path}")
        if time.monotonic() - started >= timeout:
            raise ConvergeLockError(
                f"gave up after {timeout:g} s waiting for {who} to release the converge lock {path}: another"
                f" converge of this host is still running. Let it finish (stop it if it hangs), or raise"
                f" {TIMEOUT_SETTING}"
            )
        time.sleep(POLL_SECONDS)
