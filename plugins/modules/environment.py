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
  - The environment is passed as written in C(comfyui_environments) (O(environment)); the module is
    the one reader of its keys, and the other options are the site-wide settings.
  - All requirements (the torch flavour, ComfyUI's C(requirements.txt), every node's
    C(requirements.txt) and the environment's C(pip_packages)) are resolved together in one
    C(uv pip compile), with the torch packages and C(pip_constraints) held as constraints. A conflict fails before
    anything is installed and names the nodes and packages involved; a node asking for another
    torch fails with a message naming it.
  - A changed environment is built as a new release next to the live one, installed from the
    resolved set (with hashes), run through the environment's C(hook), C(uv pip check) and ComfyUI's
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
  environment:
    description:
      - The environment as written in C(comfyui_environments), a mapping of its keys
        (C(comfyui_repo), C(comfyui_version), C(torch_flavor), C(custom_nodes), ...; the table of
        keys is in docs/environments.md).
      - The module reads and validates every key itself; an unknown key or a value of the wrong
        type fails naming the environment, the key and what it accepts.
      - What the environment leaves out comes from the other options, which hold the site-wide
        settings. Its torch flavour is looked up in O(torch_flavors), its C(protected_packages)
        are added to O(protected_packages), and its C(import_gate) overrides O(import_gate).
    type: dict
    required: true
  root:
    description: Folder of the environment; releases go to C(<root>/releases), the live one is C(<root>/current).
    type: path
    required: true
  config_dir:
    description:
      - Folder of the environment's configuration on the host. When the environment sets C(hook), the script
        run is C(<config_dir>/hook) (where the role installs it), and the import gate reads
        C(<config_dir>/extra_model_paths.yaml).
      - Without it, the environment's C(hook) is a path on the host and the gate reads no model paths.
    type: path
  torch_flavors:
    description:
      - Torch flavour name to C(packages) (exact pins or wheel files, installed and held as constraints),
        C(index_url) (the index that serves them, searched before O(index_url)) and optionally
        C(xformers) (a pin added when the environment sets C(xformers) to V(true)).
      - An environment that sets C(torch_packages) needs no flavour from this table.
    type: dict
    default: {}
  default_torch_flavor:
    description: Flavour of an environment that names none.
    type: str
    default: ""
  allowed_repos:
    description:
      - When not empty, custom node and submodule repositories must match one of these entries.
      - An entry is a git URL compared on its parsed scheme, host and whole path segments, so
        C(https://github.com/owner) admits that owner's repositories and not C(owner-other)'s.
    type: list
    elements: str
    default: []
  protected_packages:
    description:
      - Packages no node may change in any environment, besides torch, torchvision, torchaudio, xformers
        and the torch packages; each environment's own C(protected_packages) are added.
    type: list
    elements: str
    default: []
  python:
    description: Interpreter the venv is built on.
    type: str
    default: python3
  uv:
    description: Path of the uv executable.
    type: path
    required: true
  index_url:
    description:
      - Default package index. Credentials in an index URL (C(https://user:token@host/simple)) reach uv
        in its environment only; results, the lock and messages show them as C(***).
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
  user_files:
    description:
      - Files copied into the import gate's user directory, relative path to a file on the host
        (ComfyUI-Manager's locked-down C(config.ini), so the gate runs it offline).
    type: dict
    default: {}
  import_gate:
    description:
      - Run C(main.py --quick-test-for-ci --cpu) and fail when a configured custom node does not import.
      - The default of environments that do not set C(import_gate) themselves.
    type: bool
    default: true
  gate_timeout:
    description: Seconds the import gate may take.
    type: int
    default: 900
  import_names:
    description:
      - Top-level import names mapped to the distribution that provides them (C(cv2) to
        C(opencv-python)), for the import gate's message about a node that lacks a package. They
        come before the engine's own table (C(DISTRIBUTIONS) in C(plugins/module_utils/environment/imports.py)).
    type: dict
    default: {}
  writable_paths:
    description:
      - Node folder or repository name (or C(ComfyUI) for its own tree) mapped to the paths it writes
        inside its own folder (C(settings.json), C(cache/) for a folder). They come before the engine's
        table of known packs (C(KNOWN) in C(plugins/module_utils/environment/writable.py)); a node's own
        C(writable) key adds more.
      - Each becomes a link to the working directory of the process that runs ComfyUI, so every
        instance and the import gate write their own copy and the code stays read-only.
    type: dict
    default: {}
  run_as:
    description:
      - User that runs the import gate, C(uv pip check) and the environment's C(hook) unless it sets
        C(hook_as_root) (the service account, so the code tree is read-only to it and no code of a
        package or a node runs as root).
      - Without it, a build run as root runs those as root, with a warning.
    type: str
  keep_releases:
    description: Releases kept, the live one included; a release a running process uses is kept as well.
    type: int
    default: 2
  converge_lock:
    description:
      - The host-wide converge lock file (the role passes C(<comfyui_state_root>/converge.lock)). The
        module holds it for its whole run, so two converges of one host never build at once (they share
        the git cache and uv's cache), nor while instances are reconfigured; a second one waits for the
        first and says which pid it waits for. Without it, only the environment's own root is locked.
      - In check mode it is taken only when the file exists.
    type: path
  converge_lock_timeout:
    description:
      - Seconds to wait for another converge that holds O(converge_lock); the task then fails naming its pid.
    type: int
    default: 3600
"""

EXAMPLES = r"""
- name: Build the comm environment as written in comfyui_environments
  comfybake.core.environment:
    name: comm
    environment:
      comfyui_repo: https://github.com/comfyanonymous/ComfyUI.git
      comfyui_version: v0.8.0
      torch_flavor: cu128
      xformers: true
      custom_nodes:
        - repo: https://github.com/pythongosssss/ComfyUI-Custom-Scripts.git
          version: 0123456789abcdef0123456789abcdef01234567
      pip_constraints: ["numpy<2"]
    torch_flavors:
      cu128:
        index_url: https://download.pytorch.org/whl/cu128
        packages: [torch==2.13.0+cu128, torchvision==0.28.0+cu128, torchaudio==2.11.0]
        xformers: xformers==0.0.35
    root: /opt/comfybake/envs/comm
    config_dir: /etc/comfybake/envs/comm
    uv: /opt/comfybake/tools/bin/uv
    run_as: comfybake

- name: Build offline from a wheelhouse and git mirrors, with torch from a wheel file
  comfybake.core.environment:
    name: aua-sp
    environment:
      comfyui_repo: https://github.com/comfyanonymous/ComfyUI.git
      comfyui_version: v0.8.0
      torch_packages: [/var/cache/comfybake/wheelhouse/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl]
    root: /opt/comfybake/envs/aua-sp
    uv: /opt/comfybake/tools/bin/uv
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
converge_lock_waited:
  description: Whom the run waited for, when another converge held O(converge_lock).
  returned: when it waited
  type: str
  sample: waited 42 s for 4242 (comfybake.core.environment... since 2026-01-01T00:00:00Z) to release the converge lock
timings:
  description: Seconds spent in each phase.
  returned: always
  type: dict
  sample: {resolve: 0.07, install: 4.1, import gate: 2.3}
"""

import contextlib
import os
import traceback
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.comfybake.core.plugins.module_utils.converge_lock import ConvergeLockError, converge_lock
from ansible_collections.comfybake.core.plugins.module_utils.environment import (
    Builder,
    EnvError,
    environment_spec,
)
from ansible_collections.comfybake.core.plugins.module_utils.redaction import redact_data, url_credentials

# One way to pass an environment: as written (`environment`, read and validated by the engine),
# with the site-wide settings that fill in what it leaves out.
ARGUMENT_SPEC = {
    "name": {"type": "str", "required": True},
    "environment": {"type": "dict", "required": True},
    "root": {"type": "path", "required": True},
    "config_dir": {"type": "path"},
    "torch_flavors": {"type": "dict", "default": {}},
    "default_torch_flavor": {"type": "str", "default": ""},
    "allowed_repos": {"type": "list", "elements": "str", "default": []},
    "protected_packages": {"type": "list", "elements": "str", "default": []},
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
    "user_files": {"type": "dict", "default": {}},
    "import_gate": {"type": "bool", "default": True},
    "gate_timeout": {"type": "int", "default": 900},
    "import_names": {"type": "dict", "default": {}},
    "writable_paths": {"type": "dict", "default": {}},
    "run_as": {"type": "str"},
    "keep_releases": {"type": "int", "default": 2},
    "converge_lock": {"type": "path"},
    "converge_lock_timeout": {"type": "int", "default": 3600},
}
# Options of the module itself, not of the environment.
MODULE_OPTIONS = ("name", "environment", "converge_lock", "converge_lock_timeout")


def main() -> None:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    # Index URLs may carry credentials (https://user:token@host/simple): the arguments shown back (-vvv)
    # drop them, and Ansible masks them anywhere else in the result.
    module.no_log_values.update(url_credentials(module.params))
    result: dict[str, Any] = {
        "changed": False,
        "release": None,
        "fingerprint": None,
        "warnings_env": [],
        "timings": {},
        "invocation": {"module_args": redact_data(module.params)},
    }
    builder = None
    waited = ""
    try:
        site = {key: value for key, value in module.params.items() if key not in MODULE_OPTIONS}
        builder = Builder(environment_spec(module.params["name"], module.params["environment"], **site))
        with _host_lock(module) as held:
            waited = held.note() if held else ""
            outcome = builder.run(check_mode=module.check_mode)
    except (EnvError, ConvergeLockError) as error:
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
    if waited:
        result["converge_lock_waited"] = waited
        module.warn(waited)
    module.exit_json(**result)


def _host_lock(module: AnsibleModule) -> Any:
    """The host-wide converge lock for this run, or nothing when none is set (or, in check mode, none exists)."""
    path = module.params["converge_lock"]
    if not path or (module.check_mode and not os.path.exists(path)):
        return contextlib.nullcontext()
    what = f"comfybake.core.environment: building environment {module.params['name']}"
    return converge_lock(path, what, module.params["converge_lock_timeout"], module.log)


if __name__ == "__main__":
    main()
