"""VMs for the qemu bake and its first-boot checks: the local base disk, the accelerator this
machine can use, cloud-init NoCloud seeds, and a VM booted from an image with SSH and ports
forwarded to this host's loopback.

Every VM boots a throwaway overlay of its image (qcow2 with the image as backing file), so the
image itself is never written: each boot of it is a first boot.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.double import stop_process
from harness.tools import ROOT, save_log

BASE_SCRIPT = ROOT / "scripts" / "base-vm.sh"
# The account cloud-init makes on the base disk (Debian's default user), with the seed's keys.
USER = "debian"


class VMError(Exception):
    """A VM step failed; the message says which, and where its whole log is."""


def base_disk() -> Path:
    """The local base disk (scripts/base-vm.sh; rebuilt only when its recipe changed)."""
    done = subprocess.run(["bash", str(BASE_SCRIPT)], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        saved = save_log("base-vm", done.stdout + done.stderr)
        raise VMError(f"scripts/base-vm.sh failed: {done.stderr.strip().splitlines()[-1:]} (full log: {saved})")
    return Path(os.environ.get("COMFYBAKE_BASE_VM") or ROOT / "build" / "vm" / "base-bookworm.qcow2")


@dataclass(frozen=True)
class Accelerator:
    name: str  # QEMU's -accel: kvm or tcg
    cpu: str  # QEMU's -cpu for it
    why: str  # how it was chosen, for the test log


KVM = ("kvm", "host,-arch-capabilities")  # the default CPU model's MSR write aborts under some hypervisors
TCG = ("tcg", "max")


def accelerator(disk: Path, folder: Path, wait: float = 20) -> Accelerator:
    """KVM when it boots the base disk's kernel (its banner on the serial console within `wait`
    seconds), else TCG. Some nested hypervisors expose /dev/kvm and run firmware and GRUB under
    it, yet never get a Linux kernel past its decompressor. COMFYBAKE_QEMU_ACCELERATOR=kvm|tcg
    skips the probe."""
    forced = os.environ.get("COMFYBAKE_QEMU_ACCELERATOR")
    if forced:
        if forced not in ("kvm", "tcg"):
            raise VMError(f"COMFYBAKE_QEMU_ACCELERATOR is {forced!r}; set it to kvm or tcg, or unset it to probe")
        return Accelerator(*(KVM if forced == "kvm" else TCG), f"COMFYBAKE_QEMU_ACCELERATOR={forced}")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Accelerator(*TCG, "no usable /dev/kvm")
    console = folder / "kvm-probe.log"
    probe = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", KVM[0], "-cpu", KVM[1], "-m", "512", "-display", "none",
         "-serial", f"file:{console}", "-snapshot", "-drive", f"file={disk},if=virtio", "-net", "none"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and probe.poll() is None:
            if console.exists() and b"Linux version" in console.read_bytes():
                return Accelerator(*KVM, "KVM booted the base disk's kernel")
            time.sleep(0.5)
    finally:
        stop_process(probe)
    return Accelerator(*TCG, f"KVM did not boot the base disk's kernel in {wait:.0f} s (console: {console})")


def keypair(folder: Path, name: str) -> Path:
    """A new ed25519 key pair; returns the private key (the public one is beside it, .pub)."""
    key = folder / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)], check=True)
    return key


def seed_files(folder: Path, instance_id: str, user_data: dict) -> list[Path]:
    """A NoCloud seed's user-data and meta-data, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    user = folder / "user-data"
    user.write_text("#cloud-config\n" + yaml.safe_dump(user_data, sort_keys=False))
    meta = folder / "meta-data"
    meta.write_text(yaml.safe_dump({"instance-id": instance_id, "local-hostname": instance_id}))
    return [user, meta]


def seed_iso(folder: Path, instance_id: str, user_data: dict) -> Path:
    """The seed as the CD labelled cidata that NoCloud reads (cloud-image-utils' cloud-localds)."""
    user, meta = seed_files(folder, instance_id, user_data)
    iso = folder / "seed.iso"
    subprocess.run(["cloud-localds", str(iso), str(user), str(meta)], check=True, capture_output=True)
    return iso


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR")


@dataclass
class VM:
    process: subprocess.Popen
    folder: Path
    key: Path
    ssh_port: int
    ports: dict[int, int] = field(default_factory=dict)  # guest port -> this host's loopback port
    started: float = 0.0  # time.monotonic() when QEMU started
    booted_in: float = 0.0  # seconds from start to SSH answering

    @property
    def console(self) -> Path:
        return self.folder / "console.log"

    def ssh_argv(self, key: Path | None = None, user: str = USER) -> list[str]:
        known = self.folder / "known_hosts"
        return ["ssh", *SSH_OPTIONS, "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=accept-new",
                "-o", "IdentitiesOnly=yes", "-i", str(key or self.key), "-p", str(self.ssh_port),
                f"{user}@127.0.0.1"]  # fmt: skip

    def ssh(
        self, command: str, check: bool = True, timeout: float = 120, key: Path | None = None, user: str = USER
    ) -> subprocess.CompletedProcess[str]:
        """Run `command` on the VM as `user` (USER: sudo without a password) with `key` (the VM's owner's)."""
        done = subprocess.run([*self.ssh_argv(key, user), command], capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise VMError(f"ssh {command!r} exited {done.returncode}: {done.stderr.strip()}")
        return done

    def json(self, command: str) -> Any:
        return json.loads(self.ssh(command).stdout)

    def host_keys(self) -> set[str]:
        """The VM's SSH host keys as a client sees them (ssh-keyscan), without comments."""
        done = subprocess.run(
            ["ssh-keyscan", "-p", str(self.ssh_port), "127.0.0.1"], capture_output=True, text=True, timeout=60
        )
        return {" ".join(line.split()[1:3]) for line in done.stdout.splitlines() if line and not line.startswith("#")}


@contextmanager
def booted(image: Path, folder: Path, seed: Path, key: Path, accel: Accelerator, forwards: tuple[int, ...] = (),
           memory_mb: int = 2048, cpus: int = 2, timeout: float = 600) -> Iterator[VM]:  # fmt: skip
    """Boot a throwaway overlay of `image` with the NoCloud `seed`; SSH (as USER with `key`) and
    each guest port of `forwards` reach it on this host's loopback. Stopped on leaving."""
    folder.mkdir(parents=True, exist_ok=True)
    overlay = folder / "disk.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image), str(overlay)], check=True
    )
    ssh_port = free_port()
    ports = {guest: free_port() for guest in forwards}
    rules = "".join(f",hostfwd=tcp:127.0.0.1:{host}-:{guest}" for guest, host in {22: ssh_port, **ports}.items())
    started = time.monotonic()
    process = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", accel.name, "-cpu", accel.cpu, "-m", str(memory_mb), "-smp", str(cpus),
         "-display", "none", "-serial", f"file:{folder / 'console.log'}",
         "-drive", f"file={overlay},if=virtio,discard=unmap",
         "-drive", f"file={seed},if=virtio,media=cdrom,readonly=on",
         "-netdev", f"user,id=net0{rules}", "-device", "virtio-net-pci,netdev=net0"],
        stdout=subprocess.DEVNULL, stderr=(folder / "qemu.log").open("w"),
    )  # fmt: skip
    vm = VM(process=process, folder=folder, key=key, ssh_port=ssh_port, ports=ports, started=started)
    try:
        deadline = started + timeout
        while True:
            if process.poll() is not None:
                raise VMError(f"qemu exited {process.returncode}: {(folder / 'qemu.log').read_text()[-2000:]}")
            if vm.ssh("true", check=False, timeout=30).returncode == 0:
                break
            if time.monotonic() > deadline:
                tail = vm.console.read_text(errors="replace")[-3000:] if vm.console.exists() else ""
                raise VMError(f"no SSH on the VM after {timeout:.0f} s; console:\n{tail}")
            time.sleep(2)
        vm.booted_in = time.monotonic() - started
        yield vm
    finally:
        stop_process(process)


CREDENTIAL = "/etc/comfybake/credentials/hf_token"  # where comfybake-models.service loads the token from


def owner_seed(folder: Path, name: str, key: Path, token: str) -> Path:
    """The seed a VM's owner boots the image with: their SSH key, and the model token as the
    root-only file cloud-init writes for comfybake-models.service (docs/bake.md)."""
    return seed_iso(
        folder,
        name,
        {
            "ssh_authorized_keys": [key.with_suffix(".pub").read_text().strip()],
            "write_files": [{"path": CREDENTIAL, "owner": "root:root", "permissions": "0600", "content": token}],
        },
    )


def wait_ready(vm: VM, timeout: float = 900) -> list[dict]:
    """`comfybake instances status --json` once every instance is ready."""
    deadline, rows = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        done = vm.ssh("comfybake instances status --json", check=False)
        if done.stdout.strip():
            rows = json.loads(done.stdout)["instances"]
            if rows and all(row["ready"] for row in rows):
                return list(rows)
        time.sleep(3)
    failed = vm.ssh("systemctl --failed --no-legend; sudo journalctl -b --no-pager -n 60", check=False).stdout
    raise VMError(f"instances not ready after {timeout:.0f} s: {rows}\n{failed}")
