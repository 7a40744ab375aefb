"""The gateway's users and keys (plugins/module_utils/gateway/credentials.py): real bcrypt, real files."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from comfybake.engine.gateway import credentials
from comfybake.engine.gateway.credentials import Principal
from comfybake.engine.gateway.errors import GatewayError

CANARY = "canary-password-7Qz"  # a password that must never reach a file


def user(name: str, scope: list[str], source: str = "cli", plain: str = CANARY) -> Principal:
    return Principal(name, "user", credentials.hash_secret(plain, rounds=4), scope, source, "2026-01-01T00:00:00Z")


def test_a_hash_verifies_its_password_only() -> None:
    hashed = credentials.hash_secret(CANARY)
    assert hashed.startswith("$2b$12$") and credentials.HASH.fullmatch(hashed)
    assert CANARY not in hashed
    assert credentials.verify(CANARY, hashed)
    assert not credentials.verify(CANARY + "x", hashed)
    assert not credentials.verify(CANARY, "not-a-hash")
    assert not credentials.verify("", hashed)


def test_a_password_longer_than_bcrypt_reads_is_refused() -> None:
    # bcrypt reads 72 bytes: a longer password would be cut silently by older libraries.
    with pytest.raises(GatewayError, match="73 bytes long: bcrypt reads at most 72"):
        credentials.hash_secret("x" * 73)
    with pytest.raises(GatewayError, match="is empty"):
        credentials.hash_secret("")


def test_the_password_rule_names_the_length() -> None:
    with pytest.raises(GatewayError, match="11 characters long: use at least 12"):
        credentials.check_password("x" * 11)
    assert credentials.check_password("x" * 12) == "x" * 12


def test_missing_bcrypt_names_the_package_to_install(tmp_path: Path) -> None:
    # A host without python3-bcrypt: the import fails, the first hash says what to install.
    script = (
        "import sys; sys.modules['bcrypt'] = None\n"
        "from comfybake.engine.gateway import credentials\n"
        "credentials.hash_secret('x' * 12)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ))
    assert done.returncode != 0
    assert "apt-get install python3-bcrypt" in done.stderr and "pip install bcrypt" in done.stderr


@pytest.mark.parametrize("name", ["alice", "a", "ci.bot-2_x", "0" * 32])
def test_names_users_and_keys_may_have(name: str) -> None:
    assert credentials.check_name(name) == name


@pytest.mark.parametrize("name", ["", "Alice", "a:b", "-a", ".a", "a b", "0" * 33, "é"])
def test_names_refused_say_the_rule(name: str) -> None:
    with pytest.raises(GatewayError, match=r"is invalid: use 1 to 32 characters of a-z"):
        credentials.check_name(name)


def test_scopes_are_checked_and_normalized() -> None:
    assert credentials.check_scope("*") == ["*"]
    assert credentials.check_scope(["instance:b", "environment:main", "instance:b"]) == [
        "environment:main",
        "instance:b",
    ]
    assert credentials.check_scope(["instance:a", "*"]) == ["*"]
    for bad in ["instance:", "instance:A", "node:a", "a", "environment:-x"]:
        with pytest.raises(GatewayError, match=f"scope '{bad}' is invalid: use '\\*'"):
            credentials.check_scope([bad])
    with pytest.raises(GatewayError, match="no scope given"):
        credentials.check_scope([])


@pytest.mark.parametrize(
    ("scope", "route", "expected"),
    [
        (["*"], ("environment", "main", "main"), True),
        (["*"], ("instance", "a", "main"), True),
        (["environment:main"], ("environment", "main", "main"), True),
        (["environment:main"], ("instance", "a", "main"), True),  # its instances' routes too
        (["environment:main"], ("instance", "c", "other"), False),
        (["environment:main"], ("environment", "other", "other"), False),
        (["instance:a"], ("instance", "a", "main"), True),
        (["instance:a"], ("instance", "b", "main"), False),
        (["instance:a"], ("environment", "main", "main"), False),  # not the environment it is in
        (["instance:main"], ("environment", "main", "main"), False),  # names of different kinds
        (["instance:b", "environment:other"], ("instance", "b", "main"), True),
    ],
)
def test_covers(scope: list[str], route: tuple[str, str, str], expected: bool) -> None:
    principal = Principal("p", "key", "$2b$04$" + "a" * 53, scope)
    assert credentials.covers(principal, *route) is expected


def test_a_key_is_url_safe_base64_of_name_and_secret_and_only_its_hash_is_kept() -> None:
    tokens = set()
    for name in ["a", "ab", "abc", "ci-runner.01"]:  # every length modulo 3
        token, hashed = credentials.new_key(name)
        assert not set(token) & set("+/="), token
        assert base64.b64decode(token).decode().startswith(f"{name}:")
        key_name, secret = credentials.split_key(token)
        assert key_name == name and len(secret) >= credentials.SECRET_LENGTH
        assert credentials.verify(secret, hashed)
        assert secret not in hashed and token not in hashed
        tokens.add(token)
    assert len(tokens) == 4
    with pytest.raises(GatewayError, match="not an API key"):
        credentials.split_key(base64.b64encode(b"no colon here").decode())
    with pytest.raises(GatewayError, match="invalid"):
        credentials.new_key("Bad Name")


def test_save_writes_0600_atomically_and_load_reads_it_back(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    assert credentials.load(str(path)) == []
    principals = [user("zed", ["*"]), user("alice", ["environment:main"])]
    assert credentials.save(str(path), principals) is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [entry.name for entry in tmp_path.iterdir()] == ["credentials.json"]  # no temporary left
    data = json.loads(path.read_text())
    assert data["format"] == 1 and [item["name"] for item in data["principals"]] == ["alice", "zed"]
    assert set(data["principals"][0]) == {"name", "kind", "hash", "scope", "source", "created"}
    assert credentials.load(str(path)) == sorted(principals, key=lambda item: item.name)
    assert CANARY not in path.read_text()
    inode = path.stat().st_ino
    assert credentials.save(str(path), principals) is False  # the same set: not rewritten
    assert path.stat().st_ino == inode
    assert credentials.save(str(path), principals[:1]) is True
    assert path.stat().st_ino != inode  # a new file renamed over the old one
    assert [item.name for item in credentials.load(str(path))] == ["zed"]


def test_a_file_other_accounts_could_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    credentials.save(str(path), [user("alice", ["*"])])
    path.chmod(0o644)
    with pytest.raises(GatewayError, match=r"has mode 0644: other accounts could read.*chmod 600"):
        credentials.load(str(path))
    with pytest.raises(GatewayError, match="has mode 0644"):
        credentials.save(str(path), [])
    path.chmod(0o600)
    os.chown(path, 65534, -1)  # another account's file (the tests run as root)
    with pytest.raises(GatewayError, match="belongs to uid 65534, not to this account"):
        credentials.load(str(path))


def test_a_symbolic_link_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    credentials.save(str(target), [user("alice", ["*"])])
    link = tmp_path / "credentials.json"
    link.symlink_to(target)
    with pytest.raises(GatewayError, match="is a symbolic link"):
        credentials.load(str(link))
    with pytest.raises(GatewayError, match="is a symbolic link"):
        credentials.save(str(link), [])
    assert link.is_symlink() and len(credentials.load(str(target))) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "is not valid JSON"),
        ('{"format": 2, "principals": []}', "not a credentials file of format 1"),
        (
            '{"format": 1, "principals": [{"name": "a", "kind": "user", "hash": "hunter2", "scope": ["*"]}]}',
            "principal 0: hash is not a bcrypt hash",
        ),
        (
            '{"format": 1, "principals": [{"name": "a", "kind": "root", "hash": "$2b$04$'
            + "a" * 53
            + '", "scope": ["*"]}]}',
            "kind 'root' is neither",
        ),
    ],
)
def test_an_invalid_file_is_refused_naming_what_is_wrong(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "credentials.json"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(GatewayError, match=message):
        credentials.load(str(path))


def test_the_inventory_replaces_its_own_entries_and_keeps_the_command_lines() -> None:
    host_user = user("bob", ["instance:a"])
    old_inventory = user("carol", ["*"], source="inventory")
    gone = user("dave", ["*"], source="inventory")
    declared = [Principal("carol", "user", old_inventory.hash, ["environment:main"], "inventory")]
    merged = credentials.merge_inventory([host_user, old_inventory, gone], declared)
    assert [(item.name, item.source, item.scope) for item in merged] == [
        ("bob", "cli", ["instance:a"]),
        ("carol", "inventory", ["environment:main"]),
    ]
    assert merged[1].created == old_inventory.created  # the same user: created stays


def test_an_inventory_name_the_command_line_took_is_an_error_naming_both() -> None:
    host_key = Principal("ci", "key", credentials.hash_secret("s" * 20, rounds=4), ["*"], "cli", "x")
    clash = Principal("ci", "key", credentials.hash_secret("t" * 20, rounds=4), ["*"], "inventory")
    with pytest.raises(GatewayError, match=r"comfyui_gateway_keys .*`comfybake gateway keys revoke ci`"):
        credentials.merge_inventory([host_key], [clash])
    with pytest.raises(GatewayError, match="the name ci is used twice"):
        credentials.merge_inventory([], [clash, clash])


def test_declared_keeps_a_matching_hash_so_a_second_converge_changes_nothing() -> None:
    token, key_hash = credentials.new_key("ci")
    stored = [
        Principal("alice", "user", credentials.hash_secret(CANARY), ["*"], "inventory", "2026-01-01T00:00:00Z"),
        Principal("ci", "key", key_hash, ["*"], "cli", "2026-01-02T00:00:00Z"),  # made with keys create
    ]
    users = [{"name": "alice", "scope": ["*"], "password": CANARY}]
    keys = [{"name": "ci", "scope": ["environment:main"], "api_key": token}]
    found = credentials.declared(users, keys, stored)
    assert [item.hash for item in found] == [stored[0].hash, key_hash]
    merged = credentials.merge_inventory(stored, found)  # the host's key is taken over, not an error
    assert [(item.name, item.source, item.created) for item in merged] == [
        ("alice", "inventory", "2026-01-01T00:00:00Z"),
        ("ci", "inventory", "2026-01-02T00:00:00Z"),
    ]
    assert credentials.dumps(merged) == credentials.dumps(
        credentials.merge_inventory(merged, credentials.declared(users, keys, merged))
    )
    changed = credentials.declared([{"name": "alice", "scope": ["*"], "password": CANARY + "!"}], [], stored)
    assert changed[0].hash != stored[0].hash and credentials.verify(CANARY + "!", changed[0].hash)


def test_declared_entries_name_the_entry_at_fault() -> None:
    token, _hash = credentials.new_key("ci")
    with pytest.raises(GatewayError, match=r"comfyui_gateway_keys\[0\] \('other'\): its key was made for 'ci'"):
        credentials.declared([], [{"name": "other", "scope": ["*"], "api_key": token}], [])
    with pytest.raises(GatewayError, match=r"comfyui_gateway_users\[0\] \('al'\): the password is 5 characters"):
        credentials.declared([{"name": "al", "scope": ["*"], "password": "short"}], [], [])
    with pytest.raises(GatewayError, match=r"comfyui_gateway_users\[0\].*password_hash is not a bcrypt hash"):
        credentials.declared([{"name": "al", "scope": ["*"], "password_hash": "plain"}], [], [])
    with pytest.raises(GatewayError, match=r"comfyui_gateway_users\[0\].*scope 'everything' is invalid"):
        credentials.declared([{"name": "al", "scope": ["everything"], "password": CANARY}], [], [])
