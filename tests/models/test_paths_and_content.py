"""Destinations, server-sent names, archives and content checks (PA-01..PA-04, MF-02)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from harness import archives
from harness.mockhub import MockHub
from harness.models import Run, no_leftovers, safetensors, sha256, tree_hash

BAD_DESTS = ["../../etc/cron.d/x", "/etc/x", "..\\x", "C:\\x", "\\\\host\\s\\x", "loras/a\x00b", "loras/.hidden"]


@pytest.mark.parametrize("dest", BAD_DESTS, ids=repr)
def test_escaping_destinations_are_refused_before_any_request(run: Run, hub: MockHub, dest: str) -> None:
    """PA-01: each bad name is named in the error; nothing is requested."""
    message = run.error([{"url": f"{hub.url}/m.bin", "dest": dest, "sha256": "0" * 64}])
    assert repr(dest) in message


def test_symlinked_destination_is_refused(run: Run, hub: MockHub, store: Path, tmp_path: Path) -> None:
    """PA-01: a link that leaves the store; the link target is untouched, nothing is created outside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "passwd"
    victim.write_text("root:x:0:0\n")
    (store / "loras").mkdir()
    (store / "loras" / "a.safetensors").symlink_to(victim)
    (store / "vae").symlink_to(outside, target_is_directory=True)
    body = safetensors()
    hub.add("/m.safetensors", body)
    report = run(
        [
            {"url": f"{hub.url}/m.safetensors", "dest": "loras/a.safetensors", "sha256": sha256(body)},
            {"url": f"{hub.url}/m.safetensors", "dest": "vae/b.safetensors", "sha256": sha256(body)},
        ]
    )
    assert [r.action for r in report.results] == ["failed", "failed"]
    assert all("destination resolves outside the model root" in (r.msg or "") for r in report.results)
    assert victim.read_text() == "root:x:0:0\n"
    assert sorted(p.name for p in outside.iterdir()) == ["passwd"]
    assert hub.requests() == []


def test_content_disposition_is_ignored_for_exact_destinations(run: Run, hub: MockHub, store: Path) -> None:
    """PA-02: the file lands at the manifest name only."""
    body = safetensors()
    hub.add("/dl", body, content_disposition='attachment; filename="../../x.safetensors"')
    result = run.one([{"url": f"{hub.url}/dl", "dest": "loras/mine.safetensors", "sha256": sha256(body)}])
    assert result.action == "downloaded"
    assert sorted(str(p.relative_to(store)) for p in store.rglob("*.safetensors")) == ["loras/mine.safetensors"]


def test_content_disposition_is_sanitised_for_folder_destinations(run: Run, hub: MockHub, store: Path) -> None:
    body = safetensors()
    hub.add("/dl", body, content_disposition='attachment; filename="../../x.safetensors"')
    result = run.one([{"url": f"{hub.url}/dl", "dest": "loras/", "sha256": sha256(body)}])
    assert result.action == "downloaded"
    assert result.path == str(store / "loras" / "x.safetensors")
    assert not (store.parent / "x.safetensors").exists()


BAD_ARCHIVES = {
    "zip_slip": (archives.zip_slip, "escapes the target"),
    "zip_absolute": (archives.zip_absolute, "escapes the target"),
    "zip_symlink": (archives.zip_symlink, "link or special file"),
    "tar_slip": (archives.tar_slip, "escapes the target"),
    "tar_symlink": (archives.tar_symlink, "link or special file"),
    "tar_hardlink": (archives.tar_hardlink, "link or special file"),
    "tar_fifo": (archives.tar_fifo, "link or special file"),
    "tar_device": (archives.tar_device, "link or special file"),
}


@pytest.mark.parametrize("kind", sorted(BAD_ARCHIVES))
def test_unsafe_archives_are_rejected_whole(run: Run, hub: MockHub, store: Path, kind: str) -> None:
    """PA-03: the archive is refused, listing the bad members; the destination is unchanged."""
    build, reason = BAD_ARCHIVES[kind]
    good = archives.zip_bytes({"keep.onnx": b"keep"})
    hub.add("/good.zip", good)
    entry = {"url": f"{hub.url}/good.zip", "dest": "insightface/models/pack/", "extract": True}
    assert run.one([{**entry, "sha256": sha256(good)}]).action == "extracted"
    before = tree_hash(store)
    data = build()
    hub.add("/bad.archive", data)
    result = run.one([{**entry, "url": f"{hub.url}/bad.archive", "sha256": sha256(data)}])
    assert result.action == "failed"
    assert "nothing extracted" in (result.msg or "")
    assert reason in (result.msg or "")
    assert tree_hash(store) == before
    assert not (store.parent / "x.txt").exists()
    no_leftovers(store)


def test_archive_bomb_and_member_count_limits(run: Run, hub: MockHub, store: Path) -> None:
    """PA-04a: refused on the declared size or count before anything is extracted."""
    bomb = archives.zip_bomb(64 << 20)
    many = archives.zip_many(500)
    hub.add("/bomb.zip", bomb)
    hub.add("/many.zip", many)
    report = run(
        [
            {"url": f"{hub.url}/bomb.zip", "dest": "a/", "extract": True, "sha256": sha256(bomb)},
            {"url": f"{hub.url}/many.zip", "dest": "b/", "extract": True, "sha256": sha256(many)},
        ],
        archive_max_bytes=16 << 20,
        archive_max_members=100,
    )
    assert [r.action for r in report.results] == ["failed", "failed"]
    assert "over the limit" in (report.results[0].msg or "")
    assert "members" in (report.results[1].msg or "")
    assert not (store / "a").exists()
    assert not (store / "b").exists()
    no_leftovers(store)


def test_antelopev2_layout_is_normalised_and_checked(run: Run, hub: MockHub, store: Path) -> None:
    """PA-04b: a nested top-level folder is dropped; the expected files are verified; re-runs are free."""
    data = archives.antelopev2_zip()
    hub.add("/antelopev2.zip", data)
    entry = {
        "url": f"{hub.url}/antelopev2.zip",
        "dest": "insightface/models/antelopev2/",
        "extract": True,
        "sha256": sha256(data),
        "files": ["glintr100.onnx", "scrfd_10g_bnkps.onnx"],
    }
    result = run.one([entry])
    assert result.action == "extracted"
    target = store / "insightface" / "models" / "antelopev2"
    assert sorted(p.name for p in target.iterdir()) == [
        "1k3d68.onnx",
        "2d106det.onnx",
        "genderage.onnx",
        "glintr100.onnx",
        "scrfd_10g_bnkps.onnx",
    ]
    assert not (store / "insightface" / "models" / "antelopev2.zip").exists()
    hub.reset_log()
    assert run.one([entry]).action == "present"
    assert hub.requests() == []
    result = run.one([{**entry, "files": ["missing.onnx"]}])
    assert result.action == "failed"
    assert "missing.onnx" in (result.msg or "")
    assert sorted(p.name for p in target.iterdir())[0] == "1k3d68.onnx", "a failed re-extract broke the folder"
    no_leftovers(store)


def test_html_page_saved_as_a_model_is_refused(run: Run, hub: MockHub, store: Path) -> None:
    """MF-02: a login page for a .safetensors entry in bootstrap mode (no sha256 yet)."""
    hub.add("/login", b"<html><body>Please log in</body></html>", content_type="text/html")
    result = run.one([{"url": f"{hub.url}/login", "dest": "checkpoints/m.safetensors", "allow_unverified": True}])
    assert result.action == "failed"
    assert "not a safetensors file (Content-Type text/html; header invalid" in (result.msg or "")
    assert not (store / "checkpoints" / "m.safetensors").exists()
    no_leftovers(store)


def test_invalid_safetensors_header_is_refused(run: Run, hub: MockHub, store: Path) -> None:
    junk = os.urandom(4096)
    hub.add("/junk", junk)
    result = run.one([{"url": f"{hub.url}/junk", "dest": "loras/j.safetensors", "sha256": sha256(junk)}])
    assert result.action == "failed"
    assert "not a safetensors file" in (result.msg or "")
    no_leftovers(store)
