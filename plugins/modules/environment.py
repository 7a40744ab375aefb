#!/usr/bin/python
# Copyright: comfybake contributors
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""Ansible module: build one ComfyUI environment as a checked release and switch to it atomically."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: environment
short_description: Build a ComfyUI environment (ComfyUI, custom nodes, venv) as a checked release
description:
  - Brings one environment in line with its inputs, which are ComfyUI from git at a tag or full commit,
    custom nodes each pinned to a full commit, and a venv of its own.
  - All requirements (the torch flavour, ComfyUI's C(requirements.txt), every node's
    C(requirements.txt) and O(pip_packages)) are resolved together in one C(uv pip compile),
    with the torch packages and O(pip_constraints) held as constraints. A conflict fails before
    anything is installed and names the nodes and packages involved; a node asking for another
    torch fails with a message naming it.
  - A changed environment is built as a new release next to the live one, installed from the
    resolved set (with hashes), run through O(hook), C(uv pip check) and ComfyUI's
    C(--quick-test-for-ci --cpu) import gate, and only then made live by replacing the
    C(current) link in one rename. A failed build is removed and the live release keeps serving.
  - Each release holds C(comfybake.lock.json) (ComfyUI and node commits, the torch flavour,
    every installed package with version and hashes) and C(requirements.lock.txt). When the
    inputs match the live release's lock, nothing is fetched or built; the live work trees are
    checked for local modifications, which fail the task rather than being overwritten.
version_added: "0.1.0"
author: comfybake contributors (@comfybake)
extends_documentation_fragment:
  - comfybake.core.attributes
requirements:
  - python >= 3.10
  - git
  - uv
attributes:
  check_mode:
    support: full
    details:
      Resolves the pins (tags with C(git ls-remote) when not cached) and reports whether a build is due;
      builds nothing.
  diff_mode:
    support: full
    details: Shows the live and the wanted ComfyUI commit, node commits and torch pins.
  idempotent:
    support: full
    details: Inputs equal to the live release's lock report no change and fetch nothing.
options:
  name:
    description: Name of the environment (letters, digits, C(.), C(_) and C(-)).
    type: str
    required: true
  root:
    description: Folder of the environment; releases go to C(<root>/releases), the live one is C(<root>/current).
    type: path
    required: true
  comfyui:
    description: ComfyUI's repository and version (a tag or a full commit; a branch only with O(allow_moving_refs)).
    type: dict
    required: true
    suboptions: &source
      repo:
        description: Git URL. URLs with embedded credentials are refused.
        type: str
        required: true
      version:
        description: A full 40-hex commit; for ComfyUI also a tag; a branch only with O(allow_moving_refs).
        type: str
        required: true
      name:
        description: Directory name under C(custom_nodes/); defaults to the repository name.
        type: str
  custom_nodes:
    description: Custom nodes, each cloned into C(ComfyUI/custom_nodes/<name>) at its commit.
    type: list
    elements: dict
    default: []
    suboptions: *source
  allow_moving_refs:
    description: Accept branches (and tags for nodes); the environment then follows them on every run.
    type: bool
    default: false
  allowed_repos:
    description: When not empty, custom node repositories must start with one of these prefixes.
    type: list
    elements: str
    default: []
  torch_flavor:
    description: Name of the torch flavour, recorded in the lock.
    type: str
    default: ""
  torch_packages:
    description:
      - Exact pins (C(torch==2.13.0+cpu)) or wheel files, installed and held as constraints.
    type: list
    elements: str
    default: []
  torch_index_url:
    description: Index that serves the torch packages; it takes priority over O(index_url).
    type: str
  protected_packages:
    description: Packages no node may change, besides torch, torchvision, torchaudio, xformers and O(torch_packages).
    type: list
    elements: str
    default: []
  pip_constraints:
    description: Extra constraints (C(numpy<2)) applied to the whole resolution.
    type: list
    elements: str
    default: []
  pip_packages:
    description: Extra requirements installed with the rest (what a node forgot to declare).
    type: list
    elements: str
    default: []
  allow_source_builds:
    description: Allow building sdists; by default only wheels are installed.
    type: bool
    default: false
  allow_direct_references:
    description: Accept URL and path requirements in requirement files.
    type: bool
    default: false
  hook:
    description:
      - Script on the host run after install and before the checks, with C(VIRTUAL_ENV) and
        C(COMFYUI_PATH) set.
    type: path
  revision:
    description: Any string; changing it forces a rebuild with unchanged pins (to pick up new wheels).
    type: str
    default: ""
  python:
    description: Interpreter the venv is built on.
    type: str
    default: python3
  uv:
    description: Path of the uv executable.
    type: path
    required: true
  index_url:
    description: Default package index (credentials in it are never printed).
    type: str
  extra_index_urls:
    description: More indexes, searched before O(index_url).
    type: list
    elements: str
    default: []
  find_links:
    description: Local folders of wheels searched as well.
    type: list
    elements: path
    default: []
  wheelhouse:
    description: Folder of wheels on the host; when set, no index is used at all (offline installs).
    type: path
  cache_dir:
    description: uv's cache (wheels are hard-linked from it into each release).
    type: path
  git_cache:
    description: Folder of bare repositories, one per URL; defaults to C(<root>/.git-cache).
    type: path
  git_mirrors:
    description: URL prefix rewrites (git C(insteadOf)), original prefix to mirror prefix.
    type: dict
    default: {}
  ca_bundle:
    description: CA bundle for git and uv (sites behind a TLS-intercepting proxy).
    type: path
  extra_model_paths:
    description: C(extra_model_paths.yaml) passed to the import gate.
    type: path
  user_files:
    description:
      - Files copied into the import gate's user directory, relative path to a file on the host
        (ComfyUI-Manager's locked-down C(config.ini), so the gate runs it offline).
    type: dict
    default: {}
  import_gate:
    description: Run C(main.py --quick-test-for-ci --cpu) and fail when a configured custom node does not import.
    type: bool
    default: true
  gate_timeout:
    description: Seconds the import gate may take.
    type: int
    default: 900
  run_as:
    description: User that runs the import gate (the service account, so the code tree is read-only to it).
    type: str
  keep_releases:
    description: Releases kept, the live one included.
    type: int
    default: 2
"""

EXAMPLES = r"""
- name: Build the comm environment
  comfybake.core.environment:
    name: comm
    root: /opt/comfybake/envs/comm
    uv: /opt/comfybake/tools/bin/uv
    comfyui:
      repo: https://github.com/comfyanonymous/ComfyUI.git
      version: v0.8.0
    custom_nodes:
      - repo: https://github.com/pythongosssss/ComfyUI-Custom-Scripts.git
        version: 0123456789abcdef0123456789abcdef01234567
    torch_flavor: cu128
    torch_index_url: https://download.pytorch.org/whl/cu128
    torch_packages: [torch==2.13.0+cu128, torchvision==0.28.0+cu128]
    run_as: comfybake

- name: Build offline from a wheelhouse and git mirrors
  comfybake.core.environment:
    name: aua-sp
    root: /opt/comfybake/envs/aua-sp
    uv: /opt/comfybake/tools/bin/uv
    comfyui: {repo: https://github.com/comfyanonymous/ComfyUI.git, version: v0.8.0}
    torch_packages: [torch==2.13.0+cpu]
    wheelhouse: /var/cache/comfybake/wheelhouse
    git_mirrors:
      https://github.com/: https://git.mirror.internal/github/
"""

RETURN = r"""
release:
  description: Path of the live release after the run.
  returned: always
  type: str
  sample: /opt/comfybake/envs/comm/releases/4846d2df81d27bd5
previous:
  description: Release that was live before, when the run switched.
  returned: changed
  type: str
fingerprint:
  description: SHA-256 of the inputs that shape the build.
  returned: always
  type: str
lock:
  description:
    - Contents of C(comfybake.lock.json) of the live release (ComfyUI and node commits, torch
      flavour), with C(packages) replaced by the number of installed packages.
  returned: success
  type: dict
warnings_env:
  description: Notes from the build, such as custom nodes with an C(install.py) that was not run.
  returned: always
  type: list
  elements: str
timings:
  description: Seconds spent in each phase.
  returned: always
  type: dict
  sample: {resolve: 0.07, install: 4.1, import gate: 2.3}
"""

import traceback
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.comfybake.core.plugins.module_utils.environment import (
    Builder,
    EnvError,
    Source,
    Spec,
    node_name_from_repo,
)

SOURCE_SPEC = {
    "repo": {"type": "str", "required": True},
    "version": {"type": "str", "required": True},
    "name": {"type": "str"},
}

ARGUMENT_SPEC = {
    "name": {"type": "str", "required": True},
    "root": {"type": "path", "required": True},
    "comfyui": {"type": "dict", "required": True, "options": SOURCE_SPEC},
    "custom_nodes": {"type": "list", "elements": "dict", "default": [], "options": SOURCE_SPEC},
    "allow_moving_refs": {"type": "bool", "default": False},
    "allowed_repos": {"type": "list", "elements": "str", "default": []},
    "torch_flavor": {"type": "str", "default": ""},
    "torch_packages": {"type": "list", "elements": "str", "default": []},
    "torch_index_url": {"type": "str"},
    "protected_packages": {"type": "list", "elements": "str", "default": []},
    "pip_constraints": {"type": "list", "elements": "str", "default": []},
    "pip_packages": {"type": "list", "elements": "str", "default": []},
    "allow_source_builds": {"type": "bool", "default": False},
    "allow_direct_references": {"type": "bool", "default": False},
    "hook": {"type": "path"},
    "revision": {"type": "str", "default": ""},
    "python": {"type": "str", "default": "python3"},
    "uv": {"type": "path", "required": True},
    "index_url": {"type": "str"},
    "extra_index_urls": {"type": "list", "elements": "str", "default": []},
    "find_links": {"type": "list", "elements": "path", "default": []},
    "wheelhouse": {"type": "path"},
    "cache_dir": {"type": "path"},
    "git_cache": {"type": "path"},
    "git_mirrors": {"type": "dict", "default": {}},
    "ca_bundle": {"type": "path"},
    "extra_model_paths": {"type": "path"},
    "user_files": {"type": "dict", "default": {}},
    "import_gate": {"type": "bool", "default": True},
    "gate_timeout": {"type": "int", "default": 900},
    "run_as": {"type": "str"},
    "keep_releases": {"type": "int", "default": 2},
}


def _source(item: dict[str, Any], default_name: str) -> Source:
    return Source(name=item.get("name") or default_name, repo=item["repo"], version=str(item["version"]).strip())


def spec_from(params: dict[str, Any]) -> Spec:
    return Spec(
        name=params["name"],
        root=params["root"],
        comfyui=_source(params["comfyui"], "ComfyUI"),
        uv=params["uv"],
        custom_nodes=[_source(item, node_name_from_repo(item["repo"])) for item in params["custom_nodes"]],
        **{key: params[key] for key in ARGUMENT_SPEC if key not in {"name", "root", "comfyui", "uv", "custom_nodes"}},
    )


def main() -> None:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    result: dict[str, Any] = {"changed": False, "release": None, "fingerprint": None, "warnings_env": [], "timings": {}}
    builder = None
    try:
        builder = Builder(spec_from(module.params))
        outcome = builder.run(check_mode=module.check_mode)
    except EnvError as error:
        if builder is not None:
            result.update(warnings_env=builder.warnings, timings=builder.timings)
        module.fail_json(msg=str(error), **result)
    except Exception as error:  # noqa: BLE001 - unexpected: report with a traceback
        module.fail_json(msg=f"unexpected error: {error}", exception=traceback.format_exc(), **result)
    result.update(
        changed=outcome.changed,
        release=outcome.release,
        fingerprint=outcome.fingerprint,
        warnings_env=outcome.warnings,
        timings=outcome.timings,
    )
    if not module.check_mode:
        # The package list can run to hundreds of entries: the lock file has it, the result its count.
        result["lock"] = {**outcome.lock, "packages": len(outcome.lock.get("packages", []))}
    if outcome.previous:
        result["previous"] = outcome.previous
    if module._diff and outcome.diff:
        result["diff"] = outcome.diff
    for warning in outcome.warnings:
        module.warn(warning)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
