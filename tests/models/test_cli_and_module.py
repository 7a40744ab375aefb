"""The two front ends of the engine: `comfybake models fetch|lock` and the comfybake.core.models module,
run as real processes (the module through ansible-playbook) against loopback hubs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from harness.mockhub import MockHub, VirtualFile
from harness.models import CANARY_CIVITAI, CANARY_HF, assert_no_canary, no_leftovers, safetensors, sha256
from harness.tools import ROOT, venv_bin

MiB = 1 << 20


def cli(*argv: str, hub: MockHub, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_TOKEN": CANARY_HF, "CIVITAI_TOKEN": CANARY_CIVITAI}
    command = [venv_bin("comfybake"), "models", *argv, "--hf-endpoint", hub.url, "--civitai-endpoint", hub.url]
    done = subprocess.run([*command, "--allow-http"], capture_output=True, text=True, env=env, check=False, **kwargs)
    assert_no_canary([done.stdout, done.stderr])
    return done


def write(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_fetch_reports_json_and_exit_codes(hub: MockHub, cdn: MockHub, store: Path, tmp_path: Path) -> None:
    body = safetensors()
    hub.add_hf("org/repo", "m.safetensors", body, cdn=cdn, token=CANARY_HF)
    manifest = write(
        tmp_path / "models.yml", {"comfyui_models": [{"url": "hf://org/repo/m.safetensors@main", "dest": "loras/"}]}
    )
    done = cli("fetch", str(manifest), "--store", str(store), "--json", hub=hub)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)["results"]
    assert [(r["action"], r["sha256"]) for r in results] == [("downloaded", sha256(body))]
    again = cli("fetch", str(manifest), "--store", str(store), hub=hub)
    assert again.returncode == 0
    assert "1 present" in again.stdout
    write(manifest, [{"url": "hf://org/repo/absent.safetensors@main", "dest": "loras/"}])
    failed = cli("fetch", str(manifest), "--store", str(store), hub=hub)
    assert failed.returncode == 1
    assert "not found" in failed.stdout
    write(manifest, [{"url": "ftp://x/y", "dest": "loras/"}])
    invalid = cli("fetch", str(manifest), "--store", str(store), hub=hub)
    assert invalid.returncode == 2
    assert "unsupported url scheme 'ftp'" in invalid.stderr
    bad_mode = cli("fetch", str(manifest), "--store", str(store), "--mode", "0999", hub=hub)
    assert bad_mode.returncode == 2
    assert "argument --mode: mode must be an octal string such as '0640', got '0999'" in bad_mode.stderr
    assert "Traceback" not in bad_mode.stderr


def test_cli_takes_its_settings_from_a_models_file_and_flags_win(hub: MockHub, store: Path, tmp_path: Path) -> None:
    """The boot-time fetch's file: the manifest and the module's settings; a flag overrides the file."""
    first, second = os.urandom(2000), os.urandom(3000)
    hub.add("/files/a.bin", first)
    hub.add("/files/b.bin", second)
    entry = {"url": f"{hub.url}/files/a.bin", "dest": "vae/a.bin", "sha256": sha256(first)}
    settings = {"store": str(store), "group": str(os.getgid()), "mode": "0600", "directory_mode": "0700"}
    models_file = write(tmp_path / "models.yml", {**settings, "models": [entry]})
    done = cli("fetch", str(models_file), hub=hub)
    assert done.returncode == 0, done.stderr
    assert (store / "vae" / "a.bin").stat().st_mode & 0o7777 == 0o600
    assert (store / "vae").stat().st_mode & 0o7777 == 0o700
    more = {"url": f"{hub.url}/files/b.bin", "dest": "vae/b.bin", "sha256": sha256(second)}
    write(models_file, {**settings, "models": [entry, more]})
    done = cli("fetch", str(models_file), "--mode", "0644", hub=hub)
    assert done.returncode == 0, done.stderr
    assert (store / "vae" / "b.bin").stat().st_mode & 0o7777 == 0o644
    for wrong, message in [
        ({"models": [entry]}, "names no store: give --store DIR"),
        ({**settings, "hf_token": "x", "models": []}, "holds hf_token: a token does not belong in a file"),
        ({**settings, "paralel": 2, "models": []}, "unknown option(s) paralel; allowed: store, parallel,"),
        ({**settings, "parallel": 0, "models": []}, "parallel must be 1 or more, got 0"),
        ({**settings, "owner": "no-such-user", "models": []}, "owner 'no-such-user' does not exist on this host"),
    ]:
        write(models_file, wrong)
        refused = cli("fetch", str(models_file), hub=hub)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr


def test_cli_lock_pins_and_its_output_fetches(hub: MockHub, cdn: MockHub, store: Path, tmp_path: Path) -> None:
    lfs, plain, civitai = safetensors(seed=1), os.urandom(3000), safetensors(seed=2)
    commit = "c" * 40
    hub.add_hf("org/repo", "unet/m.safetensors", lfs, cdn=cdn, commit=commit)
    hub.add("/files/plain.bin", plain)
    hub.add_civitai(42, "style.safetensors", civitai, token=CANARY_CIVITAI, cdn=cdn)
    manifest = write(
        tmp_path / "models.yml",
        [
            {"url": "hf://org/repo/unet/m.safetensors@main", "dest": "unet/"},
            {"url": f"{hub.url}/files/plain.bin", "dest": "vae/plain.bin"},
            {"url": "civitai://42", "dest": "loras/"},
        ],
    )
    done = cli("lock", str(manifest), "--json", hub=hub)
    assert done.returncode == 0, done.stderr
    lock = yaml.safe_load((tmp_path / "models.lock.yml").read_text())
    assert json.loads(done.stdout) == {"output": str(tmp_path / "models.lock.yml"), "models": lock["models"]}
    assert lock["comfybake_models_lock"] == 1
    assert lock["models"] == [
        {
            "url": f"hf://org/repo/unet/m.safetensors@{commit}",
            "dest": "unet/m.safetensors",
            "sha256": sha256(lfs),
            "size": len(lfs),
        },
        {
            "url": f"{hub.url}/files/plain.bin",
            "dest": "vae/plain.bin",
            "sha256": sha256(plain),
            "size": len(plain),
            "allow_http": True,
        },
        {"url": "civitai://42", "dest": "loras/style.safetensors", "sha256": sha256(civitai), "size": len(civitai)},
    ]
    assert list(store.iterdir()) == [], "lock wrote into a store"
    fetched = cli("fetch", str(tmp_path / "models.lock.yml"), "--store", str(store), hub=hub)
    assert fetched.returncode == 0 and "3 downloaded" in fetched.stdout, fetched.stdout + fetched.stderr


def test_cli_resumes_after_sigkill_refetching_at_most_the_in_flight_window(
    hub: MockHub, store: Path, tmp_path: Path
) -> None:
    """DL-04 / S7: kill -9 at about half way; nothing at the final path; the re-run resumes."""
    body = VirtualFile(48 * MiB, seed=4)
    hub.add("/big.bin", body, rate=24 * MiB)
    manifest = write(
        tmp_path / "m.yml", [{"url": f"{hub.url}/big.bin", "dest": "unet/big.bin", "sha256": body.sha256()}]
    )
    command = [
        venv_bin("comfybake"),
        "models",
        "fetch",
        str(manifest),
        "--store",
        str(store),
        "--allow-http",
        "--connections",
        "1",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = store / "unet" / ".big.bin.comfybake-partial"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not staging.exists() or staging.stat().st_size < 24 * MiB):
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (store / "unet" / "big.bin").exists(), "a partial file is visible at the final path"
    checkpoint = json.loads(staging.with_name(staging.name + ".json").read_text())
    assert checkpoint["prefix"] > 0
    first = hub.bytes_served
    hub.reset_log()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (store / "unet" / "big.bin").stat().st_size == body.size
    refetched = first + hub.bytes_served - body.size
    assert 0 <= refetched <= 17 * MiB, f"re-fetched {refetched} bytes, more than one 16 MiB segment"
    no_leftovers(store)


def playbook(tmp_path: Path, module_args: dict[str, object], *extra: str) -> subprocess.CompletedProcess[str]:
    play = [
        {
            "hosts": "localhost",
            "gather_facts": False,
            "tasks": [
                {"name": "Fetch models", "comfybake.core.models": module_args, "register": "out"},
                {"name": "Show", "ansible.builtin.debug": {"var": "out"}},
            ],
        }
    ]
    path = tmp_path / "play.yml"
    path.write_text(yaml.safe_dump(play))
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "HF_TOKEN": CANARY_HF,
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-local"),
    }
    command = [
        venv_bin("ansible-playbook"),
        "-i",
        "localhost,",
        "-c",
        "local",
        "-e",
        f"ansible_python_interpreter={sys.executable}",
        str(path),
        *extra,
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False, cwd=ROOT)
    assert_no_canary([done.stdout, done.stderr])
    return done


def test_module_check_diff_converge_idempotence_and_no_token_at_vvvv(
    hub: MockHub, cdn: MockHub, store: Path, tmp_path: Path
) -> None:
    """AU-04 for Ansible: the canary token reaches the module through HF_TOKEN and never prints."""
    good = safetensors(seed=5)
    hub.add_hf("org/open", "m.safetensors", good, cdn=cdn, token=CANARY_HF)
    hub.add_hf("org/locked", "m.safetensors", good, cdn=cdn, token=CANARY_HF, gated=True, granted=False)
    args = {
        "store": str(store),
        "allow_http": True,
        "hf_endpoint": hub.url,
        "models": [{"url": "hf://org/open/m.safetensors@main", "dest": "checkpoints/"}],
    }
    check = playbook(tmp_path, args, "--check", "--diff")
    assert check.returncode == 0, check.stdout
    assert "would_download" in check.stdout
    assert f"sha256 {sha256(good)}" in check.stdout
    assert list(store.iterdir()) == []
    converge = playbook(tmp_path, args)
    assert converge.returncode == 0 and "changed=1" in converge.stdout, converge.stdout
    served = cdn.bytes_served
    again = playbook(tmp_path, args)
    assert again.returncode == 0 and "changed=0" in again.stdout, again.stdout
    assert cdn.bytes_served == served
    failing = {**args, "models": [*args["models"], {"url": "hf://org/locked/m.safetensors@main", "dest": "x/"}]}
    failed = playbook(tmp_path, failing, "-vvvv")
    assert failed.returncode != 0
    assert "1 of 2 model(s) failed" in failed.stdout
    assert "accept the licence" in failed.stdout
    no_leftovers(store)
