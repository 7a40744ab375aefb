"""Build the fixture git repositories: the ComfyUI test double and the fixture custom nodes.

CI cannot reach GitHub, so tests (and the offline main job) install "ComfyUI" and custom
nodes from local bare repositories built here from `tests/comfyui_double/` and
`tests/fixtures/nodes/`. Authors and dates are fixed, so every build yields the same commit
SHAs. Run `python -m harness.repos DEST` (from `tests/`) to build them by hand; it prints
the JSON manifest also written to `DEST/fixtures.json`.

Layout under DEST:
  ComfyUI.git             tags v0.8.0 and v0.8.1, branch master one commit past v0.8.1
  nodes/<Name>.git        branch main: "initial", then "update" (Basic's update adds a class)
  fixtures.json           names -> {url, path, branch, commits: {label: sha}}
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
DOUBLE_SOURCE = TESTS / "comfyui_double"
NODES_SOURCE = TESTS / "fixtures" / "nodes"

# (tag, version) of each release of the double, oldest first.
COMFYUI_RELEASES = (("v0.8.0", "0.8.0"), ("v0.8.1", "0.8.1"))
COMFYUI_DEV_VERSION = "0.8.2.dev0"
MODEL_FOLDERS = (
    "checkpoints", "configs", "loras", "vae", "text_encoders", "diffusion_models", "clip_vision",
    "style_models", "embeddings", "diffusers", "vae_approx", "controlnet", "gligen",
    "upscale_models", "hypernetworks", "photomaker", "classifiers", "model_patches",
    "audio_encoders", "latent_upscale_models",
)  # fmt: skip

_GIT_ENV = {
    "GIT_AUTHOR_NAME": "comfybake fixtures",
    "GIT_AUTHOR_EMAIL": "fixtures@comfybake.invalid",
    "GIT_COMMITTER_NAME": "comfybake fixtures",
    "GIT_COMMITTER_EMAIL": "fixtures@comfybake.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
}


@dataclass
class Repo:
    """One fixture repository: where it is and which commit each label names."""

    name: str
    path: str
    url: str
    branch: str
    commits: dict[str, str] = field(default_factory=dict)


def git(cwd: Path, *args: str, when: int = 0) -> str:
    """Run git with a fixed identity and date (seconds after 2026-01-01) for stable SHAs."""
    stamp = f"{1767225600 + when} +0000"
    env = {**os.environ, **_GIT_ENV, "GIT_AUTHOR_DATE": stamp, "GIT_COMMITTER_DATE": stamp}
    done = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {cwd}: {done.stderr.strip()}")
    return done.stdout.strip()


def _commit(work: Path, message: str, when: int) -> str:
    git(work, "add", "--all")
    git(work, "commit", "--quiet", "--no-gpg-sign", "-m", message, when=when)
    return git(work, "rev-parse", "HEAD")


def _publish(work: Path, bare: Path, name: str, branch: str, commits: dict[str, str]) -> Repo:
    if bare.exists():
        shutil.rmtree(bare)
    bare.parent.mkdir(parents=True, exist_ok=True)
    git(work.parent, "clone", "--quiet", "--bare", str(work), str(bare))
    return Repo(name=name, path=str(bare), url=bare.as_uri(), branch=branch, commits=commits)


def _copy_source(source: Path, work: Path) -> None:
    shutil.copytree(source, work, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "user"))


def build_comfyui(dest: Path, scratch: Path) -> Repo:
    work = scratch / "ComfyUI"
    work.mkdir()
    git(work, "init", "--quiet", "--initial-branch=master")
    _copy_source(DOUBLE_SOURCE, work)
    for folder in MODEL_FOLDERS:
        (work / "models" / folder).mkdir(parents=True, exist_ok=True)
        (work / "models" / folder / f"put_{folder}_here").write_text("")
    commits: dict[str, str] = {}
    for step, (tag, version) in enumerate(COMFYUI_RELEASES):
        (work / "comfyui_version.py").write_text(f'__version__ = "{version}"\n')
        commits[tag] = _commit(work, f"ComfyUI test double {version}", when=step * 3600)
        git(work, "tag", "--no-sign", "-a", tag, "-m", f"v{version}", when=step * 3600)
    (work / "comfyui_version.py").write_text(f'__version__ = "{COMFYUI_DEV_VERSION}"\n')
    commits["master"] = _commit(work, "Work after the last release", when=len(COMFYUI_RELEASES) * 3600)
    return _publish(work, dest / "ComfyUI.git", "ComfyUI", "master", commits)


def build_node(dest: Path, scratch: Path, source: Path) -> Repo:
    work = scratch / source.name
    work.mkdir()
    git(work, "init", "--quiet", "--initial-branch=main")
    _copy_source(source, work)
    (work / "README.md").write_text(f"# {source.name}\n\ncomfybake fixture custom node.\n")
    commits = {"initial": _commit(work, "Initial version", when=0)}
    if source.name == "ComfyUI-Comfybake-Basic":
        init = work / "__init__.py"
        init.write_text(
            init.read_text()
            + "\n\nclass ComfybakeAddedLater(ComfybakeEcho):\n    pass\n\n\n"
            + 'NODE_CLASS_MAPPINGS["ComfybakeAddedLater"] = ComfybakeAddedLater\n'
        )
    else:
        (work / "README.md").write_text(f"# {source.name}\n\ncomfybake fixture custom node, updated.\n")
    commits["update"] = _commit(work, "Update", when=3600)
    return _publish(work, dest / "nodes" / f"{source.name}.git", source.name, "main", commits)


def build(dest: Path) -> dict[str, Repo]:
    """Build every fixture repository under `dest` and write `dest/fixtures.json`."""
    dest = dest.resolve()
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="comfybake-fixtures-") as tmp:
        scratch = Path(tmp)
        repos = {"ComfyUI": build_comfyui(dest, scratch)}
        for source in sorted(p for p in NODES_SOURCE.iterdir() if p.is_dir()):
            repos[source.name] = build_node(dest, scratch, source)
    (dest / "fixtures.json").write_text(json.dumps({k: asdict(v) for k, v in repos.items()}, indent=2) + "\n")
    return repos


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m harness.repos DEST", file=sys.stderr)
        return 2
    repos = build(Path(argv[0]))
    print(json.dumps({k: asdict(v) for k, v in repos.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
