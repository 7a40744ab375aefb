# PRIVATE to comfybake: not a public API; it may change without notice.
"""The engine: bring a store in line with a manifest (probe, preflight, download, verify, record)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from ..redaction import scrub, url_credentials
from .archives import extract_archive
from .client import HAS_REQUESTS, REQUESTS_IMPORT_ERROR, Client, Remote, refuse_encoding, size_error
from .errors import (
    ArchiveError,
    ChecksumError,
    DiskFullError,
    FetchError,
    HTTPStatusError,
    ManifestError,
    NotFoundError,
    PathError,
    PickleError,
    TransferError,
)
from .hashing import BLOCK, StreamHasher, check_model_header, hash_file
from .manifest import (
    SHA256_HEX,
    Entry,
    display_url,
    exact_dest,
    human,
    parse_civitai_url,
    parse_hf_url,
    path_conflicts,
    sanitize_filename,
    source_label,
)
from .options import Options
from .pickles import check_file, kind_by_name, refusal
from .report import Progress, Report, Result
from .store import (
    EXTRACT_SUFFIX,
    OLD_SUFFIX,
    Store,
    fsync_dir,
    staging_path,
    stat_matches,
    stat_record,
    work_path,
)
from .transfer import Services, Transfer
from .usage import check_budget, held_bytes, scan

with contextlib.suppress(ImportError):  # its absence is reported by client.HAS_REQUESTS
    pass


def is_verified(known: str | None, record: Mapping[str, Any] | None = None) -> bool:
    """Whether a known hash vouches for a file or archive: `known`, the manifest's or the source's
    SHA-256, checked its bytes, or its record does not say `"verified": false`. Fetched without one
    (allow_unverified), it stays unverified until a manifest gives a hash."""
    if known is not None:
        return True
    return record is not None and record.get("verified", True) is not False


@dataclass
class _Plan:
    entry: Entry
    result: Result
    relpath: str | None = None  # the file (or extract folder) inside the store
    remote: Remote | None = None
    sources: list[Remote] = field(default_factory=list)
    expected: str | None = None  # sha256 to verify against
    needs_fetch: bool = False
    local: tuple[str, int] | None = None  # (sha256, size) of the file already at the path, once hashed
    started: float = 0.0

    def where(self) -> str:
        """`relpath`, which inspection or the probe sets before any step that reads it."""
        if self.relpath is None:
            raise FetchError(f"internal error: {self.entry.name} has no path in the store yet")
        return self.relpath

    def probed(self) -> Remote:
        """`remote`, which the probe sets (or fails) before any step that reads it."""
        if self.remote is None:
            raise FetchError(f"internal error: {self.entry.name} was not probed")
        return self.remote


class Fetcher:
    """Bring a store in line with a manifest: probe, preflight, download, verify, record."""

    def __init__(
        self,
        options: Options,
        progress: Progress | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if not HAS_REQUESTS:
            raise FetchError(f"the Python library requests is required: {REQUESTS_IMPORT_ERROR}")
        self.options = options
        self.secrets = options.secrets()
        self.progress = progress or Progress()
        self._log = log
        self.warnings: list[str] = []
        self._warn_lock = threading.Lock()
        self.client = Client(options, self.warn)
        self.store = Store(options)
        self.services = Services(self.client, options, self.progress, self.warn)

    def scrub(self, text: str) -> str:
        """`text` without any secret of the run: every message of the engine leaves through here
        (results in `run` and `_fail`, warnings in `warn`), whatever a server echoed into it."""
        return scrub(text, self.secrets)

    def warn(self, message: str) -> None:
        message = self.scrub(message)
        with self._warn_lock:
            self.warnings.append(message)
        if self._log:
            self._log(message)

    # public ------------------------------------------------------------------

    def run(self, entries: Sequence[Entry]) -> Report:
        """Converge the store; per-entry failures are reported, the others still run. A real run
        (not check mode) ends by writing its last-run record (_record_run)."""
        self.secrets |= url_credentials([entry.url for entry in entries])
        started = time.time()
        report = self._converge(entries)
        if not self.options.check_mode:
            self._record_run(len(entries), report, started)
        return report

    def _converge(self, entries: Sequence[Entry]) -> Report:
        plans = [_Plan(e, Result(name=e.name, source=source_label(e.url)), started=time.monotonic()) for e in entries]
        for plan in plans:  # exact dests, and folder dests whose name the store remembers
            plan.relpath = (
                plan.entry.dest.rstrip("/") if exact_dest(plan.entry) else self.store.name_for(plan.entry.key)
            )
        self._check_paths(plans)
        self._each(plans, self._inspect)  # no network: stat and records, hash unrecorded files
        self._each([p for p in plans if p.needs_fetch], self._probe)  # HEAD and API calls, no body
        self._check_paths(plans)  # with the names the sources gave, before anything is written or removed
        self._each([p for p in plans if p.entry.state == "absent"], self._remove)
        self._each([p for p in plans if p.needs_fetch], self._settle)  # keep a local file that matches
        fetching = [p for p in plans if p.needs_fetch]
        try:
            self._preflight_space(fetching)
        except DiskFullError as error:
            for plan in fetching:
                self._fail(plan, error)
            fetching = []
        for plan in fetching:
            if plan.local is not None:
                plan.result.replaced = plan.local[0]
        if self.options.check_mode:
            for plan in fetching:
                plan.result.action = "would_extract" if plan.entry.extract else "would_download"
                plan.result.changed = True
                plan.result.size = plan.remote.size if plan.remote else plan.entry.size
                plan.result.sha256 = plan.expected
        else:
            self._each(fetching, self._fetch)
        for plan in plans:
            plan.result.seconds = round(time.monotonic() - plan.started, 3)
            if plan.result.path:  # a name the server sent may carry what it echoed
                plan.result.path = self.scrub(plan.result.path)
            if plan.result.files:
                plan.result.files = [self.scrub(name) for name in plan.result.files]
        return Report([p.result for p in plans], list(self.warnings))

    def _record_run(self, entries: int, report: Report, started: float) -> None:
        """`<store>/.comfybake/last-run.json`, for the exporter and node_exporter's textfile collector:
        when the run started and ended, the bytes it moved and the entries that failed (by name only:
        never a URL or a token), and when a run last had no failure. A manifest refused before any
        work (ManifestError) leaves the store, and this record, untouched. Not writing it is a
        warning, never a failure of the run."""
        finished = time.time()
        names = [result.name for result in report.failed]
        success = not names
        record = {
            "version": 1,
            "started": round(started, 3),
            "finished": round(finished, 3),
            "duration": round(finished - started, 3),
            "bytes": sum(result.bytes for result in report.results),
            "entries": entries,
            "failed": len(names),
            "failures": [self.scrub(name) for name in names],
            "success": success,
            "last_success": round(finished, 3) if success else self.store.last_run().get("last_success"),
        }
        try:
            self.store.save_last_run(record)
        except OSError as error:
            self.warn(f"could not write the last-run record in {self.store.state_dir}: {error.strerror or error}")
            report.warnings.append(self.warnings[-1])

    def resolve(self, entries: Sequence[Entry]) -> list[dict[str, Any]]:
        """Pin every entry: exact revision, exact file name, size and SHA-256 (the lock)."""
        self.secrets |= url_credentials([entry.url for entry in entries])
        plans = [_Plan(e, Result(name=e.name, source=source_label(e.url))) for e in entries if e.state == "present"]
        self._each(plans, self._probe)
        self._check_paths(plans)
        self._each([p for p in plans if p.result.action != "failed" and not p.expected], self._hash_remote)
        failures = [p.result.msg for p in plans if p.result.action == "failed"]
        if failures:
            raise FetchError("could not lock the manifest:\n  " + "\n  ".join(str(f) for f in failures))
        locked: list[dict[str, Any]] = []
        for plan in plans:
            entry, remote = plan.entry, plan.probed()
            url = entry.url
            if url.startswith("hf://") and remote.commit:
                repo, path, _revision = parse_hf_url(url)
                url = f"hf://{repo}/{path}@{remote.commit}"
            item: dict[str, Any] = {"url": url, "dest": entry.dest if entry.extract else plan.relpath}
            item["sha256"] = plan.expected
            if remote.size is not None:
                item["size"] = remote.size
            if entry.extract:
                item["extract"] = True
                if entry.files:
                    item["files"] = list(entry.files)
                if entry.extracted_size is not None:
                    item["extracted_size"] = entry.extracted_size
            if url.startswith("http://"):
                item["allow_http"] = True
            if entry.allow_pickle:
                item["allow_pickle"] = True
            locked.append(item)
        return locked

    def _check_paths(self, plans: Sequence[_Plan]) -> None:
        """Refuse the manifest when two entries resolve to one path in the store, or one inside the
        other, naming both: the same check as parse_manifest's, once folder dests have their names."""
        problems = path_conflicts([(p.relpath, p.entry) for p in plans if p.relpath is not None])
        if problems:
            heading = "invalid model manifest, once the file names of its folder dests are known"
            raise ManifestError(self.scrub(heading + ":\n  " + "\n  ".join(problems)))

    # phases -------------------------------------------------------------------

    def _each(self, plans: Sequence[_Plan], step: Callable[[_Plan], None]) -> None:
        def guarded(plan: _Plan) -> None:
            try:
                step(plan)
            except FetchError as error:
                self._fail(plan, error)
            except OSError as error:
                self._fail(plan, self._os_error(plan, error))

        if len(plans) <= 1 or self.options.parallel <= 1:
            for plan in plans:
                guarded(plan)
            return
        with ThreadPoolExecutor(max_workers=min(self.options.parallel, len(plans))) as pool:
            list(pool.map(guarded, plans))

    def _fail(self, plan: _Plan, error: FetchError) -> None:
        plan.result.action = "failed"
        plan.result.changed = False
        plan.result.msg = self.scrub(str(error) if error.entry else f"{plan.entry.name}: {error}")
        plan.needs_fetch = False

    def _os_error(self, plan: _Plan, error: OSError) -> FetchError:
        where = error.filename or self.store.root
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return DiskFullError(f"disk full while writing {where}; free space and run again", plan.entry.name)
        return FetchError(f"{error.strerror or error} ({where})", plan.entry.name)

    def _inspect(self, plan: _Plan) -> None:
        """Decide from the store alone: present (trusted or re-hashed) or to fetch; `absent` comes later."""
        entry, result, relpath = plan.entry, plan.result, plan.relpath
        if entry.state == "absent":
            return  # removed once the paths are checked (run)
        if relpath is None:
            plan.needs_fetch = True
            return
        self._refuse_pickle_name(plan)
        path = self.store.path(relpath)
        result.path = path
        if entry.extract:
            if self._archive_present(plan, path):
                result.action = "present"
            else:
                plan.needs_fetch = True
            return
        if not os.path.lexists(path):
            plan.needs_fetch = True
            return
        if not os.path.isfile(path):
            raise PathError(f"{path} exists and is not a regular file; remove it or choose another dest", entry.name)
        record = self.store.file_record(relpath)
        # Without a hash in the manifest, a record vouches only for the source it came from.
        vouched = record is not None and (
            entry.sha256 == record.get("sha256")
            or (entry.sha256 is None and record.get("source") == source_label(entry.url))
        )
        verified = is_verified(entry.sha256, record)
        if vouched and record is not None and self.options.verify == "recorded" and stat_matches(path, record):
            if entry.size is not None and entry.size != record.get("size"):
                plan.needs_fetch = True
                return
            if verified and record.get("verified") is False:
                self._record_file(relpath, path, record["sha256"], entry)
            result.action, result.sha256, result.size = "present", record["sha256"], record["size"]
            result.verified = verified
            return
        expected = entry.sha256 or (record.get("sha256") if vouched and record is not None else None)
        if expected is None:
            plan.needs_fetch = True  # the source's published hash decides, after the probe
            return
        digest, size = plan.local = hash_file(path)
        if digest == expected and entry.size in (None, size):
            self._check_unrecorded(plan, path, record, digest)
            self._record_file(relpath, path, digest, entry, verified=verified)
            result.action, result.sha256, result.size = "present", digest, size
            result.verified = verified
            return
        if self.options.verify == "full" and record is not None and digest != record.get("sha256"):
            self.warn(
                f"{entry.name}: sha256 changed on disk since it was verified ({record.get('sha256')} -> {digest})"
            )
        plan.needs_fetch = True

    def _archive_present(self, plan: _Plan, path: str) -> bool:
        relpath = plan.where()
        record = self.store.archive_record(relpath)
        entry = plan.entry
        if record is None or record.get("source") != source_label(entry.url):
            return False
        if entry.sha256 not in (None, record.get("sha256")):
            return False
        files: dict[str, Any] = record.get("files") or {}
        if any(name not in files for name in entry.files):
            return False
        for name, info in files.items():
            member = os.path.join(path, name)
            if self.options.verify == "full":
                if not os.path.isfile(member) or hash_file(member)[0] != info.get("sha256"):
                    return False
            elif not stat_matches(member, info):
                return False
        plan.result.sha256 = record.get("sha256")
        plan.result.files = sorted(files)
        plan.result.verified = is_verified(entry.sha256, record)
        return True

    def _remove(self, plan: _Plan) -> None:
        entry, result, relpath = plan.entry, plan.result, plan.relpath
        result.action = "absent"
        if relpath is None:
            return  # a folder dest that was never fetched here: nothing to remove
        path = self.store.path(relpath)
        result.path = path
        if not os.path.lexists(path):
            return
        result.action, result.changed = "removed", True
        if self.options.check_mode:
            result.action = "would_remove"
            return
        with self.store.locked(relpath):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
                self.store.record("archives", relpath, None)
            else:
                os.unlink(path)
                self.store.record("files", relpath, None)
            if not exact_dest(entry):
                self.store.record("names", entry.key, None)

    def _probe(self, plan: _Plan) -> None:
        """Learn name, size, validators and published SHA-256 without transferring the body."""
        entry = plan.entry
        origin = self._origin_remote(entry)
        if not entry.url.startswith("file://"):
            self.client.probe(origin, entry)
        if plan.relpath is None:
            exact = exact_dest(entry)
            plan.relpath = (
                entry.dest.rstrip("/") if exact else entry.dest + sanitize_filename(origin.filename or "", entry)
            )
        plan.result.path = self.store.path(plan.relpath)
        self._refuse_pickle_name(plan)
        if entry.sha256 and origin.sha256 and entry.sha256 != origin.sha256:
            raise ChecksumError(
                f"sha256 mismatch for {entry.name}: expected {entry.sha256}, the source publishes {origin.sha256}; "
                "update the manifest (or its lock) if the model changed upstream",
                entry.name,
            )
        if entry.size is not None and origin.size is not None and entry.size != origin.size:
            raise ChecksumError(
                f"size mismatch for {entry.name}: the manifest says {entry.size} bytes, the source has {origin.size}",
                entry.name,
            )
        if origin.size is None:
            origin.size = entry.size
        plan.expected = entry.sha256 or origin.sha256
        plan.remote = origin
        plan.sources = [Remote(url=f"{base.rstrip('/')}/{plan.relpath}", mirror=True) for base in self.options.mirrors]
        if not plan.expected:
            plan.sources = []  # a mirror's bytes are trusted only against a known hash
        plan.sources.append(origin)

    def _refuse_pickle_name(self, plan: _Plan) -> None:
        """A folder dest whose file name (from the source or the records) is a pickle-based format, before any GET."""
        entry = plan.entry
        kind = None if entry.extract or entry.allow_pickle else kind_by_name(plan.where())
        if kind:
            raise PickleError(refusal(plan.where(), kind), entry.name)

    def _check_unrecorded(self, plan: _Plan, path: str, record: dict[str, Any] | None, digest: str) -> None:
        """A file already in place that no record vouches for obeys the pickle policy, as a download does."""
        if record is None or record.get("sha256") != digest:
            check_file(path, plan.where(), plan.entry.allow_pickle, plan.entry.name)

    def _settle(self, plan: _Plan) -> None:
        """After the probe: refuse unverifiable entries; keep a local file that has the published hash."""
        entry = plan.entry
        relpath = plan.where()
        if plan.expected is None and not entry.allow_unverified:
            raise ChecksumError(
                f"no sha256 for {entry.name}: the manifest gives none and {display_url(entry.url)} publishes none; "
                "add sha256 (or run `comfybake models lock`), or set allow_unverified: true",
                entry.name,
            )
        plan.result.verified = is_verified(plan.expected)  # else allow_unverified: checked against nothing
        path = self.store.path(relpath)
        if entry.extract or not plan.expected or not os.path.isfile(path):
            return
        record = self.store.file_record(relpath)
        if plan.local is not None:
            digest, size = plan.local
        elif self.options.verify == "recorded" and record and stat_matches(path, record):
            digest, size = plan.local = record.get("sha256", ""), record["size"]
        else:
            digest, size = plan.local = hash_file(path)
        if digest == plan.expected:
            self._check_unrecorded(plan, path, record, digest)
            self._record_file(relpath, path, digest, entry)
            self._remember_name(plan)
            plan.result.action, plan.result.sha256, plan.result.size = "present", digest, size
            plan.needs_fetch = False

    def _origin_remote(self, entry: Entry) -> Remote:
        url = entry.url
        if url.startswith("hf://"):
            repo, path, revision = parse_hf_url(url)
            base = self.options.hf_endpoint.rstrip("/")
            quoted = urllib.parse.quote(revision, safe="")
            return Remote(url=f"{base}/{repo}/resolve/{quoted}/{path}", filename=path.rsplit("/", 1)[-1])
        if url.startswith("civitai://"):
            return self._civitai_remote(entry, parse_civitai_url(url))
        if url.startswith("file://"):
            source = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
            try:
                size = os.stat(source).st_size
            except OSError as error:
                raise NotFoundError(f"cannot read {source}: {error.strerror}; check the file url", entry.name) from None
            return Remote(url=url, size=size, filename=os.path.basename(source))
        return Remote(url=url, filename=urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1]))

    def _civitai_remote(self, entry: Entry, version: int) -> Remote:
        base = self.options.civitai_endpoint.rstrip("/")
        response = self.client.request("GET", f"{base}/api/v1/model-versions/{version}", entry)
        if response.status_code != 200:
            raise self.client.status_error(response, entry)
        try:
            data = response.json()
            files = data.get("files") or []
            chosen = next((f for f in files if f.get("primary")), files[0] if files else None)
        except (ValueError, AttributeError):
            chosen = None
        if not isinstance(chosen, dict):
            raise NotFoundError(f"civitai model version {version} lists no files", entry.name)
        published = (chosen.get("hashes") or {}).get("SHA256")
        return Remote(
            url=f"{base}/api/download/models/{version}",
            sha256=published.lower() if isinstance(published, str) and SHA256_HEX.match(published) else None,
            filename=chosen.get("name"),
        )

    def _hash_remote(self, plan: _Plan) -> None:
        """For the lock: stream a source that publishes no SHA-256 through the hash, writing nothing."""
        remote = plan.probed()
        entry, digest = plan.entry, hashlib.sha256()
        if entry.url.startswith("file://"):
            plan.expected = hash_file(urllib.parse.unquote(urllib.parse.urlsplit(entry.url).path))[0]
            return
        response = self.client.request("GET", remote.url, entry, stream=True)
        if response.status_code != 200:
            raise self.client.status_error(response, entry)
        refuse_encoding(response, entry)
        total = 0
        for chunk in response.iter_content(BLOCK):
            digest.update(chunk)
            total += len(chunk)
        if remote.size is not None and total != remote.size:
            raise size_error(total, remote.size, entry)
        remote.size = total
        plan.expected = digest.hexdigest()

    # The bytes the front end's prune will remove after this run (usage.prunable): the budget
    # does not count them.
    prunable: int = 0

    def _preflight_space(self, plans: Sequence[_Plan]) -> None:
        """Fail before the first GET when the downloads cannot fit on the disk or in the budget."""
        need: dict[int, list[Any]] = {}
        needs: list[tuple[str, int]] = []
        unknown: list[str] = []
        for plan in plans:
            if plan.relpath is None or plan.remote is None or plan.remote.size is None:
                unknown.append(plan.entry.name)
                continue
            path = self.store.path(plan.relpath)
            existing = path
            while not os.path.exists(existing):
                existing = os.path.dirname(existing)
            device = os.stat(existing).st_dev
            partial = 0
            with contextlib.suppress(OSError):
                partial = os.stat(staging_path(path, plan.entry.extract)).st_size
            size = max(0, plan.remote.size - partial)
            if plan.entry.extract:  # the archive and what it unpacks to are on disk together
                size += plan.entry.extracted_size if plan.entry.extracted_size is not None else 2 * plan.remote.size
            slot = need.setdefault(device, [0, existing, []])
            slot[0] += size
            slot[2].append(plan.entry.name)
            # The budget is what the store holds after the run: a file (or extract folder) this
            # run replaces at the same path is counted in the usage already and goes.
            needs.append((plan.entry.name, max(0, size - held_bytes(path))))
        for amount, where, names in need.values():
            info = os.statvfs(where)
            free = info.f_bavail * info.f_frsize
            if amount > free:
                raise DiskFullError(
                    f"need {human(amount)} on {where} (free {human(free)}) for {', '.join(names)}; "
                    "free space or grow the volume, then run again"
                )
        if self.options.budget is not None and plans:
            check_budget(self.options, scan(self.options, []).total, needs, unknown, self.prunable)

    # transfer -----------------------------------------------------------------

    def _fetch(self, plan: _Plan) -> None:
        relpath = plan.where()
        entry, result = plan.entry, plan.result
        path = self.store.path(relpath)
        self.store.makedirs(os.path.dirname(path))
        with self.store.locked(relpath):
            self.store.refresh()
            if not entry.extract:
                record = self.store.file_record(relpath)
                fresh = plan.local is None  # a file this run hashed and found wrong is not trusted by stat
                if fresh and record and stat_matches(path, record) and record.get("sha256") == plan.expected:
                    result.action, result.sha256, result.size = "present", record["sha256"], record["size"]
                    return  # another run fetched it while we waited for the lock
            staging = staging_path(path, entry.extract)
            last_error: FetchError | None = None
            for source in plan.sources:
                try:
                    digest, size, transferred = self._transfer(plan, source, staging)
                    break
                except FetchError as error:
                    if not source.mirror:
                        raise
                    last_error = error
                    self.warn(f"{entry.name}: mirror {display_url(source.url)} failed ({error.reason}); trying next")
            else:  # pragma: no cover - the origin is always last and raises
                raise last_error or FetchError("no source", entry.name)
            result.bytes += transferred
            result.sha256, result.size = digest, size
            result.verified = is_verified(plan.expected)  # else allow_unverified: as the server sent it
            if entry.extract:
                self._extract(plan, staging, digest)
                result.action, result.changed = "extracted", True
            else:
                os.replace(staging, path)
                fsync_dir(os.path.dirname(path))
                self._record_file(relpath, path, digest, entry, verified=result.verified)
                self._remember_name(plan)
                result.action, result.changed = "downloaded", True
        self.progress.finish(entry.name, result.action)

    def _transfer(self, plan: _Plan, source: Remote, staging: str) -> tuple[str, int, int]:
        """Fill `staging` from `source` and verify it; returns (sha256, size, bytes transferred)."""
        entry = plan.entry
        if source.mirror:
            self.client.probe(source, replace(entry, auth="none"))
        elif source.final_url is None and not source.url.startswith("file://"):
            self.client.probe(source, entry)
        sidecar = staging + ".json"
        state = self._resume_state(plan, source, staging, sidecar)
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(staging, flags, 0o600)
        keep = False
        try:
            offset = state.get("prefix", 0) if state else 0
            done: list[int] = list(state.get("segments", [])) if state else []
            if not state:
                os.ftruncate(fd, 0)
            hasher = StreamHasher(fd, offset)
            for index in done:
                start = index * self.options.segment_size
                hasher.done(start, min(start + self.options.segment_size, source.size or 0))
            job = Transfer(self.services, entry, plan.where(), plan.expected, source, fd, hasher, sidecar, offset, done)
            self.progress.start(entry.name, source.size)
            try:
                job.run()
            except BaseException as error:
                transient = isinstance(error, (TransferError, HTTPStatusError)) or not isinstance(error, Exception)
                keep = job.resumable and transient
                if keep:
                    job.checkpoint(force=True)
                hasher.abort()
                raise
            digest, size = hasher.finish()
            if source.size is not None and size != source.size:
                raise size_error(size, source.size, entry)
            expected = plan.expected
            if expected and digest != expected:
                if state:  # the kept bytes may be stale: discard them and fetch once from the first byte
                    self.warn(f"{entry.name}: the resumed download did not verify ({digest}); fetching it again")
                    os.ftruncate(fd, 0)
                    with contextlib.suppress(OSError):
                        os.unlink(sidecar)
                    return self._transfer(plan, source, staging)
                raise ChecksumError(f"sha256 mismatch for {entry.name}: expected {expected} got {digest}", entry.name)
            if not entry.extract:
                check_model_header(staging, plan.relpath or entry.dest, source.content_type)
                check_file(staging, plan.where(), entry.allow_pickle, entry.name)  # before the rename
            os.fsync(fd)
            self.store.apply_attributes(staging, self.options.mode, fd)
            return digest, size, job.transferred
        except BaseException:
            if not keep:
                with contextlib.suppress(OSError):
                    os.unlink(staging)
                with contextlib.suppress(OSError):
                    os.unlink(sidecar)
            raise
        finally:
            os.close(fd)
            if not keep:
                with contextlib.suppress(OSError):
                    os.unlink(sidecar)

    def _resume_state(self, plan: _Plan, source: Remote, staging: str, sidecar: str) -> dict[str, Any] | None:
        """The checkpoint of an earlier interrupted transfer, if it can be trusted for this source."""
        try:
            with open(sidecar, encoding="utf-8") as handle:
                state = json.load(handle)
            partial = os.stat(staging).st_size
        except (OSError, ValueError):
            for leftover in (staging, sidecar):
                with contextlib.suppress(OSError):
                    os.unlink(leftover)
            return None
        why = None
        if state.get("url") != display_url(source.url) or state.get("sha256") != plan.expected:
            why = "it belongs to another source"
        elif state.get("size") != source.size or partial > (source.size or 0):
            why = f"the remote size changed ({state.get('size')} -> {source.size})"
        elif state.get("validator") != source.validator:
            why = f"the remote changed (validator {state.get('validator')} -> {source.validator})"
        elif plan.expected is None and not source.strong_etag:
            why = "without a sha256, only a strong ETag (not a weak one, nor Last-Modified) proves the kept bytes"
        elif not source.ranges and state.get("prefix", 0) < (source.size or 0):
            why = "the server no longer accepts Range requests"
        if why:
            self.warn(f"{plan.entry.name}: discarding the partial download: {why}; fetching again")
            os.unlink(staging)
            os.unlink(sidecar)
            return None
        return dict(state)

    def _extract(self, plan: _Plan, archive: str, digest: str) -> None:
        relpath = plan.where()
        target = self.store.path(relpath)
        parent = os.path.dirname(target)
        work = work_path(target, EXTRACT_SUFFIX)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(work)
        try:
            files = extract_archive(archive, work, plan.entry, self.options, self.store)
            missing = [name for name in plan.entry.files if name not in files]
            if missing:
                raise ArchiveError(
                    f"the archive lacks expected file(s) {', '.join(missing)}; it holds {', '.join(sorted(files))}",
                    plan.entry.name,
                )
            old = None
            if os.path.lexists(target):
                old = work_path(target, OLD_SUFFIX)
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(old)
                os.rename(target, old)
            os.rename(work, target)
            fsync_dir(parent)
            if old:
                shutil.rmtree(old)
        finally:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(work)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(archive)
        records = {}
        for name, sha in files.items():
            info = stat_record(os.path.join(target, name))
            records[name] = {**info, "sha256": sha}
        record: dict[str, Any] = {"sha256": digest, "source": source_label(plan.entry.url), "files": records}
        if not is_verified(plan.expected):
            record["verified"] = False  # allow_unverified: no known hash vouched for the archive
        self.store.record("archives", relpath, record)
        plan.result.files = sorted(files)

    def _record_file(self, relpath: str, path: str, digest: str, entry: Entry, verified: bool = True) -> None:
        """Record a file at `path` with its SHA-256; `verified` False: no known hash vouched for it
        (allow_unverified), and the record says so (`"verified": false`) until one does."""
        record: dict[str, Any] = {**stat_record(path), "sha256": digest, "source": source_label(entry.url)}
        if not verified:
            record["verified"] = False
        self.store.record("files", relpath, record)

    def _remember_name(self, plan: _Plan) -> None:
        """The file at `relpath` is this entry's now: a folder dest remembers its name, and the name
        another folder dest remembered for that path (one no longer in the manifest) is forgotten."""
        owner = None if exact_dest(plan.entry) else plan.entry.key
        for key in self.store.names_of(plan.where()):
            if key != owner:
                self.store.record("names", key, None)
        if owner is not None:
            self.store.record("names", owner, plan.where())
