"""Bake the `test` target with Packer: the fixtures, an origin on the Docker bridge, `packer build`.

Used by tests/packer and bench/bake.py. The bake runs as behind a TLS-intercepting proxy:
everything comes over https from the origin on this machine (tests/harness/serve_models.py),
whose certificates a throwaway CA signed that the bake container trusts only through
`extra_ca_bundle`: packages from its package index (the fixture wheelhouse), ComfyUI and the
nodes from its git remotes (the fixture repositories), models from its model origin, whose
token is a canary handed to Packer only as HF_TOKEN. A step that fails says why in one line and
keeps its whole log under build/test-logs/.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from harness import vm
from harness.bridge import host_address
from harness.tools import ROOT, failure_reason, save_log

TARGET = ROOT / "packer" / "targets" / "test.pkrvars.hcl"
PYTHON = Path(sys.executable)


class BakeError(Exception):
    """A step of the bake failed; the message is its first error and where its whole log is."""


def docker(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return done


@dataclass
class Origin:
    """The fixtures (git repositories, wheelhouse) and the running origin that serves them and the models."""

    state: Path
    token: str
    fixtures: Path

    def read(self) -> dict:
        return json.loads(self.state.read_text())

    @property
    def ca(self) -> str:
        """The throwaway CA that signed the origin's certificates (the proxy's CA of a real site)."""
        return str(self.read()["ca"])


@dataclass
class Bake:
    image: str
    log: str
    seconds: float
    volumes: dict[str, str] = field(default_factory=dict)


@contextmanager
def origin(work: Path) -> Iterator[Origin]:
    """Build the fixtures under `work` and serve them and the test models over https on the Docker bridge."""
    fixtures = subprocess.run(
        [str(PYTHON), "-m", "harness.wheelhouse", str(work / "fixtures")],
        cwd=ROOT / "tests", capture_output=True, text=True,
    )  # fmt: skip
    if fixtures.returncode != 0:
        log = fixtures.stdout + fixtures.stderr
        raise BakeError(f"building the fixtures failed: {failure_reason(log)} (full log: {save_log('fixtures', log)})")
    wheelhouse = json.loads((work / "fixtures" / "environments.json").read_text())["wheelhouse"]
    address = host_address()  # where the bake container reaches this host
    token = f"hf_CANARY_{uuid.uuid4().hex}"
    state = work / "origin.json"
    with (work / "origin.log").open("w") as log_file:
        server = subprocess.Popen(
            [str(PYTHON), str(ROOT / "tests" / "harness" / "serve_models.py"),
             "--bind", address, "--state", str(state), "--tls", str(work / "tls"),
             "--packages", wheelhouse, "--repos", str(work / "fixtures" / "repos")],
            env={**os.environ, "COMFYBAKE_CANARY": token}, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not state.exists() and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if not state.exists():
            log = (work / "origin.log").read_text()
            raise BakeError(f"the model origin did not start on {address}: {failure_reason(log)}")
        yield Origin(state=state, token=token, fixtures=work / "fixtures")
    finally:
        state.unlink(missing_ok=True)  # the origin exits when its state file goes
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


def packer_env(origin: Origin) -> dict[str, str]:
    """Packer's environment for a bake of the test target: this venv's Ansible, the inventory's
    fixtures and origin, and the origin's canary token as HF_TOKEN."""
    return {
        **os.environ,
        "PATH": f"{PYTHON.parent}{os.pathsep}{os.environ['PATH']}",
        "COMFYBAKE_FIXTURES": str(origin.fixtures / "environments.json"),
        "COMFYBAKE_ORIGIN": str(origin.state),
        "HF_TOKEN": origin.token,
    }


def bake(origin: Origin, policy: str, version: str, volumes: dict[str, str] | None = None) -> Bake:
    """`packer build` of the test target into comfybake/test:<version>."""
    env = packer_env(origin)
    mounts = dict(volumes or {})
    started = time.monotonic()
    done = subprocess.run(
        ["packer", "build", "-color=false", "-only=comfybake.docker.comfybake", f"-var-file={TARGET}",
         f"-var=models_policy={policy}", f"-var=image_version={version}", f"-var=docker_volumes={json.dumps(mounts)}",
         f"-var=extra_ca_bundle={origin.ca}", "packer"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    log = done.stdout + done.stderr
    if done.returncode != 0:
        saved = save_log(f"packer-{policy}-{version}", log)
        raise BakeError(f"packer build ({policy}) failed: {failure_reason(log)} (full log: {saved})")
    return Bake(image=f"comfybake/test:{version}", log=log, seconds=time.monotonic() - started, volumes=mounts)


def image_files(image: str) -> dict[str, bytes]:
    """Every regular file of the image's filesystem, by absolute path."""
    container = docker("create", image).stdout.strip()
    try:
        exported = subprocess.run(["docker", "export", container], capture_output=True, check=True).stdout
    finally:
        docker("rm", container)
    files = {}
    with tarfile.open(fileobj=io.BytesIO(exported)) as archive:
        for member in archive:
            if member.isfile():
                handle = archive.extractfile(member)
                files["/" + member.name.lstrip("./")] = handle.read() if handle else b""
    return files


def image_size(image: str) -> int:
    return int(docker("image", "inspect", "-f", "{{.Size}}", image).stdout.strip())


@dataclass
class VMBake:
    disk: Path  # the qcow2 Packer wrote
    log: str
    seconds: float
    key: Path  # the build key pair's private half (Packer logged in with it)
    host_keys: set[str]  # the build VM's SSH host keys ("type base64"), given by its seed
    accelerator: vm.Accelerator


def bake_vm(origin: Origin, folder: Path, version: str, policy: str = "boot") -> VMBake:
    """`packer build` of the test target's qemu source from the local base disk, under the
    accelerator this machine can use, into build/qemu-test/. Packer logs in as the base disk's
    default user with a build key pair that the NoCloud seed on the build VM's CD authorizes."""
    disk = vm.base_disk()
    accel = vm.accelerator(disk, folder)
    key = vm.keypair(folder, "build-key")
    host = vm.keypair(folder, "build-host-key")
    host_public = host.with_suffix(".pub").read_text().strip()
    user_data = {
        "ssh_authorized_keys": [key.with_suffix(".pub").read_text().strip()],
        "ssh_keys": {"ed25519_private": host.read_text(), "ed25519_public": host_public},
    }
    seed = vm.seed_files(folder / "build-seed", "comfybake-build", user_data)
    checksum = subprocess.run(["sha256sum", str(disk)], capture_output=True, text=True, check=True).stdout.split()[0]
    env = {**packer_env(origin), "PACKER_CACHE_DIR": str(ROOT / "build" / "packer-cache")}  # not ./packer_cache
    started = time.monotonic()
    done = subprocess.run(
        ["packer", "build", "-color=false", "-force", "-only=comfybake.qemu.comfybake", f"-var-file={TARGET}",
         f"-var=models_policy={policy}", f"-var=image_version={version}", f"-var=extra_ca_bundle={origin.ca}",
         f"-var=qemu_base_disk={disk}", f"-var=qemu_base_disk_checksum=sha256:{checksum}",
         f"-var=qemu_accelerator={accel.name}", f"-var=qemu_cpu={accel.cpu}", "-var=qemu_cpus=2",
         "-var=qemu_memory_mb=2048", "-var=disk_size_gb=20", f"-var=ssh_username={vm.USER}",
         f"-var=ssh_private_key_file={key}", f"-var=qemu_seed_files={json.dumps([str(path) for path in seed])}",
         "packer"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    log = done.stdout + done.stderr
    if done.returncode != 0:
        saved = save_log(f"packer-qemu-{version}", log)
        raise BakeError(
            f"packer build (qemu, {accel.name}: {accel.why}) failed: {failure_reason(log)} (full log: {saved})"
        )
    image = ROOT / "build" / "qemu" / f"comfybake-test-test-{version}" / f"comfybake-test-test-{version}.qcow2"
    host_keys = {" ".join(host_public.split()[:2])}
    return VMBake(
        disk=image, log=log, seconds=time.monotonic() - started, key=key, host_keys=host_keys, accelerator=accel
    )
