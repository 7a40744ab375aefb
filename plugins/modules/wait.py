#!/usr/bin/python
# Copyright: comfybake contributors
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""Ansible module: wait until ComfyUI instances can serve their environment, or have drained."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: wait
short_description: Wait until ComfyUI instances are ready to serve their environment, or drained
description:
  - With O(state=ready), polls every instance at once until it is ready, and fails naming each
    instance that is not within O(timeout) seconds.
  - Ready means, in order, the unit is active, the port accepts connections, C(GET /system_stats)
    answers with exactly the configured command line in C(system.argv), C(GET /object_info/<Class>)
    is non-empty for every required node class, and C(GET /models/<folder>) lists every
    required model. A unit that fails or starts restarting ends the wait at once, and so
    does a node class missing from an instance that answers (ComfyUI imports every custom node
    before it serves, so the class cannot appear later).
  - A failure reports the instance's output since it last started (its journal, or its log
    file), with every custom node that logged C(IMPORT FAILED) and its error, and every one of
    ComfyUI's own optional nodes (C(comfy_extras/)) that did not import, which ComfyUI logs as a
    warning and starts without.
  - With O(state=drained), waits until each instance's C(/queue) is empty (or the instance does
    not answer), at most O(timeout) seconds, and never fails; it reports what was still queued.
version_added: "0.1.0"
author: comfybake contributors (@comfybake)
extends_documentation_fragment:
  - comfybake.core.attributes
requirements:
  - python >= 3.10
  - systemd (unless O(systemd=false))
attributes:
  check_mode:
    support: full
    details: It only reads; it runs the same in check mode.
  diff_mode:
    support: none
  idempotent:
    support: full
    details: It never changes anything.
options:
  instances:
    description:
      - Records of the instance layout (the C(comfybake.core.instance_layout) filter), of which
        C(name), C(port), C(listen), C(args), C(required_node_classes), C(required_models),
        C(unit) and C(log_file) are read.
    type: list
    elements: dict
    required: true
  state:
    description: What to wait for.
    type: str
    choices: [ready, drained]
    default: ready
  timeout:
    description: Seconds to wait, for all instances together.
    type: int
    default: 300
  systemd:
    description: Read the units' state and journal (false for instances that systemd does not run).
    type: bool
    default: true
  list_node_classes:
    description: With O(state=ready), also return every node class each ready instance serves (one C(GET /object_info)).
    type: bool
    default: false
"""

EXAMPLES = r"""
- name: Wait until every instance serves its environment
  comfybake.core.wait:
    instances: "{{ _comfyui_instances_layout | selectattr('enabled') }}"
    timeout: 300

- name: Let the instances about to restart finish their queue (at most 10 minutes)
  comfybake.core.wait:
    instances: "{{ _comfyui_instances_layout | selectattr('name', 'in', restarting) }}"
    state: drained
    timeout: 600
"""

RETURN = r"""
instances:
  description: One result per instance.
  returned: always
  type: list
  elements: dict
  sample:
    - name: main
      port: 8188
      ready: false
      stage: nodes
      seconds: 2.4
      error: node class ComfybakeBroken is missing
      import_failures: {ComfyUI-Comfybake-Broken: "ModuleNotFoundError: No module named 'nonexistent'"}
      optional_node_failures: {comfy_extras/nodes_audio.py: "No module named 'torchaudio'"}
      log: ["...", "   0.0 seconds (IMPORT FAILED): /opt/.../custom_nodes/ComfyUI-Comfybake-Broken"]
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.comfybake.core.plugins.module_utils.runtime import Instance, drain_all, get_json, wait_all

ARGUMENT_SPEC = {
    "instances": {"type": "list", "elements": "dict", "required": True},
    "state": {"type": "str", "choices": ["ready", "drained"], "default": "ready"},
    "timeout": {"type": "int", "default": 300},
    "systemd": {"type": "bool", "default": True},
    "list_node_classes": {"type": "bool", "default": False},
}


def main() -> None:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    params = module.params
    try:
        instances = [Instance(record) for record in params["instances"]]
    except (KeyError, TypeError, ValueError) as error:
        module.fail_json(msg=f"instances: each needs at least name and port ({error})")
    if params["state"] == "drained":
        results = drain_all(instances, params["timeout"])
        module.exit_json(changed=False, instances=results)
    results = wait_all(instances, params["timeout"], use_systemd=params["systemd"])
    if params["list_node_classes"]:
        for instance, result in zip(instances, results, strict=True):
            if result["ready"]:
                result["node_classes"] = sorted(get_json(instance.url("/object_info"), timeout=60))
    failed = [result for result in results if not result["ready"]]
    if failed:
        module.fail_json(msg="\n".join(result["message"] for result in failed), instances=results)
    module.exit_json(changed=False, instances=results)


if __name__ == "__main__":
    main()
