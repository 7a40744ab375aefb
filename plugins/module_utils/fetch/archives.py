# PRIVATE to comfybake: not a public API; it may change without notice.
"""Archives: safe extraction of zip and tar members into the store."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

from .errors import ArchiveError, DiskFullError, ManifestError
from .hashing import BLOCK
from .manifest import Entry, human
from .options import Options
from .pickles import check_file
from .store import Store, check_relative_path


def extract_archive(archive: str, work: str, entry: Entry, options: Options, store: Store) -> dict[str, str]:
    """Check every member first, then extract regular files only; returns name -> sha256."""
    try:
        return _extract_archive(archive, work, entry, options, store)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as error:
        raise ArchiveError(f"corrupt archive ({error}); nothing extracted", entry.name) from None


def _extract_archive(archive: str, work: str, entry: Entry, options: Options, store: Store) -> dict[str, str]:
    with open(archive, "rb") as handle:
        magic = handle.read(4)
    members: list[tuple[str, int, Callable[[], IO[bytes]]]]
    closer: contextlib.ExitStack = contextlib.ExitStack()
    with closer:
        if magic.startswith(b"PK"):
            zip_file = closer.enter_context(zipfile.ZipFile(archive))
            members = _safe_members(_zip_members(zip_file, entry, options), entry, options)
        else:
            try:
                tar = closer.enter_context(tarfile.open(archive, "r:*"))  # noqa: SIM115 - closed by the ExitStack
            except tarfile.TarError:
                raise ArchiveError("not a zip or tar archive; check the url or drop extract", entry.name) from None
            members = _safe_members(_tar_members(tar, entry, options), entry, options)
        prefix = _strip_prefix([name for name, _size, _open in members], entry)
        parent = os.path.dirname(work)
        info = os.statvfs(parent)
        needed, free = sum(size for _name, size, _open in members), info.f_bavail * info.f_frsize
        if needed > free:
            raise DiskFullError(f"need {human(needed)} on {parent} to extract (free {human(free)})", entry.name)
        os.mkdir(work, 0o700)
        hashes: dict[str, str] = {}
        total = 0
        for name, _size, opener in members:
            relative = name[len(prefix) :]
            if not relative:
                continue
            target = os.path.join(work, relative)
            store.makedirs(os.path.dirname(target))
            digest = hashlib.sha256()
            with opener() as source, open(target, "wb") as out:
                while True:
                    chunk = source.read(BLOCK)
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > options.archive_max_bytes:
                        raise ArchiveError(
                            f"archive expands past {human(options.archive_max_bytes)}; refusing it (raise "
                            "archive_max_bytes if it is genuine)",
                            entry.name,
                        )
                    digest.update(chunk)
                    out.write(chunk)
                store.apply_attributes(target, options.mode, out.fileno())
            # A pickle-based member obeys the entry's policy; on failure the caller removes `work`.
            check_file(target, entry.dest + relative, entry.allow_pickle, entry.name)
            hashes[relative] = digest.hexdigest()
        store.apply_attributes(work, options.directory_mode)
    return hashes


def _member_problem(name: str) -> str | None:
    try:
        check_relative_path(name.rstrip("/"), "member")
    except ManifestError:
        return "escapes the target"
    return None


# (name, is a folder, is a link or special file, declared size, opener)
_Member = tuple[str, bool, bool, int, Callable[[], IO[bytes]]]


def _zip_members(archive: zipfile.ZipFile, entry: Entry, options: Options) -> Iterator[_Member]:
    infos = archive.infolist()
    if len(infos) > options.archive_max_members:
        raise ArchiveError(
            f"archive holds {len(infos)} members, over the limit of {options.archive_max_members}", entry.name
        )
    for info in infos:
        kind = stat.S_IFMT(info.external_attr >> 16)
        special = bool(kind) and kind not in (stat.S_IFREG, stat.S_IFDIR)
        yield info.filename, info.is_dir(), special, info.file_size, functools.partial(archive.open, info)


def _tar_members(archive: tarfile.TarFile, entry: Entry, options: Options) -> Iterator[_Member]:
    for count, info in enumerate(archive, 1):
        if count > options.archive_max_members:
            raise ArchiveError(f"archive holds more than {options.archive_max_members} members", entry.name)

        def opener(info: tarfile.TarInfo = info) -> IO[bytes]:
            handle = archive.extractfile(info)
            return handle if handle is not None else io.BytesIO()

        yield info.name, info.isdir(), not (info.isfile() or info.isdir()), info.size, opener


def _safe_members(members: Iterator[_Member], entry: Entry, options: Options) -> list[tuple[str, int, Any]]:
    """Every member checked before anything is extracted; one bad member rejects the archive."""
    bad: list[str] = []
    files: list[tuple[str, int, Any]] = []
    declared = 0
    for name, folder, special, size, opener in members:
        problem = "is a link or special file" if special else _member_problem(name)
        if problem:
            bad.append(f"{name!r} {problem}")
        elif not folder:
            declared += size
            files.append((name, size, opener))
    if bad:
        raise ArchiveError("unsafe archive members, nothing extracted: " + "; ".join(bad), entry.name)
    if declared > options.archive_max_bytes:
        raise ArchiveError(
            f"archive expands to {human(declared)}, over the limit of {human(options.archive_max_bytes)}", entry.name
        )
    return files


def _strip_prefix(names: Sequence[str], entry: Entry) -> str:
    """Drop one wrapping folder named like the target (antelopev2.zip holds antelopev2/*)."""
    target = entry.dest.rstrip("/").rsplit("/", 1)[-1]
    tops = {name.split("/", 1)[0] for name in names}
    if tops == {target} and all("/" in name for name in names):
        return target + "/"
    return ""
