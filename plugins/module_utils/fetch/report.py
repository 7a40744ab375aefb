# PRIVATE to comfybake: not a public API; it may change without notice.
"""What a run reports: each entry's result, the whole report, and progress callbacks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Result:
    """What happened to one entry; safe to print (no token, no signed URL)."""

    name: str
    source: str
    action: str = "pending"
    changed: bool = False
    path: str | None = None
    sha256: str | None = None
    size: int | None = None
    bytes: int = 0
    seconds: float = 0.0
    msg: str | None = None
    files: list[str] | None = None
    replaced: str | None = None  # sha256 of the file this run replaced (or would replace)
    verified: bool = True  # False: no sha256 was known, the file is as the server sent it (allow_unverified)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class Report:
    results: list[Result]
    warnings: list[str]

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if r.action == "failed"]

    @property
    def changed(self) -> bool:
        return any(r.changed for r in self.results)


class Progress:
    """Receives transfer progress; the CLI draws bars, the module ignores it."""

    def start(self, name: str, total: int | None) -> None:
        """A transfer of `total` bytes (None: unknown) begins."""

    def advance(self, name: str, amount: int) -> None:
        """`amount` more bytes of `name` arrived."""

    def finish(self, name: str, action: str) -> None:
        """`name` is done."""
