"""Benchmark of image bakes: the `test` target with models policy boot against bake, a re-bake
with a warm wheel cache, and the same target as a VM image (the qemu source), side by side in
one run, with the VM image's boot-to-ready time.

Every bake is a real `packer build` of packer/targets/test.pkrvars.hcl (local base image, the
ComfyUI test double and fixture nodes, the fixture wheelhouse as a package index and the
models, all over https from an origin on this machine, tests/harness/bake.py). The warm
re-bake mounts a uv cache from this machine into the bake container (`docker_volumes`), filled
by the bake before it; the cache never enters the image. The VM bake boots the local base disk
(scripts/base-vm.sh) under KVM, or TCG where KVM cannot boot a kernel (it prints which), and
its image is then booted with a fresh seed until every instance is ready (tests/harness/vm.py).
Nothing here asserts a time: it measures.

    .venv/bin/python bench/bake.py             # one round
    .venv/bin/python bench/bake.py --rounds 3  # medians of three
    .venv/bin/python bench/bake.py --no-vm     # containers only
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness import bake as baking  # noqa: E402 - after the path set-up
from harness import vm as vms  # noqa: E402

MB = 1_000_000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-vm", dest="vm", action="store_false", help="leave out the VM image")
    args = parser.parse_args()
    results: dict[str, list[tuple[float, int]]] = {"boot": [], "bake": [], "boot, warm uv cache": []}
    if args.vm:
        results["boot, VM image (qcow2)"] = []
    ready: list[float] = []
    with tempfile.TemporaryDirectory(prefix="comfybake-bench-bake-") as work:
        with baking.origin(Path(work)) as origin:
            for round_ in range(args.rounds):
                cache = Path(work) / f"uv-cache-{round_}"
                cache.mkdir()
                for policy in ("boot", "bake"):
                    done = baking.bake(origin, policy, f"bench-{policy}")
                    size = baking.image_size(done.image)
                    results[policy].append((done.seconds, size))
                    print(f"round {round_ + 1}: {policy}: {done.seconds:.1f} s, {size / MB:.0f} MB")
                # The warm re-bake: one bake fills the mounted cache, the next one uses it.
                mount = {str(cache): "/var/cache/comfybake/uv"}
                baking.bake(origin, "boot", "bench-fill", volumes=mount)
                done = baking.bake(origin, "boot", "bench-warm", volumes=mount)
                results["boot, warm uv cache"].append((done.seconds, baking.image_size(done.image)))
                print(f"round {round_ + 1}: boot, warm uv cache: {done.seconds:.1f} s")
                shutil.rmtree(cache, ignore_errors=True)
                if args.vm:
                    vm_bake, seconds_to_ready = bake_and_boot_vm(origin, Path(work) / f"vm-{round_}")
                    size = vm_bake.disk.stat().st_blocks * 512  # the qcow2's blocks on disk
                    results["boot, VM image (qcow2)"].append((vm_bake.seconds, size))
                    ready.append(seconds_to_ready)
                    accel = vm_bake.accelerator
                    print(f"round {round_ + 1}: VM image: {vm_bake.seconds:.1f} s, {size / MB:.0f} MB, "
                          f"ready {seconds_to_ready:.1f} s after boot ({accel.name}: {accel.why})")  # fmt: skip
                    shutil.rmtree(vm_bake.disk.parent)
        for version in ("bench-boot", "bench-bake", "bench-fill", "bench-warm"):
            baking.docker("rmi", f"comfybake/test:{version}", check=False)

    rows = {
        name: (statistics.median(t for t, _ in runs), statistics.median(s for _, s in runs))
        for name, runs in results.items()
    }
    boot_time, boot_size = rows["boot"]
    sources = "docker" + (", the VM row qemu" if args.vm else "")
    print(f"\nmedians of {args.rounds} round(s), packer build of the test target (source {sources})")
    print(f"{'bake':<22}{'time':>9}{'image':>10}{'time vs boot':>14}{'size vs boot':>14}")
    for name, (seconds, size) in rows.items():
        print(f"{name:<22}{seconds:>8.1f}s{size / MB:>8.0f}MB{seconds / boot_time:>13.2f}x{size / boot_size:>13.2f}x")
    if ready:
        print(f"VM image, first boot to every instance ready: {statistics.median(ready):.1f} s (median)")
    return 0


def bake_and_boot_vm(origin: baking.Origin, folder: Path) -> tuple[baking.VMBake, float]:
    """The test target's VM image, then its first boot with a fresh seed until every instance is
    ready: (the bake, seconds from starting QEMU to ready)."""
    folder.mkdir()
    done = baking.bake_vm(origin, folder, "bench-vm")
    key = vms.keypair(folder, "owner-key")
    seed = vms.owner_seed(folder / "seed", "comfybake-bench", key, origin.token)
    with vms.booted(done.disk, folder / "boot", seed, key, done.accelerator) as vm:
        vms.wait_ready(vm)
        return done, time.monotonic() - vm.started


if __name__ == "__main__":
    sys.exit(main())
