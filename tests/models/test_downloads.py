"""Downloads: integrity, atomicity, resume, retries, concurrency, idempotence (DL-01..DL-11)."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from harness import archives
from harness.mockhub import MockHub, Route, VirtualFile
from harness.models import Run, no_leftovers, safetensors, sha256, tree_hash

from comfybake.engine.fetch.client import content_range

MiB = 1 << 20


def test_download_verifies_records_and_second_run_moves_no_bytes(run: Run, hub: MockHub, store: Path) -> None:
    """DL-10: the second run makes no request at all and touches no file."""
    body = safetensors(os.urandom(3 * MiB))
    hub.add("/m/a.safetensors", body)
    models = [{"url": f"{hub.url}/m/a.safetensors", "dest": "checkpoints/a.safetensors", "sha256": sha256(body)}]
    first = run.one(models)
    assert (first.action, first.changed, first.bytes, first.sha256) == ("downloaded", True, len(body), sha256(body))
    target = store / "checkpoints" / "a.safetensors"
    assert target.read_bytes() == body
    assert oct(target.stat().st_mode & 0o7777) == "0o640"
    assert oct((store / "checkpoints").stat().st_mode & 0o7777) == "0o2750"
    before, served = tree_hash(store), len(hub.requests())
    second = run.one(models)
    assert (second.action, second.changed, second.bytes) == ("present", False, 0)
    assert len(hub.requests()) == served, "a converged store still made requests"
    assert tree_hash(store) == before
    check = run.one(models, check_mode=True)
    assert (check.action, check.changed) == ("present", False)
    no_leftovers(store)


def test_check_mode_probes_with_head_and_writes_nothing(run: Run, hub: MockHub, store: Path) -> None:
    body = safetensors()
    hub.add("/m/b.safetensors", body)
    # No sha256 and none published: check mode reports what the real run would refuse.
    result = run.one([{"url": f"{hub.url}/m/b.safetensors", "dest": "loras/b.safetensors"}], check_mode=True)
    assert result.action == "failed"
    assert "no sha256" in (result.msg or "")
    result = run.one(
        [{"url": f"{hub.url}/m/b.safetensors", "dest": "loras/b.safetensors", "sha256": sha256(body)}],
        check_mode=True,
    )
    assert (result.action, result.changed, result.size) == ("would_download", True, len(body))
    assert {r.method for r in hub.requests()} == {"HEAD"}
    assert list(store.iterdir()) == []


def test_checksum_mismatch_keeps_the_good_file(run: Run, hub: MockHub, store: Path) -> None:
    """DL-01: a wrong hash fails, names both hashes, and leaves the installed file alone."""
    good, other = safetensors(seed=1), safetensors(seed=2)
    hub.add("/m/c.safetensors", good)
    entry = {"url": f"{hub.url}/m/c.safetensors", "dest": "checkpoints/c.safetensors"}
    assert run.one([{**entry, "sha256": sha256(good)}]).action == "downloaded"
    before = tree_hash(store)
    result = run.one([{**entry, "sha256": sha256(other)}])
    assert result.action == "failed"
    assert f"sha256 mismatch for checkpoints/c.safetensors: expected {sha256(other)} got {sha256(good)}" in (
        result.msg or ""
    )
    assert tree_hash(store) == before
    no_leftovers(store)


def test_truncated_body_without_resume_fails_and_leaves_nothing(run: Run, hub: MockHub, store: Path) -> None:
    """DL-02: a Content-Length promise that is not kept."""
    body = os.urandom(6 * MiB)
    hub.add("/m/t.bin", body, ranges=False, truncate_at=2 * MiB)
    result = run.one([{"url": f"{hub.url}/m/t.bin", "dest": "vae/t.bin", "sha256": sha256(body)}])
    assert result.action == "failed"
    assert "incomplete read" in (result.msg or "") or "connection broke" in (result.msg or "")
    assert not (store / "vae" / "t.bin").exists()
    no_leftovers(store)


def test_truncated_body_resumes_from_where_it_stopped(run: Run, hub: MockHub, store: Path) -> None:
    """DL-02 with resume: one cut, then a ranged request for the rest only."""
    body = os.urandom(3 * MiB)
    hub.add("/m/r.bin", body, truncate_at=MiB + 123, truncate_times=1)
    result = run.one([{"url": f"{hub.url}/m/r.bin", "dest": "vae/r.bin", "sha256": sha256(body)}], connections=1)
    assert result.action == "downloaded"
    assert (store / "vae" / "r.bin").read_bytes() == body
    gets = [r for r in hub.requests("/m/r.bin") if r.method == "GET"]
    assert len(gets) == 2
    resumed_at = int(gets[1].headers["Range"].removeprefix("bytes=").rstrip("-"))
    assert MiB <= resumed_at <= MiB + 123, "the resume did not start where the cut was"
    assert hub.bytes_served - len(body) <= 123, "more than the unreceived tail was fetched twice"
    no_leftovers(store)


def test_truncated_chunked_stream_fails(run: Run, hub: MockHub, store: Path) -> None:
    """DL-03: a chunked body cut short, with no length to compare against."""
    body = os.urandom(2 * MiB)
    hub.add("/m/chunked.bin", body, chunked=True, ranges=False, truncate_at=MiB)
    result = run.one([{"url": f"{hub.url}/m/chunked.bin", "dest": "vae/chunked.bin", "sha256": sha256(body)}])
    assert result.action == "failed"
    assert not (store / "vae" / "chunked.bin").exists()
    no_leftovers(store)


def _partial_run(run: Run, hub: MockHub, body: bytes, cut: int) -> dict[str, object]:
    """A first run that breaks after `cut` bytes and may not retry: it leaves a resumable partial."""
    hub.add("/m/p.bin", body, truncate_at=cut, truncate_times=1)
    entry = {"url": f"{hub.url}/m/p.bin", "dest": "vae/p.bin", "sha256": sha256(body)}
    result = run.one([entry], retries=0, connections=1)
    assert result.action == "failed"
    assert "incomplete read" in (result.msg or "")
    return entry


def test_range_ignored_restarts_from_zero(run: Run, hub: MockHub, store: Path) -> None:
    """DL-05a: a partial exists and the server answers Range with a full 200."""
    body = os.urandom(3 * MiB)
    entry = _partial_run(run, hub, body, MiB)
    assert (store / "vae" / ".p.bin.comfybake-partial").stat().st_size >= MiB
    hub.add("/m/p.bin", body, ignore_range=True)
    report = run([entry], connections=1)
    assert report.results[0].action == "downloaded"
    assert any("server ignored Range; restarting" in w for w in report.warnings)
    assert (store / "vae" / "p.bin").read_bytes() == body
    no_leftovers(store)


def test_partial_of_a_changed_remote_is_discarded(run: Run, hub: MockHub, store: Path) -> None:
    """DL-05b: the recorded validator differs from the current one."""
    old, new = os.urandom(3 * MiB), os.urandom(3 * MiB)
    entry = _partial_run(run, hub, old, MiB)
    hub.add("/m/p.bin", new)
    report = run([{**entry, "sha256": sha256(new)}], connections=1)
    assert report.results[0].action == "downloaded"
    assert any("discarding the partial download" in w for w in report.warnings)
    assert (store / "vae" / "p.bin").read_bytes() == new
    no_leftovers(store)


def test_complete_partial_is_finalised_without_refetch(run: Run, hub: MockHub, store: Path) -> None:
    """DL-06: every byte was written but the process died before the rename."""
    body = os.urandom(3 * MiB)
    entry = _partial_run(run, hub, body, MiB)
    staging = store / "vae" / ".p.bin.comfybake-partial"
    staging.write_bytes(body)  # the rest arrived, then the process was killed before its checkpoint
    sidecar = staging.with_name(staging.name + ".json")
    state = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**state, "prefix": len(body)}))
    hub.reset_log()
    result = run.one([entry])
    assert (result.action, result.changed, result.bytes) == ("downloaded", True, 0)
    assert hub.bytes_served == 0
    assert (store / "vae" / "p.bin").read_bytes() == body
    assert run.one([entry]).changed is False
    no_leftovers(store)


def test_free_space_preflight_fails_before_any_get(run: Run, hub: MockHub, store: Path) -> None:
    """DL-07: need more than the filesystem has free."""
    # More than the whole filesystem, not just more than is free now: tests running alongside
    # free space too, and a file that fits after all would really be downloaded.
    size = os.statvfs(store).f_blocks * os.statvfs(store).f_frsize
    huge = VirtualFile(size + (1 << 30), sha256="0" * 64)  # never read: the preflight stops at the HEAD
    hub.add("/m/huge.bin", huge)
    result = run.one([{"url": f"{hub.url}/m/huge.bin", "dest": "unet/huge.bin", "sha256": "0" * 64}])
    assert result.action == "failed"
    assert "need " in (result.msg or "")
    assert "(free " in (result.msg or "")
    assert str(store) in (result.msg or "")
    assert [r.method for r in hub.requests()] == ["HEAD"]
    no_leftovers(store)


def test_staging_sits_next_to_the_destination(run: Run, hub: MockHub, store: Path, tmp_path: Path) -> None:
    """DL-08 and DL-04's window: nothing goes to the temp dir; the partial has no model extension."""
    body = safetensors(os.urandom(4 * MiB))
    hub.add("/m/slow.safetensors", body, rate=4 * MiB)
    seen: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            folder = store / "loras"
            if folder.exists():
                seen.update(p.name for p in folder.iterdir())
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = run.one(
            [{"url": f"{hub.url}/m/slow.safetensors", "dest": "loras/slow.safetensors", "sha256": sha256(body)}]
        )
    finally:
        done.set()
        watcher.join()
    assert result.action == "downloaded"
    assert ".slow.safetensors.comfybake-partial" in seen
    assert all(name == "slow.safetensors" or not name.endswith(".safetensors") for name in seen)
    no_leftovers(store)


def test_parallel_ranges_fetch_every_byte_once(run: Run, hub: MockHub, store: Path) -> None:
    body = VirtualFile(24 * MiB + 12345, seed=7)
    hub.add("/m/big.bin", body)
    result = run.one([{"url": f"{hub.url}/m/big.bin", "dest": "unet/big.bin", "sha256": body.sha256()}], connections=4)
    assert result.action == "downloaded"
    assert result.sha256 == body.sha256()
    gets = [r for r in hub.requests("/m/big.bin") if r.method == "GET"]
    assert len(gets) == 25
    assert all(r.headers.get("Range", "").startswith("bytes=") for r in gets)
    assert hub.bytes_served == body.size
    no_leftovers(store)


def test_concurrent_runs_download_once(hub: MockHub, store: Path) -> None:
    """DL-09: two runs on one store at once: one GET body, one winner, the other sees it verified."""
    body = os.urandom(6 * MiB)
    hub.add("/m/shared.bin", body, rate=12 * MiB)
    models = [{"url": f"{hub.url}/m/shared.bin", "dest": "vae/shared.bin", "sha256": sha256(body)}]
    results = []

    def one() -> None:
        results.append(Run(hub, store).one(models))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.action for r in results) == ["downloaded", "present"]
    assert hub.bytes_served == len(body)
    assert (store / "vae" / "shared.bin").read_bytes() == body
    no_leftovers(store)


def test_retries_honour_retry_after_and_succeed(run: Run, hub: MockHub) -> None:
    """DL-11: 503 twice then 200; 429 with Retry-After."""
    body = os.urandom(MiB)
    hub.add("/m/flaky.bin", body, fail_first=[(503, {}), (503, {})])
    assert (
        run.one([{"url": f"{hub.url}/m/flaky.bin", "dest": "vae/flaky.bin", "sha256": sha256(body)}], retries=3).action
        == "downloaded"
    )
    hub.add("/m/busy.bin", body, fail_first=[(429, {"Retry-After": "1"})])
    started = time.monotonic()
    assert run.one([{"url": f"{hub.url}/m/busy.bin", "dest": "vae/busy.bin", "sha256": sha256(body)}]).action == (
        "downloaded"
    )
    assert time.monotonic() - started >= 1.0, "Retry-After: 1 was not honoured"


def test_retries_are_bounded_and_name_the_last_status(run: Run, hub: MockHub) -> None:
    hub.add("/m/down.bin", b"x", error=(503, {"X-Request-Id": "req-42"}, "unavailable"))
    result = run.one([{"url": f"{hub.url}/m/down.bin", "dest": "vae/down.bin", "sha256": "0" * 64}], retries=2)
    assert result.action == "failed"
    assert "HTTP 503" in (result.msg or "")
    assert "after 3 attempts" in (result.msg or "")
    assert "request id req-42" in (result.msg or "")
    assert len(hub.requests("/m/down.bin")) == 3


def test_401_403_404_are_never_retried(run: Run, hub: MockHub) -> None:
    for status in (401, 403, 404):
        hub.add(f"/m/{status}.bin", b"x", error=(status, {}, "no"))
        result = run.one(
            [{"url": f"{hub.url}/m/{status}.bin", "dest": f"vae/{status}.bin", "sha256": "0" * 64}], retries=3
        )
        assert result.action == "failed"
        assert len(hub.requests(f"/m/{status}.bin")) == 1


def test_one_failure_does_not_stop_the_others(run: Run, hub: MockHub, store: Path) -> None:
    body = os.urandom(1000)
    hub.add("/m/ok.bin", body)
    report = run(
        [
            {"url": f"{hub.url}/m/missing.bin", "dest": "vae/missing.bin", "sha256": "0" * 64},
            {"url": f"{hub.url}/m/ok.bin", "dest": "vae/ok.bin", "sha256": sha256(body)},
        ]
    )
    assert [r.action for r in report.results] == ["failed", "downloaded"]
    assert "not found" in (report.results[0].msg or "")
    assert (store / "vae" / "ok.bin").read_bytes() == body


def test_full_verification_catches_silent_corruption(run: Run, hub: MockHub, store: Path) -> None:
    body = os.urandom(2 * MiB)
    hub.add("/m/v.bin", body)
    models = [{"url": f"{hub.url}/m/v.bin", "dest": "vae/v.bin", "sha256": sha256(body)}]
    run.one(models)
    target = store / "vae" / "v.bin"
    info = target.stat()
    with target.open("r+b") as handle:  # flip a byte in place, keep size, inode and mtime
        handle.seek(1000)
        handle.write(bytes([body[1000] ^ 0xFF]))
    os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert run.one(models).action == "present"  # recorded mode trusts the unchanged stat
    hub.reset_log()
    repaired = run.one(models, verify="full")
    assert repaired.action == "downloaded"
    damaged = body[:1000] + bytes([body[1000] ^ 0xFF]) + body[1001:]
    assert repaired.replaced == sha256(damaged), "the result does not name the file it replaced"
    assert target.read_bytes() == body
    assert hub.bytes_served == len(body)


def test_state_absent_removes_file_and_record(run: Run, hub: MockHub, store: Path) -> None:
    body = os.urandom(100)
    hub.add("/m/gone.bin", body)
    entry = {"url": f"{hub.url}/m/gone.bin", "dest": "vae/gone.bin", "sha256": sha256(body)}
    run.one([entry])
    assert run.one([{**entry, "state": "absent"}], check_mode=True).action == "would_remove"
    assert (store / "vae" / "gone.bin").exists()
    assert run.one([{**entry, "state": "absent"}]).action == "removed"
    assert not (store / "vae" / "gone.bin").exists()
    records = json.loads((store / ".comfybake" / "verified.json").read_text())
    assert "vae/gone.bin" not in records["files"]
    assert run.one([{**entry, "state": "absent"}]).changed is False


def test_mirror_first_then_origin(run: Run, hub: MockHub, cdn: MockHub, store: Path) -> None:
    body = os.urandom(5000)
    hub.add("/m/mirrored.bin", body)
    cdn.add("/store/vae/mirrored.bin", body)
    entry = {"url": f"{hub.url}/m/mirrored.bin", "dest": "vae/mirrored.bin", "sha256": sha256(body)}
    assert run.one([entry], mirrors=(f"{cdn.url}/store",)).action == "downloaded"
    assert hub.bytes_served == 0
    assert cdn.bytes_served == len(body)
    (store / "vae" / "mirrored.bin").unlink()
    cdn.add("/store/vae/mirrored.bin", os.urandom(5000))  # the mirror serves other bytes
    report = run([entry], mirrors=(f"{cdn.url}/store",))
    assert report.results[0].action == "downloaded"
    assert hub.bytes_served == len(body)
    assert any("mirror" in w and "sha256 mismatch" in w for w in report.warnings)
    assert (store / "vae" / "mirrored.bin").read_bytes() == body
    no_leftovers(store)


def test_file_sources_are_copied_and_verified(run: Run, store: Path, tmp_path: Path) -> None:
    source = tmp_path / "local.safetensors"
    source.write_bytes(safetensors())
    result = run.one([{"url": f"file://{source}", "dest": "loras/"}])
    assert result.action == "failed"
    assert "no sha256" in (result.msg or "")
    result = run.one([{"url": f"file://{source}", "dest": "loras/", "allow_unverified": True}])
    assert result.action == "downloaded"
    assert (store / "loras" / "local.safetensors").read_bytes() == source.read_bytes()
    assert run.one([{"url": f"file://{source}", "dest": "loras/", "allow_unverified": True}]).action == "present"


def test_disk_full_mid_stream_removes_the_partial(hub: MockHub, tmp_path: Path) -> None:
    """DL-07 mid-stream: a source without a length passes the preflight, then fills the disk."""
    store = tmp_path / "small"
    store.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(store)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        keep = os.urandom(MiB)
        hub.add("/keep.bin", keep)
        big = os.urandom(16 * MiB)
        hub.add("/big.bin", big, chunked=True, ranges=False)
        run = Run(hub, store)
        assert run.one([{"url": f"{hub.url}/keep.bin", "dest": "vae/keep.bin", "sha256": sha256(keep)}]).changed
        before, free = tree_hash(store), os.statvfs(store).f_bavail
        result = run.one([{"url": f"{hub.url}/big.bin", "dest": "unet/big.bin", "sha256": sha256(big)}])
        assert result.action == "failed"
        assert "disk full while writing" in (result.msg or "") and str(store) in (result.msg or "")
        assert tree_hash(store) == before
        assert os.statvfs(store).f_bavail == free, "the partial's space was not given back"
        no_leftovers(store)
    finally:
        subprocess.run(["umount", str(store)], check=True)


def test_resumed_bytes_that_do_not_verify_are_fetched_again_once(run: Run, hub: MockHub, store: Path) -> None:
    """DL-05b: a partial with a matching validator but bad bytes is discarded, then fetched whole."""
    body = os.urandom(3 * MiB)
    entry = _partial_run(run, hub, body, MiB)
    staging = store / "vae" / ".p.bin.comfybake-partial"
    with staging.open("r+b") as handle:  # the kept bytes went bad (another writer, a bad disk)
        handle.write(b"\0" * 4096)
    hub.reset_log()
    report = run([entry], connections=1)
    assert report.results[0].action == "downloaded"
    assert any("the resumed download did not verify" in w for w in report.warnings)
    assert (store / "vae" / "p.bin").read_bytes() == body
    assert hub.bytes_served == len(body) + (len(body) - MiB), "expected one resumed tail, then one whole copy"
    no_leftovers(store)


def test_an_unusable_mirror_url_falls_through_to_the_origin(run: Run, hub: MockHub, store: Path) -> None:
    body = os.urandom(1000)
    hub.add("/m/o.bin", body)
    report = run(
        [{"url": f"{hub.url}/m/o.bin", "dest": "vae/o.bin", "sha256": sha256(body)}],
        mirrors=("htps://typo.invalid/store",),
    )
    assert report.results[0].action == "downloaded"
    assert any("mirror htps://typo.invalid/store/vae/o.bin failed" in w for w in report.warnings)


def test_stalled_transfer_says_it_timed_out_and_which_setting_to_raise(run: Run, hub: MockHub, store: Path) -> None:
    """A server that stops sending mid-body: the message says timed out, after how long, and what to raise."""
    body = os.urandom(2 * MiB)
    hub.add("/m/stall.bin", body, ranges=False, stall_at=MiB, stall_for=2.5)
    started = time.monotonic()
    result = run.one(
        [{"url": f"{hub.url}/m/stall.bin", "dest": "vae/stall.bin", "sha256": sha256(body)}], retries=0, timeout=1
    )
    assert result.action == "failed"
    message = result.msg or ""
    assert "timed out: no data for 1 s" in message, message
    assert "timeout (--timeout, comfyui_models_timeout)" in message, message
    assert "connection broke" not in message
    assert time.monotonic() - started < 2.5, "the stall was not cut by the timeout"
    no_leftovers(store)


def test_content_encoding_is_refused_with_the_url_and_what_to_do(run: Run, hub: MockHub, store: Path) -> None:
    """A server that gzips the body although identity was asked: refused, not 'incomplete read', not retried."""
    body = safetensors(b"\0" * (6 * MiB))
    hub.add("/m/gz.safetensors", gzip.compress(body), headers={"Content-Encoding": "gzip"})
    url = f"{hub.url}/m/gz.safetensors"
    result = run.one([{"url": url, "dest": "checkpoints/gz.safetensors", "sha256": sha256(body)}])
    assert result.action == "failed"
    message = result.msg or ""
    assert f"the server sent Content-Encoding gzip for {url} although identity was asked" in message, message
    assert "incomplete" not in message
    assert len([r for r in hub.requests("/m/gz.safetensors") if r.method == "GET"]) == 1, "a refusal was retried"
    assert not (store / "checkpoints" / "gz.safetensors").exists()
    no_leftovers(store)


def test_more_bytes_than_announced_is_not_called_incomplete(run: Run, hub: MockHub, store: Path) -> None:
    """HEAD announces 1 MiB, the GET streams 2 MiB (chunked): the message says which way the size is wrong."""
    body = os.urandom(2 * MiB)
    streamed = Route(body=body, chunked=True, ranges=False)

    def grown(request: Any) -> bool:
        if request.command == "GET":
            request.serve(streamed)
            return True
        request.send_response(200)
        request.send_header("Content-Type", "application/octet-stream")
        request.send_header("Content-Length", str(MiB))
        request.end_headers()
        return True

    hub.routes["/m/grown.bin"] = Route(handler=grown)
    result = run.one([{"url": f"{hub.url}/m/grown.bin", "dest": "vae/grown.bin", "sha256": sha256(body)}])
    assert result.action == "failed"
    message = result.msg or ""
    assert f"received {2 * MiB} bytes, more than the {MiB} the server announced" in message, message
    assert "incomplete" not in message
    no_leftovers(store)


# Issue 17, defect 2: without a hash, ranges must prove they belong to one representation ----------


def _records(store: Path) -> dict[str, Any]:
    return json.loads((store / ".comfybake" / "verified.json").read_text())["files"]


def _swap_after(hub: MockHub, path: str, gets: int, route: Route) -> None:
    """Serve `route` at `path` from the GET after the first `gets` GETs on (the origin changes mid-transfer)."""
    seen = [0]

    def observe(request: Any) -> None:
        if request.path == path and request.method == "GET":
            seen[0] += 1
            if seen[0] == gets + 1:
                hub.routes[path] = route

    hub.observers.append(observe)


@pytest.mark.parametrize(
    ("header", "parsed"),
    [
        ("bytes 0-99/1000", (0, 99, 1000)),
        (" BYTES  5-5/6 ", (5, 5, 6)),
        ("bytes */1000", (None, None, 1000)),
        ("bytes 0-99/*", (0, 99, None)),
        ("bytes 0-99", None),
        ("bytes 0-99/1000x", None),
        ("items 0-99/1000", None),
        ("junk/1000", None),
        ("", None),
        (None, None),
    ],
)
def test_one_content_range_parser_for_the_probe_ranges_and_416(header: str | None, parsed: object) -> None:
    """The probe's size, each 206's proof and a 416's total are read by the same parser."""
    assert content_range(header) == parsed


def test_unverified_ranges_with_a_wrong_content_range_fall_back_to_one_stream(
    run: Run, hub: MockHub, store: Path
) -> None:
    """A 206 whose Content-Range is not the range asked for is never written; one fresh stream instead."""
    body = os.urandom(6 * MiB)
    hub.add("/m/shifted.bin", body, range_shift=-1000)
    entry = {"url": f"{hub.url}/m/shifted.bin", "dest": "vae/shifted.bin", "allow_unverified": True}
    report = run([entry], connections=4)
    result = report.results[0]
    assert result.action == "downloaded", result
    assert (store / "vae" / "shifted.bin").read_bytes() == body, "bytes were written at the wrong offsets"
    assert result.verified is False
    shifted = [re.search(r"Content-Range bytes (\d+)-(\d+)/6291456 for bytes=(\d+)-(\d+);", w) for w in report.warnings]
    sent = [tuple(int(n) for n in m.groups()) for m in shifted if m]  # whichever segment came first
    assert sent and all((start, end) == (asked - 1000, last - 1000) for start, end, asked, last in sent), (
        report.warnings
    )
    assert any("fetching it again in one stream from the first byte" in w for w in report.warnings)
    last = [r for r in hub.requests("/m/shifted.bin") if r.method == "GET"][-1]
    assert "Range" not in last.headers, "the fallback was not one fresh stream"
    assert _records(store)["vae/shifted.bin"]["verified"] is False
    assert result.as_dict()["verified"] is False
    no_leftovers(store)


@pytest.mark.parametrize("change", ["new-etag", "dropped-etag", "kept-etag-new-size"])
def test_unverified_ranges_of_a_changed_representation_are_not_mixed(
    run: Run, hub: MockHub, store: Path, change: str
) -> None:
    """An origin that ignores If-Range and changes its file after two ranges: no mixed file is recorded."""
    old, new = os.urandom(6 * MiB), os.urandom(6 * MiB if change != "kept-etag-new-size" else 7 * MiB)
    hub.add("/m/moving.bin", old, etag='"v1"', ignore_if_range=True)
    etag = {"new-etag": '"v2"', "dropped-etag": None, "kept-etag-new-size": '"v1"'}[change]
    _swap_after(hub, "/m/moving.bin", 2, Route(body=new, etag=etag, ignore_if_range=True))
    entry = {"url": f"{hub.url}/m/moving.bin", "dest": "vae/moving.bin", "allow_unverified": True}
    report = run([entry], connections=2)
    result = report.results[0]
    target = store / "vae" / "moving.bin"
    if change == "kept-etag-new-size":  # one fresh stream of the new file, longer than the probe said
        assert result.action == "failed", result
        assert "more than the 6291456 the server announced" in (result.msg or ""), result.msg
        assert not target.exists()
    else:
        assert result.action == "downloaded", result
        assert target.read_bytes() == new, "a file mixed from two representations was recorded"
        assert result.verified is False
    why = {"new-etag": 'validator changed ("v1" -> "v2")', "dropped-etag": 'validator changed ("v1" -> none)'}
    wanted = why.get(change, "Content-Range bytes")
    assert any(wanted in w for w in report.warnings), report.warnings
    no_leftovers(store)


def test_resumed_unverified_ranges_are_checked_and_restart_from_zero(run: Run, hub: MockHub, store: Path) -> None:
    """A crash leaves segments and a checkpoint holding the validator; the resume's ranges come back
    at the wrong offsets: the kept bytes are dropped and the file is fetched once, whole."""
    body = os.urandom(6 * MiB)
    hub.add("/m/resumed.bin", body, truncate_at=MiB // 2, truncate_times=1)
    entry = {"url": f"{hub.url}/m/resumed.bin", "dest": "vae/resumed.bin", "allow_unverified": True}
    assert run.one([entry], connections=2, retries=0).action == "failed"
    staging = store / "vae" / ".resumed.bin.comfybake-partial"
    checkpoint = json.loads(staging.with_name(staging.name + ".json").read_text())
    assert checkpoint["validator"] == f'"{sha256(body)}"' and checkpoint["sha256"] is None
    hub.add("/m/resumed.bin", body, range_shift=-4096)
    hub.reset_log()
    report = run([entry], connections=2)
    assert report.results[0].action == "downloaded"
    assert (store / "vae" / "resumed.bin").read_bytes() == body, "the resume wrote bytes at the wrong offsets"
    assert report.results[0].verified is False
    assert any("fetching it again in one stream from the first byte" in w for w in report.warnings)
    no_leftovers(store)


def test_unverified_file_with_only_a_weak_etag_is_fetched_in_one_stream_and_never_resumed(
    run: Run, hub: MockHub, store: Path
) -> None:
    body = os.urandom(6 * MiB)
    hub.add("/m/weak.bin", body, etag='W/"weak"', truncate_at=2 * MiB, truncate_times=1)
    entry = {"url": f"{hub.url}/m/weak.bin", "dest": "vae/weak.bin", "allow_unverified": True}
    failed = run.one([entry], connections=4, retries=0)
    assert failed.action == "failed"
    assert list((store / "vae").iterdir()) == [], "a partial without a strong validator was kept for a resume"
    report = run([entry], connections=4)
    assert (report.results[0].action, report.results[0].verified) == ("downloaded", False)
    assert (store / "vae" / "weak.bin").read_bytes() == body
    gets = [r for r in hub.requests("/m/weak.bin") if r.method == "GET"]
    assert all("Range" not in r.headers for r in gets)
    assert any("in one stream: no sha256 and no strong validator" in w for w in report.warnings), report.warnings


def test_unverified_file_with_only_last_modified_is_fetched_in_one_stream_and_never_resumed(
    run: Run, hub: MockHub, store: Path
) -> None:
    """Last-Modified is a weak validator (RFC 9110): without a hash it proves no range; with one it may."""
    body = os.urandom(6 * MiB)
    stamp = "Wed, 02 Dec 2026 10:00:00 GMT"
    hub.add("/m/lm.bin", body, etag=None, last_modified=stamp, truncate_at=2 * MiB, truncate_times=1)
    entry = {"url": f"{hub.url}/m/lm.bin", "dest": "vae/lm.bin", "allow_unverified": True}
    failed = run.one([entry], connections=4, retries=0)
    assert failed.action == "failed"
    assert list((store / "vae").iterdir()) == [], "a partial proven only by Last-Modified was kept for a resume"
    report = run([entry], connections=4)
    assert (report.results[0].action, report.results[0].verified) == ("downloaded", False)
    assert (store / "vae" / "lm.bin").read_bytes() == body
    gets = [r for r in hub.requests("/m/lm.bin") if r.method == "GET"]
    assert all("Range" not in r.headers for r in gets), "ranges stitched on the strength of Last-Modified"
    assert any("in one stream: no sha256 and no strong validator" in w for w in report.warnings), report.warnings
    hub.add("/m/pinned.bin", body, etag=None, last_modified=stamp)
    pinned = {"url": f"{hub.url}/m/pinned.bin", "dest": "vae/pinned.bin", "sha256": sha256(body)}
    assert run.one([pinned], connections=4).action == "downloaded"
    ranged = [r for r in hub.requests("/m/pinned.bin") if r.method == "GET" and "Range" in r.headers]
    assert len(ranged) > 1 and all(r.headers.get("If-Range") == stamp for r in ranged), "with a hash, ranges stay"


def test_resume_without_a_strong_validator_restarts_from_zero(run: Run, hub: MockHub, store: Path) -> None:
    """A checkpoint of an unverified file whose server now has only a weak ETag is not resumed."""
    body = os.urandom(3 * MiB)
    hub.add("/m/lm.bin", body, truncate_at=MiB, truncate_times=1)
    entry = {"url": f"{hub.url}/m/lm.bin", "dest": "vae/lm.bin", "allow_unverified": True}
    assert run.one([entry], connections=1, retries=0).action == "failed"
    hub.add("/m/lm.bin", body, etag='W/"weak"')
    hub.reset_log()
    report = run([entry], connections=1)
    assert report.results[0].action == "downloaded"
    assert any("discarding the partial download" in w for w in report.warnings), report.warnings
    assert hub.bytes_served == len(body)
    assert all("Range" not in r.headers for r in hub.requests("/m/lm.bin"))


def test_unverified_record_and_result_until_a_hash_is_known(run: Run, hub: MockHub, store: Path) -> None:
    body = os.urandom(3000)
    hub.add("/m/tofu.bin", body, etag=None)
    entry = {"url": f"{hub.url}/m/tofu.bin", "dest": "vae/tofu.bin", "allow_unverified": True}
    first = run.one([entry])
    assert (first.action, first.verified, first.as_dict()["verified"]) == ("downloaded", False, False)
    assert _records(store)["vae/tofu.bin"]["verified"] is False
    again = run.one([entry])
    assert (again.action, again.verified) == ("present", False)
    again = run.one([entry], verify="full")
    assert (again.action, again.verified) == ("present", False)
    assert _records(store)["vae/tofu.bin"]["verified"] is False, "re-hashing made the record verified"
    pinned = run.one([{**entry, "sha256": sha256(body)}])
    assert (pinned.action, pinned.verified) == ("present", True)
    assert "verified" not in _records(store)["vae/tofu.bin"]
    hub.add("/m/known.bin", body)
    known = run.one([{"url": f"{hub.url}/m/known.bin", "dest": "vae/known.bin", "sha256": sha256(body)}])
    assert (known.action, known.verified, known.as_dict()["verified"]) == ("downloaded", True, True)
    assert "verified" not in _records(store)["vae/known.bin"]


# Issue 17, defect 4: empty files, servers without HEAD, Range refused ---------------------------


@pytest.mark.parametrize(
    "server",
    [
        {"head_status": 405},
        {"head_status": 501},
        {"head_status": 405, "range_status": 416},
        {"head_status": 405, "range_status": 501},
        {"head_status": 405, "ranges": False},
        {"range_status": 416},
        {},
    ],
    ids=["head-405", "head-501", "head-405-range-416", "head-405-range-501", "head-405-no-range", "range-416", "plain"],
)
@pytest.mark.parametrize("size", [0, 1, 5000])
def test_empty_and_small_files_without_head_or_range(
    run: Run, hub: MockHub, store: Path, server: dict[str, Any], size: int
) -> None:
    body = os.urandom(size)
    hub.add("/m/small.json", body, **server)
    for extra in ({"sha256": sha256(body)}, {"allow_unverified": True}):
        entry = {"url": f"{hub.url}/m/small.json", "dest": "configs/small.json", **extra}
        result = run.one([entry])
        assert (result.action, result.size) == ("downloaded", size), result.msg
        assert (store / "configs" / "small.json").read_bytes() == body
        assert run.one([entry]).action == "present"
        (store / "configs" / "small.json").unlink()
    no_leftovers(store)


def test_unverified_download_whose_renewed_url_is_another_file_starts_again(
    run: Run, hub: MockHub, cdn: MockHub, store: Path
) -> None:
    """A presigned URL expires mid-transfer and the renewed one serves another representation: the
    ranges already written are not stitched to the new ones."""
    old, new = os.urandom(6 * MiB), os.urandom(6 * MiB)
    cdn.add("/blob", old, etag='"v1"', expire_after=3)
    signatures = iter(range(1, 100))

    def sign(request: Any) -> bool:
        signature = next(signatures)
        if signature == 2:  # the renewal: the storage now holds another file
            cdn.routes["/blob"] = Route(body=new, etag='"v2"', ignore_if_range=True)
        return request.reply(302, "", {"Location": f"{cdn.url}/blob?sig={signature}"})

    hub.routes["/m/signed.bin"] = Route(handler=sign)
    entry = {"url": f"{hub.url}/m/signed.bin", "dest": "vae/signed.bin", "allow_unverified": True}
    report = run([entry], connections=2)
    result = report.results[0]
    assert result.action == "downloaded", result
    assert (store / "vae" / "signed.bin").read_bytes() == new, "ranges of two files were stitched together"
    assert result.verified is False
    assert any('validator changed ("v1" -> "v2")' in w for w in report.warnings), report.warnings
    no_leftovers(store)


def test_unverified_archive_is_recorded_and_reported_unverified(run: Run, hub: MockHub, store: Path) -> None:
    data = archives.zip_bytes({"a.onnx": os.urandom(2000), "b.onnx": os.urandom(3000)})
    hub.add("/m/pack.zip", data, etag=None)
    entry = {"url": f"{hub.url}/m/pack.zip", "dest": "insightface/pack/", "extract": True, "allow_unverified": True}
    first = run.one([entry])
    assert (first.action, first.verified) == ("extracted", False), first
    records = json.loads((store / ".comfybake" / "verified.json").read_text())["archives"]
    assert records["insightface/pack"]["verified"] is False
    assert (run.one([entry]).action, run.one([entry]).verified) == ("present", False)
    pinned = run.one([{**entry, "sha256": sha256(data)}])
    assert (pinned.action, pinned.verified) == ("present", True)
