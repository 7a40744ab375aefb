"""The one-command state read of the roles (`_comfyui_probe`), run with this machine's sh,
dpkg and getent against a temporary folder: each kind of entry prints exactly the line the
roles' skip conditions compare with."""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
VARS = yaml.safe_load((ROOT / "roles" / "comfyui" / "vars" / "main.yml").read_text())


def probe(*entries: str) -> list[str]:
    argv = [*VARS["_comfyui_probe"], *entries]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_probe_prints_one_line_per_entry_that_exists(tmp_path: Path) -> None:
    me = pwd.getpwuid(os.getuid())
    group = grp.getgrgid(me.pw_gid).gr_name
    file, folder, link = tmp_path / "file", tmp_path / "folder", tmp_path / "link"
    file.write_bytes(b"content")
    file.chmod(0o640)
    folder.mkdir()
    folder.chmod(0o2750)
    link.symlink_to("folder")
    owner = f"{me.pw_name}|{grp.getgrgid(file.stat().st_gid).gr_name}"
    lines = probe(
        "pkg:dpkg", "pkg:comfybake-no-such-package", f"group:{group}", "group:comfybake-no-such-group",
        f"user:{me.pw_name}", "user:comfybake-no-such-user", f"ids:{me.pw_name}", "ids:comfybake-no-such-user",
        str(file), str(folder), str(link), str(tmp_path / "missing"),
    )  # fmt: skip
    ids = lines.pop(3).split("|")
    assert ids[:4] == ["ids", me.pw_name, str(me.pw_uid), str(me.pw_gid)]
    names = {grp.getgrgid(gid).gr_name for gid in os.getgrouplist(me.pw_name, me.pw_gid)}
    assert ids[4].split(" ")[0] == group
    assert set(ids[4].split(" ")) == names
    assert lines == [
        "pkg|dpkg|installed",
        f"group|{group}",
        f"user|{me.pw_name}|{group}|{me.pw_gecos}|{me.pw_dir}|{me.pw_shell}",
        f"{hashlib.sha1(b'content', usedforsecurity=False).hexdigest()}|regular file|{owner}|640|{file}",
        f"-|directory|{owner}|2750|{folder}",
        f"->folder|symbolic link|{owner}|777|{link}",
    ]


def test_missing_entries_print_nothing_and_the_read_succeeds() -> None:
    for last in ("pkg:comfybake-none", "group:comfybake-none", "user:comfybake-none", "ids:comfybake-none",
                 "unit:comfybake-none.service", "/nonexistent"):  # fmt: skip
        assert probe("/nonexistent", last) == [], last


def test_root_file_and_folder_lines_match_the_roles_middles(tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("root files need root")
    (tmp_path / "f").write_text("x")
    (tmp_path / "f").chmod(0o644)
    (tmp_path / "d").mkdir()
    (tmp_path / "d").chmod(0o755)
    os.chown(tmp_path / "f", 0, 0)
    os.chown(tmp_path / "d", 0, 0)
    lines = probe(str(tmp_path / "f"), str(tmp_path / "d"))
    sha = hashlib.sha1(b"x", usedforsecurity=False).hexdigest()
    assert lines == [
        sha + VARS["_comfyui_probe_file"] + str(tmp_path / "f"),
        VARS["_comfyui_probe_dir"] + str(tmp_path / "d"),
    ]
