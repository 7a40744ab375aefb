"""Issue 17, items 9-11: what the store holds (`models du|ls`), pruning (`models prune`, the module's
prune option), disk budgets, and `state: absent` per entry, on real stores filled from loopback hubs,
with real processes holding files open and locks held."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import archives
from harness.mockhub import MockHub
from harness.models import Run, safetensors, sha256, tree_hash
from test_cli_and_module import playbook

from comfybake.cli import main
from comfybake.engine.fetch import options as fetch_options
from comfybake.engine.fetch import store as fetch_store

MiB = 1 << 20
# An entry whose file is not in the store: a manifest that lists a model, so that prune runs.
OTHER = {
    "url": "https://example.invalid/other.safetensors",
    "dest": "checkpoints/other.safetensors",
    "sha256": "0" * 64,
}


def write(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    capsys.readouterr()
    code = main(["models", *argv, "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


@pytest.fixture
def holder() -> Iterator[Any]:
    """Real processes that hold a file open, or hold a store lock, until the test ends."""
    started: list[subprocess.Popen[str]] = []

    def hold(path: Path, lock: bool = False) -> None:
        code = (
            "import fcntl, sys\n"
            f"f = open({str(path)!r}, 'a')\n"
            + ("fcntl.flock(f, fcntl.LOCK_EX)\n" if lock else "")
            + "print('ready', flush=True)\nsys.stdin.read()\n"
        )
        process = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert process.stdout is not None and process.stdout.readline() == "ready\n"
        started.append(process)

    yield hold
    for process in started:
        process.communicate("")


def lock_file(store: Path, relpath: str) -> Path:
    name = hashlib.sha1(relpath.encode(), usedforsecurity=False).hexdigest()
    path = store / ".comfybake" / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def env_folder(config: Path, name: str, store: Path, folders: dict[str, str]) -> None:
    """An environment's extra_model_paths.yaml as the comfyui_environments role writes it."""
    folder = config / "envs" / name
    folder.mkdir(parents=True)
    section = {"base_path": str(store), "is_default": True, **folders}
    write(folder / "extra_model_paths.yaml", {"comfybake_store": section})


@pytest.fixture
def filled(hub: MockHub, store: Path, run: Run, tmp_path: Path) -> dict[str, Any]:
    """A store with an exact dest, a folder dest (a `names` record), an extracted archive, an
    unreferenced file, a stale partial and one whose download is running; a models file; two
    environments with different extra folders."""
    exact, named = safetensors(b"e" * 5000, seed=1), safetensors(b"n" * 7000, seed=2)
    pack = archives.zip_bytes({"a.onnx": b"a" * 3000, "sub/b.onnx": b"b" * 2000})
    hub.add("/exact.safetensors", exact)
    hub.add("/files/named.safetensors", named)
    hub.add("/pack.zip", pack)
    models = [
        {"url": f"{hub.url}/exact.safetensors", "dest": "checkpoints/exact.safetensors", "sha256": sha256(exact)},
        {"url": f"{hub.url}/files/named.safetensors", "dest": "loras/", "sha256": sha256(named)},
        {"url": f"{hub.url}/pack.zip", "dest": "insightface/models/pack/", "extract": True, "sha256": sha256(pack)},
    ]
    report = run(models)
    assert [r.action for r in report.results] == ["downloaded", "downloaded", "extracted"], report.results
    (store / "loras" / "old.safetensors").write_bytes(b"o" * 1100)
    (store / "upscale").mkdir()
    (store / "upscale" / "x4.pth").write_bytes(b"u" * 1300)
    (store / "checkpoints" / ".gone.safetensors.comfybake-partial").write_bytes(b"p" * 900)
    (store / "checkpoints" / ".busy.safetensors.comfybake-partial").write_bytes(b"q" * 800)
    config = tmp_path / "etc"
    settings = {"store": str(store), "allow_http": True}
    config.mkdir()
    write(config / "models.yml", {**settings, "models": models})
    env_folder(config, "base", store, {"checkpoints": "checkpoints/", "loras": "loras/"})
    faces = {"checkpoints": "checkpoints/", "insightface": "insightface/", "upscale_models": "upscale/"}
    env_folder(config, "faces", store, faces)
    return {"models": models, "config": config, "exact": exact, "named": named, "pack": pack}


def test_du_and_ls_classify_every_file_by_entry_state_and_environment(
    filled: dict[str, Any], store: Path, holder: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    holder(lock_file(store, "checkpoints/busy.safetensors"), lock=True)
    config = str(filled["config"])
    files = {item["path"]: item for item in cli_json(capsys, "ls", "--config-root", config)}
    exact, named = len(filled["exact"]), len(filled["named"])
    assert {path: (item["state"], item["entry"], item["size"]) for path, item in files.items()} == {
        "checkpoints/exact.safetensors": ("verified", "checkpoints/exact.safetensors", exact),
        "loras/named.safetensors": ("verified", "loras/", named),
        "insightface/models/pack/a.onnx": ("verified", "insightface/models/pack/", 3000),
        "insightface/models/pack/sub/b.onnx": ("verified", "insightface/models/pack/", 2000),
        "loras/old.safetensors": ("unreferenced", None, 1100),
        "upscale/x4.pth": ("unreferenced", None, 1300),
        "checkpoints/.gone.safetensors.comfybake-partial": ("partial", None, 900),
        "checkpoints/.busy.safetensors.comfybake-partial": ("partial", None, 800),
    }
    assert files["checkpoints/.busy.safetensors.comfybake-partial"]["in_use"] is True
    assert files["checkpoints/.gone.safetensors.comfybake-partial"]["in_use"] is False
    assert files["checkpoints/exact.safetensors"]["environments"] == ["base", "faces"]
    assert files["loras/named.safetensors"]["environments"] == ["base"]
    assert files["insightface/models/pack/sub/b.onnx"]["environments"] == ["faces"]
    assert files["upscale/x4.pth"]["environments"] == ["faces"]

    usage = cli_json(capsys, "du", "--config-root", config)
    assert usage["entries"] == {
        "checkpoints/exact.safetensors": {"bytes": exact, "files": 1},
        "insightface/models/pack/": {"bytes": 5000, "files": 2},
        "loras/": {"bytes": named, "files": 1},
    }
    assert usage["folders"] == {
        "checkpoints": {"bytes": exact, "files": 1},
        "insightface": {"bytes": 5000, "files": 2},
        "loras": {"bytes": named + 1100, "files": 2},
        "upscale": {"bytes": 1300, "files": 1},
    }
    assert usage["environments"] == {
        "base": {"bytes": exact + named + 1100, "files": 3},
        "faces": {"bytes": exact + 5000 + 1300, "files": 4},
    }
    assert usage["unreferenced"] == {"bytes": 2400, "files": 2}
    assert usage["partial"] == {"bytes": 1700, "files": 2, "in_use": 1}
    assert usage["total"] == {"bytes": exact + named + 5000 + 2400 + 1700, "files": 8}
    assert usage["free"] > 0
    capsys.readouterr()
    assert main(["models", "du", "--config-root", config]) == 0
    table = capsys.readouterr().out
    assert "unreferenced" in table and "partial (1 in use)" in table and "free" in table


def test_prune_dry_run_then_apply_removes_exactly_the_unreferenced(
    filled: dict[str, Any], store: Path, holder: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    holder(lock_file(store, "checkpoints/busy.safetensors"), lock=True)
    (store / "loras" / "mine.safetensors").write_bytes(b"m" * 600)
    (store / "loras" / "playing.safetensors").write_bytes(b"y" * 700)
    holder(store / "loras" / "playing.safetensors")  # a running instance has it open
    config = str(filled["config"])
    before = tree_hash(store)
    records = (store / ".comfybake" / "verified.json").read_text()
    protect = ["--protected", "loras/mine-*", "--protected", "loras/mine.*"]
    dry = cli_json(capsys, "prune", "--config-root", config, *protect)
    assert dry["dry_run"] is True and dry["changed"] is False
    assert tree_hash(store) == before
    assert (store / "checkpoints" / ".gone.safetensors.comfybake-partial").exists()
    assert (store / ".comfybake" / "verified.json").read_text() == records
    removed = {item["path"]: item["bytes"] for item in dry["removed"]}
    assert removed == {
        "checkpoints/.gone.safetensors.comfybake-partial": 900,
        "loras/old.safetensors": 1100,
        "upscale/x4.pth": 1300,
    }
    kept = {item["path"]: item["why"] for item in dry["kept"]}
    assert kept == {
        "checkpoints/.busy.safetensors.comfybake-partial": "download in progress",
        "loras/mine.safetensors": "protected (loras/mine.*)",
        "loras/playing.safetensors": "open by a running process",
    }
    capsys.readouterr()
    assert main(["models", "prune", "--config-root", config, "--protected", "loras/mine.*"]) == 0
    assert "dry run: nothing was removed" in capsys.readouterr().out

    applied = cli_json(capsys, "prune", "--config-root", config, "--protected", "loras/mine.*", "--yes")
    assert applied["changed"] is True and applied["freed"] == 3300
    assert {item["path"] for item in applied["removed"]} == set(removed)
    after = tree_hash(store)
    assert set(before) - set(after) == set(removed)
    assert {k: v for k, v in before.items() if k in after} == after
    # The records of referenced files stay; a second prune finds nothing more.
    again = cli_json(capsys, "prune", "--config-root", config, "--protected", "loras/mine.*", "--yes")
    assert again["removed"] == [] and again["changed"] is False
    files = {item["path"]: item["state"] for item in cli_json(capsys, "ls", "--config-root", config)}
    assert files["loras/named.safetensors"] == "verified"


def test_prune_removes_the_records_of_what_it_removes(
    hub: MockHub, store: Path, run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder dest dropped from the manifest: its file, its `files` record and its `names` record go."""
    body = safetensors(seed=9)
    hub.add("/files/dropped.safetensors", body)
    entry = {"url": f"{hub.url}/files/dropped.safetensors", "dest": "loras/", "sha256": sha256(body)}
    assert run.one([entry]).action == "downloaded"
    manifest = write(tmp_path / "other.yml", {"store": str(store), "models": [OTHER]})
    pruned = cli_json(capsys, "prune", str(manifest), "--yes", "--config-root", str(tmp_path / "none"))
    assert [item["path"] for item in pruned["removed"]] == ["loras/dropped.safetensors"]
    records = json.loads((store / ".comfybake" / "verified.json").read_text())
    assert records["files"] == {} and records["names"] == {}
    # Fetched again, it is downloaded again, not taken for present on a stale name.
    assert run.one([entry]).action == "downloaded"


def test_prune_refuses_without_a_manifest(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (store / "a.bin").write_bytes(b"x")
    code = main(["models", "prune", "--store", str(store), "--config-root", str(tmp_path / "etc"), "--yes"])
    assert code == 2
    assert "no manifest" in capsys.readouterr().err
    assert (store / "a.bin").exists()


def test_prune_budget_removes_least_recently_used_first(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    for index, name in enumerate(["oldest", "older", "newer", "newest"]):
        path = store / "loras" / f"{name}.safetensors"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x" * MiB)
        os.utime(path, (now - 10_000 + index * 1000, now - 10_000))
    manifest = write(tmp_path / "models.yml", {"store": str(store), "models": [OTHER]})
    config = ["--config-root", str(tmp_path / "none")]
    pruned = cli_json(capsys, "prune", str(manifest), *config, "--budget", "2.5MiB", "--yes")
    assert [item["path"] for item in pruned["removed"]] == ["loras/oldest.safetensors", "loras/older.safetensors"]
    assert pruned["freed"] == 2 * MiB and pruned["budget"] == int(2.5 * MiB)
    assert sorted(p.name for p in (store / "loras").iterdir()) == ["newer.safetensors", "newest.safetensors"]
    fits = cli_json(capsys, "prune", str(manifest), *config, "--budget", "2MiB", "--yes")
    assert fits["removed"] == []


def test_budget_is_checked_before_any_get_and_passes_when_it_fits(
    hub: MockHub, store: Path, run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = os.urandom(2 * MiB)
    pack = archives.zip_bytes({"m.onnx": os.urandom(MiB)})
    hub.add("/files/big.bin", body)
    hub.add("/pack.zip", pack)
    (store / "old.bin").write_bytes(b"o" * MiB)
    models = [
        {"url": f"{hub.url}/files/big.bin", "dest": "unet/big.bin", "sha256": sha256(body)},
        {"url": f"{hub.url}/pack.zip", "dest": "pack/", "extract": True, "sha256": sha256(pack)},
    ]
    # 1 MiB in the store + 2 MiB + the archive and twice its size unpacked > 4 MiB.
    report = run(models, budget=4 * MiB)
    assert [r.action for r in report.results] == ["failed", "failed"]
    message = report.results[0].msg or ""
    assert "over its budget of 4.0 MiB" in message, message
    assert "budget (--budget, comfyui_models_budget)" in message
    assert "1.0 MiB now" in message
    assert [r.method for r in hub.requests() if r.method == "GET"] == []
    assert [p.name for p in store.iterdir() if p.name != ".comfybake"] == ["old.bin"]
    # The archive's extracted size, when the entry gives it, replaces the estimate; then it fits.
    sized = [models[0], {**models[1], "extracted_size": MiB + 4096}]
    manifest = write(tmp_path / "models.yml", {"store": str(store), "allow_http": True, "models": sized})
    capsys.readouterr()
    assert main(["models", "fetch", str(manifest), "--budget", "6MiB"]) == 0, capsys.readouterr().err
    assert (store / "unet" / "big.bin").stat().st_size == 2 * MiB
    # Through the CLI, the refusal is the same, before any GET.
    hub.reset_log()
    (store / "unet" / "big.bin").unlink()
    capsys.readouterr()
    assert main(["models", "fetch", str(manifest), "--budget", "3MiB", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert "over its budget of 3.0 MiB" in out["results"][0]["msg"]
    assert [r for r in hub.requests() if r.method == "GET"] == []


def test_budget_sizes_are_parsed_and_bad_ones_refused(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from comfybake.engine.fetch import ManifestError, Options

    assert Options.from_params({"store": str(store), "budget": "200GiB"}).budget == 200 << 30
    assert Options.from_params({"store": str(store), "budget": "2TB"}).budget == 2 * 10**12
    assert Options.from_params({"store": str(store), "budget": "500G"}).budget == 500 << 30
    assert Options.from_params({"store": str(store), "budget": 1234}).budget == 1234
    with pytest.raises(ManifestError, match="budget must be a size such as '200GiB'"):
        Options.from_params({"store": str(store), "budget": "lots"})
    with pytest.raises(SystemExit) as usage_error:
        main(["models", "du", "--store", str(store), "--budget", "many"])
    assert usage_error.value.code == 2
    assert "argument --budget: budget must be a size" in capsys.readouterr().err


def test_state_absent_removes_an_exact_and_a_folder_dest_through_the_cli(
    hub: MockHub, store: Path, run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exact, named = safetensors(seed=3), safetensors(seed=4)
    hub.add("/exact.safetensors", exact)
    hub.add("/files/named.safetensors", named)
    models = [
        {"url": f"{hub.url}/exact.safetensors", "dest": "vae/exact.safetensors", "sha256": sha256(exact)},
        {"url": f"{hub.url}/files/named.safetensors", "dest": "loras/", "sha256": sha256(named)},
    ]
    manifest = write(tmp_path / "models.yml", {"store": str(store), "allow_http": True, "models": models})
    assert main(["models", "fetch", str(manifest)]) == 0
    assert (store / "vae" / "exact.safetensors").exists() and (store / "loras" / "named.safetensors").exists()
    write(manifest, {"store": str(store), "allow_http": True, "models": [{**m, "state": "absent"} for m in models]})
    result = cli_json(capsys, "fetch", str(manifest))
    assert [(r["action"], r["changed"]) for r in result["results"]] == [("removed", True), ("removed", True)]
    assert not (store / "vae" / "exact.safetensors").exists() and not (store / "loras" / "named.safetensors").exists()
    records = json.loads((store / ".comfybake" / "verified.json").read_text())
    assert records["files"] == {} and records["names"] == {}
    again = cli_json(capsys, "fetch", str(manifest))
    assert [(r["action"], r["changed"]) for r in again["results"]] == [("absent", False), ("absent", False)]


def test_module_prunes_and_removes_absent_entries(hub: MockHub, store: Path, tmp_path: Path) -> None:
    keep, drop, gone = safetensors(seed=6), safetensors(seed=7), safetensors(seed=8)
    hub.add("/keep.safetensors", keep)
    hub.add("/files/drop.safetensors", drop)
    hub.add("/gone.safetensors", gone)
    entries = [
        {"url": f"{hub.url}/keep.safetensors", "dest": "vae/keep.safetensors", "sha256": sha256(keep)},
        {"url": f"{hub.url}/files/drop.safetensors", "dest": "loras/", "sha256": sha256(drop)},
        {"url": f"{hub.url}/gone.safetensors", "dest": "vae/gone.safetensors", "sha256": sha256(gone)},
    ]
    args: dict[str, object] = {"store": str(store), "allow_http": True, "models": entries}
    first = playbook(tmp_path, args)
    assert first.returncode == 0 and "changed=1" in first.stdout, first.stdout
    (store / "vae" / "mine.safetensors").write_bytes(b"m" * 100)
    # An exact dest and a folder dest marked absent, the protected file kept, the rest pruned.
    (store / "upscale").mkdir()
    (store / "upscale" / "stray.pth").write_bytes(b"s" * 200)
    absent = [entries[0], {**entries[1], "state": "absent"}, {**entries[2], "state": "absent"}]
    pruning = {**args, "models": absent, "prune": True, "protected": ["vae/mine.*"]}
    check = playbook(tmp_path, pruning, "--check", "--diff")
    assert check.returncode == 0 and "changed=1" in check.stdout, check.stdout
    assert "upscale/stray.pth: absent (pruned, unreferenced)" in check.stdout
    assert (store / "upscale" / "stray.pth").exists() and (store / "vae" / "gone.safetensors").exists()
    converge = playbook(tmp_path, pruning)
    assert converge.returncode == 0 and "changed=1" in converge.stdout, converge.stdout
    assert "freed: 200" in converge.stdout, converge.stdout[-3000:]
    assert converge.stdout.count("action: removed") == 2, converge.stdout[-3000:]  # state: absent, not prune
    left = sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file() and ".comfybake" not in p.parts)
    assert left == ["vae/keep.safetensors", "vae/mine.safetensors"]
    again = playbook(tmp_path, pruning)
    assert again.returncode == 0 and "changed=0" in again.stdout, again.stdout


# The review's defects (empty manifests, sizes, blind /proc, failed runs, links) -------------


def test_prune_refuses_an_empty_manifest_and_keeps_every_file(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`models: []` is more likely unset than meant: prune (and fetch's prune) refuse, naming the file."""
    (store / "loras").mkdir()
    (store / "loras" / "a.safetensors").write_bytes(b"a" * 100)
    manifest = write(tmp_path / "models.yml", {"store": str(store), "models": [], "prune": True})
    before = tree_hash(store)
    for argv in (["prune", str(manifest), "--yes", "--config-root", str(tmp_path / "none")], ["fetch", str(manifest)]):
        capsys.readouterr()
        code = main(["models", *argv])
        err = capsys.readouterr().err
        assert code == 2, err
        assert f"{manifest} lists no model in use" in err and "list the models in use" in err
    assert tree_hash(store) == before


def test_the_role_models_file_never_says_prune() -> None:
    """The boot-time fetch (the store owner, /proc hidden) reads this file: it must never prune."""
    tasks = yaml.safe_load(Path("roles/comfyui_models/tasks/manifest.yml").read_text())
    task = next(task for task in tasks if task["name"] == "Install the models file")
    assert "'prune': false" in task["ansible.builtin.copy"]["content"]


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("1000", 1000),
        ("1000B", 1000),
        ("1 KiB", 1024),
        ("1K", 1024),
        ("1KB", 1000),
        ("200GiB", 200 << 30),
        ("2TB", 2 * 10**12),
        (500_000_000_000, 500_000_000_000),
        ("500000000000", 500_000_000_000),
    ],
)
def test_parse_size_counts_plain_numbers_as_bytes(value: object, size: int) -> None:
    assert fetch_options.parse_size("budget", value) == size


def test_prune_as_another_user_cannot_see_open_files_and_removes_nothing(holder: Any) -> None:
    """Not root: another user's fds are unreadable, so an open file could look unreferenced."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to run prune as another user while a root process holds a file")
    base = Path(tempfile.mkdtemp(prefix="comfybake-blind-"))
    try:
        store = base / "models"
        (store / "loras").mkdir(parents=True)
        held = store / "loras" / "held.safetensors"
        held.write_bytes(b"h" * 100)
        (store / "loras" / "free.safetensors").write_bytes(b"f" * 100)
        manifest = write(base / "m.yml", {"store": str(store), "models": [OTHER]})
        for path in (base, store, store / "loras", manifest):
            path.chmod(0o777 if path.is_dir() else 0o644)
        holder(held)  # root holds it open
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "comfybake"]
        argv = ["models", "prune", str(manifest), "--config-root", str(base / "none"), "--yes", "--json"]
        env = {**os.environ, "PYTHONPATH": str(Path("src").resolve())}
        done = subprocess.run([*command, *argv], capture_output=True, text=True, env=env, check=False)
        assert done.returncode == 0, done.stderr
        pruned = json.loads(done.stdout)
        assert pruned["removed"] == []
        whys = {item["path"]: item["why"] for item in pruned["kept"]}
        assert set(whys) == {"loras/held.safetensors", "loras/free.safetensors"}
        assert all("cannot tell which files running processes have open" in why for why in whys.values()), whys
        assert "run prune as root" in whys["loras/free.safetensors"]
        assert held.exists() and (store / "loras" / "free.safetensors").exists()
    finally:
        shutil.rmtree(base)


def test_prune_keeps_a_file_a_process_only_maps(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """safetensors loads by mmap and may close the fd: /proc/PID/maps still shows the file."""
    (store / "loras").mkdir()
    mapped = store / "loras" / "mapped.safetensors"
    mapped.write_bytes(b"m" * 4096)
    code = (
        "import ctypes, os, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.mmap.restype = ctypes.c_void_p\n"
        "c = ctypes\n"
        "libc.mmap.argtypes = [c.c_void_p, c.c_size_t, c.c_int, c.c_int, c.c_int, c.c_long]\n"
        f"fd = os.open({str(mapped)!r}, os.O_RDONLY)\n"
        "assert libc.mmap(None, 4096, 1, 1, fd, 0) not in (None, ctypes.c_void_p(-1).value)\n"
        "os.close(fd)\n"
        "print('ready', flush=True)\nsys.stdin.read()\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline() == "ready\n"
        assert str(mapped) not in {
            os.path.realpath(f"/proc/{process.pid}/fd/{n}") for n in os.listdir(f"/proc/{process.pid}/fd")
        }
        manifest = write(tmp_path / "m.yml", {"store": str(store), "models": [OTHER]})
        pruned = cli_json(capsys, "prune", str(manifest), "--config-root", str(tmp_path / "none"), "--yes")
        assert pruned["removed"] == []
        assert pruned["kept"] == [
            {"path": "loras/mapped.safetensors", "bytes": 4096, "why": "open by a running process"}
        ]
    finally:
        process.communicate("")
    assert mapped.exists()


def test_fetch_with_prune_skips_prune_when_an_entry_failed(
    hub: MockHub, store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failed folder entry's file may be on disk under a name the run did not learn: prune nothing."""
    body = safetensors(seed=21)
    hub.add("/files/good.safetensors", body)
    (store / "loras").mkdir()
    (store / "loras" / "theirs.safetensors").write_bytes(b"t" * 100)  # what the failing entry would name
    models = [
        {"url": f"{hub.url}/files/good.safetensors", "dest": "checkpoints/good.safetensors", "sha256": sha256(body)},
        {"url": f"{hub.url}/files/missing.safetensors", "dest": "loras/", "sha256": "1" * 64},
    ]
    manifest = write(tmp_path / "m.yml", {"store": str(store), "allow_http": True, "prune": True, "models": models})
    capsys.readouterr()
    code = main(["models", "fetch", str(manifest), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1
    assert out["pruned"]["removed"] == [] and "prune skipped: 1 entry(ies) failed" in out["pruned"]["skipped"]
    assert (store / "loras" / "theirs.safetensors").exists()
    # A folder dest whose name the store does not know references its whole folder.
    pruned = cli_json(capsys, "prune", str(manifest), "--config-root", str(tmp_path / "none"), "--yes")
    assert pruned["removed"] == [] and (store / "loras" / "theirs.safetensors").exists()


def test_links_in_the_store_are_listed_never_pruned_nor_counted(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nas = tmp_path / "nas"
    nas.mkdir()
    (nas / "big.safetensors").write_bytes(b"n" * 5000)
    (store / "loras").mkdir()
    (store / "loras" / "nas").symlink_to(nas)
    (store / "loras" / "one.safetensors").symlink_to(nas / "big.safetensors")
    (store / "loras" / "plain.bin").write_bytes(b"p" * 10)
    manifest = write(tmp_path / "m.yml", {"store": str(store), "models": [OTHER]})
    config = ["--config-root", str(tmp_path / "none")]
    files = {item["path"]: (item["state"], item["size"]) for item in cli_json(capsys, "ls", str(manifest), *config)}
    assert files == {
        "loras/nas": ("link", 0),
        "loras/one.safetensors": ("link", 0),
        "loras/plain.bin": ("unreferenced", 10),
    }
    assert cli_json(capsys, "du", str(manifest), *config)["total"] == {"bytes": 10, "files": 1}
    pruned = cli_json(capsys, "prune", str(manifest), *config, "--yes")
    assert [item["path"] for item in pruned["removed"]] == ["loras/plain.bin"]
    assert (store / "loras" / "nas").is_symlink() and (nas / "big.safetensors").exists()
    assert (store / "loras" / "one.safetensors").is_symlink()


def test_protected_globs_add_up_and_folders_protect_what_they_hold(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every models file's globs and --protected add up; `loras/keep/`, `./x`, the store's own path work."""
    for relpath in ("loras/keep/a.bin", "loras/kept/b.bin", "vae/v.bin", "clip/c.bin", "unet/u.bin", "gone.bin"):
        (store / relpath).parent.mkdir(parents=True, exist_ok=True)
        (store / relpath).write_bytes(b"x" * 10)
    first = write(tmp_path / "a.yml", {"store": str(store), "protected": ["loras/keep/"], "models": [OTHER]})
    second = write(tmp_path / "b.yml", {"protected": ["./loras/kept", "nothing/here/*"], "models": [OTHER]})
    argv = [str(first), str(second), "--config-root", str(tmp_path / "none"), "--yes"]
    pruned = cli_json(capsys, "prune", *argv, "--protected", "vae", "--protected", f"{store}/clip/")
    assert sorted(item["path"] for item in pruned["removed"]) == ["gone.bin", "unet/u.bin"]
    kept = {item["path"]: item["why"] for item in pruned["kept"]}
    assert kept == {
        "loras/keep/a.bin": "protected (loras/keep/)",
        "loras/kept/b.bin": "protected (./loras/kept)",
        "vae/v.bin": "protected (vae)",
        "clip/c.bin": f"protected ({store}/clip/)",
    }
    assert pruned["unmatched_protected"] == ["nothing/here/*"]
    capsys.readouterr()
    code = main(["models", "prune", *argv, "--protected", "/srv/elsewhere/*"])
    err = capsys.readouterr().err
    assert code == 2 and "'/srv/elsewhere/*' is an absolute path outside the store" in err, err


def test_a_models_file_others_can_read_must_not_hold_url_credentials(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = [{"url": "https://user:secret@example.invalid/a.safetensors", "dest": "loras/", "sha256": "0" * 64}]
    manifest = write(tmp_path / "models.yml", {"store": str(store), "models": models, "mirrors": []})
    manifest.chmod(0o644)
    capsys.readouterr()
    assert main(["models", "du", str(manifest), "--config-root", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "holds credentials in a URL (models[0].url)" in err and "secret" not in err, err
    manifest.chmod(0o640)  # readable by the store owner's group only: allowed, as a token file would be
    assert main(["models", "du", str(manifest), "--config-root", str(tmp_path / "none")]) == 0


def test_budget_counts_a_replaced_file_once(hub: MockHub, store: Path, run: Run) -> None:
    """A file replaced at the same path goes when the new one lands: old + new is not the need."""
    body = os.urandom(2 * MiB)
    hub.add("/files/big.bin", body)
    (store / "unet").mkdir()
    (store / "unet" / "big.bin").write_bytes(b"o" * 2 * MiB)  # an older version, to be replaced
    entry = {"url": f"{hub.url}/files/big.bin", "dest": "unet/big.bin", "sha256": sha256(body)}
    report = run([entry], budget=3 * MiB)
    assert [r.action for r in report.results] == ["downloaded"], report.results[0].msg
    assert (store / "unet" / "big.bin").read_bytes() == body


def test_prune_drops_an_emptied_extract_folder_its_record_and_honours_a_held_lock(
    hub: MockHub, store: Path, run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str], holder: Any
) -> None:
    """One save for every removal; an extract folder pruned empty loses its `archives` record and
    its folders; a file whose lock a run holds is kept, without waiting for it."""
    pack = archives.zip_bytes({"a.onnx": b"a" * 300, "sub/b.onnx": b"b" * 200})
    hub.add("/pack.zip", pack)
    entry = {"url": f"{hub.url}/pack.zip", "dest": "insightface/models/pack/", "extract": True, "sha256": sha256(pack)}
    assert run.one([entry]).action == "extracted"
    (store / "loras").mkdir()
    (store / "loras" / "locked.bin").write_bytes(b"l" * 10)
    holder(lock_file(store, "loras/locked.bin"), lock=True)
    manifest = write(tmp_path / "m.yml", {"store": str(store), "models": [OTHER]})
    pruned = cli_json(capsys, "prune", str(manifest), "--config-root", str(tmp_path / "none"), "--yes")
    assert sorted(item["path"] for item in pruned["removed"]) == [
        "insightface/models/pack/a.onnx",
        "insightface/models/pack/sub/b.onnx",
    ]
    assert pruned["kept"] == [{"path": "loras/locked.bin", "bytes": 10, "why": "a run holds its lock"}]
    records = json.loads((store / ".comfybake" / "verified.json").read_text())
    assert records["archives"] == {}
    assert sorted(p.name for p in store.iterdir()) == [".comfybake", "insightface", "loras"]
    assert list((store / "insightface").iterdir()) == []


def test_budget_with_prune_does_not_count_what_the_same_run_prunes(
    hub: MockHub, store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = os.urandom(2 * MiB)
    hub.add("/files/new.bin", body)
    (store / "unet").mkdir()
    (store / "unet" / "old.bin").write_bytes(b"o" * 2 * MiB)  # unreferenced: this run's prune removes it
    models = [{"url": f"{hub.url}/files/new.bin", "dest": "unet/new.bin", "sha256": sha256(body)}]
    settings = {"store": str(store), "allow_http": True, "prune": True, "models": models}
    tight = write(tmp_path / "tight.yml", {**settings, "budget": "1MiB"})
    capsys.readouterr()
    assert main(["models", "fetch", str(tight)]) == 1
    out = capsys.readouterr().out
    assert "2.0 MiB now, 2.0 MiB of it pruned by this run + 2.0 MiB" in out, out
    assert "comfybake models prune" not in out  # prune is on: it cannot help more
    manifest = write(tmp_path / "m.yml", {**settings, "budget": "3MiB"})
    out = cli_json(capsys, "fetch", str(manifest))
    assert [r["action"] for r in out["results"]] == ["downloaded"], out
    assert [item["path"] for item in out["pruned"]["removed"]] == ["unet/old.bin"]
    assert sorted(p.name for p in (store / "unet").iterdir()) == ["new.bin"]


def test_staging_names_map_back_to_their_destination() -> None:
    """One definition of the staging names (store.py): prune finds a partial's destination from it."""
    for archive in (False, True):
        staging = fetch_store.staging_path("/s/loras/x.safetensors", archive)
        assert fetch_store.staging_target(os.path.basename(staging)) == "x.safetensors"
        assert fetch_store.staging_target(os.path.basename(staging) + ".json") == "x.safetensors"
        assert fetch_store.staging_target(os.path.basename(staging) + ".json.tmp") == "x.safetensors"
    for suffix in (fetch_store.EXTRACT_SUFFIX, fetch_store.OLD_SUFFIX):
        path = fetch_store.work_path("/s/insightface/pack/", suffix)
        assert fetch_store.staging_target(os.path.basename(path)) == "pack"
    assert fetch_store.staging_target("x.safetensors") is None
    assert fetch_store.staging_target(".comfybake-partial") is None
