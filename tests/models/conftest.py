"""Fixtures of the model-engine tests: two loopback hubs (an origin and a CDN on another
host), a model store, and an engine runner whose outputs are checked for the canary token."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.mockhub import MockHub
from harness.models import Run, assert_no_canary


@pytest.fixture
def hub() -> Iterator[MockHub]:
    with MockHub("127.0.0.1") as server:
        yield server


@pytest.fixture
def cdn() -> Iterator[MockHub]:
    """A second host (127.0.0.2): presigned-URL storage that must never receive a token."""
    with MockHub("127.0.0.2") as server:
        yield server


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    return root


@pytest.fixture
def run(hub: MockHub, store: Path) -> Iterator[Run]:
    runner = Run(hub, store)
    yield runner
    assert_no_canary(runner.outputs)
