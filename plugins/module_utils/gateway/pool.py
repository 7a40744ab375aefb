"""A front's pool states: for each member (a fleet host), whether its instances get traffic.

`serving` (new sessions and sticky ones), `draining` (no new session; a client whose affinity
cookie names one of its instances still reaches it), `out` (nothing reaches it). They live in
`<config dir>/pool.json` (root's, written atomically), which `apply.refresh` reads, so the module
`comfybake.core.gateway_pool`, the command `comfybake gateway pool` and a converge of the
gateway role render the same configuration. A converge keeps every state it finds (a rolling
playbook may have set a member `out`), drops the members that left the fleet and starts new
ones `serving`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .caddy import SERVING, STATES
from .errors import GatewayError
from .files import read, write

FORMAT = 1
MODE = 0o644


def load(path: str) -> dict[str, str]:
    """Member -> state from pool.json at `path`; {} where there is none (a host's own gateway)."""
    text = read(path)
    if text is None:
        return {}
    try:
        data = json.loads(text)
        states = data["members"]
        if not isinstance(states, dict) or not all(state in STATES for state in states.values()):
            raise ValueError("a state that is not serving, draining or out")
    except (ValueError, KeyError, TypeError) as error:
        raise GatewayError(
            f"{path} is not a pool file ({error}): converge the comfyui_gateway role on this host again"
        ) from None
    return {str(member): str(state) for member, state in states.items()}


def dumps(states: dict[str, str]) -> str:
    return json.dumps({"format": FORMAT, "members": states}, indent=2, sort_keys=True) + "\n"


def save(path: str, states: dict[str, str]) -> bool:
    """Write pool.json (root's, mode 0644: no secret, like gateway.json) unless it holds `states`."""
    return write(path, dumps(states), MODE)


def restore(path: str, old: str | None) -> None:
    """Put pool.json back as it was (`old`, its text; None: there was none) after a
    configuration Caddy refused: the file always says what serves."""
    if old is not None:
        write(path, old, MODE)
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        raise GatewayError(f"cannot remove {path}: {error.strerror}") from None


def members(routes: dict[str, Any]) -> list[str]:
    """The members of a front's routes (gateway.json's): the member of each upstream."""
    return sorted({member for route in routes.get("environments", []) for member in route.get("members", {}).values()})


def reconcile(states: dict[str, str], members: list[str]) -> dict[str, str]:
    """The states of exactly `members`: each keeps the one it had, a new one serves."""
    return {member: states.get(member, SERVING) for member in sorted(set(members))}


def upstreams(routes: dict[str, Any]) -> dict[str, list[str]]:
    """Member -> the upstreams (HOST:PORT) of its instances, from a front's routes."""
    found: dict[str, set[str]] = {}
    for route in routes.get("environments", []):
        for upstream, member in route.get("members", {}).items():
            found.setdefault(member, set()).add(upstream)
    return {member: sorted(addresses) for member, addresses in sorted(found.items())}
