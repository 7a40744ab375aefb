"""Fixtures of the job tests: loopback instances (jobs_loopback.py)."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest
from jobs_loopback import Instance, StartInstance, start_instance, stop_all


@pytest.fixture
def instance() -> Iterator[StartInstance]:
    """Start a loopback instance: `instance("a", "prod", queue_remaining=2, object_info=...)`."""
    started: list[Instance] = []
    yield functools.partial(start_instance, started)
    stop_all(started)
