"""A real `packer build` of the test target's qemu source from the local base disk
(scripts/base-vm.sh), then first boots of the image in QEMU with fresh NoCloud seeds.

One bake serves every check. The bake VM boots with a seed that authorizes a build key pair and
sets known SSH host keys; the bake runs playbooks/bake.yml (the test double, the fixture nodes,
packages and models from the loopback origin, policy `boot`) and ends with sysprep. Each boot
runs a throwaway overlay of the image with a seed of its own (the owner's key, and the model
token as the file cloud-init writes for comfybake-models.service), so every boot is a first one.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import bake as baking
from harness import vm as vms
from harness.bake import Origin, VMBake

pytestmark = [pytest.mark.docker, pytest.mark.slow]

GATEWAY_PORT = 8443  # the environment route of the test target (ports mode)
GATEWAY_CA = "/var/lib/comfybake-gateway/pki/authorities/local/root.crt"
MAX_EXPOSURE = 2.0  # what the instances and exporter scenarios assert on provisioned hosts
UNITS = ("comfyui@a.service", "comfyui@b.service", "comfybake-exporter.service")


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory, docker_engine: None) -> Iterator[Origin]:
    with baking.origin(tmp_path_factory.mktemp("vm-origin")) as served:
        yield served


@pytest.fixture(scope="module")
def vm_bake(origin: Origin, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VMBake]:
    folder = tmp_path_factory.mktemp("vm-bake")
    try:
        done = baking.bake_vm(origin, folder, "ci-vm")
    except (baking.BakeError, vms.VMError) as error:
        pytest.fail(str(error), pytrace=False)
    print(f"vm bake: {done.seconds:.0f} s under {done.accelerator.name} ({done.accelerator.why})")
    yield done
    shutil.rmtree(done.disk.parent, ignore_errors=True)


@dataclass
class Boot:
    vm: vms.VM
    ready_in: float  # seconds from starting QEMU to every instance ready
    served: int  # model bytes the origin served during this boot


@pytest.fixture(scope="module")
def first_boot(vm_bake: VMBake, origin: Origin, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Boot]:
    folder = tmp_path_factory.mktemp("vm-boot-1")
    key = vms.keypair(folder, "owner-key")
    seed = vms.owner_seed(folder / "seed", "comfybake-boot-1", key, origin.token)
    before = origin.read()
    try:
        with vms.booted(vm_bake.disk, folder / "vm", seed, key, vm_bake.accelerator, forwards=(GATEWAY_PORT,)) as vm:
            vms.wait_ready(vm)
            ready_in = time.monotonic() - vm.started
            after = origin.read()
            print(f"vm first boot: SSH after {vm.booted_in:.0f} s, every instance ready after {ready_in:.0f} s")
            yield Boot(vm, ready_in, after["bytes_served"] - before["bytes_served"])
    except vms.VMError as error:
        pytest.fail(str(error), pytrace=False)


def identity(vm: vms.VM) -> tuple[str, set[str]]:
    return vm.ssh("cat /etc/machine-id").stdout.strip(), vm.host_keys()


# -- the image file, offline ------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_raw(vm_bake: VMBake, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The image as a raw disk (sparse), to read every block of it; removed after the module."""
    raw = tmp_path_factory.mktemp("vm-raw") / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(vm_bake.disk), str(raw)], check=True)
    yield raw
    raw.unlink()


def blocks_holding(raw: Path, needles: dict[str, bytes]) -> dict[str, int]:
    """How many times each needle is in the disk's data, free blocks included (holes skipped)."""
    found = dict.fromkeys(needles, 0)
    longest = max(len(needle) for needle in needles.values())
    with raw.open("rb") as disk:
        fd, size, offset = disk.fileno(), os.fstat(disk.fileno()).st_size, 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # no data after offset
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            disk.seek(start)
            tail = b""
            while disk.tell() < end:
                chunk = tail + disk.read(min(16 << 20, end - disk.tell()))
                for name, needle in needles.items():
                    found[name] += chunk.count(needle)
                tail = chunk[-(longest - 1) :]
            offset = end
    return found


def test_no_block_of_the_image_holds_the_token(vm_bake: VMBake, origin: Origin, image_raw: Path) -> None:
    """Every block of the image file, free ones included: the token the bake had is nowhere."""
    assert "Executing Ansible:" in vm_bake.log and origin.token not in vm_bake.log
    assert blocks_holding(image_raw, {"token": origin.token.encode()}) == {"token": 0}


def test_the_image_file_is_sysprepped(vm_bake: VMBake, image_raw: Path, tmp_path: Path) -> None:
    """The image's filesystem, mounted read-only: no identity, no keys, no password, the BOM."""
    loop = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", str(image_raw)], capture_output=True, text=True, check=True
    )
    device, mount = loop.stdout.strip(), tmp_path / "root"
    mount.mkdir()
    try:
        subprocess.run(["partx", "--add", device], check=True)
        subprocess.run(["mount", "-o", "ro,noload", f"{device}p1", str(mount)], check=True)
        try:
            assert (mount / "etc/machine-id").read_text() == ""
            assert (mount / "etc/hostname").read_text() == "localhost\n"
            assert sorted(path.name for path in (mount / "etc/ssh").glob("ssh_host_*")) == []
            # The build key's public half is in no file (free blocks may keep copies of the
            # files that authorized it: a public key opens nothing once no file lists it).
            public = vm_bake.key.with_suffix(".pub").read_text().split()[1]
            grep = ["grep", "-rlF", "--devices=skip", public, str(mount)]
            holding = subprocess.run(grep, capture_output=True, text=True)
            assert holding.stdout == "" and holding.returncode == 1, holding
            assert not (mount / "var/lib/cloud/instance").exists()
            shadow = {
                line.split(":")[0]: line.split(":")[1] for line in (mount / "etc/shadow").read_text().splitlines()
            }
            assert shadow["debian"] in ("!", "*") and shadow["root"] in ("!", "*", "!*"), shadow
            assert (
                not (mount / "etc/comfybake/credentials").exists()
                or list((mount / "etc/comfybake/credentials").iterdir()) == []
            )
            bom = json.loads((mount / "etc/comfybake/lock.json").read_text())
            assert bom["bake"]["target"] == "test" and bom["bake"]["models_policy"] == "boot"
            assert [item["name"] for item in bom["instances"]] == ["a", "b"]
            assert list((mount / "var/lib/comfybake-gateway").glob("pki/**/*.key")) == []
        finally:
            subprocess.run(["umount", str(mount)], check=True)
    finally:
        subprocess.run(["partx", "--delete", device], check=False)
        subprocess.run(["losetup", "--detach", device], check=True)


def test_the_manifest_post_processor_records_the_vm_image(vm_bake: VMBake, root: Path) -> None:
    manifest = json.loads((root / "build" / "packer-manifest.json").read_text())
    build = next(item for item in manifest["builds"] if item["builder_type"] == "qemu")
    assert build["files"][0]["name"] == vm_bake.disk.name
    assert build["custom_data"]["org.comfybake.target"] == "test"
    assert build["custom_data"]["org.comfybake.models-policy"] == "boot"


def test_the_drivers_gating_left_the_driver_out(vm_bake: VMBake) -> None:
    """The test target has no GPU: nvidia_driver_install false, the role says so and does nothing."""
    assert "nvidia_driver_install is false: nothing to do" in " ".join(vm_bake.log.split())


# -- first boot -------------------------------------------------------------------------------


def test_first_boot_fetches_each_model_once_with_the_token(first_boot: Boot, origin: Origin) -> None:
    vm, state = first_boot.vm, origin.read()
    shown = vm.ssh("systemctl show comfybake-models.service -p Result -p ExecMainStatus -p ActiveState").stdout.split()
    assert shown == ["Result=success", "ExecMainStatus=0", "ActiveState=active"], shown
    # Every file of the manifest, the gated one (which needs the token) among them, once.
    assert first_boot.served == state["total"], (first_boot.served, state["total"])
    listed = {row["path"]: row for row in vm.json("sudo comfybake models ls --json")}
    for expected in state["expected"]:
        assert listed[expected["path"]]["state"] == "verified", listed.get(expected["path"])
    # A restart skips what is verified: no byte moves.
    vm.ssh("sudo systemctl restart comfybake-models.service")
    assert origin.read()["bytes_served"] - state["bytes_served"] == 0
    # The token reached the fetch as a credential only: not in the journal or any unit.
    journal = vm.ssh("sudo journalctl -b --no-pager -o cat").stdout
    units = vm.ssh(
        "sudo cat /etc/systemd/system/*.service /etc/systemd/system/*/*.conf 2>/dev/null", check=False
    ).stdout
    assert origin.token not in journal + units
    assert vm.ssh(f"sudo stat -c '%U %a' {vms.CREDENTIAL}").stdout.split() == ["root", "600"]


def test_every_instance_is_ready_under_its_hardened_unit(first_boot: Boot, origin: Origin) -> None:
    vm = first_boot.vm
    rows = vm.json("comfybake instances status --json")["instances"]
    assert sorted(row["name"] for row in rows) == ["a", "b"] and all(row["ready"] for row in rows), rows
    for unit in UNITS:
        assert vm.ssh(f"systemctl is-active {unit}").stdout.strip() == "active", unit
        report = vm.ssh(f"sudo systemd-analyze security --no-pager {unit}").stdout
        exposure = float(report.rsplit("Overall exposure level for", 1)[1].split(":")[1].split()[0])
        assert exposure <= MAX_EXPOSURE, f"{unit}: {exposure}"
    # No token in any ComfyUI process's environment.
    pids = [str(row["pid"]) for row in rows]
    environments = vm.ssh(f"sudo cat {' '.join(f'/proc/{pid}/environ' for pid in pids)}").stdout
    assert "PATH=" in environments, "no environment was read"
    assert origin.token not in environments


def test_the_gateway_answers_and_asks_for_credentials(first_boot: Boot, tmp_path: Path) -> None:
    vm = first_boot.vm
    ca = tmp_path / "ca.crt"
    ca.write_text(vm.ssh(f"sudo cat {GATEWAY_CA}").stdout)
    context = ssl.create_default_context(cafile=ca)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    port = vm.ports[GATEWAY_PORT]
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener.open(f"https://localhost:{port}/system_stats", timeout=30)
    assert refused.value.code == 401
    password = base64.b64encode(os.urandom(12)).decode()
    vm.ssh(f"sudo comfybake gateway users add alice --scope '*' --password-stdin <<< '{password}'")
    request = urllib.request.Request(f"https://localhost:{port}/system_stats")
    request.add_header("Authorization", "Basic " + base64.b64encode(f"alice:{password}".encode()).decode())
    with opener.open(request, timeout=30) as answer:
        assert answer.status == 200 and "devices" in json.loads(answer.read())


def test_the_build_key_is_refused(first_boot: Boot, vm_bake: VMBake) -> None:
    for user in (vms.USER, "root"):
        done = first_boot.vm.ssh("true", check=False, key=vm_bake.key, user=user)
        assert done.returncode == 255 and "Permission denied" in done.stderr, (user, done.stderr)


def test_each_boot_gets_its_own_machine_id_and_host_keys(first_boot: Boot, vm_bake: VMBake, tmp_path: Path) -> None:
    """The image has none (test_the_image_file_is_sysprepped); the first boot and a second boot of
    the same image each make their own, and neither has the build VM's host keys."""
    machine_id, host_keys = identity(first_boot.vm)
    key = vms.keypair(tmp_path, "owner-key-2")
    seed = vms.owner_seed(tmp_path / "seed", "comfybake-boot-2", key, "no-token")
    with vms.booted(vm_bake.disk, tmp_path / "vm", seed, key, vm_bake.accelerator) as second:
        machine_id_2, host_keys_2 = identity(second)
    assert len(machine_id) == 32 and len(machine_id_2) == 32 and machine_id != machine_id_2
    assert host_keys and host_keys_2 and not host_keys & host_keys_2
    assert not (host_keys | host_keys_2) & vm_bake.host_keys
