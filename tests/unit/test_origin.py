"""The origin of the molecule scenarios and the bake (tests/harness/serve_models.py) with --tls:
every server is signed by the origin's throwaway CA, which nothing else trusts, and its package
index and git remotes serve pip and git when, and only when, they are given that CA."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import repos

SERVER = Path(__file__).resolve().parents[1] / "harness" / "serve_models.py"
SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # this machine's trust, without the origin's CA


def probe_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel, comfybake-probe 1.0."""
    wheel = folder / "comfybake_probe-1.0-py3-none-any.whl"
    info = "comfybake_probe-1.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("comfybake_probe/__init__.py", "")
        archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: comfybake-probe\nVersion: 1.0\n")
        archive.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        archive.writestr(f"{info}/RECORD", "")
    return wheel


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory, fixture_repos: dict[str, repos.Repo]) -> Iterator[dict]:
    work = tmp_path_factory.mktemp("origin")
    (work / "wheels").mkdir()
    probe_wheel(work / "wheels")
    state = work / "origin.json"
    server = subprocess.Popen(
        [sys.executable, str(SERVER), "--state", str(state), "--tls", str(work / "tls"),
         "--packages", str(work / "wheels"), "--repos", str(Path(fixture_repos["ComfyUI"].path).parent)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not state.exists() and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert state.exists(), f"the origin did not start (exit code {server.poll()})"
        yield json.loads(state.read_text())
    finally:
        state.unlink(missing_ok=True)  # the origin exits when its state file goes
        server.wait(timeout=10)


def clean_env(**extra: str) -> dict[str, str]:
    """This machine's environment without its CA settings (SSL_CERT_FILE, REQUESTS_CA_BUNDLE,
    GIT_SSL_CAINFO, pip's configuration...)."""
    keep = {key: value for key, value in os.environ.items() if key in ("PATH", "HOME", "LANG")}
    return {**keep, "GIT_CONFIG_NOSYSTEM": "1", "PIP_CONFIG_FILE": os.devnull, **extra}


def test_every_server_is_https_signed_by_the_origin_ca_alone(origin: dict) -> None:
    for url in (origin["url"] + "/files/vae.bin", origin["index"] + "/", origin["git"] + "/ComfyUI.git/HEAD"):
        assert url.startswith("https://")
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            get(url, SYSTEM_BUNDLE)
        assert get(url, origin["ca"]) == 200


def get(url: str, cafile: str) -> int:
    """GET straight to the origin (no proxy from the environment) with this CA bundle: the status."""
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=cafile))
    )
    try:
        with opener.open(url, timeout=10) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return error.code


def test_git_clones_over_https_with_the_ca_only(origin: dict, tmp_path: Path) -> None:
    url = f"{origin['git']}/ComfyUI.git"
    refused = subprocess.run(["git", "ls-remote", url], env=clean_env(), capture_output=True, text=True)
    assert refused.returncode != 0
    assert "certificate" in refused.stderr
    done = subprocess.run(
        ["git", "clone", "--quiet", "--branch", "v0.8.0", url, str(tmp_path / "c")],
        env=clean_env(GIT_SSL_CAINFO=origin["ca"]), capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "c" / "comfyui_version.py").read_text() == '__version__ = "0.8.0"\n'


def test_pip_installs_from_the_index_with_the_ca_only(origin: dict, tmp_path: Path) -> None:
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--retries", "0",
           "--index-url", origin["index"], "--target", str(tmp_path / "t"), "comfybake-probe==1.0"]  # fmt: skip
    refused = subprocess.run(pip, env=clean_env(PIP_CERT=SYSTEM_BUNDLE), capture_output=True, text=True)
    assert refused.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in refused.stdout + refused.stderr
    done = subprocess.run(pip, env=clean_env(PIP_CERT=origin["ca"]), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "t" / "comfybake_probe" / "__init__.py").exists()
