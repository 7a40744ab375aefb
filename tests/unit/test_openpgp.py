"""The filter `openpgp_fingerprints`, which the nvidia_driver role pins its repository keys with,
against keys that gpg makes here and the fingerprints gpg itself reports for them."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from ansible.errors import AnsibleFilterError
from ansible_collections.comfybake.core.plugins.filter.openpgp import openpgp_fingerprints


def gpg(home: Path, *args: str) -> str:
    env = {**os.environ, "GNUPGHOME": str(home)}
    return subprocess.run(["gpg", "--batch", *args], env=env, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Two armored keys, each with a subkey (RSA, as NVIDIA's; ed25519, as the scenario's), and
    the fingerprints gpg reports for their primary keys."""
    home = tmp_path_factory.mktemp("gnupg")
    home.chmod(0o700)
    found: dict[str, str] = {}
    for name, algo in (("rsa", "rsa2048"), ("ed", "ed25519")):
        uid = f"{name} <{name}@comfybake.invalid>"
        gpg(home, "--passphrase", "", "--quick-gen-key", uid, algo, "sign", "never")
        primary = gpg(home, "--with-colons", "--list-keys", uid).split("fpr:::::::::")[1].split(":")[0]
        gpg(home, "--passphrase", "", "--quick-add-key", primary, "rsa2048" if name == "rsa" else "cv25519", "encr")
        found[name] = gpg(home, "--armor", "--export", uid)
        found[f"{name}_fpr"] = primary
    try:
        yield found
    finally:
        subprocess.run(["gpgconf", "--kill", "all"], env={**os.environ, "GNUPGHOME": str(home)}, check=False)


def test_the_primary_key_is_the_one_gpg_names_and_subkeys_are_left_out(keys: dict[str, str]) -> None:
    assert openpgp_fingerprints(keys["rsa"]) == [keys["rsa_fpr"]]
    assert openpgp_fingerprints(keys["ed"]) == [keys["ed_fpr"]]
    assert len(keys["rsa_fpr"]) == 40 and keys["rsa_fpr"] == keys["rsa_fpr"].upper()


def test_a_file_with_two_keys_lists_both_so_a_pin_of_one_refuses_it(keys: dict[str, str]) -> None:
    both = keys["rsa"] + "\n" + keys["ed"]
    assert openpgp_fingerprints(both) == [keys["rsa_fpr"], keys["ed_fpr"]]


def test_armor_headers_and_windows_line_ends_are_read(keys: dict[str, str]) -> None:
    begin, rest = keys["ed"].split("\n", 1)
    dressed = f"{begin}\nComment: a mirror's copy\nVersion: x\n{rest}".replace("\n", "\r\n")
    assert openpgp_fingerprints(dressed) == [keys["ed_fpr"]]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<html>login</html>", "no '-----BEGIN PGP PUBLIC KEY BLOCK-----'"),
        ("-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmQ!!\n-----END PGP PUBLIC KEY BLOCK-----\n", "base64 is damaged"),
        ("-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nAAAA\n-----END PGP PUBLIC KEY BLOCK-----\n", "not an OpenPGP packet"),
    ],
)
def test_what_is_not_a_key_fails_saying_why(text: str, message: str) -> None:
    with pytest.raises(AnsibleFilterError, match="openpgp_fingerprints - ") as raised:
        openpgp_fingerprints(text)
    assert message in str(raised.value)


def test_a_truncated_key_fails(keys: dict[str, str]) -> None:
    lines = keys["rsa"].splitlines()
    cut = "\n".join([*lines[:4], *lines[-2:]])  # the first base64 lines only, and the armor's end
    with pytest.raises(AnsibleFilterError, match=r"ends in the middle of a packet|base64"):
        openpgp_fingerprints(cut)
