#!/usr/bin/python
# Copyright: comfybake contributors
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""Ansible module: hold the host-wide converge lock across the tasks of a play."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: converge_lock
short_description: Hold the host-wide comfybake converge lock across several tasks
description:
  - The converge lock (an exclusive C(flock) on one file, C(<comfyui_state_root>/converge.lock)) keeps
    two converges of one host from changing the same things at once. The C(environment) module holds
    it for its own run; this module holds it across the tasks of a block (the C(comfyui_instances)
    role's units, files and restarts), released in the block's C(always).
  - With O(state=held), waits for the current holder (logging C(waiting for <pid> (<what it does>)) to
    the host's journal), then hands the lock to a small process of its own (C(sleep)), which keeps it
    after the task ends, until O(state=released) ends that process, or O(timeout) seconds at most (a
    play that was killed before it released the lock).
  - The lock file says who holds it (C(<pid> <what it does> since <time>)).
version_added: "0.1.0"
author: comfybake contributors (@comfybake)
extends_documentation_fragment:
  - comfybake.core.attributes
requirements:
  - python >= 3.10
  - Linux (C(/proc))
attributes:
  check_mode:
    support: full
    details:
      It runs the same in check mode (a dry run waits for a converge under way), except that it takes
      no lock whose file does not exist yet.
  diff_mode:
    support: none
  idempotent:
    support: full
    details: It changes nothing that a converge manages; it always reports no change.
options:
  path:
    description: The lock file.
    type: path
    required: true
  state:
    description: Take the lock and hold it (V(held)), or end the holder that O(holder) names (V(released)).
    type: str
    choices: [held, released]
    default: held
  purpose:
    description: What the play does while it holds the lock, written into the lock file for a contender to show.
    type: str
    default: a comfybake converge
  timeout:
    description:
      - With O(state=held), seconds to wait for another holder; the task then fails naming its pid.
      - Also the longest the lock is then held when no task releases it.
    type: int
    default: 3600
  holder:
    description: With O(state=released), the pid that O(state=held) returned (C(holder)); V(0) releases nothing.
    type: int
    default: 0
"""

EXAMPLES = r"""
- name: Change the instances while no other converge of this host runs
  block:
    - name: Take the converge lock
      comfybake.core.converge_lock:
        path: /var/lib/comfybake/converge.lock
        purpose: "comfyui_instances: units and restarts"
      register: converge_lock

    - name: Restart the instances
      ansible.builtin.systemd_service:
        name: comfyui.target
        state: restarted
  always:
    - name: Release the converge lock
      comfybake.core.converge_lock:
        path: /var/lib/comfybake/converge.lock
        state: released
        holder: "{{ converge_lock.holder | default(0) }}"
"""

RETURN = r"""
holder:
  description: Pid of the process that holds the lock for the play (V(0) when none was taken).
  returned: always
  type: int
waited:
  description: Whom the task waited for, when another converge held the lock.
  returned: when it waited
  type: str
"""

import os
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.comfybake.core.plugins.module_utils.converge_lock import (
    ConvergeLockError,
    end_holder,
    hand_over,
    take,
)

ARGUMENT_SPEC = {
    "path": {"type": "path", "required": True},
    "state": {"type": "str", "choices": ["held", "released"], "default": "held"},
    "purpose": {"type": "str", "default": "a comfybake converge"},
    "timeout": {"type": "int", "default": 3600},
    "holder": {"type": "int", "default": 0},
}


def main() -> None:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    params = module.params
    path = params["path"]
    if params["state"] == "released":
        ended = params["holder"] > 0 and end_holder(path, params["holder"])
        module.exit_json(changed=False, holder=params["holder"] if ended else 0)
    if module.check_mode and not os.path.exists(path):
        module.exit_json(changed=False, holder=0)
    what = f"comfybake.core.converge_lock: {params['purpose']}"
    try:
        fd, held = take(path, what, params["timeout"], module.log)
    except ConvergeLockError as error:
        module.fail_json(msg=str(error), changed=False, holder=0)
    result: dict[str, Any] = {"changed": False, "holder": hand_over(fd, what, params["timeout"])}
    if held.note():
        result["waited"] = held.note()
        module.warn(held.note())
    module.exit_json(**result)


if __name__ == "__main__":
    main()
