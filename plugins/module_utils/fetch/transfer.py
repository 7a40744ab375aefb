# PRIVATE to comfybake: not a public API; it may change without notice.
"""One file's transfer: a single stream or parallel ranges, resumable, hashed as it lands."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace

from .client import Client, Remote, content_range, raise_timeout, refuse_encoding, size_error, timed_out
from .errors import ContentError, TransferError
from .hashing import BLOCK, StreamHasher
from .manifest import MODEL_EXTENSIONS, Entry, display_url, human
from .options import Options
from .report import Progress
from .store import TEMP_SUFFIX

with contextlib.suppress(ImportError):  # its absence is reported by client.HAS_REQUESTS
    import requests


@dataclass(frozen=True)
class Services:
    """What a transfer uses of the engine that runs it."""

    client: Client
    options: Options
    progress: Progress
    warn: Callable[[str], None]


class Transfer:
    """One file's transfer: a single stream, or parallel ranges when the server allows them."""

    def __init__(
        self,
        services: Services,
        entry: Entry,
        relpath: str,
        expected: str | None,
        source: Remote,
        fd: int,
        hasher: StreamHasher,
        sidecar: str,
        offset: int,
        done: list[int],
    ) -> None:
        self.client, self.options, self.progress, self.warn = (
            services.client,
            services.options,
            services.progress,
            services.warn,
        )
        self.entry, self.relpath, self.expected = entry, relpath, expected
        self.source, self.fd, self.hasher, self.sidecar = source, fd, hasher, sidecar
        self.offset = offset
        self.done = set(done)
        self.transferred = 0
        self.resumable = False
        self._lock = threading.Lock()
        self._last_checkpoint = 0.0
        self.segment = self.options.segment_size
        self.url = source.final_url or source.url

    def run(self) -> int:
        source, options = self.source, self.options
        if source.url.startswith("file://"):
            self._copy_file()
            return self.transferred
        # Without a hash to check, ranges are stitched together only when a strong ETag lets every
        # one of them prove it is of the representation the probe saw (see _prove); Last-Modified is
        # weak (RFC 9110 8.8.2.2): with a hash it is sent as If-Range, and the hash decides.
        self.resumable = bool(source.ranges and source.size and (source.strong_etag or self.expected))
        worth_splitting = (
            source.ranges
            and options.connections > 1
            and source.size is not None
            and source.size - self.offset >= options.min_split_size
        )
        if worth_splitting and not self.resumable:
            self.warn(
                f"{self.entry.name}: fetching it in one stream: no sha256 and no strong validator "
                "(a strong ETag; a weak one or Last-Modified is not) to prove that its ranges are of one file"
            )
        if (worth_splitting and self.resumable) or self.done:
            try:
                self._parallel()
                return self.transferred
            except _RangeIgnoredError as error:
                self._restart(str(error))
        self._stream()
        return self.transferred

    # single stream ---------------------------------------------------------------

    def _stream(self) -> None:
        attempts = 0
        while True:
            try:
                self._stream_once()
                return
            except _RangeIgnoredError as error:
                self._restart(str(error))
            except TransferError as error:
                attempts += 1
                if attempts > self.options.retries:
                    raise
                if not self.resumable:
                    self._restart(f"{error.reason}; the server cannot resume, restarting from the first byte")
                self.client.sleep(attempts, None)

    def _stream_once(self) -> None:
        headers: dict[str, str] = {}
        start = self.hasher.watermark
        size = self.source.size
        if start and size is not None and start >= size:
            return  # complete on disk already (the process died before the rename)
        if start:
            headers["Range"] = f"bytes={start}-"
            if self.source.validator:
                headers["If-Range"] = self.source.validator
        response = self._get(headers)
        with response:
            if start and response.status_code == 200:
                raise _RangeIgnoredError
            if response.status_code == 416:
                self._complete_416(response, start)
                return
            if response.status_code not in (200, 206):
                raise self.client.status_error(response, self.entry)
            if start:
                self._prove(response, start, size or 0)
            elif self.expected is None and self.source.validator_of(response) != self.source.validator:
                self.resumable = False  # not the probe's representation: a break restarts from the first byte
            self._check_type(response)
            expected = self._expected_length(response, start)
            position = start
            for chunk in self._chunks(response, start):
                self._write(position, chunk, feed=True)
                position += len(chunk)
                self.checkpoint(position)
            self.checkpoint(force=True)
            if expected is not None and position - start != expected:
                raise size_error(position, start + expected, self.entry, "run again to resume")

    def _complete_416(self, response: requests.Response, start: int) -> None:
        """416 on a partial that is already whole: finalise it after the hash check (no refetch)."""
        parsed = content_range(response.headers.get("Content-Range"))
        size = parsed[2] if parsed and parsed[2] is not None else self.source.size or self.entry.size
        if size is not None and start == size:
            return
        raise TransferError(f"the server refused the resume at byte {start} (416); run again", self.entry.name)

    # parallel ranges -----------------------------------------------------------------

    def _parallel(self) -> None:
        size = self.source.size or 0
        os.ftruncate(self.fd, size)
        count = (size + self.segment - 1) // self.segment
        first = self.offset // self.segment
        queue = [i for i in range(first, count) if i not in self.done]
        cursor = iter(queue)
        cursor_lock = threading.Lock()
        errors: list[BaseException] = []
        stop = threading.Event()

        def worker() -> None:
            while not stop.is_set():
                with cursor_lock:
                    index = next(cursor, None)
                if index is None:
                    return
                try:
                    self._segment(index, size)
                except BaseException as error:  # noqa: BLE001 - collected and re-raised below
                    errors.append(error)
                    stop.set()
                    return

        threads = [threading.Thread(target=worker, daemon=True) for _worker in range(self.options.connections)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            for error in errors:
                if isinstance(error, _RangeIgnoredError):
                    raise error
            raise errors[0]

    def _segment(self, index: int, size: int) -> None:
        start = max(index * self.segment, self.offset if index == self.offset // self.segment else 0)
        end = min((index + 1) * self.segment, size)
        position, attempts = start, 0
        while position < end:
            headers = {"Range": f"bytes={position}-{end - 1}"}
            if self.source.validator:
                headers["If-Range"] = self.source.validator
            try:
                response = self._get(headers)
                with response:
                    if response.status_code == 200:
                        raise _RangeIgnoredError
                    if response.status_code != 206:
                        raise self.client.status_error(response, self.entry)
                    self._prove(response, position, end)
                    self._check_type(response)
                    for chunk in self._chunks(response, position, limit=end - position):
                        self._write(position, chunk, feed=True)
                        position += len(chunk)
                    if position < end:
                        raise TransferError(
                            f"incomplete read {human(position - start)} of {human(end - start)} in a range",
                            self.entry.name,
                        )
            except TransferError:
                attempts += 1
                if attempts > self.options.retries:
                    raise
                self.client.sleep(attempts, None)
        with self._lock:
            self.done.add(index)
        self.checkpoint(force=True)

    # shared ---------------------------------------------------------------------------

    def _get(self, headers: Mapping[str, str]) -> requests.Response:
        entry = self.entry if not self.source.mirror else replace(self.entry, auth="none")
        for _attempt in range(3):
            url = self.url
            try:
                response = self.client.request("GET", url, entry, headers=headers, stream=True)
            except requests.RequestException as error:
                raise TransferError(f"request failed: {type(error).__name__}", self.entry.name) from None
            if response.status_code not in (401, 403, 404) or url == self.source.url:
                return response
            # A presigned URL (Hub, Civitai CDNs) that expired mid-transfer: ask the source again.
            response.close()
            with self._lock:
                if self.url == url:
                    self.warn(f"{self.entry.name}: the download URL expired; asking the source for a new one")
                    validator = self.source.validator
                    self.client.probe(self.source, entry)
                    self.url = self.source.final_url or self.source.url
                    if self.expected is None and self.resumable and self.source.validator != validator:
                        raise _UnprovenRangeError(
                            f"the source's validator changed ({validator} -> {self.source.validator or 'none'}) "
                            "with its new download URL"
                        )
        return self.client.request("GET", self.url, entry, headers=headers, stream=True)

    def _chunks(self, response: requests.Response, offset: int, limit: int | None = None) -> Iterator[bytes]:
        received = 0
        try:
            for chunk in response.iter_content(BLOCK):
                if limit is not None and received + len(chunk) > limit:
                    chunk = chunk[: limit - received]
                received += len(chunk)
                if chunk:
                    yield chunk
                if limit is not None and received >= limit:
                    return
        except requests.RequestException as error:
            total = f" of {human(self.source.size)}" if self.source.size is not None else ""
            if timed_out(error):
                raise TransferError(
                    f"timed out: no data for {self.options.timeout:g} s after {human(offset + received)}{total}; "
                    + raise_timeout(),
                    self.entry.name,
                ) from None
            raise TransferError(
                f"incomplete read {human(offset + received)}{total}: the connection broke ({type(error).__name__})",
                self.entry.name,
            ) from None

    def _write(self, position: int, chunk: bytes, feed: bool) -> None:
        view = memoryview(chunk)
        written = 0
        while written < len(chunk):
            written += os.pwrite(self.fd, view[written:], position + written)
        if feed:
            self.hasher.feed(position, chunk)
        else:
            self.hasher.done(position, position + len(chunk))
        with self._lock:
            self.transferred += len(chunk)
        self.progress.advance(self.entry.name, len(chunk))

    def _prove(self, response: requests.Response, start: int, end: int) -> None:
        """A 206 must hold exactly bytes [start, end) of the file the probe saw: its Content-Range is
        checked (start, end and total) and, without a hash to check at the end, its validator against
        the probe's. Otherwise nothing of it is written and the file is fetched in one stream."""
        asked = f"bytes={start}-{end - 1}"
        sent = response.headers.get("Content-Range", "").strip()
        if content_range(sent) != (start, end - 1, self.source.size):
            raise _UnprovenRangeError(f"the server sent Content-Range {sent or '(none)'} for {asked}")
        if self.expected is None:
            wanted, got = self.source.validator, self.source.validator_of(response)
            if got != wanted:
                raise _UnprovenRangeError(
                    f"the source's validator changed ({wanted} -> {got or 'none'}) by {asked}, "
                    "so its ranges may be of different files"
                )

    def _check_type(self, response: requests.Response) -> None:
        refuse_encoding(response, self.entry)
        kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind:
            self.source.content_type = kind
        if kind == "text/html" and self.relpath.lower().endswith(MODEL_EXTENSIONS):
            raise ContentError(
                "not a safetensors file (Content-Type text/html; header invalid): the server sent a web page, "
                "often a login or error page; check the url and the token",
                self.entry.name,
            )

    def _expected_length(self, response: requests.Response, start: int) -> int | None:
        length = response.headers.get("Content-Length")
        if length and length.isdigit():
            return int(length)
        if self.source.size is not None:
            return self.source.size - start
        return None

    def checkpoint(self, position: int | None = None, force: bool = False) -> None:
        """Record resume state every segment so a killed run re-fetches at most the in-flight window."""
        if not self.resumable:
            return
        now = time.monotonic()
        if not force and position is not None and position % self.segment >= BLOCK and now - self._last_checkpoint < 1:
            return
        with self._lock:
            self._last_checkpoint = now
            state = {
                "url": display_url(self.source.url),
                "size": self.source.size,
                "validator": self.source.validator,
                "sha256": self.expected,
                "prefix": self.hasher.watermark,
                "segments": sorted(self.done),
            }
            temporary = self.sidecar + TEMP_SUFFIX  # in the name budget: store.STAGING_RESERVE
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump(state, handle)
            os.replace(temporary, self.sidecar)

    def _restart(self, message: str) -> None:
        self.warn(f"{self.entry.name}: {message}")
        self.hasher.reset()
        os.ftruncate(self.fd, 0)
        self.offset = 0
        self.done = set()
        self.resumable = False

    def _copy_file(self) -> None:
        source = urllib.parse.unquote(urllib.parse.urlsplit(self.source.url).path)
        position = 0
        with open(source, "rb") as handle:
            while True:
                chunk = handle.read(BLOCK)
                if not chunk:
                    break
                self._write(position, chunk, feed=True)
                position += len(chunk)


class _RangeIgnoredError(Exception):
    """The server answered a Range request with the whole body."""

    def __init__(self, message: str = "server ignored Range; restarting") -> None:
        super().__init__(message)


class _UnprovenRangeError(_RangeIgnoredError):
    """A 206 that is not the range asked for, or not of the probed file: fetch it whole, once."""

    def __init__(self, why: str) -> None:
        super().__init__(f"{why}; fetching it again in one stream from the first byte")
