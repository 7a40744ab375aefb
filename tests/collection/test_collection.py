"""comfybake as users consume it: the collection built with ansible-galaxy, checked by
ansible-test, installed into a project that is not this checkout and used there by FQCN."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tarfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from harness import collection
from harness.tools import ROOT, venv_bin
from harness.wheelhouse import CACHE

pytestmark = [pytest.mark.docker, pytest.mark.slow]

HOST = "comfybake-consumer"
MODEL = b"a model fetched by a user's own playbook"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return collection.build(tmp_path_factory.mktemp("dist"))


def test_the_collection_and_the_command_share_one_version() -> None:
    galaxy = yaml.safe_load((ROOT / "galaxy.yml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert galaxy["version"] == project["version"], "set the same version in galaxy.yml and pyproject.toml"


def test_the_artifact_holds_the_collection_and_nothing_else_of_the_checkout(artifact: Path) -> None:
    with tarfile.open(artifact) as archive:
        members = {member.name: member for member in archive.getmembers()}
    for wanted in (
        "MANIFEST.json",
        "meta/runtime.yml",
        "plugins/modules/models.py",
        "plugins/module_utils/fetch/engine.py",
        "plugins/module_utils/environment/builder.py",
        "plugins/module_utils/comfyui_log.py",
        "plugins/filter/instances.py",
        "plugins/filter/instance_layout.yml",
        "roles/comfyui_instances/tasks/main.yml",
        "roles/comfyui/files/comfybake.pyz",
        "playbooks/site.yml",
    ):
        assert wanted in members, wanted
    checkout_only = ("tests/", "molecule/", "packer/", "src/", "collections/", "inventories/", "group_vars/", "build/")
    assert [name for name in members if name.startswith(checkout_only)] == []
    assert "playbooks/group_vars" not in members  # the checkout's site settings
    assert [name for name, member in members.items() if member.issym() or member.islnk()] == []


def test_ansible_test_sanity_passes(artifact: Path, tmp_path: Path) -> None:
    installed = collection.install(artifact, tmp_path / "collections")
    output = collection.sanity(installed, CACHE / "ansible-test-home")
    assert re.search(r'Running sanity test "validate-modules"', output)
    assert "pylint" in output


@pytest.fixture
def consumer(artifact: Path, tmp_path: Path, docker_engine: None) -> Iterator[dict[str, str]]:
    """A user's own project with the collection installed, and a systemd host for it."""
    project = tmp_path / "project"
    project.mkdir()
    collection.install(artifact, project / "collections")
    (project / "ansible.cfg").write_text("[defaults]\ncollections_path = ./collections\ninventory = hosts.yml\n")
    (project / "hosts.yml").write_text(
        f"consumers:\n  hosts:\n    {HOST}:\n      ansible_connection: community.docker.docker\n"
    )
    (project / "site.yml").write_text(PLAYBOOK)
    (project / "model.json").write_text(json.dumps({"model": MODEL.decode()}))
    env = {key: value for key, value in os.environ.items() if not key.startswith("ANSIBLE_")}
    env.update(ANSIBLE_CONFIG=str(project / "ansible.cfg"), ANSIBLE_NOCOLOR="1", COMFYBAKE_LOCAL_NAME=HOST)
    env["PATH"] = f"{Path(venv_bin('ansible-playbook')).parent}{os.pathsep}{env['PATH']}"
    local = str(ROOT / "scripts" / "local.sh")
    subprocess.run([local, "down"], env=env, capture_output=True)
    collection.run(local, "start", cwd=project, env=env)
    yield {"project": str(project), **env}
    subprocess.run([local, "down"], env=env, capture_output=True)


# Modules, filters and roles by FQCN only: the project has no roles, library or filter folder.
PLAYBOOK = """\
---
- name: A user's own playbook
  hosts: consumers
  vars:
    comfyui_instances: []
    settings: {listen: 127.0.0.1, state_root: /var/lib/x, cache_root: /var/cache/x, config_root: /etc/x,
               code_root: /opt/x, log_dir: /var/log/x}
    layout: "{{ [{'name': 'a', 'environment': 'main', 'port': 8190, 'gpus': []}]
                | comfybake.core.instance_layout({'main': {}}, settings) }}"
  tasks:
    - name: Check a layout with the collection's filter
      ansible.builtin.assert:
        that:
          - layout | length == 1
          - layout[0].unit == 'comfyui@a.service'
          - "'--port' in layout[0].args"
        quiet: true

    - name: Run the collection's instances role (and the base role it depends on)
      ansible.builtin.include_role:
        name: comfybake.core.comfyui_instances

    - name: Put a model where the models module can fetch it
      ansible.builtin.copy:
        content: "{{ model }}"
        dest: /opt/consumer-origin.bin
        mode: "0644"

    - name: Fetch it with the collection's models module
      comfybake.core.models:
        store: /srv/comfybake/models  # the base role made it
        models:
          - url: file:///opt/consumer-origin.bin
            dest: checkpoints/consumer.bin
            sha256: "{{ model | hash('sha256') }}"
"""


def playbook(env: dict[str, str]) -> str:
    argv = [venv_bin("ansible-playbook"), "site.yml", "--extra-vars", "@model.json"]
    return collection.run(*argv, cwd=Path(env["project"]), env=env, timeout=900)


def test_a_users_own_project_converges_with_the_installed_collection_then_changes_nothing(
    consumer: dict[str, str],
) -> None:
    first = playbook(consumer)
    assert re.search(rf"{HOST}\s+: ok=\d+\s+changed=[1-9]\d*\s+unreachable=0\s+failed=0", first), first[-3000:]
    second = playbook(consumer)
    assert re.search(rf"{HOST}\s+: ok=\d+\s+changed=0\s+unreachable=0\s+failed=0", second), second[-3000:]
    stored = subprocess.run(
        ["docker", "exec", HOST, "sha256sum", "/srv/comfybake/models/checkpoints/consumer.bin"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert stored.stdout.split()[0] == hashlib.sha256(MODEL).hexdigest()
    version = subprocess.run(["docker", "exec", HOST, "comfybake", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == "comfybake 0.1.0", version
