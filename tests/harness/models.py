"""Helpers of the model-engine tests: an in-process engine runner that keeps every text it
produced, a canary token that must never appear in any of them, and store assertions."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from comfybake.engine import fetch
from harness.mockhub import MockHub

CANARY_HF = f"hf_CANARY_{uuid.uuid4().hex}"
CANARY_CIVITAI = f"civitai_CANARY_{uuid.uuid4().hex}"
LEFTOVER_MARKERS = (".comfybake-partial", ".comfybake-extract", ".comfybake-old", ".part", ".incomplete", "ansible")


class Run:
    """Runs the engine in-process and keeps every text it produced for the canary check."""

    def __init__(self, hub: MockHub, store: Path) -> None:
        self.hub = hub
        self.store = store
        self.outputs: list[str] = []

    def options(self, **overrides: Any) -> fetch.Options:
        settings: dict[str, Any] = {
            "store": str(self.store),
            "hf_endpoint": self.hub.url,
            "civitai_endpoint": self.hub.url,
            "hf_token": CANARY_HF,
            "civitai_token": CANARY_CIVITAI,
            "allow_http": True,
            "backoff": 0.01,
            "retries": 2,
            "segment_size": 1 << 20,
            "min_split_size": 4 << 20,
        }
        settings.update(overrides)
        return fetch.Options(**settings)

    def __call__(self, models: list[dict[str, Any]], **overrides: Any) -> fetch.Report:
        options = self.options(**overrides)
        fetcher = fetch.Fetcher(options, log=self.outputs.append)
        report = fetcher.run(fetch.parse_manifest(models, options))
        self.outputs.extend(repr(r.as_dict()) for r in report.results)
        self.outputs.extend(report.warnings)
        return report

    def one(self, models: list[dict[str, Any]], **overrides: Any) -> fetch.Result:
        report = self(models, **overrides)
        assert len(report.results) == 1
        return report.results[0]

    def error(self, models: list[dict[str, Any]], **overrides: Any) -> str:
        """The manifest must be refused before any request; returns the message."""
        before = len(self.hub.requests())
        with pytest.raises(fetch.ManifestError) as caught:
            self(models, **overrides)
        self.outputs.append(str(caught.value))
        assert len(self.hub.requests()) == before, "a refused manifest made requests"
        return str(caught.value)


def assert_no_canary(texts: list[str]) -> None:
    for text in texts:
        assert CANARY_HF not in text and CANARY_CIVITAI not in text, f"token leaked in: {text[:300]}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def safetensors(payload: bytes = b"\0" * 4096, seed: int = 0) -> bytes:
    """A minimal valid safetensors file (header + payload)."""
    header = (b'{"__metadata__":{"seed":"%d"}}' % seed).ljust(64, b" ")
    return len(header).to_bytes(8, "little") + header + payload


def no_leftovers(root: Path) -> None:
    found = [
        str(p.relative_to(root))
        for p in root.rglob("*")
        if ".comfybake" not in p.relative_to(root).parts[:1] and any(m in p.name for m in LEFTOVER_MARKERS)
    ]
    assert found == [], f"leftovers in the store: {found}"


def tree_hash(root: Path) -> dict[str, tuple[int, int, str]]:
    """inode, mtime and sha256 of every model file (the store's own records excluded)."""
    tree = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts[0] == ".comfybake" or not path.is_file():
            continue
        info = os.stat(path)
        tree[str(rel)] = (info.st_ino, info.st_mtime_ns, sha256(path.read_bytes()))
    return tree
