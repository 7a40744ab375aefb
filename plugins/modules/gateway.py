#!/usr/bin/python
# Copyright: comfybake contributors
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""Ansible module: render, validate and load the gateway's configuration."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: gateway
short_description: Configure the comfybake gateway (Caddy) from the instance layout
description:
  - Computes the gateway's public routes (one per instance, one per environment) from the records
    of the instance layout, renders Caddy's configuration with the users and API keys whose scope
    covers each route, checks it with C(caddy validate), swaps it in atomically and loads it into a
    running gateway through its admin socket (a graceful reload: open WebSockets stay). A
    configuration Caddy refuses never replaces the one that serves.
  - Users and keys of O(users) and O(keys) join those the C(comfybake gateway) command added on
    the host; the credentials file holds bcrypt hashes only. A password or key that still matches
    its stored hash keeps that hash, so a second run changes nothing.
  - Writes C(caddy.json), C(gateway.json) (routes and settings, no secret, for the command line),
    C(credentials.json) and, once the gateway made its internal CA, C(ca.crt) in O(config_dir).
version_added: "0.1.0"
author: comfybake contributors (@comfybake)
extends_documentation_fragment:
  - comfybake.core.attributes
requirements:
  - python >= 3.10
  - bcrypt (Debian's python3-bcrypt)
  - Caddy 2.6 or later
attributes:
  check_mode:
    support: full
    details: Reports what would change, writes nothing and loads nothing.
  diff_mode:
    support: none
  idempotent:
    support: full
options:
  layout:
    description: Records of the instance layout (the P(comfybake.core.instance_layout#filter) filter).
    type: list
    elements: dict
    required: true
  settings:
    description:
      - The gateway's settings, C(mode), C(port), C(port_offset), C(environment_ports), C(domain),
        C(names), C(listen), C(tls), C(max_request_body), C(health_uri), C(health_interval),
        C(storage), C(admin_socket), C(access_log) (the role's C(comfyui_gateway_*) variables; see
        docs/gateway.md).
    type: dict
    required: true
  users:
    description: Users declared in the inventory, each C(name), C(scope) and C(password) or C(password_hash) (bcrypt).
    type: list
    elements: dict
    default: []
  keys:
    description:
      - API keys declared in the inventory, each C(name), C(scope) and C(key).
      - A key is made by C(comfybake gateway keys create).
    type: list
    elements: dict
    default: []
  config_dir:
    description: Folder of the gateway's files.
    type: path
    required: true
  caddy:
    description: The Caddy binary.
    type: path
    default: /usr/bin/caddy
  group:
    description: Group of the gateway's account, which may read C(caddy.json); empty leaves root's.
    type: str
    default: comfybake-gateway
"""

EXAMPLES = r"""
- name: Configure the gateway
  comfybake.core.gateway:
    layout: "{{ (lookup('ansible.builtin.file', '/etc/comfybake/instances.json') | from_json).instances }}"
    settings:
      mode: ports
      names: [gpu1.example.com]
      tls: {mode: internal}
    users:
      - name: alice
        scope: ["environment:prod"]
        password: "{{ vault_alice_password }}"
    config_dir: /etc/comfybake/gateway
"""

RETURN = r"""
routes:
  description: The public routes, C(instances) and C(environments), each with its C(public_url).
  returned: always
  type: dict
changed_files:
  description: The files this run wrote (or would write, in check mode).
  returned: always
  type: list
  elements: str
"""

import copy

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.comfybake.core.plugins.module_utils.gateway import apply, caddy, credentials, routes
from ansible_collections.comfybake.core.plugins.module_utils.gateway.errors import GatewayError

ARGUMENT_SPEC = {
    "layout": {"type": "list", "elements": "dict", "required": True},
    "settings": {"type": "dict", "required": True},
    "users": {
        "type": "list",
        "elements": "dict",
        "default": [],
        "options": {
            "name": {"type": "str", "required": True},
            "scope": {"type": "list", "elements": "str", "required": True},
            "password": {"type": "str", "no_log": True},
            "password_hash": {"type": "str", "no_log": False},
        },
        "mutually_exclusive": [["password", "password_hash"]],
        "required_one_of": [["password", "password_hash"]],
    },
    "keys": {
        "type": "list",
        "elements": "dict",
        "default": [],
        "options": {
            "name": {"type": "str", "required": True},
            "scope": {"type": "list", "elements": "str", "required": True},
            "key": {"type": "str", "required": True, "no_log": True},
        },
    },
    "config_dir": {"type": "path", "required": True},
    "caddy": {"type": "path", "default": "/usr/bin/caddy"},
    "group": {"type": "str", "default": "comfybake-gateway"},
}


def main() -> None:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    params = module.params
    paths = apply.Paths(params["config_dir"], caddy=params["caddy"], group=params["group"])
    try:
        settings = caddy.normalize(params["settings"])
        public = routes.public_routes(params["layout"], settings)
        stored = credentials.load(paths.credentials)
        declared = credentials.declared(params["users"], params["keys"], stored)
        principals = credentials.merge_inventory(stored, declared)
        config = caddy.render(public, settings, principals)
        changed_files = []
        if credentials.dumps(principals) != apply.read(paths.credentials):
            changed_files.append(paths.credentials)
        if apply.dump({"format": 1, "routes": public, "settings": settings}) != apply.read(paths.inputs):
            changed_files.append(paths.inputs)
        if apply.dump(config) != apply.read(paths.config):
            changed_files.append(paths.config)
        if not module.check_mode:
            if paths.credentials in changed_files:
                credentials.save(paths.credentials, principals)
            apply.save_inputs(paths, public, settings)
            apply.apply(paths, copy.deepcopy(config))
            if apply.export_ca(paths, settings["storage"]):
                changed_files.append(paths.ca)
    except GatewayError as error:
        module.fail_json(msg=str(error))
    module.exit_json(changed=bool(changed_files), routes=public, changed_files=changed_files)


if __name__ == "__main__":
    main()
