"""What a front does with its members' pool states: show them, and change them.

One implementation for the module `comfybake.core.gateway_pool` and the command `comfybake
gateway pool`: the states are written to pool.json, then the configuration is rendered again
from gateway.json, credentials.json and pool.json, validated and loaded (Caddy's graceful
reload: requests in flight finish).
"""

from __future__ import annotations

import json
from typing import Any

from . import apply, pool
from .caddy import SERVING, STATES
from .errors import GatewayError
from .files import read


def _inputs(paths: apply.Paths) -> dict[str, Any]:
    text = read(paths.inputs)
    if text is None:
        raise GatewayError(f"{paths.inputs} is missing: converge the comfyui_gateway role on this host first")
    inputs: dict[str, Any] = json.loads(text)
    return inputs


def view(paths: apply.Paths) -> dict[str, Any]:
    """`states` (member -> state), `upstreams` (member -> its upstreams) and `routes` (gateway.json's)
    of this front."""
    inputs = _inputs(paths)
    if not inputs.get("settings", {}).get("fleet"):
        raise GatewayError(
            f"the gateway of {paths.config_dir} is a host's own, not a front: pool states belong to a front"
            " (comfyui_gateway_fleet_members)"
        )
    # The members are those of the routes (and of pool.json: one whose instances are all disabled
    # has no upstream); a member pool.json does not name, or every one where it is lost, serves:
    # that is what the configuration rendered from them says.
    stored = pool.load(paths.pool)
    states = {member: stored.get(member, SERVING) for member in sorted({*pool.members(inputs["routes"]), *stored})}
    return {"states": states, "upstreams": pool.upstreams(inputs["routes"]), "routes": inputs["routes"]}


def describe(states: dict[str, str]) -> str:
    """States as the lines of a diff: `<member>: <state>`."""
    return "".join(f"{member}: {state}\n" for member, state in sorted(states.items()))


def short_of_serving(routes: dict[str, Any], before: dict[str, str], after: dict[str, str], least: int) -> list[str]:
    """The environments that had at least `least` serving members before and would have fewer
    after, each as `<name> (serving: <its serving members before>; keeps <n>)`. An environment
    keeps at most all its members but one: one served by a single member goes down while that
    member changes, whatever the order, so it is never short."""
    short = []
    for route in routes.get("environments", []):
        owners = sorted(set(route.get("members", {}).values()))
        serving = [member for member in owners if before.get(member) == SERVING]
        keep = min(least, len(owners) - 1)
        if keep > 0 and len(serving) >= keep > sum(after.get(member) == SERVING for member in owners):
            short.append(f"{route['name']} (serving: {', '.join(serving)}; keeps {keep})")
    return short


def change(
    paths: apply.Paths, members: list[str], state: str | None, check: bool = False, min_serving: int = 0
) -> dict[str, Any]:
    """Set `members` to `state` on this front and load the new configuration (a graceful reload);
    in `check`, or with no `state`, only say what would change. Returns `changed`, `previous`
    (the given members' states before), `states` (every member's after) and `upstreams` (the
    given members').

    `min_serving`: refuse a change that would leave an environment route that has that many
    serving members with fewer (a rolling change whose batch holds every host of an environment
    would otherwise take it down), counting at most all its members but one; 0 refuses nothing.

    The caller holds the gateway's lock (credentials.locked) to change a state. Where the new
    configuration is refused, pool.json is put back: the file always says what serves.
    """
    if state is not None and state not in STATES:
        raise GatewayError(f"pool state {state!r} is not one of {', '.join(STATES)}")
    found = view(paths)
    before: dict[str, str] = found["states"]
    unknown = sorted(set(members) - set(before))
    if unknown:
        raise GatewayError(
            f"{', '.join(repr(name) for name in unknown)} {'is' if len(unknown) == 1 else 'are'} not a member of this"
            f" front; its members: {', '.join(before) or 'none'} (comfyui_gateway_fleet_members: add the host"
            " there and converge the front)"
        )
    after = {**before, **dict.fromkeys(members, state)} if state is not None else dict(before)
    changed = after != before
    short = short_of_serving(found["routes"], before, after, min_serving) if min_serving > 0 else []
    if changed and short:
        raise GatewayError(
            f"setting {', '.join(members)} {state} would take {'; '.join(short)} below the serving members it"
            f" keeps (comfybake_fleet_min_serving {min_serving}, at most all its members but one): it would stop"
            " taking new sessions. Change fewer hosts at a time (comfybake_serial, comfybake_canary), bring a"
            " member back first, or accept the outage (comfybake_fleet_min_serving: 0)"
        )
    if changed and not check:
        old = read(paths.pool)
        pool.save(paths.pool, after)
        try:
            apply.refresh(paths)
        except BaseException:
            pool.restore(paths.pool, old)
            raise
    return {
        "changed": changed,
        "previous": {member: before[member] for member in members},
        "states": after,
        "upstreams": {member: found["upstreams"].get(member, []) for member in members},
    }
