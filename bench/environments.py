"""Benchmark of environment builds: comfybake (uv, one resolution) against pip, side by side.

Every contender builds the same environment from the same local wheelhouse, with no network:
ComfyUI's requirements (the list real ComfyUI ships, on the ComfyUI test double's code), torch
2.13.0+cpu, and the fixture custom nodes Basic and SixOld. The baselines are what operators do
today: pip, one `requirements.txt` at a time (the seeds' way), and pip with everything in one
resolution. comfybake also checks hashes, runs `uv pip check` and the import gate, and
writes a lock; that work is inside its times. Nothing here asserts a time: it measures.

    .venv/bin/python bench/environments.py            # one round
    .venv/bin/python bench/environments.py --rounds 3 # medians of three

The wheelhouse (about 0.9 GB) is downloaded once with `pip download` into the test cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness import repos, wheelhouse  # noqa: E402 - after the path set-up
from harness.environments import engine  # noqa: E402

# ComfyUI's requirements.txt (v0.8 series), the set every environment installs.
COMFYUI_REQUIREMENTS = """\
comfyui-frontend-package
comfyui-workflow-templates
comfyui-embedded-docs
torch
torchsde
torchvision
torchaudio
numpy>=1.25.0
einops
transformers>=4.50.3
tokenizers>=0.13.3
sentencepiece
safetensors>=0.4.2
aiohttp>=3.11.8
yarl>=1.18.0
pyyaml
Pillow
scipy
tqdm
psutil
alembic
SQLAlchemy>=2.0.0
filelock
av>=16.0.0
requests
simpleeval>=1.0.0
blake3
kornia>=0.7.1
spandrel
pydantic~=2.0
pydantic-settings~=2.0
"""
NODES = ("ComfyUI-Comfybake-Basic", "ComfyUI-Comfybake-SixOld")
ROWS: list[tuple[str, str, str]] = []


def row(what: str, value: str, note: str = "") -> None:
    ROWS.append((what, value, note))
    print(f"{what:<52} {value:>10}  {note}", flush=True)


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def sh(*args: str | Path, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed: {done.stderr[-2000:]}")
    return done


def bench_comfyui(work: Path, fixtures: dict[str, repos.Repo]) -> Path:
    """The test double's repository with ComfyUI's real requirements committed on top (tag bench)."""
    clone = work / "ComfyUI-work"
    repos.git(work, "clone", "--quiet", fixtures["ComfyUI"].path, str(clone))
    (clone / "requirements.txt").write_text(COMFYUI_REQUIREMENTS)
    repos.git(clone, "commit", "--quiet", "--no-gpg-sign", "-am", "Real requirements")
    repos.git(clone, "tag", "bench")
    bare = work / "mirrors" / "ComfyUI.git"
    repos.git(work, "clone", "--quiet", "--bare", str(clone), str(bare))
    return bare


def pip_env(cache: Path) -> dict[str, str]:
    # No pip configuration of this machine (extra indexes, constraints): the wheelhouse only.
    return {
        **os.environ,
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_CACHE_DIR": str(cache),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }


def pip_baseline(work: Path, wheels: Path, tree: Path, one_pass: bool) -> float:
    """A venv built with pip from the same checkout; one requirements file at a time, or all at once."""
    venv = work / ("pip-one-pass" if one_pass else "pip-per-node")
    cache = work / f"{venv.name}-cache"
    for path in (venv, cache):
        shutil.rmtree(path, ignore_errors=True)
    env = pip_env(cache)
    pip = [venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-index", "--find-links", wheels]
    files = [tree / "requirements.txt", *(tree / "custom_nodes" / n / "requirements.txt" for n in NODES)]

    def build() -> None:
        sh(sys.executable, "-m", "venv", venv)
        sh(*pip, wheelhouse.TORCH, env=env)
        if one_pass:
            constraints = work / "constraints.txt"
            constraints.write_text(wheelhouse.TORCH + "\n")
            sh(*pip, "-c", constraints, *(arg for f in files for arg in ("-r", f)), env=env)
        else:
            for requirements in files:
                sh(*pip, "-r", requirements, env=env)

    return timed(build)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1, help="repeat every contender (medians are printed)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()

    print("preparing the wheelhouse (cached) and the repositories ...", flush=True)
    requirements = tuple(line for line in COMFYUI_REQUIREMENTS.splitlines() if line and line != "torch")
    wheels = wheelhouse.wheelhouse(requirements=(*wheelhouse.REQUIREMENTS, *requirements))
    work = Path(tempfile.mkdtemp(prefix="comfybake-bench-env-", dir=args.work))
    fixtures = repos.build(work / "fixtures")
    comfyui = bench_comfyui(work, fixtures)
    count = len(list(wheels.glob("*.whl")))
    size = sum(p.stat().st_size for p in wheels.glob("*.whl"))
    print(f"wheelhouse: {count} wheels, {size / 1e9:.2f} GB; work in {work}", flush=True)

    nodes_mirror = Path(fixtures["ComfyUI-Comfybake-Basic"].path).parent.as_uri() + "/"

    def spec(name: str, uv_cache: Path, nodes: tuple[str, ...] = NODES) -> engine.Spec:
        return engine.Spec(
            name=name,
            root=str(work / "envs" / name),
            comfyui=engine.Source("ComfyUI", "https://github.com/comfyanonymous/ComfyUI.git", "bench"),
            uv=shutil.which("uv", path=str(Path(sys.executable).parent)) or "uv",
            custom_nodes=[
                engine.Source(n, f"https://github.com/comfybake-fixtures/{n}.git", fixtures[n].commits["initial"])
                for n in nodes
            ],
            torch_flavor="cpu",
            torch_packages=[wheelhouse.TORCH],
            wheelhouse=str(wheels),
            cache_dir=str(uv_cache),
            git_cache=str(work / "git-cache"),
            git_mirrors={
                "https://github.com/comfyanonymous/": f"{comfyui.parent.as_uri()}/",
                "https://github.com/comfybake-fixtures/": nodes_mirror,
            },
            python=sys.executable,
        )

    times: dict[str, list[float]] = {k: [] for k in ("cold", "warm", "noop", "per-node", "one-pass")}
    tree = None
    for round_ in range(args.rounds):
        cache = work / f"uv-cache-{round_}"
        cold = spec(f"cold{round_}", cache)
        times["cold"].append(timed(lambda s=cold: engine.Builder(s).run()))
        warm = spec(f"warm{round_}", cache)
        times["warm"].append(timed(lambda s=warm: engine.Builder(s).run()))
        times["noop"].append(timed(lambda s=warm: engine.Builder(s).run()))
        tree = Path(warm.root) / "current" / "ComfyUI"
        times["per-node"].append(pip_baseline(work, wheels, tree, one_pass=False))
        times["one-pass"].append(pip_baseline(work, wheels, tree, one_pass=True))
        shutil.rmtree(cache, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    lock = json.loads((Path(spec("warm0", work).root) / "current" / "comfybake.lock.json").read_text())
    print()
    row("environment", f"{len(lock['packages'])} pkgs", "ComfyUI requirements + torch 2.13.0+cpu + Basic + SixOld")
    row("pip, one requirements.txt at a time (baseline)", f"{med['per-node']:.1f} s", "no lock, no check, no gate")
    row("pip, one resolution with torch as constraint", f"{med['one-pass']:.1f} s", "no lock, no check, no gate")
    row(
        "comfybake, cold uv cache",
        f"{med['cold']:.1f} s",
        f"{med['per-node'] / med['cold']:.2f}x faster than pip per node",
    )
    row(
        "comfybake, warm uv cache (a re-bake)",
        f"{med['warm']:.1f} s",
        f"{med['per-node'] / med['warm']:.2f}x faster than pip per node",
    )
    row("comfybake, converged re-run", f"{med['noop'] * 1000:.0f} ms", f"{med['per-node'] / med['noop']:.0f}x")
    row(
        "ratio pip one-pass / comfybake cold",
        f"{med['one-pass'] / med['cold']:.2f}x",
        "same resolution work, uv vs pip",
    )

    # The conflict a per-node install hides: SixOld's requirements.txt, then SixNew's.
    pip_conflict = work / "pip-conflict"
    env = pip_env(work / "pip-conflict-cache")
    sh(sys.executable, "-m", "venv", pip_conflict)
    pip = [pip_conflict / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-index", "--find-links", wheels]
    codes = [sh(*pip, req, env=env, check=False).returncode for req in ("six==1.16.0", "six==1.17.0")]
    row("pip per node, SixOld then SixNew", f"exit {max(codes)}", "six 1.17.0 wins silently; SixOld breaks at import")
    failing = spec("conflict", work / "uv-cache-conflict", ("ComfyUI-Comfybake-SixOld", "ComfyUI-Comfybake-SixNew"))
    started = time.perf_counter()
    try:
        engine.Builder(failing).run()
        outcome = "built (unexpected)"
    except engine.EnvError as error:
        outcome = "fails: " + str(error).splitlines()[1][:60]
    row("comfybake, SixOld + SixNew", f"{time.perf_counter() - started:.1f} s", outcome)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
