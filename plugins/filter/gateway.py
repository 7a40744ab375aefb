"""Filter `gateway_routes`: the gateway's public routes for the instance layout; its
documentation is in `gateway_routes.yml` beside this one.

The same function (module_utils/gateway/routes.py) serves the gateway module and the command
line, so the routing file's public URLs are those the gateway serves.
"""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleFilterError
from ansible_collections.comfybake.core.plugins.module_utils.gateway.errors import GatewayError
from ansible_collections.comfybake.core.plugins.module_utils.gateway.routes import public_routes


def gateway_routes(layout: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    try:
        return public_routes(layout, settings)
    except GatewayError as error:
        raise AnsibleFilterError(str(error)) from error


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"gateway_routes": gateway_routes}
