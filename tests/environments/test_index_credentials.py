"""Index credentials (`https://user:token@host/simple`) reach pip and uv and nothing else.

A real loopback package index that requires HTTP basic auth serves the uv wheel and a torch
stand-in. The role's installer installs uv from it with pip, the environment module builds an
environment from it with that uv, and the image's bill of materials is written from the locks,
all in one `ansible-playbook -vvv --diff` run on localhost. The canary password must not appear
in the play's output, in any file the run leaves (lock, release, tools venv, BOM), or in the
command line of any process while the index serves it: the index reads every process's
/proc/<pid>/cmdline while its client waits for each answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from harness import repos, wheelhouse
from harness.environments import GITHUB, node_repo
from harness.mockhub import MockHub
from harness.serve_models import serve_packages
from harness.tools import ROOT, venv_bin

CANARY = "idxCANARY7f3e9b1c"
USER = "builder"


def argv_holding(secret: str) -> list[str]:
    """The command line of every process whose argv holds `secret` (shown with the secret masked)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # the process ended
        if secret.encode() in argv:
            found.append(argv.replace(b"\0", b" ").decode(errors="replace").replace(secret, "<canary>"))
    return found


@dataclass
class PrivateIndex:
    hub: MockHub
    argv_leaks: list[str] = field(default_factory=list)  # command lines that held the canary


@pytest.fixture
def index(tmp_path: Path, wheels: Path) -> Iterator[PrivateIndex]:
    """A private index: every path needs basic auth USER:CANARY; each request records the command
    lines that held the canary while it was served."""
    folder = tmp_path / "index"
    folder.mkdir()
    wheelhouse.stand_in(folder, "torch", "2.13.0+cpu", {"torch/__init__.py": "__version__ = '2.13.0+cpu'\n"})
    for wheel in wheels.glob(f"uv-{wheelhouse.UV_VERSION}-*.whl"):
        (folder / wheel.name).symlink_to(wheel)
    private = PrivateIndex(MockHub())
    serve_packages(private.hub, folder)
    private.hub.basic_auth = (USER, CANARY)
    private.hub.observers.append(lambda _request: private.argv_leaks.extend(argv_holding(CANARY)))
    with private.hub:
        yield private


def files_holding(top: Path, secret: str) -> list[str]:
    return [
        str(path)
        for path in top.rglob("*")
        if path.is_file() and not path.is_symlink() and secret.encode() in path.read_bytes()
    ]


def test_index_credentials_never_print_persist_or_reach_a_command_line(
    index: PrivateIndex, fixture_repos: dict[str, repos.Repo], tmp_path: Path
) -> None:
    hub = index.hub
    private = f"{hub.url.replace('://', f'://{USER}:{CANARY}@')}/simple"
    # The observer sees command lines: a client that holds the URL in its argv is caught.
    ask = "import sys, urllib.request\ntry: urllib.request.urlopen(sys.argv[1], timeout=10)\nexcept OSError: pass"
    subprocess.run([sys.executable, "-c", ask, f"{hub.url}/simple/", private], check=True, timeout=30)
    assert index.argv_leaks, "the observer did not see the client's command line"
    index.argv_leaks.clear()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{hub.url}/simple/uv/", timeout=10)  # noqa: S310 - a loopback http URL
    assert refused.value.code == 401, "the index requires basic auth"

    envs = tmp_path / "envs"
    old_lock = envs / "old" / "current" / "comfybake.lock.json"
    old_lock.parent.mkdir(parents=True)
    # A lock written before locks dropped credentials: the BOM must not copy them.
    old_lock.write_text(json.dumps({"environment": "old", "torch": {"flavor": "cpu", "index_url": private}}))
    github = f"{Path(fixture_repos['ComfyUI'].path).parent.as_uri()}/"
    tools = tmp_path / "tools"
    # A node that writes down, at import (the import gate), the index settings in its environment.
    seen = tmp_path / "gate-environment.txt"
    witness = (
        f"import os\nwith open({str(seen)!r}, 'w') as out:\n"
        "    out.write(os.environ.get('UV_DEFAULT_INDEX', '') + os.environ.get('UV_INDEX', ''))\n"
    )
    node_url, node_commit = node_repo(
        tmp_path / "nodes", "Witness", {"__init__.py": witness + "NODE_CLASS_MAPPINGS = {}\n"}
    )
    comm = {
        "comfyui_repo": "https://github.com/comfyanonymous/ComfyUI.git",
        "comfyui_version": "v0.8.0",
        "torch_flavor": "cpu",
        "torch_index_url": private,  # an environment's own index: a loop item of the role's tasks
        "custom_nodes": [{"repo": node_url, "version": node_commit}],
    }
    # The role's settings, in a vars file after the role's defaults and vars: nothing on a command line.
    settings = {
        "comfyui_environments": {"comm": comm},
        "comfyui_environments_index_url": private,
        "comfyui_environments_extra_index_urls": [private],
        "comfyui_environments_torch_flavors": {"cpu": {"index_url": private, "packages": ["torch==2.13.0+cpu"]}},
        "comfyui_environments_python": sys.executable,
        "comfyui_environments_git_mirrors": {"https://github.com/comfyanonymous/": github, f"{GITHUB}/": github},
        "comfyui_user": "{{ omit }}",  # run_as unset: the gate runs as root, the test user
        "_comfyui_environments_tools": str(tools),
        "_comfyui_environments_wheelhouse": "",
        "_comfyui_environments_uv_cache": str(tmp_path / "uv-cache"),
        "_comfyui_environments_git_cache": str(tmp_path / "git-cache"),
        "_comfyui_envs_root": str(envs),
        "_comfyui_config_envs_dir": str(tmp_path / "config"),
        "_comfyui_converge_lock": str(tmp_path / "converge.lock"),  # the base role's
        "comfyui_converge_lock_timeout": 60,
        "comfyui_model_store": str(tmp_path / "models"),
        "comfyui_image_info": {"target": "test"},
        "_comfyui_image_bom_file": str(tmp_path / "lock.json"),
        "_comfyui_image_volatile_keys": ["built_at", "release", "warnings"],
    }
    role = ROOT / "roles" / "comfyui_environments"
    settings_file = tmp_path / "settings.yml"
    play = [
        {
            "hosts": "localhost",
            "gather_facts": False,
            # The base role's vars first: the role reads its files' state with its _comfyui_probe.
            "vars_files": [
                str(ROOT / "roles/comfyui/vars/main.yml"),
                str(role / "defaults/main.yml"),
                str(role / "vars/main.yml"),
                str(settings_file),
            ],
            "tasks": [
                {"name": "Installer", "ansible.builtin.include_tasks": str(role / "tasks/installer.yml")},
                {"name": "Configure", "ansible.builtin.include_tasks": str(role / "tasks/configure.yml")},
                {"name": "Build", "ansible.builtin.include_tasks": str(role / "tasks/build.yml")},
                {
                    "name": "Bill of materials",
                    "ansible.builtin.include_tasks": str(ROOT / "roles/comfyui_image/tasks/bom.yml"),
                    "vars": {"comfyui_environments": {"comm": comm, "old": {}}},
                },
            ],
        }
    ]  # fmt: skip
    settings_file.write_text(yaml.safe_dump(settings))
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play, sort_keys=False))
    (tmp_path / "templates").symlink_to(role / "templates")  # found beside the play, as in the role
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-local"),
        "ANSIBLE_NOCOLOR": "1",
        "TMPDIR": str(scratch),
    }
    argv = [venv_bin("ansible-playbook"), "-i", "localhost,", "-c", "local", "-vvv", "--diff"]
    argv += ["-e", f"ansible_python_interpreter={sys.executable}", str(tmp_path / "play.yml")]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]

    # The build went through the private index, authenticated.
    served = [r for r in hub.requests() if r.status == 200]
    assert {"/simple/uv/", "/simple/torch/"} <= {r.path for r in served}, [r.path for r in hub.requests()]
    redacted = f"{hub.url.replace('://', '://***@')}/simple"
    lock = json.loads((envs / "comm" / "current" / "comfybake.lock.json").read_text())
    bom = json.loads((tmp_path / "lock.json").read_text())
    assert bom["environments"]["comm"]["torch"] == lock["torch"]

    leaks = {
        "the play's output (-vvv --diff)": [line for line in output.splitlines() if CANARY in line][:3],
        "command lines while the index served": index.argv_leaks,
        "files of the environment": files_holding(envs / "comm", CANARY),
        "files of the tools venv": files_holding(tools, CANARY),
        "the import gate's environment": [seen.read_text()] if CANARY in seen.read_text() else [],
        "the bill of materials": [key for key, value in bom["environments"].items() if CANARY in json.dumps(value)],
    }
    assert {where: found for where, found in leaks.items() if found} == {}
    assert lock["torch"]["index_url"] == redacted
    assert bom["environments"]["old"]["torch"]["index_url"] == redacted
    assert list(scratch.iterdir()) == [], "pip's settings folder was left behind"
