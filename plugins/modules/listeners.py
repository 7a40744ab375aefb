#!/usr/bin/python
# Copyright: comfybake contributors
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""Ansible module: the host's listening TCP ports, with the process and unit that own each."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: listeners
short_description: List the listening TCP ports of a host with their owners
description:
  - Reads C(/proc/net/tcp) and C(/proc/net/tcp6) and maps each listening socket to the process
    and systemd unit that hold it, so a port layout can be checked against what already runs
    on the host (ports held by O(ignore_units) are left out, since those are the instances being reconfigured).
version_added: "0.1.0"
author: comfybake contributors (@comfybake)
extends_documentation_fragment:
  - comfybake.core.attributes
requirements:
  - python >= 3.10
  - Linux /proc
attributes:
  check_mode:
    support: full
    details: It only reads.
  diff_mode:
    support: none
  idempotent:
    support: full
    details: It never changes anything.
options:
  ignore_units:
    description: Regular expression; ports whose owning unit matches it are not returned.
    type: str
    default: "^comfyui@.+[.]service$"
"""

EXAMPLES = r"""
- name: Find the ports something other than an instance already uses
  comfybake.core.listeners:
  register: listeners
"""

RETURN = r"""
busy:
  description: Port to a description of its owner, for the ports not left out.
  returned: always
  type: dict
  sample: {"22": "sshd (pid 101, ssh.service)"}
listeners:
  description:
    - Every listening port with its addresses, the uid that owns the socket, and the pid,
      process name and unit holding it.
    - Where the process cannot be read (root without C(CAP_SYS_PTRACE), as in containers), pid is
      null and the unit comes from the socket's uid when all processes of that uid are in one unit.
  returned: always
  type: list
  elements: dict
  sample: [{port: 8188, addresses: [127.0.0.1], uid: 61234, pid: 240, process: python3, unit: comfyui@main.service}]
"""

import re

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.comfybake.core.plugins.module_utils.runtime import listeners

ARGUMENT_SPEC = {
    "ignore_units": {"type": "str", "default": "^comfyui@.+[.]service$"},
}


def main() -> None:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    try:
        ignore = re.compile(module.params["ignore_units"])
    except re.error as error:
        module.fail_json(msg=f"ignore_units {module.params['ignore_units']!r} is not a regular expression: {error}")
    found = sorted(listeners().values(), key=lambda entry: entry["port"])
    busy = {}
    for entry in found:
        if entry["unit"] and ignore.search(entry["unit"]):
            continue
        owner = entry["process"] or "an unknown process"
        holder = f"pid {entry['pid']}" if entry["pid"] else f"uid {entry['uid']}"
        details = ", ".join(x for x in (holder, entry["unit"]) if x)
        busy[str(entry["port"])] = f"{owner} ({details})" if details else owner
    module.exit_json(changed=False, busy=busy, listeners=found)


if __name__ == "__main__":
    main()
