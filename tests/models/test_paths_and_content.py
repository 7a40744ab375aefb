"""Destinations, server-sent names, archives and content checks (PA-01..PA-04, MF-02)."""

from __future__ import annotations

import json
import os
import urllib.parse
from pathlib import Path

import pytest
from harness import archives
from harness.mockhub import MockHub
from harness.models import Run, no_leftovers, safetensors, sha256, tree_hash

from comfybake.engine import fetch
from comfybake.engine.fetch.store import staging_path

NAME_BYTES = 219  # 255 bytes less the longest staging suffix, ".<name>.archive.comfybake-partial.json.tmp"

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


def test_two_entries_resolving_to_one_path_are_refused_naming_both(run: Run, hub: MockHub, store: Path) -> None:
    """Issue 17, defect 1: a folder dest named by the URL and an exact dest with other bytes. Both
    "succeeded", then one reported `present` for a file holding the other's bytes. Now the names are
    resolved (the probe), then the manifest is refused naming both entries, before any body is asked for."""
    first, second = safetensors(seed=1), safetensors(seed=2)
    hub.add("/a/x.safetensors", first)
    hub.add("/b/other.safetensors", second)
    models = [
        {"url": f"{hub.url}/a/x.safetensors", "dest": "loras/", "sha256": sha256(first)},
        {"url": f"{hub.url}/b/other.safetensors", "dest": "loras/x.safetensors", "sha256": sha256(second)},
    ]
    with pytest.raises(fetch.ManifestError) as caught:
        run(models)
    message = str(caught.value)
    assert (
        f"models[0] (dest 'loras/', url {hub.url}/a/x.safetensors) and "
        f"models[1] (dest 'loras/x.safetensors', url {hub.url}/b/other.safetensors) "
        "both resolve to 'loras/x.safetensors' in the store"
    ) in message
    assert "give each a dest of its own" in message
    assert {r.method for r in hub.requests()} == {"HEAD"}, "a body was asked for"
    assert [p.name for p in store.iterdir()] == []


NAMED_TWICE = {
    "two_folder_dests": (
        [{"url": "/a/x.safetensors", "dest": "loras/"}, {"url": "/b/x.safetensors", "dest": "loras/"}],
        "models[0] (dest 'loras/', url {hub}/a/x.safetensors) and models[1] (dest 'loras/', "
        "url {hub}/b/x.safetensors) both resolve to 'loras/x.safetensors'",
    ),
    "content_disposition": (
        [{"url": "/dl", "dest": "loras/"}, {"url": "/b/x.safetensors", "dest": "loras/"}],
        "models[0] (dest 'loras/', url {hub}/dl) and models[1] (dest 'loras/', "
        "url {hub}/b/x.safetensors) both resolve to 'loras/x.safetensors'",
    ),
    "folder_dest_inside_a_file": (
        [{"url": "/a/x.safetensors", "dest": "loras/"}, {"url": "/b/x.safetensors", "dest": "loras/x.safetensors/"}],
        "models[1] (dest 'loras/x.safetensors/', url {hub}/b/x.safetensors) resolves to "
        "'loras/x.safetensors/x.safetensors', inside 'loras/x.safetensors', the file of models[0] (dest 'loras/',",
    ),
}


@pytest.mark.parametrize("case", sorted(NAMED_TWICE))
def test_folder_dests_resolving_to_one_path_are_refused(run: Run, hub: MockHub, store: Path, case: str) -> None:
    """Issue 17, defect 1: names from the URL or Content-Disposition, checked once they are known."""
    first, second = safetensors(seed=1), safetensors(seed=2)
    hub.add("/a/x.safetensors", first)
    hub.add("/b/x.safetensors", second)
    hub.add("/dl", first, content_disposition='attachment; filename="x.safetensors"')
    models, expected = NAMED_TWICE[case]
    for item in models:
        item.update(url=hub.url + item["url"], allow_unverified=True)
    with pytest.raises(fetch.ManifestError) as caught:
        run(models)
    assert expected.format(hub=hub.url) in str(caught.value)
    assert {r.method for r in hub.requests()} == {"HEAD"}
    assert [p.name for p in store.iterdir()] == []


def test_two_hub_files_with_one_name_in_one_folder_are_refused(run: Run, hub: MockHub, cdn: MockHub) -> None:
    hub.add_hf("org/repo", "a/m.safetensors", safetensors(seed=1), cdn=cdn)
    hub.add_hf("org/repo", "b/m.safetensors", safetensors(seed=2), cdn=cdn)
    models = [{"url": f"hf://org/repo/{part}/m.safetensors@main", "dest": "unet/"} for part in ("a", "b")]
    with pytest.raises(fetch.ManifestError) as caught:
        run(models)
    assert (
        "models[0] (dest 'unet/', url hf://org/repo/a/m.safetensors@main) and "
        "models[1] (dest 'unet/', url hf://org/repo/b/m.safetensors@main) both resolve to 'unet/m.safetensors'"
    ) in str(caught.value)
    assert cdn.bytes_served == 0


def test_an_exact_dest_inside_an_extract_folder_is_refused_before_any_request(run: Run, hub: MockHub) -> None:
    """Issue 17, defect 1: extracting the folder would replace the file (and the file's record would lie)."""
    pack = {"url": f"{hub.url}/pack.zip", "dest": "insightface/models/pack/", "extract": True, "sha256": "1" * 64}
    inside = {"url": f"{hub.url}/x.onnx", "dest": "insightface/models/pack/x.onnx", "sha256": "2" * 64}
    nested = {**pack, "dest": "insightface/models/pack/inner/"}
    message = run.error([pack, inside, nested])
    assert (
        f"models[1] (dest 'insightface/models/pack/x.onnx', url {hub.url}/x.onnx) resolves to "
        "'insightface/models/pack/x.onnx', inside 'insightface/models/pack', the folder models[0] "
        f"(dest 'insightface/models/pack/', url {hub.url}/pack.zip) extracts to"
    ) in message
    assert "models[2] (dest 'insightface/models/pack/inner/'" in message


def test_a_remembered_name_collides_with_a_new_exact_dest(run: Run, hub: MockHub, store: Path) -> None:
    """Issue 17, defect 1: the folder dest's name comes from the store's records; no request is made."""
    first, second = safetensors(seed=1), safetensors(seed=2)
    hub.add("/a/x.safetensors", first)
    hub.add("/b/other.safetensors", second)
    folder = {"url": f"{hub.url}/a/x.safetensors", "dest": "loras/", "sha256": sha256(first)}
    assert run.one([folder]).action == "downloaded"
    hub.reset_log()
    exact = {"url": f"{hub.url}/b/other.safetensors", "dest": "loras/x.safetensors", "sha256": sha256(second)}
    with pytest.raises(fetch.ManifestError) as caught:
        run([folder, exact])
    assert "models[0] (dest 'loras/', url" in str(caught.value)
    assert "models[1] (dest 'loras/x.safetensors', url" in str(caught.value)
    assert hub.requests() == []
    assert (store / "loras" / "x.safetensors").read_bytes() == first
    assert run.one([folder]).action == "present"


def test_an_absent_entry_does_not_remove_the_file_of_a_colliding_entry(run: Run, hub: MockHub, store: Path) -> None:
    """The check comes before `state: absent` removes anything."""
    body = safetensors(seed=1)
    hub.add("/a/x.safetensors", body)
    folder = {"url": f"{hub.url}/a/x.safetensors", "dest": "loras/", "sha256": sha256(body)}
    assert run.one([folder]).action == "downloaded"
    gone = {"url": f"{hub.url}/old.safetensors", "dest": "loras/x.safetensors", "state": "absent"}
    with pytest.raises(fetch.ManifestError):
        run([gone, folder])
    assert (store / "loras" / "x.safetensors").read_bytes() == body


LONG_NAMES = {
    "ascii": ('attachment; filename="{}.safetensors"'.format("a" * 400), "a" * 190),
    "utf8": (
        "attachment; filename*=UTF-8''" + urllib.parse.quote("模型-v1-" * 60 + ".safetensors"),
        "__-v1-" * 31,
    ),
}


@pytest.mark.parametrize("case", sorted(LONG_NAMES))
def test_a_server_sent_name_too_long_for_the_file_system_is_shortened(
    run: Run, hub: MockHub, store: Path, case: str
) -> None:
    """Issue 17, defect 5: the name keeps its extension and a hash of the whole name; it and its staging
    names fit 255 bytes; a second run finds the same file."""
    disposition, start = LONG_NAMES[case]
    body = safetensors()
    hub.add("/dl", body, content_disposition=disposition)
    entry = {"url": f"{hub.url}/dl", "dest": "loras/", "sha256": sha256(body)}
    result = run.one([entry])
    assert result.action == "downloaded", result.msg
    name = Path(result.path or "").name
    assert name.startswith(start) and name.endswith(".safetensors"), name
    assert len(name.encode()) <= NAME_BYTES
    assert [p.name for p in (store / "loras").iterdir()] == [name]
    for archive in (False, True):
        assert len(os.path.basename(staging_path(str(store / "loras" / name), archive)).encode()) + 9 <= 255
    (store / ".comfybake" / "verified.json").unlink()  # no record: the name is resolved again
    again = run.one([entry])
    assert (again.action, again.path) == ("present", result.path)
    no_leftovers(store)


def test_long_names_that_differ_only_at_the_end_stay_apart(run: Run, hub: MockHub, store: Path) -> None:
    first, second = safetensors(seed=1), safetensors(seed=2)
    for path, body, tail in (("/one", first, "1"), ("/two", second, "2")):
        hub.add(path, body, content_disposition=f'attachment; filename="{"b" * 300}{tail}.safetensors"')
    report = run(
        [
            {"url": f"{hub.url}{p}", "dest": "loras/", "sha256": sha256(b)}
            for p, b in (("/one", first), ("/two", second))
        ]
    )
    assert [r.action for r in report.results] == ["downloaded", "downloaded"]
    assert len({r.path for r in report.results}) == 2


UNNAMEABLE = {
    "only_dots": 'attachment; filename="...."',
    "only_unsafe": 'attachment; filename="?*<>|"',
    "only_unsafe_stem": 'attachment; filename="?? ??.safetensors"',
    "only_non_ascii": "attachment; filename*=UTF-8''" + urllib.parse.quote("模型.safetensors"),
}


@pytest.mark.parametrize("case", sorted(UNNAMEABLE))
def test_a_server_sent_name_with_nothing_left_is_refused(run: Run, hub: MockHub, store: Path, case: str) -> None:
    """Issue 17, defect 5: no file called '____'; the message names the url and says what to do."""
    body = safetensors()
    hub.add("/dl", body, content_disposition=UNNAMEABLE[case])
    result = run.one([{"url": f"{hub.url}/dl", "dest": "loras/", "sha256": sha256(body)}])
    assert result.action == "failed"
    assert f"cannot tell a file name for {hub.url}/dl" in (result.msg or "")
    assert "give dest as a file path, e.g. loras/model.safetensors" in (result.msg or "")
    assert {r.method for r in hub.requests()} == {"HEAD"}
    assert not (store / "loras").exists()


def test_a_manifest_name_too_long_for_the_file_system_is_refused(run: Run, hub: MockHub) -> None:
    message = run.error([{"url": f"{hub.url}/m", "dest": "loras/" + "n" * 240 + ".safetensors", "sha256": "0" * 64}])
    assert f"is 252 bytes long; a name in the store may have at most {NAME_BYTES} bytes" in message


def test_the_longest_accepted_extract_folder_name_downloads_with_its_checkpoint(
    run: Run, hub: MockHub, store: Path
) -> None:
    """Every staging name fits 255 bytes, the checkpoint's `<sidecar>.tmp` included: a dest accepted at
    validation never fails with ENAMETOOLONG (it did at 223 bytes: `.<name>.archive...json.tmp`)."""
    body = archives.zip_bytes({"a.safetensors": safetensors(os.urandom(3 << 20))})
    hub.add("/pack.zip", body)
    for length in (NAME_BYTES + 1, 223):
        message = run.error([{"url": f"{hub.url}/pack.zip", "dest": f"loras/{'p' * length}/", "extract": True}])
        assert f"is {length} bytes long; a name in the store may have at most {NAME_BYTES} bytes" in message
    entry = {
        "url": f"{hub.url}/pack.zip",
        "dest": f"loras/{'p' * NAME_BYTES}/",
        "extract": True,
        "sha256": sha256(body),
    }
    result = run.one([entry], connections=1)
    assert result.action == "extracted", result.msg
    assert (store / "loras" / ("p" * NAME_BYTES) / "a.safetensors").is_file()
    no_leftovers(store)


def test_a_replaced_file_forgets_the_name_another_folder_dest_remembered(run: Run, hub: MockHub, store: Path) -> None:
    """The store's name records say which entry a file belongs to: one path, one owner."""
    first, second = safetensors(seed=1), safetensors(seed=2)
    hub.add("/a/x.safetensors", first)
    hub.add("/b/other.safetensors", second)
    folder = {"url": f"{hub.url}/a/x.safetensors", "dest": "loras/", "sha256": sha256(first)}
    exact = {"url": f"{hub.url}/b/other.safetensors", "dest": "loras/x.safetensors", "sha256": sha256(second)}
    assert run.one([folder]).action == "downloaded"
    records = store / ".comfybake" / "verified.json"
    assert json.loads(records.read_text())["names"] == {f"{folder['url']} -> loras/": "loras/x.safetensors"}
    assert run.one([exact]).action == "downloaded"  # the folder dest left the manifest
    assert json.loads(records.read_text())["names"] == {}
    assert run.one([folder]).action == "downloaded"  # and came back: its name is resolved again
    assert (store / "loras" / "x.safetensors").read_bytes() == first
