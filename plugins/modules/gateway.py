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
    running gateway through its admin socket (Caddy's graceful reload). A
    configuration Caddy refuses never replaces the one that serves.
  - Users and keys of O(users) and O(keys) join those the C(comfybake gateway) command added on
    the host; the credentials file holds bcrypt hashes only. A password or key that still matches
    its stored hash keeps that hash, so a second run changes nothing.
  - Writes C(caddy.json), C(gateway.json) (routes and settings, no secret, for the command line),
    C(credentials.json) and, once the gateway made its internal CA, C(ca.crt) in O(config_dir).
  - With O(fleet_mode), the gateway is a front (docs/gateway.md, Fleet gateway) - one route per
    environment over the instances of every member of O(fleet), no route per instance - and
    C(pool.json) holds each member's pool state, set by M(comfybake.core.gateway_pool). This
    module keeps every state it finds, drops the members no longer listed and starts new ones
    C(serving). In C(ports) mode each environment keeps the port it was given (read back from
    C(gateway.json)) while it exists.
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
    description:
      - Records of the instance layout (the P(comfybake.core.instance_layout#filter) filter).
      - Ignored with O(fleet_mode).
    type: list
    elements: dict
    default: []
  fleet:
    description:
      - The members of a front, each C(name) (its inventory name), C(address) (where the front
        reaches its instances) and C(instances) (the records of its C(instances.json)). Each
        record's C(url) host becomes the member's address; names, environments and URLs are
        checked, since they come from another host.
      - Required, not empty, with O(fleet_mode).
    type: list
    elements: dict
    default: []
  fleet_mode:
    description:
      - Whether this gateway is a front, routing the instances of the members of O(fleet); else it
        routes O(layout), the host's own instances.
      - Explicit, so that members missing from O(fleet) (their files not read) fail instead of
        turning the front into a host's own gateway with no route.
    type: bool
    default: false
  leave_fleet:
    description:
      - Let a gateway whose C(gateway.json) says it is a front become a host's own gateway
        (O(fleet_mode) false). Without it, that fails and the front keeps serving.
    type: bool
    default: false
  settings:
    description:
      - The gateway's settings, C(mode), C(port), C(port_offset), C(environment_ports), C(domain),
        C(names), C(listen), C(tls), C(max_request_body), C(health_uri), C(health_interval),
        C(storage), C(admin_socket), C(access_log) (the role's C(comfyui_gateway_*) variables; see
        docs/gateway.md).
      - C(metrics), a dict of C(upstream) (C(HOST:PORT) of the host's exporter) and C(port) (the
        route's port in C(ports) mode, 9722 by default), adds the route C(metrics) that only
        principals whose scope holds C(metrics) or C(*) reach; absent or null, no such route.
      - C(jobs) and C(control), each a dict of C(socket) (the unix socket of C(comfybake jobs serve)'s
        job API or control API) and C(port) (the route's port in C(ports) mode, 9723 and 9724 by
        default), add the routes C(jobs) and C(control) that only principals whose scope holds that
        name or C(*) reach; absent or null, no such route.
    type: dict
    required: true
  users:
    description: Users declared in the inventory (secrets from Ansible Vault).
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: The user's name, C([a-z0-9][a-z0-9._-]{0,31}), shared with the keys' names.
        type: str
        required: true
      scope:
        description:
          - The routes the user may use, C(*), C(environment:<name>), C(instance:<name>), C(metrics)
            (the exporter's route), C(jobs) (the job API's) or C(control) (the control API's).
        type: list
        elements: str
        required: true
      password:
        description:
          - The password, at least 12 characters; stored as a bcrypt hash only.
          - Exclusive with O(users[].password_hash).
        type: str
      password_hash:
        description: A bcrypt hash (C($2b$...)), from C(caddy hash-password) or C(comfybake gateway users add).
        type: str
  keys:
    description: API keys declared in the inventory (secrets from Ansible Vault).
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: The key's name, the one inside the key.
        type: str
        required: true
      scope:
        description: The routes the key may use, as for O(users[].scope).
        type: list
        elements: str
        required: true
      api_key:
        description:
          - The key, as C(comfybake gateway keys create) printed it; stored as a bcrypt hash only.
          - Named so that C(comfybake.core.redact) and C(playbooks/show_config.yml) hide it.
        type: str
        required: true
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

- name: Configure a front over two fleet hosts
  comfybake.core.gateway:
    fleet_mode: true
    fleet:
      - name: gpu-a-1
        address: 10.0.0.11
        instances: "{{ (lookup('ansible.builtin.file', 'gpu-a-1/instances.json') | from_json).instances }}"
      - name: gpu-a-2
        address: 10.0.0.12
        instances: "{{ (lookup('ansible.builtin.file', 'gpu-a-2/instances.json') | from_json).instances }}"
    settings:
      mode: ports
      names: [front.example.com]
    config_dir: /etc/comfybake/gateway
"""

RETURN = r"""
routes:
  description:
    - The public routes, C(instances) and C(environments), each with its C(public_url), and
      C(metrics), the exporter's route, C(jobs) and C(control), the job service's (each null without one).
  returned: always
  type: dict
pool:
  description: Each member's pool state (C(serving), C(draining), C(out)) on a front; empty otherwise.
  returned: always
  type: dict
changed_files:
  description: The files this run wrote (or would write, in check mode).
  returned: always
  type: list
  elements: str
"""

import json
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.comfybake.core.plugins.module_utils.gateway import (
    apply,
    caddy,
    credentials,
    files,
    pool,
    routes,
)
from ansible_collections.comfybake.core.plugins.module_utils.gateway.errors import GatewayError

ARGUMENT_SPEC = {
    "layout": {"type": "list", "elements": "dict", "default": []},
    "fleet": {"type": "list", "elements": "dict", "default": []},
    "fleet_mode": {"type": "bool", "default": False},
    "leave_fleet": {"type": "bool", "default": False},
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
        "no_log": False,  # each key's secret is its own no_log suboption
        "options": {
            "name": {"type": "str", "required": True},
            "scope": {"type": "list", "elements": "str", "required": True},
            "api_key": {"type": "str", "required": True, "no_log": True},
        },
    },
    "config_dir": {"type": "path", "required": True},
    "caddy": {"type": "path", "default": "/usr/bin/caddy"},
    "group": {"type": "str", "default": "comfybake-gateway"},
}


def plan(
    paths: apply.Paths, public: dict[str, Any], settings: dict[str, Any], params: dict[str, Any]
) -> tuple[list[str], list[credentials.Principal], dict[str, str], dict[str, Any]]:
    """The files that would change, the principals, the pool states (a front's) and Caddy's configuration."""
    stored = credentials.load(paths.credentials)
    principals = credentials.merge_inventory(stored, credentials.declared(params["users"], params["keys"], stored))
    members = [member["name"] for member in params["fleet"]] if settings["fleet"] else []
    states = pool.reconcile(pool.load(paths.pool), members)
    config = caddy.render(public, settings, principals, states)
    wanted = {
        paths.credentials: credentials.dumps(principals),
        paths.inputs: apply.dump({"format": 1, "routes": public, "settings": settings}),
        paths.config: apply.dump(config),
    }
    if settings["fleet"]:
        wanted[paths.pool] = pool.dumps(states)
    return [path for path, text in wanted.items() if files.read(path) != text], principals, states, config


def last_render(paths: apply.Paths, params: dict[str, Any]) -> dict[str, Any]:
    """The routes of gateway.json (the last render), after checking the mode asked for: a front
    never becomes a host's own gateway by accident, nor runs without members."""
    fleet_mode = params["fleet_mode"]
    if fleet_mode and not params["fleet"]:
        raise GatewayError(
            "fleet_mode is on but no member's records were given (fleet is empty): read each member's"
            " instances.json first (the comfyui_gateway role's configure phase does; run it whole, not"
            " a tag that skips the reads), or leave comfyui_gateway_fleet_members empty for a host's own gateway"
        )
    text = files.read(paths.inputs)
    try:
        inputs = json.loads(text) if text is not None else {}
    except ValueError:
        inputs = {}
    was_front = isinstance(inputs, dict) and inputs.get("settings", {}).get("fleet") is True
    if was_front and not fleet_mode and not params["leave_fleet"]:
        raise GatewayError(
            f"{paths.inputs} says this gateway is a front (comfyui_gateway_fleet_members), but this run would"
            " make it a host's own gateway and drop every fleet route: set comfyui_gateway_fleet_members to"
            " the fleet hosts again, or set comfyui_gateway_leave_fleet true (module option leave_fleet) to"
            " stop being a front"
        )
    routes_found: dict[str, Any] = inputs.get("routes", {}) if was_front and fleet_mode else {}
    return routes_found


def main() -> None:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    params = module.params
    paths = apply.Paths(params["config_dir"], caddy=params["caddy"], group=params["group"])
    states: dict[str, str] = {}
    try:
        before = last_render(paths, params)
        settings = caddy.normalize({**params["settings"], "fleet": params["fleet_mode"]})
        layout = routes.fleet_records(params["fleet"]) if params["fleet_mode"] else params["layout"]
        public = routes.public_routes(layout, settings, routes.kept_ports(before))
        if module.check_mode:
            changed_files, _principals, states, _config = plan(paths, public, settings, params)
        else:
            # Not while `comfybake gateway` changes a key or gateway_pool a member's state.
            with credentials.locked(paths.config_dir):
                changed_files, principals, states, config = plan(paths, public, settings, params)
                if paths.config in changed_files:  # nothing is written for a configuration Caddy refuses
                    apply.validate(paths, config)
                if paths.credentials in changed_files:
                    credentials.save(paths.credentials, principals)
                old_pool = files.read(paths.pool)
                if paths.pool in changed_files:
                    pool.save(paths.pool, states)
                try:
                    apply.apply(paths, config, validated=True)
                except BaseException:
                    pool.restore(paths.pool, old_pool)  # the file says what serves
                    raise
                apply.save_inputs(paths, public, settings)
            if apply.export_ca(paths, settings["storage"]):
                changed_files.append(paths.ca)
    except GatewayError as error:
        module.fail_json(msg=str(error))
    module.exit_json(changed=bool(changed_files), routes=public, pool=states, changed_files=changed_files)


if __name__ == "__main__":
    main()
