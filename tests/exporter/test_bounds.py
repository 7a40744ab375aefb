"""Scrapes are bounded in time even when the model store's walk hangs.

The hang is real: the store's records file (`<store>/.comfybake/verified.json`, which every walk
reads first) is a named pipe, so the walk blocks in the kernel's open() until the test opens the
other end, as a walk on a stuck network file system blocks. The kernel also tells how many of
the exporter's threads wait there (`/proc/<pid>/task/*/wchan` is `wait_for_partner`), which shows
that a late walk is never started a second time.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.double import free_port
from harness.exporter import Samples, exporter, samples, value, write_host

RECORDS = '{"version": 1, "files": {}, "archives": {}, "names": {}}'


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A store of one 4 KiB file, and the models file that names it."""
    store = tmp_path / "models"
    (store / ".comfybake").mkdir(parents=True)
    (store / "loras").mkdir()
    (store / "loras" / "a.safetensors").write_bytes(b"\0" * 4096)
    (store / ".comfybake" / "verified.json").write_text(RECORDS)
    config = write_host(tmp_path / "etc", [])
    (config / "models.yml").write_text(f"store: {store}\nmodels: []\n")
    os.chmod(config / "models.yml", 0o600)
    return store


def hang(store: Path) -> Path:
    """Make the store's records file a named pipe: the next walk blocks opening it."""
    pipe = store.parent / "records.fifo"
    os.mkfifo(pipe)
    os.link(pipe, store / ".comfybake" / "verified.fifo")
    os.replace(store / ".comfybake" / "verified.fifo", store / ".comfybake" / "verified.json")
    return pipe


def release(store: Path, pipe: Path) -> None:
    """A regular records file again for the walks to come, then the blocked walk gets its records."""
    (store / ".comfybake" / "verified.tmp").write_text(RECORDS)
    os.replace(store / ".comfybake" / "verified.tmp", store / ".comfybake" / "verified.json")
    try:  # the blocked walk is the reader; without one (its process has exited) there is nothing to release
        fd = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as error:
        if error.errno != errno.ENXIO:
            raise
        return
    with os.fdopen(fd, "w", encoding="utf-8") as writer:
        writer.write(RECORDS)


def blocked_walks(pid: int) -> int:
    """Threads of the process waiting in open() for a pipe's other end."""
    waiting = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            waiting += (task / "wchan").read_text().strip() == "wait_for_partner"
        except OSError:  # the thread ended meanwhile
            continue
    return waiting


@pytest.fixture
def serve(store: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    port = free_port()
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "comfybake", "exporter", "serve", "--config-root", str(tmp_path / "etc")),
            *("--listen", f"127.0.0.1:{port}", "--timeout", "1", "--state", str(tmp_path / "state.json")),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    yield server, port
    server.terminate()
    assert server.wait(timeout=10) == 0


def get(server: subprocess.Popen[str], port: int) -> Samples:
    """One scrape of /metrics (the limit is generous: a scrape that hangs fails the test, it does not hang it)."""
    deadline = time.monotonic() + 30
    while True:
        assert server.poll() is None, server.stderr.read() if server.stderr else ""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
                return samples(response.read().decode())
        except urllib.error.URLError as error:
            if not isinstance(error.reason, ConnectionRefusedError):  # else: not listening yet
                raise
            assert time.monotonic() < deadline, "the exporter did not start listening"
            time.sleep(0.1)


def test_a_hung_store_walk_serves_the_last_completed_walk(
    store: Path, serve: tuple[subprocess.Popen[str], int]
) -> None:
    server, port = serve
    labels = {"store": str(store)}
    late = 0.0  # scrapes whose walk was late (a first walk on a busy machine may be)
    while True:  # until a scrape's own walk was in time: then no walk runs between scrapes
        first = get(server, port)
        counted = value(first, "comfybake_exporter_errors_total", instance="", what="store") or 0.0
        if counted == late and value(first, "comfybake_model_store_used_bytes", **labels) == 4096:
            break
        assert counted < 5, first
        late = counted

    pipe = hang(store)
    (store / "loras" / "b.safetensors").write_bytes(b"\0" * 8192)
    second = get(server, port)  # answers although its walk hangs: the last completed walk's values
    assert value(second, "comfybake_model_store_used_bytes", **labels) == 4096
    assert value(second, "comfybake_exporter_errors_total", instance="", what="store") == late + 1
    third = get(server, port)
    assert value(third, "comfybake_model_store_used_bytes", **labels) == 4096
    assert value(third, "comfybake_exporter_errors_total", instance="", what="store") == late + 2
    ages = [value(found, "comfybake_model_store_scan_age_seconds", **labels) for found in (first, second, third)]
    assert ages[0] is not None and ages[1] is not None and ages[2] is not None and ages[2] > ages[1]
    assert blocked_walks(server.pid) == 1, "a late walk is waited for, not started again"

    release(store, pipe)
    deadline = time.monotonic() + 30
    while value(found := get(server, port), "comfybake_model_store_used_bytes", **labels) != 4096 + 8192:
        assert time.monotonic() < deadline, found
    assert blocked_walks(server.pid) == 0


def test_a_one_shot_scrape_with_a_hung_walk_answers_without_store_values(store: Path, tmp_path: Path) -> None:
    """`scrape` has no earlier walk to report: no store values, the `store` error, exit 0."""
    pipe = hang(store)
    done = exporter("scrape", "--config-root", str(tmp_path / "etc"), "--timeout", "1")
    assert done.returncode == 0, done.stderr
    found = samples(done.stdout)
    assert value(found, "comfybake_exporter_errors_total", instance="", what="store") == 1
    assert not [name for name, _labels in found if name.startswith("comfybake_model_store_")]
    release(store, pipe)
