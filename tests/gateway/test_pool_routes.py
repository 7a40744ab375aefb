"""A front's routes and Caddy configuration with pool states, as pure functions (the proxy itself,
with real Caddy and doubles: test_fleet_gateway.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from comfybake.engine.gateway import caddy, pool
from comfybake.engine.gateway.errors import GatewayError
from comfybake.engine.gateway.routes import fleet_records, kept_ports, public_routes


def member(name: str, address: str, *instances: tuple[str, str, int]) -> dict[str, Any]:
    return {
        "name": name,
        "address": address,
        "instances": [
            {"name": n, "environment": e, "port": p, "url": f"http://127.0.0.1:{p}", "enabled": True}
            for n, e, p in instances
        ],
    }


# Two hosts with the same instance names (a layout per GPU type repeats them) and one other.
FLEET = [
    member("gpu-a-1", "10.0.0.11", ("a", "prod", 8188), ("b", "dev", 8189)),
    member("gpu-a-2", "10.0.0.12", ("a", "prod", 8188), ("b", "dev", 8189)),
    member("gpu-b-1", "gpu-b-1.example.com", ("x", "prod", 8190)),
]
SETTINGS = {"names": ["front.example.com"], "fleet": True}


def front_routes(fleet: list[dict[str, Any]] = FLEET) -> dict[str, Any]:
    return public_routes(fleet_records(fleet), SETTINGS)


def environment_chain(config: dict[str, Any], port: int) -> list[dict[str, Any]]:
    """The proxy steps of the environment route on `port` (after the credentials and body limit)."""
    route = config["apps"]["http"]["servers"][f"port{port}"]["routes"][0]
    chain = route["handle"][0]["routes"]
    return [
        step
        for step in chain
        if (
            any(h["handler"] in ("reverse_proxy", "static_response") for h in step.get("handle", []))
            and not step.get("match")
        )
        or any("vars" in m for m in step.get("match", []))
    ]


def sticky(chain: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Cookie value -> the upstreams its route tries, in order."""
    return {
        next(iter(step["match"][0]["vars"].values()))[0]: [u["dial"] for u in step["handle"][0]["upstreams"]]
        for step in chain
        if step.get("match")
    }


def fresh(chain: list[dict[str, Any]]) -> dict[str, Any]:
    return chain[-1]["handle"][0]


def test_a_front_routes_environments_over_every_members_instances_and_no_instance() -> None:
    routes = front_routes()
    assert routes["instances"] == []  # instance names repeat across hosts: no route per instance
    prod = next(route for route in routes["environments"] if route["name"] == "prod")
    assert prod["upstreams"] == ["10.0.0.11:8188", "10.0.0.12:8188", "gpu-b-1.example.com:8190"]
    assert prod["members"] == {
        "10.0.0.11:8188": "gpu-a-1",
        "10.0.0.12:8188": "gpu-a-2",
        "gpu-b-1.example.com:8190": "gpu-b-1",
    }
    assert prod["instances"] == ["gpu-a-1/a", "gpu-a-2/a", "gpu-b-1/x"]
    assert pool.upstreams(routes) == {
        "gpu-a-1": ["10.0.0.11:8188", "10.0.0.11:8189"],
        "gpu-a-2": ["10.0.0.12:8188", "10.0.0.12:8189"],
        "gpu-b-1": ["gpu-b-1.example.com:8190"],
    }
    # an IPv6 address is bracketed in the URL and the upstream
    six = public_routes(fleet_records([member("v6", "fd00::5", ("a", "prod", 8188))]), SETTINGS)
    assert six["environments"][0]["upstreams"] == ["[fd00::5]:8188"]
    # host names know no case: an address written in capitals is the same host
    upper = public_routes(fleet_records([member("gpu-1", "GPU1.Internal", ("a", "prod", 8188)),
                                         member("v6", "FD00::5", ("a", "prod", 8188))]), SETTINGS)  # fmt: skip
    assert upper["environments"][0]["upstreams"] == ["gpu1.internal:8188", "[fd00::5]:8188"]


def test_an_environment_keeps_the_port_it_was_given() -> None:
    """On a front the ports of the last render (kept_ports of gateway.json's routes) stay: a new
    environment takes a free port, one that left frees its own, none moves another."""
    first = front_routes()
    kept = kept_ports(first)
    grown = [*FLEET, member("gpu-c-1", "10.0.0.13", ("a", "aaa", 8188), ("b", "zzz", 8189))]
    second = public_routes(fleet_records(grown), SETTINGS, kept)
    ports = {route["name"]: route["port"] for route in second["environments"]}
    assert {name: ports[name] for name in kept} == kept
    assert len(set(ports.values())) == len(ports)
    # an explicit comfyui_gateway_environment_ports entry wins over a kept port
    pinned = public_routes(fleet_records(FLEET), {**SETTINGS, "environment_ports": {"dev": 9000}}, kept)
    assert {route["name"]: route["port"] for route in pinned["environments"]}["dev"] == 9000


def test_pool_states_decide_new_and_sticky_sessions() -> None:
    routes = front_routes()
    settings = caddy.normalize(SETTINGS)
    prod_port = next(route["port"] for route in routes["environments"] if route["name"] == "prod")
    states = {"gpu-a-1": "draining", "gpu-a-2": "out", "gpu-b-1": "serving"}
    chain = environment_chain(caddy.render(routes, settings, [], states), prod_port)
    # draining keeps its cookie's route, falling back to serving ones only; out has none
    assert sticky(chain) == {
        "gpu-b-1.example.com:8190": ["gpu-b-1.example.com:8190"],
        "10.0.0.11:8188": ["10.0.0.11:8188", "gpu-b-1.example.com:8190"],
    }
    new = fresh(chain)
    assert [u["dial"] for u in new["upstreams"]] == ["gpu-b-1.example.com:8190"]  # new sessions: serving only
    assert "10.0.0.12" not in json.dumps(chain)  # out appears nowhere

    # every member serving (and a member never set): all in the pool, every fallback serving
    everyone = environment_chain(caddy.render(routes, settings, [], {"gpu-a-1": "serving"}), prod_port)
    assert sticky(everyone)["10.0.0.12:8188"] == ["10.0.0.12:8188", "10.0.0.11:8188", "gpu-b-1.example.com:8190"]
    assert fresh(everyone)["load_balancing"]["selection_policy"] == {"policy": "least_conn"}
    assert len(fresh(everyone)["upstreams"]) == 3


def test_an_environment_without_a_serving_member_answers_503_but_keeps_draining_sessions() -> None:
    routes = front_routes()
    settings = caddy.normalize(SETTINGS)
    dev_port = next(route["port"] for route in routes["environments"] if route["name"] == "dev")
    chain = environment_chain(caddy.render(routes, settings, [], {"gpu-a-1": "draining", "gpu-a-2": "out"}), dev_port)
    assert sticky(chain) == {"10.0.0.11:8189": ["10.0.0.11:8189"]}
    assert fresh(chain)["status_code"] == 503
    assert "environment dev has no serving instance" in fresh(chain)["body"]


def test_a_hosts_own_gateway_renders_as_before() -> None:
    """Without members (a host's own gateway) the states change nothing, and routes have no members."""
    records = [r for m in FLEET[:1] for r in m["instances"]]
    settings = caddy.normalize({"names": ["gpu1.example.com"]})
    routes = public_routes(records, settings)
    assert "members" not in routes["environments"][0]
    assert {r["name"] for r in routes["instances"]} == {"a", "b"}
    assert caddy.render(routes, settings, [], {"gpu-a-1": "out"}) == caddy.render(routes, settings, [])


def test_a_members_file_is_checked_before_use() -> None:
    bad = [
        member("gpu-a-1", "10.0.0.11", ("A_b", "prod", 8188)),
        member("gpu-a-2", "10.0.0.12", ("a", "pr}od", 8188)),
        member("gpu a 3", "10.0.0.13"),
        member("gpu-a-4", "Not An Address"),
        {
            "name": "gpu-a-5",
            "address": "10.0.0.15",
            "instances": [{"name": "a", "environment": "prod", "port": 1, "url": "unix:/x"}],
        },
    ]
    with pytest.raises(GatewayError) as error:
        fleet_records(bad)
    message = str(error.value)
    for part in ("'gpu-a-1', instance 'A_b'", "environment 'pr}od'", "fleet member 'gpu a 3'",
                 "its address 'Not An Address'", "url 'unix:/x' is not http://ADDRESS:PORT"):  # fmt: skip
        assert part in message, (part, message)
    # two members on one address would share upstreams: refused, naming both
    same = [member("gpu-a-1", "10.0.0.11", ("a", "prod", 8188)), member("gpu-a-2", "10.0.0.11", ("a", "prod", 8188))]
    with pytest.raises(GatewayError, match="'a' of member 'gpu-a-2' and instance 'a' of member 'gpu-a-1' both answer"):
        public_routes(fleet_records(same), SETTINGS)


def test_pool_files_keep_states_drop_leavers_and_start_newcomers_serving(tmp_path: Any) -> None:
    path = str(tmp_path / "pool.json")
    assert pool.load(path) == {}
    assert pool.save(path, {"gpu-a-1": "out", "gone": "draining"})
    assert not pool.save(path, {"gpu-a-1": "out", "gone": "draining"})  # unchanged: not written
    assert oct((tmp_path / "pool.json").stat().st_mode & 0o777) == "0o644"
    assert pool.reconcile(pool.load(path), ["gpu-a-1", "gpu-a-2"]) == {"gpu-a-1": "out", "gpu-a-2": "serving"}
    (tmp_path / "pool.json").write_text('{"format": 1, "members": {"gpu-a-1": "away"}}')
    with pytest.raises(GatewayError, match=r"pool\.json is not a pool file"):
        pool.load(path)
    with pytest.raises(GatewayError, match=r"pool states must be one of serving, draining, out; found 'x': 'away'"):
        caddy.render(front_routes(), caddy.normalize(SETTINGS), [], {"x": "away"})
