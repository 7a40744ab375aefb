"""The gateway's one way to read and write its files (caddy.json, gateway.json, credentials.json,
ca.crt): a write is atomic (a new file beside the old, renamed over it) and happens only when the
content, the mode or the group differ."""

from __future__ import annotations

import contextlib
import grp
import os
import tempfile

from .errors import GatewayError


def read(path: str) -> str | None:
    """The file's text, None if it does not exist."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def write(path: str, text: str, mode: int, group: str = "") -> bool:
    """Write `text` to `path` atomically, owned by this account and `group` ("" leaves the
    account's own), unless it already holds it with that mode and group; whether it wrote."""
    gid = grp.getgrnam(group).gr_gid if group else -1
    if read(path) == text:
        status = os.stat(path)
        if status.st_mode & 0o7777 == mode and (gid == -1 or status.st_gid == gid):
            return False
    try:
        fd, temporary = tempfile.mkstemp(prefix=".", suffix=".new", dir=os.path.dirname(path))  # 0600, O_EXCL
    except OSError as error:
        raise GatewayError(f"cannot write {path}: {error.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), mode)
            if gid != -1:
                os.fchown(handle.fileno(), -1, gid)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise GatewayError(f"cannot write {path}: {error.strerror}") from None
        raise
    return True
