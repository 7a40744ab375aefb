"""The Docker host's address as its containers see it: where the harness serves what they fetch.

The model origins of the bake tests and of the molecule scenarios listen on this address. It is
found in the first of these places that has one:

1. `COMFYBAKE_BRIDGE_ADDRESS`, for engines this machine cannot inspect (remote or rootless);
2. the gateway of a named container's own networks (`docker inspect`);
3. the gateway in the network's IPAM config (`docker network inspect`); an engine that has
   just created its default bridge leaves it out, although the bridge has its address;
4. the IPv4 address of the network's bridge interface (`docker0` for `bridge`), from the kernel.

Nothing is ever served on an empty or wildcard address: when no place answers, the error
names each place tried and what it held.

    python tests/harness/bridge.py [--network bridge] [--container NAME]
"""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys
from typing import Any

OVERRIDE = "COMFYBAKE_BRIDGE_ADDRESS"
SIOCGIFADDR = 0x8915  # <linux/sockios.h>: an interface's IPv4 address


class BridgeError(RuntimeError):
    """No usable address; the message lists every place tried."""


def _inspect(*args: str) -> dict[str, Any]:
    done = subprocess.run(["docker", *args, "--format", "{{json .}}"], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise BridgeError(f"docker {' '.join(args)} failed: {done.stderr.strip() or done.returncode}")
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def _usable(address: str | None) -> str | None:
    """`address` if it is a concrete IPv4 address (not empty, not 0.0.0.0), else None."""
    try:
        parsed = ipaddress.IPv4Address((address or "").split("/")[0])
    except ValueError:
        return None
    return None if parsed.is_unspecified else str(parsed)


def interface_address(name: str) -> str:
    """The IPv4 address of the interface `name`, as the kernel has it (OSError when it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        answer = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
    return socket.inet_ntoa(answer[20:24])


def host_address(network: str = "bridge", container: str | None = None) -> str:
    """The address on `network` (or `container`'s networks) where this host is reached; BridgeError otherwise."""
    override = os.environ.get(OVERRIDE)
    if override is not None:
        if found := _usable(override):
            return found
        raise BridgeError(f"{OVERRIDE}={override!r} is not a concrete IPv4 address; set it to an address of this host")
    networks = None
    if container:
        networks = (_inspect("inspect", container).get("NetworkSettings") or {}).get("Networks") or {}
    return resolve(_inspect("network", "inspect", network), container, networks)


def resolve(details: dict[str, Any], container: str | None = None, networks: dict[str, Any] | None = None) -> str:
    """Steps 2 to 4 on what `docker network inspect` (and `docker inspect` of `container`) said."""
    tried: list[str] = []
    if container:
        gateways = [item.get("Gateway") for item in (networks or {}).values()]
        if found := next(filter(None, map(_usable, gateways)), None):
            return found
        tried.append(f"container {container} lists no gateway on its networks ({', '.join(networks or {}) or 'none'})")
    name = details.get("Name", "?")
    configs = (details.get("IPAM") or {}).get("Config") or []
    if found := next(filter(None, (_usable(item.get("Gateway")) for item in configs)), None):
        return found
    tried.append(f"network {name}'s IPAM config has no gateway ({json.dumps(configs)})")
    options = details.get("Options") or {}
    interface = options.get("com.docker.network.bridge.name") or f"br-{details.get('Id', '')[:12]}"
    try:
        if found := _usable(interface_address(interface)):
            return found
        tried.append(f"interface {interface} has no usable IPv4 address")
    except OSError as error:
        tried.append(f"interface {interface} has no IPv4 address here ({error.strerror or error})")
    raise BridgeError(
        "cannot find the address where containers reach this host: "
        + "; ".join(tried)
        + f". Is the Docker engine remote or rootless? Set {OVERRIDE} to an address of this host that containers reach."
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", default="bridge", help="the Docker network (default: bridge)")
    parser.add_argument("--container", help="a container whose own networks are asked first")
    args = parser.parse_args()
    try:
        print(host_address(args.network, args.container))
    except BridgeError as error:
        print(f"bridge: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
