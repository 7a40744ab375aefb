"""`comfybake instances clean` (the retention of outputs and uploads) and how `status` words a
crash loop. The units that run them are exercised on real systemd by the comfyui scenario."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.tools import venv_bin

from comfybake.instances import describe_loop

DAY = 86400


def cli(config_root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    command = [venv_bin("comfybake"), "instances", "--config-root", str(config_root), *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def aged(path: Path, days: float, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    when = time.time() - days * DAY
    os.utime(path, (when, when))
    return path


def host(tmp_path: Path, retention_days: int = 30) -> Path:
    records = [
        {"name": name, "environment": "comm", "port": port, "state_dir": str(tmp_path / "state" / name)}
        for name, port in (("a", 8188), ("b", 8189))
    ]
    config = tmp_path / "etc"
    config.mkdir()
    (config / "instances.json").write_text(
        json.dumps({"format": 1, "retention_days": retention_days, "instances": records})
    )
    return config


def test_clean_deletes_old_outputs_and_uploads_and_keeps_new_ones_and_everything_else(tmp_path: Path) -> None:
    config = host(tmp_path)
    state = tmp_path / "state" / "a"
    old_output = aged(state / "output" / "ComfyUI_00001_.png", 31, "12345")
    old_nested = aged(state / "output" / "run" / "deep" / "x.png", 40)
    old_upload = aged(state / "input" / "pasted" / "image.png", 90)
    new_output = aged(state / "output" / "ComfyUI_00002_.png", 29)
    old_user = aged(state / "user" / "default" / "workflow.json", 400)  # not an output: kept
    old_db = aged(state / "comfyui.db", 400)
    outside = aged(tmp_path / "elsewhere" / "precious.txt", 400)
    # A link the instance could have placed: neither it nor anything it points at is deleted.
    (state / "output" / "link").symlink_to(outside)
    (state / "output" / "linked-folder").symlink_to(outside.parent, target_is_directory=True)
    other = aged(tmp_path / "state" / "b" / "output" / "old.png", 31)

    done = cli(config, "clean", "a")
    assert done.returncode == 0, done.stderr
    assert "a: deleted 3 files (7 B) older than 30 days" in done.stdout
    assert not old_output.exists() and not old_nested.exists() and not old_upload.exists()
    assert new_output.exists() and old_user.exists() and old_db.exists() and outside.exists()
    assert (state / "output" / "link").is_symlink() and (state / "output" / "run" / "deep").is_dir()
    assert other.exists()  # only the named instance

    done = cli(config, "clean", "--older-than", "1", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["older_than_days"] == 1
    assert {item["name"]: item["files"] for item in report["instances"]} == {"a": 1, "b": 1}
    assert not new_output.exists() and not other.exists() and outside.exists()


def test_a_retention_of_zero_days_deletes_nothing(tmp_path: Path) -> None:
    config = host(tmp_path, retention_days=0)
    old = aged(tmp_path / "state" / "a" / "output" / "old.png", 3650)
    done = cli(config, "clean")
    assert done.returncode == 0, done.stderr
    assert "retention is off" in done.stdout and old.exists()


def test_status_words_each_phase_of_a_crash_loop() -> None:
    assert describe_loop(None) is None
    assert describe_loop({"phase": "restarting", "restarts": 3}) == "crash loop, restarting (restart 3)"
    assert describe_loop({"phase": "restarting"}) == "crash loop, restarting"
    assert describe_loop({"phase": "waiting", "next_retry": 250}) == "crash loop, next retry in 4m10s"
    assert describe_loop({"phase": "waiting", "next_retry": 9}) == "crash loop, next retry in 9s"
    assert describe_loop({"phase": "waiting", "next_retry": None}) == "crash loop, retry pending"
    assert describe_loop({"phase": "given up"}).startswith("crash loop, gave up")  # type: ignore[union-attr]


@pytest.fixture
def open_scratch() -> Iterator[Path]:
    """A folder every account can traverse (pytest's own is root's only)."""
    scratch = Path(tempfile.mkdtemp(prefix="comfybake-upkeep-"))
    scratch.chmod(0o755)
    yield scratch
    shutil.rmtree(scratch, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another account needs root")
def test_root_in_a_container_cleans_an_instance_as_its_account(open_scratch: Path) -> None:
    # Root in a container image holds CHOWN, SETUID, SETGID and KILL only (docs/bake.md): it
    # cannot enter an instance's state folder, which the keeper must clean. It cleans each
    # instance as the instance's own account instead.
    config = host(open_scratch)
    state = open_scratch / "state" / "a"
    old = aged(state / "output" / "old.png", 40)
    new = aged(state / "output" / "new.png", 1)
    nobody = pwd.getpwnam("nobody")
    for path in (state, state / "output", old, new):
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    state.chmod(0o700)
    records = json.loads((config / "instances.json").read_text())
    records["instances"][0]["user"] = "nobody"
    records["manager"] = "supervisor"  # a container image's layout
    (config / "instances.json").write_text(json.dumps(records))
    as_container_root = ["setpriv", "--bounding-set=-all,+chown,+setuid,+setgid,+kill"]
    command = [venv_bin("comfybake"), "instances", "--config-root", str(config), "clean", "a"]
    done = subprocess.run(as_container_root + command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "a: deleted 1 files" in done.stdout
    assert not old.exists() and new.exists()
