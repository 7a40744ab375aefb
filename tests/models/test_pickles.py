"""Issue 17 item 12 (MF-01): pickle-based formats run code when loaded. They are refused unless the
entry or the run allows them; an allowed one is scanned with picklescan in its staging file, and
a dangerous import fails the entry with nothing at the final path. Real files, loopback hubs."""

from __future__ import annotations

import os
import pickletools
import random
from pathlib import Path

import pytest
from harness import archives
from harness.mockhub import MockHub
from harness.models import Run, no_leftovers, safetensors, sha256
from harness.pickles import global_call, harmless_pickle, malicious_pickle, padded_pickle, text_pickle, torch_zip

from comfybake.engine import fetch
from comfybake.engine.fetch import pickles


def gets(hub: MockHub, path: str) -> list[str]:
    return [request.method for request in hub.requests(path) if request.method == "GET"]


@pytest.mark.parametrize("name", ["m.ckpt", "m.pt", "m.pth", "m.pkl"])
def test_exact_pickle_dest_is_refused_at_validation_naming_the_entry_and_the_key(
    run: Run, hub: MockHub, name: str
) -> None:
    body = harmless_pickle()
    hub.add(f"/files/{name}", body)
    entry = {"url": f"{hub.url}/files/{name}", "dest": f"checkpoints/{name}", "sha256": sha256(body)}
    message = run.error([{"url": f"{hub.url}/files/ok.safetensors", "dest": "checkpoints/ok.safetensors"}, entry])
    assert f"models[1] (checkpoints/{name}): dest 'checkpoints/{name}' is a pickle-based format" in message
    assert "loading it can run code; use a .safetensors file, or set allow_pickle: true on this entry" in message
    assert "allow_pickle (--allow-pickle, comfyui_models_allow_pickle) for the run" in message


def test_folder_dest_is_refused_once_the_name_is_known_before_any_get(run: Run, hub: MockHub, store: Path) -> None:
    body = harmless_pickle()
    hub.add("/files/model.ckpt", body)
    result = run.one([{"url": f"{hub.url}/files/model.ckpt", "dest": "checkpoints/", "sha256": sha256(body)}])
    assert result.action == "failed"
    assert "checkpoints/model.ckpt is a pickle-based format (.ckpt): loading it can run code" in (result.msg or "")
    assert gets(hub, "/files/model.ckpt") == []
    assert list(store.rglob("*.ckpt")) == []


def test_allowed_harmless_pickle_is_scanned_and_installed(run: Run, hub: MockHub, store: Path) -> None:
    body = harmless_pickle()
    hub.add("/files/model.pt", body)
    entry = {"url": f"{hub.url}/files/model.pt", "sha256": sha256(body)}
    assert run.one([{**entry, "dest": "checkpoints/a.pt", "allow_pickle": True}]).action == "downloaded"
    assert run.one([{**entry, "dest": "checkpoints/"}], allow_pickle=True).action == "downloaded"  # the run's setting
    assert (store / "checkpoints" / "a.pt").read_bytes() == body
    assert (store / "checkpoints" / "model.pt").read_bytes() == body
    no_leftovers(store)


@pytest.mark.parametrize("name", ["evil.ckpt", "evil.bin"])
def test_allowed_malicious_pickle_fails_with_the_finding_and_nothing_is_installed(
    run: Run, hub: MockHub, store: Path, name: str
) -> None:
    body = malicious_pickle("touch /nonexistent/ran")
    opcodes = [(op.name, arg) for op, arg, _pos in pickletools.genops(body)]  # a real gadget, never loaded
    assert ("GLOBAL", "posix system") in opcodes and ("REDUCE", None) in opcodes
    hub.add(f"/files/{name}", body)
    entry = {"url": f"{hub.url}/files/{name}", "dest": f"checkpoints/{name}", "sha256": sha256(body)}
    result = run.one([{**entry, "allow_pickle": True}])
    assert result.action == "failed"
    assert f"picklescan found dangerous import(s) in checkpoints/{name}: posix system" in (result.msg or "")
    assert not (store / "checkpoints" / name).exists()
    assert gets(hub, f"/files/{name}") == ["GET"]  # refused by the scan of the downloaded bytes, not by its name
    no_leftovers(store)


def test_bin_is_judged_by_its_bytes(run: Run, hub: MockHub, store: Path) -> None:
    """`.bin` names pickles (pytorch_model.bin) and raw weights alike: a pickle stream or a PyTorch
    zip is refused without allow_pickle, other bytes are not."""
    raw, stream, zipped = os.urandom(4096), harmless_pickle(), torch_zip(harmless_pickle())
    for path, body in (("/raw.bin", raw), ("/stream.bin", stream), ("/zipped.bin", zipped)):
        hub.add(path, body)
    report = run(
        [
            {"url": f"{hub.url}/raw.bin", "dest": "vae/raw.bin", "sha256": sha256(raw)},
            {"url": f"{hub.url}/stream.bin", "dest": "vae/stream.bin", "sha256": sha256(stream)},
            {"url": f"{hub.url}/zipped.bin", "dest": "vae/zipped.bin", "sha256": sha256(zipped)},
        ]
    )
    actions = [(r.action, r.msg) for r in report.results]
    assert actions[0] == ("downloaded", None)
    assert actions[1][0] == "failed" and "vae/stream.bin is a pickle stream: loading it can run code" in actions[1][1]
    assert actions[2][0] == "failed" and "is a PyTorch zip of pickles (model/data.pkl)" in actions[2][1]
    assert sorted(p.name for p in (store / "vae").iterdir()) == ["raw.bin"]
    no_leftovers(store)


def test_torch_zip_is_scanned_member_by_member(run: Run, hub: MockHub, store: Path) -> None:
    good, evil = torch_zip(harmless_pickle()), torch_zip(malicious_pickle())
    hub.add("/good.pt", good)
    hub.add("/evil.pt", evil)
    report = run(
        [
            {"url": f"{hub.url}/good.pt", "dest": "checkpoints/good.pt", "sha256": sha256(good)},
            {"url": f"{hub.url}/evil.pt", "dest": "checkpoints/evil.pt", "sha256": sha256(evil)},
        ],
        allow_pickle=True,
    )
    good_result, evil_result = report.results
    assert good_result.action == "downloaded"
    assert evil_result.action == "failed"
    assert "dangerous import(s) in checkpoints/evil.pt: posix system" in (evil_result.msg or "")
    assert sorted(p.name for p in (store / "checkpoints").iterdir()) == ["good.pt"]
    no_leftovers(store)


def test_safetensors_is_unaffected(run: Run, hub: MockHub, store: Path) -> None:
    body = safetensors(seed=3)
    hub.add("/m.safetensors", body)
    entry = {"url": f"{hub.url}/m.safetensors", "dest": "loras/m.safetensors", "sha256": sha256(body)}
    assert run.one([entry]).action == "downloaded"
    assert run.one([entry], allow_pickle=True).action == "present"


def test_archive_members_obey_the_policy(run: Run, hub: MockHub, store: Path) -> None:
    good = archives.zip_bytes({"pack/weights.ckpt": harmless_pickle(), "pack/model.onnx": b"onnx"})
    evil = archives.tar_bytes({"pack/weights.bin": malicious_pickle(), "pack/model.onnx": b"onnx"})
    hub.add("/good.zip", good)
    hub.add("/evil.tar.gz", evil)
    entry = {"url": f"{hub.url}/good.zip", "dest": "ipadapter/pack/", "extract": True, "sha256": sha256(good)}
    refused = run.one([entry])
    assert refused.action == "failed"
    assert "ipadapter/pack/weights.ckpt is a pickle-based format (.ckpt)" in (refused.msg or "")
    assert not (store / "ipadapter" / "pack").exists()
    assert run.one([{**entry, "allow_pickle": True}]).action == "extracted"
    assert (store / "ipadapter" / "pack" / "weights.ckpt").read_bytes() == harmless_pickle()
    bad = {**entry, "url": f"{hub.url}/evil.tar.gz", "dest": "ipadapter/other/", "sha256": sha256(evil)}
    failed = run.one([{**bad, "allow_pickle": True}])
    assert failed.action == "failed"
    assert "dangerous import(s) in ipadapter/other/pack/weights.bin: posix system" in (failed.msg or "")
    assert not (store / "ipadapter" / "other").exists()
    no_leftovers(store)


def test_lock_refuses_a_pickle_name_unless_allowed_and_keeps_the_permission(run: Run, hub: MockHub) -> None:
    body = harmless_pickle()
    hub.add("/files/model.ckpt", body)
    entry = {"url": f"{hub.url}/files/model.ckpt", "dest": "checkpoints/"}
    options = run.options()
    with pytest.raises(fetch.FetchError, match=r"checkpoints/model\.ckpt is a pickle-based format \(\.ckpt\)"):
        fetch.Fetcher(options).resolve(fetch.parse_manifest([entry], options))
    allowed = run.options(allow_pickle=True)
    (locked,) = fetch.Fetcher(allowed).resolve(fetch.parse_manifest([entry], allowed))
    assert locked["dest"] == "checkpoints/model.ckpt" and locked["sha256"] == sha256(body)
    assert locked["allow_pickle"] is True


@pytest.mark.parametrize(
    ("module", "name"),
    [("multiprocessing.util", "spawnv_passfds"), ("code", "interact"), ("logging.config", "listen")],
)
def test_allowed_pickle_with_a_global_picklescan_only_suspects_fails_naming_it(
    run: Run, hub: MockHub, store: Path, module: str, name: str
) -> None:
    """Fail closed: picklescan rates these gadgets only "suspicious"; a global on neither its safe
    list nor ours (pickles.ALLOWED_GLOBALS) fails the entry."""
    body = global_call(module, name, b"x")
    hub.add("/files/gadget.pt", body)
    entry = {"url": f"{hub.url}/files/gadget.pt", "dest": "checkpoints/gadget.pt", "sha256": sha256(body)}
    result = run.one([{**entry, "allow_pickle": True}])
    assert result.action == "failed"
    assert f"checkpoints/gadget.pt imports {module} {name}, not on picklescan's safe list" in (result.msg or "")
    assert not (store / "checkpoints" / "gadget.pt").exists()
    no_leftovers(store)


def test_allowed_pickle_with_allow_listed_globals_is_installed(run: Run, hub: MockHub, store: Path) -> None:
    body = global_call("torch._utils", "_rebuild_parameter")[:-1] + b"0" + global_call("torch", "FloatStorage")[2:]
    hub.add("/files/ok.pt", body)
    entry = {"url": f"{hub.url}/files/ok.pt", "dest": "checkpoints/ok.pt", "sha256": sha256(body)}
    assert run.one([{**entry, "allow_pickle": True}]).action == "downloaded"


@pytest.mark.parametrize(
    ("name", "body", "kind"),
    [
        ("text.bin", text_pickle(), "a pickle stream"),
        ("padded.bin", padded_pickle(), "a pickle stream"),
        ("broken.bin", b"PK\x03\x04" + b"\0" * 200, "a zip that cannot be read"),
        ("legacy.bin", archives.tar_bytes({"pickle": harmless_pickle(), "storages": b"\0"}, gz=False), "a tar archive"),
    ],
)
def test_bin_detection_fails_closed(run: Run, hub: MockHub, store: Path, name: str, body: bytes, kind: str) -> None:
    hub.add(f"/{name}", body)
    result = run.one([{"url": f"{hub.url}/{name}", "dest": f"vae/{name}", "sha256": sha256(body)}])
    assert result.action == "failed"
    assert f"vae/{name} is {kind}" in (result.msg or "")
    assert not (store / "vae" / name).exists()


def test_random_bytes_are_not_called_a_pickle(tmp_path: Path) -> None:
    generator = random.Random(17)  # noqa: S311 - test data, reproducible
    path = tmp_path / "raw.bin"
    called = []
    for sample in range(1000):
        path.write_bytes(generator.randbytes(4096))
        if pickles.pickle_kind(str(path), "raw.bin"):
            called.append(sample)
    assert called == []


def test_a_pickle_already_in_place_obeys_the_policy_before_it_is_recorded(
    run: Run, hub: MockHub, cdn: MockHub, store: Path
) -> None:
    """Defect 6: a file at its final path without a record becomes present only as a download would."""
    evil = malicious_pickle()
    hub.add("/files/evil.bin", evil)
    (store / "vae").mkdir(parents=True)
    (store / "vae" / "evil.bin").write_bytes(evil)
    entry = {"url": f"{hub.url}/files/evil.bin", "dest": "vae/evil.bin"}
    exact = run.one([{**entry, "sha256": sha256(evil)}])  # _inspect: the manifest's hash matches
    assert exact.action == "failed" and "vae/evil.bin is a pickle stream" in (exact.msg or ""), exact.msg
    allowed = run.one([{**entry, "sha256": sha256(evil), "allow_pickle": True}])
    assert allowed.action == "failed" and "dangerous import(s) in vae/evil.bin: posix system" in (allowed.msg or "")
    hub.add_hf("org/repo", "evil.bin", evil, cdn=cdn)
    published = run.one([{"url": "hf://org/repo/evil.bin@main", "dest": "vae/evil.bin"}])  # _settle: the hub's hash
    assert published.action == "failed" and "vae/evil.bin is a pickle stream" in (published.msg or ""), published
    assert (
        not (store / ".comfybake" / "verified.json").exists()
        or "evil.bin" not in (store / ".comfybake" / "verified.json").read_text()
    )
