# PRIVATE to comfybake: not a public API; it may change without notice.
"""SHA-256 of files and of streams written out of order, and the model-header check."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading

from .errors import ContentError
from .manifest import MODEL_EXTENSIONS
from .options import MiB

BLOCK = MiB  # read and hash in 1 MiB pieces: large enough for hashlib to release the GIL


def hash_file(path: str) -> tuple[str, int]:
    """SHA-256 and size of a file, read once in 1 MiB blocks."""
    digest = hashlib.sha256()
    buffer = bytearray(BLOCK)
    view = memoryview(buffer)
    total = 0
    with open(path, "rb", buffering=0) as handle:
        while True:
            count = handle.readinto(buffer)
            if not count:
                break
            digest.update(view[:count])
            total += count
    return digest.hexdigest(), total


class StreamHasher:
    """Hashes a file while it is written, on its own thread, exactly once per byte.

    Writers report bytes that are on disk (`done`); bytes handed over in order with `feed`
    are hashed from memory, the rest is read back from the page cache (parallel ranges,
    and the prefix of a resumed download, which this process has never hashed)."""

    def __init__(self, fd: int, start: int = 0) -> None:
        self._fd = fd
        self._digest = hashlib.sha256()
        self._hashed = 0
        self._fed: list[tuple[int, bytes]] = []
        self._spans: list[tuple[int, int]] = [(0, start)] if start else []
        self._watermark = start
        self._finished = False
        self._aborted = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()

    @property
    def watermark(self) -> int:
        with self._cond:
            return self._watermark

    def feed(self, offset: int, data: bytes) -> None:
        """`data` at `offset` is on disk; hash it from memory if it continues the stream."""
        with self._cond:
            end = self._fed[-1][0] + len(self._fed[-1][1]) if self._fed else self._hashed
            if offset == end and len(self._fed) < 64:  # bounded: the rest comes from the page cache
                self._fed.append((offset, data))
            self._add_span(offset, offset + len(data))

    def done(self, start: int, end: int) -> None:
        """Bytes [start, end) are on disk."""
        with self._cond:
            self._add_span(start, end)

    def _add_span(self, start: int, end: int) -> None:
        spans = sorted([*self._spans, (start, end)])
        merged: list[tuple[int, int]] = []
        for a, b in spans:
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self._spans = merged
        self._watermark = merged[0][1] if merged and merged[0][0] == 0 else 0
        self._cond.notify_all()

    def reset(self) -> None:
        """Start over (the server ignored Range): forget every byte."""
        with self._cond:
            self._digest = hashlib.sha256()
            self._hashed = 0
            self._fed = []
            self._spans = []
            self._watermark = 0

    def finish(self) -> tuple[str, int]:
        """Wait until every byte on disk is hashed; return the digest and the byte count."""
        with self._cond:
            self._finished = True
            self._cond.notify_all()
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._digest.hexdigest(), self._hashed

    def abort(self) -> None:
        """Stop hashing at once (the transfer failed); the bytes on disk stay as they are."""
        with self._cond:
            self._finished = self._aborted = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while self._hashed >= self._watermark and not self._finished:
                        self._cond.wait()
                    if self._aborted or self._hashed >= self._watermark:
                        return
                    digest, start, target = self._digest, self._hashed, self._watermark
                    while self._fed and self._fed[0][0] < start:
                        self._fed.pop(0)
                    chunk = self._fed.pop(0)[1] if self._fed and self._fed[0][0] == start else None
                if chunk is None:
                    chunk = os.pread(self._fd, min(BLOCK, target - start), start)
                    if not chunk:
                        raise OSError(errno.EIO, "short read while hashing the staging file")
                digest.update(chunk)
                with self._cond:
                    if self._digest is digest:  # not reset meanwhile
                        self._hashed = start + len(chunk)
                    self._cond.notify_all()
        except BaseException as error:  # noqa: BLE001 - re-raised by finish() on the caller's thread
            with self._cond:
                self._error = error
                self._cond.notify_all()


def check_model_header(path: str, dest: str, content_type: str | None) -> None:
    """Catch an HTML page or JSON error saved under a model name."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind in ("text/html", "application/json", "text/plain") and dest.lower().endswith(MODEL_EXTENSIONS):
        raise ContentError(
            f"not a model file (Content-Type {kind}): the server sent a page, often a login or error page; "
            "check the url and the token",
            dest,
        )
    if not dest.lower().endswith((".safetensors", ".sft")):
        return
    problem = None
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            problem = "shorter than a safetensors header"
        else:
            length = int.from_bytes(head, "little")
            size = os.fstat(handle.fileno()).st_size
            if length <= 1 or length > 100 * MiB or length + 8 > size:
                problem = f"header length {length} is impossible for a {size}-byte file"
            else:
                try:
                    header = json.loads(handle.read(length))
                    if not isinstance(header, dict):
                        problem = "header is not a JSON object"
                except ValueError:
                    problem = "header is not valid JSON"
    if problem:
        kind_text = f"Content-Type {kind}; " if kind else ""
        raise ContentError(f"not a safetensors file ({kind_text}header invalid: {problem})", dest)
