# PRIVATE to comfybake: not a public API; it may change without notice.
"""The engine's errors: each names the entry or value at fault and what to do."""

from __future__ import annotations


class FetchError(Exception):
    """A failure the user can act on; the message names the entry, the cause and the fix."""

    retryable = False

    def __init__(self, message: str, entry: str | None = None) -> None:
        super().__init__(f"{entry}: {message}" if entry else message)
        self.entry = entry
        self.reason = message


class ManifestError(FetchError):
    """The manifest is invalid; nothing was fetched."""


class AuthError(FetchError):
    """401/403: a missing, invalid or unentitled token. Never retried."""


class NotFoundError(FetchError):
    """404: the repository, file or model version does not exist. Never retried."""


class HTTPStatusError(FetchError):
    """Another HTTP status, after the retries it deserved."""


class TransferError(FetchError):
    """The connection broke or the body was cut short; resumable."""

    retryable = True


class ChecksumError(FetchError):
    """The bytes do not have the expected SHA-256."""


class DiskFullError(FetchError):
    """Not enough free space, found before the first byte or while writing."""


class RedirectError(FetchError):
    """A redirect that comfybake refuses to follow."""


class ContentError(FetchError):
    """The bytes are not what the destination says (an HTML page saved as a model)."""


class ArchiveError(FetchError):
    """An archive with unsafe members or past the size limits; nothing was extracted."""


class PathError(FetchError):
    """A destination that escapes the model store."""


class PickleError(ContentError):
    """A pickle-based file (code runs when it is loaded) that the manifest does not allow, or that
    the scanner found dangerous, or that no scanner could check; nothing was installed."""


class BudgetError(DiskFullError):
    """The store would grow past its budget; found before the first byte."""
