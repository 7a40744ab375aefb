"""Fixtures of the job tests: loopback instances (jobs_loopback.py), a serving host of ComfyUI
doubles and moto's S3 server (harness/jobs.py)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness.jobs import Environment, JobsHost, S3Server, start_host, start_s3
from jobs_loopback import Instance, StartInstance, start_instance, stop_all


@pytest.fixture
def instance() -> Iterator[StartInstance]:
    """Start a loopback instance: `instance("a", "prod", queue_remaining=2, object_info=...)`."""
    started: list[Instance] = []
    yield functools.partial(start_instance, started)
    stop_all(started)


# --------------------------------------------------------------------------- a serving host (harness/jobs.py)


@pytest.fixture
def jobs_host(tmp_path: Path) -> Iterator[Callable[..., JobsHost]]:
    """Start ComfyUI doubles in environments, routing.json listing them:
    `host = jobs_host({"a": "prod", "v": "video"})` (environments: harness.jobs.ENVIRONMENTS)."""
    started: list[JobsHost] = []

    def start(layout: dict[str, str], environments: dict[str, Environment] | None = None) -> JobsHost:
        host = start_host(tmp_path, layout, environments)
        started.append(host)
        return host

    yield start
    for host in started:
        host.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on a free loopback port, with the bucket `comfybake-jobs`."""
    found = start_s3()
    yield found
    found.server.stop()
