"""The two front ends of the engine: `comfybake models fetch|lock` and the comfybake.core.models module,
run as real processes (the module through ansible-playbook) against loopback hubs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml
from harness.mockhub import MockHub, VirtualFile
from harness.models import CANARY_CIVITAI, CANARY_HF, assert_no_canary, no_leftovers, safetensors, sha256
from harness.pickles import harmless_pickle, malicious_pickle
from harness.tools import ROOT, venv_bin

from comfybake.cli import main
from comfybake.engine.fetch import pickles

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


def laughs(levels: int) -> str:
    """A "billion laughs": `levels` anchors of nine aliases each, 9**levels values once expanded."""
    lines = ['- &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"- &l{n} [{', '.join([f'*l{n - 1}'] * 9)}]" for n in range(1, levels)]
    return "\n".join(lines)


def test_cli_refuses_a_manifest_that_hurts_at_once_naming_it(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 17, defect 6: aliases that expand exponentially, a cycle, bytes that are not UTF-8 and
    nesting past the recursion limit end in exit code 2 and one line naming the file; the bomb is
    refused by its bound on expanded values (the message says so), not by running out of time."""
    bomb = f"laughs:\n{laughs(8)}\ncomfyui_models:\n  - url: https://example.invalid/m.bin\n    dest: *l7\n"
    cases = {
        "laughs.yml": (bomb.encode(), "its aliases expand to more than 100,000 values"),
        "cycle.yml": (b"models: &a [*a]\n", "an alias refers to the node that holds it"),
        "latin1.yml": ("- url: https://example.invalid/café.bin\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9"),
        "deep.yml": (b"models: " + b"[" * 3000 + b"]" * 3000, "nests lists or mappings more than 100 deep (line 1)"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        for argv in (["models", "fetch", str(path), "--store", str(store)], ["models", "lock", str(path)]):
            code = main(argv)
            err = capsys.readouterr().err
            assert (code, err) == (2, f"error: manifest {path} {err.split(str(path) + ' ', 1)[-1]}"), err[:300]
            assert message in err, err[:300]
    token = tmp_path / "hf-token"
    token.write_bytes(b"hf_\xff")
    for text, extra, message in [
        ("- {1: x, url: 'https://h/x', dest: a/b}\n", [], "models[0] (a/b): unknown key(s) 1; allowed:"),
        ("- {url: 'https://h:99999/x', dest: a/b}\n", [], "url is not a valid URL (Port out of range 0-65535)"),
        ("{hf_endpoint: 'https://[h', 1: 2, models: []}\n", [], "unknown option(s) 1; allowed: store,"),
        ("{hf_endpoint: 'https://[h', models: []}\n", [], "hf_endpoint is not a valid URL (Invalid IPv6 URL)"),
        ("[]\n", ["--hf-token-file", str(token)], f"cannot read token file {token}: it is not UTF-8 text"),
    ]:
        (tmp_path / "other.yml").write_text(text)
        assert main(["models", "fetch", str(tmp_path / "other.yml"), "--store", str(store), *extra]) == 2
        assert message in capsys.readouterr().err
    vars_file = tmp_path / "environments.yml"
    vars_file.write_text(f"comfyui_environments: {{}}\nx:\n{laughs(8)}\n")
    assert main(["environments", "lock", str(vars_file)]) == 2
    assert f"{vars_file} is refused: its aliases expand" in capsys.readouterr().err
    assert list(store.iterdir()) == []


def test_cli_reads_aliases_within_the_bound(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Anchors, aliases and merge keys that stay small keep working."""
    source = tmp_path / "a.bin"
    source.write_bytes(os.urandom(1000))
    manifest = tmp_path / "models.yml"
    manifest.write_text(
        f"defaults: &defaults {{url: 'file://{source}', sha256: {sha256(source.read_bytes())}}}\n"
        "comfyui_models:\n  - {<<: *defaults, dest: &dest vae/a.bin}\n  - {<<: *defaults, dest: *dest}\n"
    )
    assert main(["models", "fetch", str(manifest), "--store", str(store)]) == 2  # one dest twice: the aliases worked
    assert "and models[1] (dest 'vae/a.bin', url file://" in capsys.readouterr().err
    manifest.write_text(manifest.read_text().rsplit("\n  - ", 1)[0] + "\n")
    assert main(["models", "fetch", str(manifest), "--store", str(store)]) == 0
    assert (store / "vae" / "a.bin").read_bytes() == source.read_bytes()


def test_cli_redacts_a_token_the_origin_echoes(hub: MockHub, store: Path, tmp_path: Path) -> None:
    """Issue 17, defect 7, through the CLI (cli() fails on the canary in any output)."""
    for how in ("error-code", "request-id", "redirect", "scheme"):
        hub.add_echo(f"/echo/{how}", how)
    models = [{"url": f"{hub.url}/echo/{how}", "dest": f"vae/{how}.bin"} for how in ("error-code", "redirect")]
    done = cli("fetch", str(write(tmp_path / "models.yml", models)), "--store", str(store), "--retries", "0", hub=hub)
    assert done.returncode == 1 and done.stdout.count("<redacted>") == 2, done.stdout + done.stderr
    models = [{"url": f"{hub.url}/echo/{how}", "dest": f"vae/{how}.bin"} for how in ("request-id", "scheme")]
    done = cli("lock", str(write(tmp_path / "models.yml", models)), "--retries", "0", hub=hub)
    assert done.returncode == 2 and done.stderr.count("<redacted>") == 2, done.stderr


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
    state = store / ".comfybake"
    record = json.loads((state / "last-run.json").read_text())  # the exporter's: what the run did
    assert {k: record[k] for k in ("version", "bytes", "entries", "failed", "failures", "success")} == {
        "version": 1,
        "bytes": len(good),
        "entries": 1,
        "failed": 0,
        "failures": [],
        "success": True,
    }
    assert record["started"] <= record["finished"] == record["last_success"]
    assert record["duration"] == pytest.approx(record["finished"] - record["started"], abs=0.002)
    assert (state / "last-run.json").stat().st_mode == (state / "verified.json").stat().st_mode
    again = playbook(tmp_path, args)
    assert again.returncode == 0 and "changed=0" in again.stdout, again.stdout
    assert cdn.bytes_served == served
    converged = json.loads((state / "last-run.json").read_text())
    assert (converged["bytes"], converged["success"]) == (0, True)
    assert converged["last_success"] == converged["finished"] > record["finished"]
    before = (state / "last-run.json").read_bytes()
    assert playbook(tmp_path, args, "--check").returncode == 0
    assert (state / "last-run.json").read_bytes() == before, "check mode writes no record"
    hub.add_echo("/echo/error-code", "error-code")  # issue 17, defect 7: the engine scrubs before Ansible's no_log
    echoed = {"url": f"{hub.url}/echo/error-code", "dest": "y/e.bin"}
    failing = {**args, "models": [*args["models"], {"url": "hf://org/locked/m.safetensors@main", "dest": "x/"}, echoed]}
    failed = playbook(tmp_path, failing, "-vvvv")
    assert failed.returncode != 0
    assert "2 of 3 model(s) failed" in failed.stdout
    assert "accept the licence" in failed.stdout
    assert "repo/file not found (404 (<redacted>))" in failed.stdout
    text = (state / "last-run.json").read_text()
    assert_no_canary([text])
    assert "://" not in text, "names only, never a URL"
    failing_run = json.loads(text)
    assert {k: failing_run[k] for k in ("entries", "failed", "failures", "success")} == {
        "entries": 3,
        "failed": 2,
        "failures": ["x/", "y/e.bin"],
        "success": False,
    }
    assert failing_run["last_success"] == converged["last_success"], "a failed run keeps the last success"
    no_leftovers(store)


def test_two_entries_resolving_to_one_path_are_refused_by_fetch_lock_and_module(
    hub: MockHub, store: Path, tmp_path: Path
) -> None:
    """Issue 17, defect 1: a folder dest named by the URL and an exact dest with other bytes; exit 2
    like any invalid manifest, both entries named, no body asked for, nothing written."""
    first, second = safetensors(seed=1), safetensors(seed=2)
    hub.add("/a/x.safetensors", first)
    hub.add("/b/x.safetensors", second)
    models = [
        {"url": f"{hub.url}/a/x.safetensors", "dest": "loras/", "sha256": sha256(first)},
        {"url": f"{hub.url}/b/x.safetensors", "dest": "loras/x.safetensors", "sha256": sha256(second)},
    ]
    both = (
        f"models[0] (dest 'loras/', url {hub.url}/a/x.safetensors) and models[1] (dest 'loras/x.safetensors', "
        f"url {hub.url}/b/x.safetensors) both resolve to 'loras/x.safetensors' in the store"
    )
    manifest = write(tmp_path / "models.yml", models)
    done = cli("fetch", str(manifest), "--store", str(store), hub=hub)
    assert done.returncode == 2, done.stdout + done.stderr
    assert both in done.stderr
    locked = cli("lock", str(manifest), hub=hub)
    assert locked.returncode == 2, locked.stdout + locked.stderr
    assert both in locked.stderr
    assert not (tmp_path / "models.lock.yml").exists()
    module = playbook(tmp_path, {"store": str(store), "allow_http": True, "models": models})
    assert module.returncode != 0
    assert both in module.stdout
    assert {r.method for r in hub.requests()} == {"HEAD"}
    assert list(store.iterdir()) == []


def test_server_sent_names_that_do_not_fit_through_the_cli_and_module(
    hub: MockHub, store: Path, tmp_path: Path
) -> None:
    """Issue 17, defect 5: a name too long for the file system is shortened (the same name on every
    run and through both front ends); a name with nothing left once made safe fails the entry."""
    body = safetensors()
    hub.add("/long", body, content_disposition=f'attachment; filename="{"L" * 300}.safetensors"')
    hub.add("/dots", body, content_disposition='attachment; filename="...."')
    long = {"url": f"{hub.url}/long", "dest": "loras/", "sha256": sha256(body)}
    manifest = write(tmp_path / "models.yml", [long])
    done = cli("fetch", str(manifest), "--store", str(store), "--json", hub=hub)
    assert done.returncode == 0, done.stderr
    (name,) = [p.name for p in (store / "loras").iterdir()]
    assert name.startswith("L" * 190) and name.endswith(".safetensors") and len(name) <= 219
    assert json.loads(done.stdout)["results"][0]["path"] == str(store / "loras" / name)
    (store / ".comfybake" / "verified.json").unlink()  # the module resolves the name again
    module = playbook(tmp_path, {"store": str(store), "allow_http": True, "models": [long]})
    assert module.returncode == 0 and "changed=0" in module.stdout, module.stdout
    write(manifest, [{**long, "url": f"{hub.url}/dots"}])
    refused = cli("fetch", str(manifest), "--store", str(store), hub=hub)
    assert refused.returncode == 1
    assert f"cannot tell a file name for {hub.url}/dots: the source calls it '....'" in refused.stdout
    assert "give dest as a file path, e.g. loras/model.safetensors" in refused.stdout
    no_leftovers(store)


def test_cli_and_module_fetch_empty_and_small_files_from_servers_without_head_or_range(
    hub: MockHub, store: Path, tmp_path: Path
) -> None:
    """Issue 17, defect 4: a 0-byte file from a server that refuses HEAD failed with "HTTP 416 ... try
    again later". Empty files, HEAD refused (405, 501) and Range refused all work, through both front
    ends; a file fetched without a known hash is marked unverified by each."""
    bodies = {"empty.json": b"", "one.txt": b"x", "small.json": os.urandom(5000), "tofu.bin": os.urandom(3000)}
    hub.add("/e/empty.json", bodies["empty.json"], head_status=405)
    hub.add("/e/one.txt", bodies["one.txt"], head_status=501, range_status=416)
    hub.add("/e/small.json", bodies["small.json"], head_status=405, ranges=False)
    hub.add("/e/tofu.bin", bodies["tofu.bin"], head_status=405, range_status=501)
    models: list[dict[str, object]] = [
        {"url": f"{hub.url}/e/{name}", "dest": f"configs/{name}", "sha256": sha256(body)}
        for name, body in bodies.items()
        if name != "tofu.bin"
    ]
    models.append({"url": f"{hub.url}/e/tofu.bin", "dest": "configs/", "allow_unverified": True})
    manifest = write(tmp_path / "models.yml", models)
    done = cli("fetch", str(manifest), "--store", str(store), hub=hub)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 downloaded (1 unverified: no sha256 was known to check)" in done.stdout, done.stdout
    lines = done.stdout.splitlines()
    assert any(line.startswith("downloaded") and line.endswith("  configs/  (unverified)") for line in lines), lines
    assert any(line.startswith("downloaded") and line.endswith("  configs/empty.json") for line in lines), lines
    for name, body in bodies.items():
        assert (store / "configs" / name).read_bytes() == body
    again = cli("fetch", str(manifest), "--store", str(store), "--json", hub=hub)
    assert again.returncode == 0, again.stderr
    results = json.loads(again.stdout)["results"]
    assert [(r["action"], r["verified"]) for r in results] == [("present", True)] * 3 + [("present", False)]
    module_store = tmp_path / "module-store"
    module_store.mkdir()
    args = {"store": str(module_store), "allow_http": True, "models": models}
    converge = playbook(tmp_path, args)
    assert converge.returncode == 0 and "changed=1" in converge.stdout, converge.stdout
    assert converge.stdout.count("verified: false") == 1 and "verified: true" in converge.stdout, converge.stdout
    for name, body in bodies.items():
        assert (module_store / "configs" / name).read_bytes() == body
    again_module = playbook(tmp_path, args)
    assert again_module.returncode == 0 and "changed=0" in again_module.stdout, again_module.stdout
    no_leftovers(store)
    no_leftovers(module_store)


def test_cli_pickle_policy_and_scan(hub: MockHub, store: Path, tmp_path: Path) -> None:
    """Issue 17 item 12 (MF-01) through the command line: refused at validation, allowed with
    --allow-pickle, and a dangerous import fails the entry with the scanner's finding."""
    good, evil = harmless_pickle(), malicious_pickle()
    hub.add("/files/good.ckpt", good)
    hub.add("/files/evil.pt", evil)
    exact = {"url": f"{hub.url}/files/good.ckpt", "dest": "checkpoints/good.ckpt", "sha256": sha256(good)}
    manifest = write(tmp_path / "models.yml", [exact])
    refused = cli("fetch", str(manifest), "--store", str(store), hub=hub)
    assert refused.returncode == 2, refused.stderr
    assert "models[0] (checkpoints/good.ckpt): dest 'checkpoints/good.ckpt' is a pickle-based format" in refused.stderr
    assert "set allow_pickle: true on this entry" in refused.stderr
    allowed = cli("fetch", str(manifest), "--store", str(store), "--allow-pickle", hub=hub)
    assert allowed.returncode == 0 and "1 downloaded" in allowed.stdout, allowed.stdout + allowed.stderr
    write(manifest, [{"url": f"{hub.url}/files/evil.pt", "dest": "checkpoints/", "sha256": sha256(evil)}])
    folder = cli("fetch", str(manifest), "--store", str(store), hub=hub)
    assert folder.returncode == 1 and "checkpoints/evil.pt is a pickle-based format (.pt)" in folder.stdout
    failed = cli("fetch", str(manifest), "--store", str(store), "--allow-pickle", hub=hub)
    assert failed.returncode == 1
    assert "picklescan found dangerous import(s) in checkpoints/evil.pt: posix system" in failed.stdout
    assert not (store / "checkpoints" / "evil.pt").exists()
    no_leftovers(store)
    (tmp_path / "evil.pt").write_bytes(evil)
    (tmp_path / "good.pt").write_bytes(good)
    scan = [venv_bin("comfybake"), "models", "scan", "--json", str(tmp_path / "good.pt"), str(tmp_path / "evil.pt")]
    scanned = subprocess.run(scan, capture_output=True, text=True, check=False)
    assert scanned.returncode == 1, scanned.stderr
    results = json.loads(scanned.stdout)["results"]
    assert [(r["name"], r["dangerous"]) for r in results] == [("good.pt", []), ("evil.pt", ["posix system"])]


# No picklescan for this Python; the first argument is the host command (pickles.HOST_COMMAND, the private override).
WITHOUT_PICKLESCAN = (
    "import sys; sys.modules['picklescan'] = None; from comfybake.engine.fetch import pickles; "
    "pickles.HOST_COMMAND = sys.argv.pop(1); from comfybake.cli import main; sys.exit(main())"
)


def test_engine_without_picklescan_uses_the_host_command_or_fails_clearly(
    hub: MockHub, store: Path, tmp_path: Path
) -> None:
    """Where the engine's Python has no picklescan (the module on a host), it runs the host's
    `comfybake models scan`, whose zipapp carries the pinned picklescan; without that command the
    entry fails, naming what to install, and nothing is installed unscanned."""
    pyz = tmp_path / "comfybake.pyz"
    subprocess.run([sys.executable, "scripts/build-cli.py", "--output", str(pyz)], cwd=ROOT, check=True)
    with zipfile.ZipFile(pyz) as archive:
        bundled = archive.namelist()
    assert "picklescan/scanner.py" in bundled and "picklescan-1.0.5.dist-info/licenses/LICENSE" in bundled
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "comfybake"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} {pyz} "$@"\n')
    shim.chmod(0o755)
    good, evil = harmless_pickle(), malicious_pickle()
    hub.add("/files/good.pt", good)
    hub.add("/files/evil.pt", evil)
    manifest = write(
        tmp_path / "models.yml",
        [
            {"url": f"{hub.url}/files/good.pt", "dest": "checkpoints/good.pt", "sha256": sha256(good)},
            {"url": f"{hub.url}/files/evil.pt", "dest": "checkpoints/evil.pt", "sha256": sha256(evil)},
        ],
    )

    def fetch_with(host_command: Path, path: str = "/usr/bin:/bin") -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-c", WITHOUT_PICKLESCAN, str(host_command), "models", "fetch", str(manifest)]
        argv += ["--store", str(store), "--allow-pickle", "--allow-http"]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PATH": path}
        return subprocess.run(argv, capture_output=True, text=True, env=env, check=False)

    done = fetch_with(shim)
    assert done.returncode == 1, done.stderr
    assert "1 downloaded, 1 failed" in done.stdout, done.stdout
    assert "picklescan found dangerous import(s) in checkpoints/evil.pt: posix system" in done.stdout
    (store / "checkpoints" / "good.pt").unlink()
    # Only the host command is run, never a `comfybake` found on PATH.
    bare = fetch_with(tmp_path / "nonexistent", path=f"{bin_dir}:/usr/bin:/bin")
    assert bare.returncode == 1
    assert "no pickle scanner to check checkpoints/good.pt: install picklescan==1.0.5 for this Python" in bare.stdout
    shim.chmod(0o775)  # group-writable: anyone in the group could change what scans
    writable = fetch_with(shim)
    assert "no pickle scanner to check checkpoints/good.pt" in writable.stdout, writable.stdout
    liar = bin_dir / "liar"
    report = {"results": [{"path": "/elsewhere", "name": "x.pt", "dangerous": [], "suspicious": [], "error": None}]}
    liar.write_text(f"#!/bin/sh\necho '{json.dumps(report)}'\n")
    liar.chmod(0o755)
    lied = fetch_with(liar)
    assert f"{liar} models scan could not scan checkpoints/good.pt (a result about another file)" in lied.stdout
    assert sorted(p.name for p in (store / "checkpoints").iterdir()) == []
    no_leftovers(store)


def test_a_picklescan_other_than_the_pin_is_not_used(tmp_path: Path) -> None:
    """Defect 4: an older picklescan first on this Python's path is refused, naming both versions."""
    fake = tmp_path / "site"
    (fake / "picklescan").mkdir(parents=True)
    (fake / "picklescan" / "__init__.py").write_text("")
    result = "class R:\n    globals = []\n    scan_err = False\n\n\ndef scan_bytes(*args, **kwargs):\n    return R()\n"
    (fake / "picklescan" / "scanner.py").write_text(result)  # finds nothing, as an outdated scanner might
    (fake / "picklescan-0.0.9.dist-info").mkdir()
    metadata = "Metadata-Version: 2.1\nName: picklescan\nVersion: 0.0.9\n"
    (fake / "picklescan-0.0.9.dist-info" / "METADATA").write_text(metadata)
    (tmp_path / "evil.pt").write_bytes(malicious_pickle())
    env = {**os.environ, "PYTHONPATH": f"{fake}:{ROOT / 'src'}"}
    argv = [sys.executable, "-m", "comfybake", "models", "scan", str(tmp_path / "evil.pt")]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "this Python imports picklescan 0.0.9, not the pinned 1.0.5" in done.stderr


def test_the_picklescan_pin_is_written_once() -> None:
    """pickles.PICKLESCAN_VERSION is the pin; build-cli.py reads it, pyproject.toml and the constraints agree."""
    pin = f"picklescan=={pickles.PICKLESCAN_VERSION}"
    assert f'"{pin}"' in (ROOT / "pyproject.toml").read_text()
    assert pin in (ROOT / "requirements" / "constraints.txt").read_text().splitlines()
    assert f"picklescan {pickles.PICKLESCAN_VERSION}, or" in (ROOT / "plugins" / "modules" / "models.py").read_text()
    build = (ROOT / "scripts" / "build-cli.py").read_text()
    assert 'PICKLESCAN = f"picklescan=={PICKLESCAN_VERSION}"' in build
    assert re.search(r"picklescan[=-][0-9]", build) is None, "build-cli.py writes a version of its own"


def test_module_pickle_policy(hub: MockHub, store: Path, tmp_path: Path) -> None:
    """Issue 17 item 12 (MF-01) through the module: the entry's key, the run's setting, the finding."""
    good, evil = harmless_pickle(), malicious_pickle()
    hub.add("/files/good.pt", good)
    hub.add("/files/evil.bin", evil)
    exact = {"url": f"{hub.url}/files/good.pt", "dest": "checkpoints/good.pt", "sha256": sha256(good)}
    args: dict[str, object] = {"store": str(store), "allow_http": True, "models": [exact]}
    refused = playbook(tmp_path, args)
    assert refused.returncode != 0
    assert "models[0] (checkpoints/good.pt): dest 'checkpoints/good.pt' is a pickle-based format" in refused.stdout
    allowed = playbook(tmp_path, {**args, "models": [{**exact, "allow_pickle": True}]})
    assert allowed.returncode == 0 and "changed=1" in allowed.stdout, allowed.stdout
    evil_entry = {"url": f"{hub.url}/files/evil.bin", "dest": "vae/evil.bin", "sha256": sha256(evil)}
    not_allowed = playbook(tmp_path, {**args, "models": [evil_entry]})
    assert not_allowed.returncode != 0
    assert "vae/evil.bin is a pickle stream: loading it can run code" in not_allowed.stdout
    failed = playbook(tmp_path, {**args, "allow_pickle": True, "models": [evil_entry]})
    assert failed.returncode != 0
    assert "picklescan found dangerous import(s) in vae/evil.bin: posix system" in failed.stdout
    assert not (store / "vae" / "evil.bin").exists()
    no_leftovers(store)
