"""Filter `openpgp_fingerprints`: the fingerprints of the primary keys in an OpenPGP public key
(ASCII-armored, as apt's keyrings in /etc/apt/keyrings hold them); its documentation is in
`openpgp_fingerprints.yml` beside this one.

The nvidia_driver role pins its repository keys with it: a downloaded key is written for apt
only when it holds exactly the pinned key. Pure: it reads only its argument and needs no gpg.
Fingerprints follow RFC 4880 (version 4: SHA-1) and RFC 9580 (version 6: SHA-256, and the
version 5 draft's form).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Any

from ansible.errors import AnsibleFilterError

PUBLIC_KEY = 6  # the primary key's packet tag; subkeys (14) are not keys one pins
BEGIN = "-----BEGIN PGP PUBLIC KEY BLOCK-----"
END = "-----END PGP PUBLIC KEY BLOCK-----"


def _fail(reason: str) -> AnsibleFilterError:
    return AnsibleFilterError(f"openpgp_fingerprints - {reason}")


def _dearmor(text: str) -> bytes:
    """The binary packets of every armored public key block in `text`, concatenated."""
    data, inside, body = b"", False, False
    chunk: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line == BEGIN:
            inside, body, chunk = True, False, []
        elif line == END and inside:
            try:
                data += base64.b64decode("".join(chunk), validate=True)
            except (binascii.Error, ValueError):
                raise _fail("the armored key's base64 is damaged") from None
            inside = False
        elif inside and not body and (line == "" or ":" in line):
            body = line == ""  # armor headers (Version:, Comment:) end with an empty line
        elif inside and not line.startswith("="):  # "=" starts the CRC-24 line
            body = True
            chunk.append(line)
    if not data:
        raise _fail(f"no '{BEGIN}' ... '{END}' block found")
    return data


def _packets(data: bytes) -> list[tuple[int, bytes]]:
    """(tag, body) of each packet, in the old and the new header formats."""
    packets, at = [], 0
    while at < len(data):
        header = data[at]
        if not header & 0x80:
            raise _fail(f"byte {at} is not an OpenPGP packet header")
        if header & 0x40:  # new format
            tag, at = header & 0x3F, at + 1
            first = data[at] if at < len(data) else 0
            if first < 192:
                length, at = first, at + 1
            elif first < 224:
                length, at = ((first - 192) << 8) + data[at + 1] + 192, at + 2
            elif first == 255:
                length, at = int.from_bytes(data[at + 1 : at + 5], "big"), at + 5
            else:
                raise _fail("partial body lengths do not occur in a public key")
        else:  # old format
            tag, kind, at = (header >> 2) & 0x0F, header & 0x03, at + 1
            if kind == 3:
                raise _fail("indeterminate packet lengths do not occur in a public key")
            size = 1 << kind
            length, at = int.from_bytes(data[at : at + size], "big"), at + size
        if at + length > len(data):
            raise _fail("the key ends in the middle of a packet")
        packets.append((tag, data[at : at + length]))
        at += length
    return packets


def _fingerprint(body: bytes) -> str:
    version = body[0] if body else 0
    if version == 4:
        # RFC 4880 defines the version 4 fingerprint as SHA-1; the pin compares all 160 bits.
        return hashlib.sha1(b"\x99" + len(body).to_bytes(2, "big") + body).hexdigest().upper()  # noqa: S324
    if version in (5, 6):
        prefix = b"\x9a" if version == 5 else b"\x9b"
        return hashlib.sha256(prefix + len(body).to_bytes(4, "big") + body).hexdigest().upper()
    raise _fail(f"a version {version} key has no fingerprint this filter computes (versions 4, 5 and 6 do)")


def openpgp_fingerprints(key: Any) -> list[str]:
    """The fingerprint of each primary key in the armored public key `key`, upper-case hex, in order."""
    if not isinstance(key, str):
        raise _fail(f"give the ASCII-armored key as text, not {type(key).__name__}")
    return [_fingerprint(body) for tag, body in _packets(_dearmor(key)) if tag == PUBLIC_KEY]


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"openpgp_fingerprints": openpgp_fingerprints}
