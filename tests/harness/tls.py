"""A throwaway CA and server certificate for loopback TLS tests, made with the openssl CLI."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class TLSFiles:
    ca: Path
    cert: Path
    key: Path


def make_tls(dest: Path, hosts: tuple[str, ...] = ("127.0.0.1", "127.0.0.2", "localhost")) -> TLSFiles:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed for the TLS tests; install the openssl package")
    dest.mkdir(parents=True, exist_ok=True)
    ca, ca_key = dest / "ca.pem", dest / "ca.key"
    cert, key, csr = dest / "server.pem", dest / "server.key", dest / "server.csr"
    names = []
    for host in hosts:
        try:
            ipaddress.ip_address(host)
            names.append(f"IP:{host}")
        except ValueError:
            names.append(f"DNS:{host}")
    (dest / "ext.cnf").write_text(f"subjectAltName={','.join(names)}\nbasicConstraints=CA:FALSE\n")
    commands = [
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", ca_key, "-out", ca, "-days", "1", "-subj", "/CN=comfybake test CA"],
        ["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", key, "-out", csr, "-subj", "/CN=comfybake test server"],
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "1", "-extfile", dest / "ext.cnf"],
    ]  # fmt: skip
    for command in commands:
        subprocess.run([str(part) for part in command], check=True, capture_output=True)
    return TLSFiles(ca=ca, cert=cert, key=key)
