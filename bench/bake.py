"""Benchmark of image bakes: the `test` target with models policy boot against bake, and a
re-bake with a warm wheel cache, side by side in one run.

Every bake is a real `packer build` of packer/targets/test.pkrvars.hcl (local base image, the
ComfyUI test double and fixture nodes, the fixture wheelhouse as a package index and the
models, all over https from an origin on this machine, tests/harness/bake.py). The warm
re-bake mounts a uv cache from this machine into the bake container (`docker_volumes`), filled
by the bake before it; the cache never enters the image.
Nothing here asserts a time: it measures.

    .venv/bin/python bench/bake.py             # one round
    .venv/bin/python bench/bake.py --rounds 3  # medians of three
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness import bake as baking  # noqa: E402 - after the path set-up

MB = 1_000_000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, int]]] = {"boot": [], "bake": [], "boot, warm uv cache": []}
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
        for version in ("bench-boot", "bench-bake", "bench-fill", "bench-warm"):
            baking.docker("rmi", f"comfybake/test:{version}", check=False)

    rows = {
        name: (statistics.median(t for t, _ in runs), statistics.median(s for _, s in runs))
        for name, runs in results.items()
    }
    boot_time, boot_size = rows["boot"]
    print(f"\nmedians of {args.rounds} round(s), packer build -only=comfybake.docker.comfybake, target test")
    print(f"{'bake':<22}{'time':>9}{'image':>10}{'time vs boot':>14}{'size vs boot':>14}")
    for name, (seconds, size) in rows.items():
        print(f"{name:<22}{seconds:>8.1f}s{size / MB:>8.0f}MB{seconds / boot_time:>13.2f}x{size / boot_size:>13.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
