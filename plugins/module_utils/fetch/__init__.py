# PRIVATE to comfybake: not a public API; it may change without notice.
#
# The one download engine of comfybake. The comfybake.core.models module and the
# `comfybake models` CLI both drive it; nothing else in comfybake downloads.
# It needs only the standard library and requests (and picklescan, or the host's
# comfybake command that carries it, for pickle-based files a manifest allows),
# and runs on the managed host's Python (3.10 or later). One concept per module:
#   errors    the errors, each naming the entry or value at fault
#   options   the settings of a run and the keys of an entry, each declared once
#   manifest  entries and their validation, source and file names
#   report    results, the report, progress callbacks
#   store     the store: paths, verification records, locks, staging names
#   hashing   SHA-256 of files and of out-of-order streams, the model-header check
#   client    HTTP with retries, auth by origin and redirects; the probe of a source
#   transfer  one file's transfer: a stream or parallel ranges, resumable
#   pickles   pickle-based files: detection, the allow_pickle policy, the picklescan scan
#   archives  safe extraction of zip and tar archives
#   engine    the Fetcher: probe, preflight, download, verify, record
#   usage     what the store holds and who uses it, pruning, the disk budget
"""Fetch, verify and record the files of a model manifest in a model store."""

from __future__ import annotations

from .client import HAS_REQUESTS, REQUESTS_IMPORT_ERROR, Client, Remote
from .engine import Fetcher
from .errors import (
    ArchiveError,
    AuthError,
    BudgetError,
    ChecksumError,
    ContentError,
    DiskFullError,
    FetchError,
    HTTPStatusError,
    ManifestError,
    NotFoundError,
    PathError,
    PickleError,
    RedirectError,
    TransferError,
)
from .hashing import StreamHasher, check_model_header, hash_file
from .manifest import (
    Entry,
    display_url,
    human,
    parse_civitai_url,
    parse_hf_url,
    parse_manifest,
)
from .options import ENTRY, SETTINGS, Options, Setting, add_arguments, argument_spec, render_documentation
from .report import Progress, Report, Result
from .store import Store, check_relative_path
from .usage import Pruned, StoreFile, Usage, environment_folders, prunable, prune, scan

__all__ = [
    "ENTRY",
    "HAS_REQUESTS",
    "REQUESTS_IMPORT_ERROR",
    "SETTINGS",
    "ArchiveError",
    "AuthError",
    "BudgetError",
    "ChecksumError",
    "Client",
    "ContentError",
    "DiskFullError",
    "Entry",
    "FetchError",
    "Fetcher",
    "HTTPStatusError",
    "ManifestError",
    "NotFoundError",
    "Options",
    "PathError",
    "PickleError",
    "Progress",
    "Pruned",
    "RedirectError",
    "Remote",
    "Report",
    "Result",
    "Setting",
    "Store",
    "StoreFile",
    "StreamHasher",
    "TransferError",
    "Usage",
    "add_arguments",
    "argument_spec",
    "check_model_header",
    "check_relative_path",
    "display_url",
    "environment_folders",
    "hash_file",
    "human",
    "parse_civitai_url",
    "parse_hf_url",
    "parse_manifest",
    "prunable",
    "prune",
    "render_documentation",
    "scan",
]
