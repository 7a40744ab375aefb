"""The harness finds the host's address on the Docker bridge on every engine, and never an empty one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from harness import bridge
from harness.serve_models import parse_args
from harness.tools import BASE_IMAGE, ROOT

pytestmark = pytest.mark.docker


def network(name: str = "bridge") -> dict:
    return json.loads(subprocess.run(["docker", "network", "inspect", name, "--format", "{{json .}}"],
                                     capture_output=True, text=True, check=True).stdout)  # fmt: skip


def default_route_seen_by_a_container() -> str:
    """The gateway of a container's default route, read from its /proc/net/route."""
    table = subprocess.run(["docker", "run", "--rm", BASE_IMAGE, "cat", "/proc/net/route"],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    gateway = next(line.split()[2] for line in table.splitlines()[1:] if line.split()[1] == "00000000")
    return ".".join(str(byte) for byte in bytes.fromhex(gateway)[::-1])


def test_the_address_is_where_containers_route(docker_engine: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(bridge.OVERRIDE, raising=False)
    assert bridge.host_address() == default_route_seen_by_a_container()


def test_an_engine_that_omits_the_gateway_falls_back_to_the_bridge_interface(docker_engine: None) -> None:
    # A new engine's default bridge: IPAM lists the subnet only, docker0 has the address.
    details = network()
    for config in details["IPAM"]["Config"] or []:
        config.pop("Gateway", None)
    assert bridge.resolve(details) == default_route_seen_by_a_container()


def test_no_address_anywhere_names_every_place_tried(docker_engine: None) -> None:
    details = network()
    details["IPAM"]["Config"] = [{"Subnet": "172.31.0.0/16"}]
    details["Options"] = {"com.docker.network.bridge.name": "comfybake-none0"}
    with pytest.raises(bridge.BridgeError) as raised:
        bridge.resolve(details, "some-container", {"bridge": {"Gateway": ""}})
    message = str(raised.value)
    assert "container some-container lists no gateway on its networks (bridge)" in message
    assert 'IPAM config has no gateway ([{"Subnet": "172.31.0.0/16"}])' in message
    assert "interface comfybake-none0 has no IPv4 address here" in message
    assert bridge.OVERRIDE in message


@pytest.mark.parametrize("value", ["", "0.0.0.0", "docker0", "fe80::1"])  # noqa: S104 - refused values
def test_a_bad_override_is_refused_by_name(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(bridge.OVERRIDE, value)
    with pytest.raises(bridge.BridgeError, match=f"{bridge.OVERRIDE}='{value}' is not a concrete IPv4 address"):
        bridge.host_address()


def test_the_command_line_prints_the_address_or_one_line_of_why(docker_engine: None) -> None:
    script = [sys.executable, str(ROOT / "tests" / "harness" / "bridge.py")]
    done = subprocess.run(script, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and bridge._usable(done.stdout.strip()) == done.stdout.strip()
    missing = subprocess.run([*script, "--network", "comfybake-no-such-network"], capture_output=True, text=True)
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.startswith("bridge: docker network inspect comfybake-no-such-network failed")


@pytest.mark.parametrize("bind", ["", "0.0.0.0", "::"])  # noqa: S104 - refused values
def test_the_model_origin_refuses_an_empty_or_wildcard_bind(bind: str, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--bind", bind, "--state", str(tmp_path / "state.json")])
