#!/usr/bin/python
# Copyright: comfybake contributors
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""Ansible module: set the pool state of fleet members on a front's gateway."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: gateway_pool
short_description: Set whether a fleet host's instances get traffic from a front's gateway
description:
  - Runs on a front (a host whose C(comfyui_gateway_fleet_members) lists the fleet hosts; callers
    use C(delegate_to) the front) and sets the pool state of one member or several.
  - C(serving) - new sessions and sticky ones. C(draining) - no new session; a client whose
    affinity cookie names one of the member's instances still reaches it (then a serving one if
    it fails). C(out) - nothing reaches it; its clients land on a serving member.
  - Persists the states in C(pool.json) in O(config_dir), renders the gateway's configuration
    again (from C(gateway.json), C(credentials.json) and C(pool.json)), has Caddy validate it and
    loads it into the running gateway (Caddy's graceful reload - requests in flight finish). Where
    Caddy refuses it, C(pool.json) is put back and nothing changes.
  - The same code as the command C(comfybake gateway pool MEMBER --state STATE) on the front.
  - A converge of the comfyui_gateway role keeps the states it finds.
version_added: "0.1.0"
author: comfybake contributors (@comfybake)
extends_documentation_fragment:
  - comfybake.core.attributes
requirements:
  - python >= 3.10
  - Caddy 2.6 or later
attributes:
  check_mode:
    support: full
    details: Reports whether a state would change and the diff, writes nothing and loads nothing.
  diff_mode:
    support: full
    details: The states of the given members before and after.
  idempotent:
    support: full
options:
  member:
    description: The inventory name of one fleet host, as the front lists it.
    type: str
  members:
    description: Several fleet hosts, set to the same O(state).
    type: list
    elements: str
  state:
    description:
      - The pool state to set. Without it, nothing changes and the states are returned.
    type: str
    choices: [serving, draining, out]
  min_serving:
    description:
      - Refuse (fail, changing nothing) a change that would leave an environment route that has
        at least this many serving members with fewer, naming the environments and their serving
        members. An environment keeps at most all its members but one (one served by a single
        member goes down while that member changes, whatever the order). A rolling change sets it
        to 1, so that a batch holding every host of an environment fails instead of taking the
        environment down. C(0) refuses nothing.
    type: int
    default: 0
  config_dir:
    description: Folder of the gateway's files on the front.
    type: path
    default: /etc/comfybake/gateway
  caddy:
    description: The Caddy binary.
    type: path
    default: /usr/bin/caddy
  group:
    description: Group of the gateway's account, which may read C(caddy.json); empty leaves root's.
    type: str
    default: comfybake-gateway
notes:
  - An unknown member fails, naming it and the front's members.
  - O(min_serving) counts each environment route's members in state C(serving) only.
seealso:
  - module: comfybake.core.gateway
"""

EXAMPLES = r"""
- name: Send no new session to this host on every front
  comfybake.core.gateway_pool:
    member: "{{ inventory_hostname }}"
    state: draining
  delegate_to: "{{ item }}"
  loop: "{{ groups['comfybake_gateway'] }}"

- name: Take two hosts out of the pools
  comfybake.core.gateway_pool:
    members: [gpu-a-1, gpu-a-2]
    state: out
  delegate_to: front-1

- name: Read the states
  comfybake.core.gateway_pool:
  delegate_to: front-1
  register: pool
"""

RETURN = r"""
previous:
  description: The given members' states before this run (member to state).
  returned: always
  type: dict
  sample: {gpu-a-1: serving}
states:
  description: Every member's state after this run (or as it would be, in check mode).
  returned: always
  type: dict
  sample: {gpu-a-1: draining, gpu-a-2: serving}
upstreams:
  description: The given members' upstreams (C(HOST:PORT) of their enabled instances), member to list.
  returned: always
  type: dict
  sample: {gpu-a-1: ["10.0.0.11:8188", "10.0.0.11:8189"]}
"""

from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.comfybake.core.plugins.module_utils.gateway import apply, credentials, front
from ansible_collections.comfybake.core.plugins.module_utils.gateway.caddy import STATES
from ansible_collections.comfybake.core.plugins.module_utils.gateway.errors import GatewayError

ARGUMENT_SPEC = {
    "member": {"type": "str"},
    "members": {"type": "list", "elements": "str"},
    "state": {"type": "str", "choices": list(STATES)},
    "min_serving": {"type": "int", "default": 0},
    "config_dir": {"type": "path", "default": "/etc/comfybake/gateway"},
    "caddy": {"type": "path", "default": "/usr/bin/caddy"},
    "group": {"type": "str", "default": "comfybake-gateway"},
}


def main() -> None:
    module = AnsibleModule(
        argument_spec=ARGUMENT_SPEC,
        mutually_exclusive=[["member", "members"]],
        supports_check_mode=True,
    )
    params = module.params
    members = [params["member"]] if params["member"] is not None else list(params["members"] or [])
    state = params["state"]
    paths = apply.Paths(params["config_dir"], caddy=params["caddy"], group=params["group"])
    result: dict[str, Any] = {"changed": False, "previous": {}, "states": {}, "upstreams": {}}
    if state is not None and not members:
        module.fail_json(msg=f"state {state} needs member or members: the fleet hosts to set", **result)
    try:
        if state is None or module.check_mode:
            result.update(front.change(paths, members, state, check=True, min_serving=params["min_serving"]))
        else:
            with credentials.locked(paths.config_dir):  # not while a converge or the command line writes
                result.update(front.change(paths, members, state, min_serving=params["min_serving"]))
    except GatewayError as error:
        module.fail_json(msg=str(error), **result)
    if state is not None:
        result["diff"] = {
            "before": front.describe(result["previous"]),
            "after": front.describe(dict.fromkeys(result["previous"], state)),
        }
    module.exit_json(**result)


if __name__ == "__main__":
    main()
