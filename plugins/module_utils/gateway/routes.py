"""The gateway's public routes, from the instance layout: one per instance, one per environment.

Pure: `public_routes` reads only its arguments (records of the `instance_layout` filter, as the
comfyui_instances role writes them into `<config root>/instances.json`, and the gateway's
settings), so the instances role (the routing file's public URLs), the gateway module and the
command line all compute the same routes. Every problem is reported at once.

Modes (`comfyui_gateway_mode`):
- `ports`: each instance answers on its own port plus `port_offset`, each environment on
  `environment_ports[<name>]` or else the next free port from `port`; any host name of `names`.
- `hosts`: one port, a host name per route: `<instance>.<domain>` and `<environment>.<domain>`.
- `paths`: one port and host, `/instances/<name>/` and `/environments/<name>/` (ComfyUI's
  frontend still asks for some absolute paths, so this mode has caveats: docs/gateway.md).

With `metrics: {"upstream": "HOST:PORT"}` in the settings (the host's `comfybake exporter`), one
more route, `metrics`, serves the exporter to Prometheus: on its own port (`metrics.port`,
METRICS_PORT unless set) in `ports` mode, as `metrics.<domain>` in `hosts` mode, and below
`/metrics` in `paths` mode. Its port is claimed after every other route's, so adding it never
moves another route: the instances' and environments' URLs are the same with it or without it.

With `jobs` and `control` in the settings (`{"socket": "/run/comfybake-jobs/jobs.sock"}`: the
host's `comfybake jobs serve`), two more routes serve the job API and the control API from their
unix sockets, placed as the metrics route is: on their own ports (JOBS_PORT, CONTROL_PORT unless
set) in `ports` mode, as `jobs.<domain>` and `control.<domain>` in `hosts` mode, and below
`/jobs/` and `/control/` (stripped) in `paths` mode. Their ports are claimed last too.

Fleet mode (`fleet: true`, a front): the records are those of every member (a fleet host), each
with `member` (its inventory name) and its `url` on the member's address (`fleet_records`). Only
environment routes are served, each balancing over the instances of every member, and each
knows the member of each upstream (`members`), so that a member's pool state (pool.py) decides
what reaches it. There is no route per instance: instance names repeat across hosts.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any
from urllib.parse import urlsplit

from .errors import GatewayError

MODES = ("ports", "hosts", "paths")
# A DNS label (RFC 1123), as the hosts mode makes names of instances and environments.
LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
HOSTNAME = re.compile(r"(\*\.)?[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")
# What a front takes from its members' files (another host's, so checked as strictly as the
# instance_layout filter checks a host's own): instance names, environment names, member names.
INSTANCE = re.compile(r"[a-z0-9][a-z0-9-]{0,22}")
ENVIRONMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MEMBER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,252}")
MIN_PORT, MAX_PORT = 1, 65535
DEFAULTS: dict[str, Any] = {
    "mode": "ports",
    "port": 8443,
    "port_offset": 1000,
    "environment_ports": {},
    "domain": "",
    "names": ["localhost", "127.0.0.1"],
    "metrics": None,  # {"upstream": "127.0.0.1:9721", "port": 9722}: the exporter's route
    "jobs": None,  # {"socket": "/run/comfybake-jobs/jobs.sock", "port": 9723}: the job API's route
    "control": None,  # {"socket": "/run/comfybake-jobs/control.sock", "port": 9724}: the control API's route
    "fleet": False,  # a front: environment routes over the instances of every member
}
METRICS = "metrics"  # the route's name, its host label (hosts mode) and the scope that reaches it
METRICS_PORT = 9722  # its port in ports mode, unless comfyui_gateway_metrics_port says otherwise
METRICS_PATH = "/metrics"  # where Prometheus asks (its default metrics_path), in every mode
JOBS, CONTROL = "jobs", "control"  # the job service's routes: each its name, host label and scope
JOBS_PORT, CONTROL_PORT = 9723, 9724  # their ports in ports mode, unless set otherwise
# The service routes, each with one upstream, in the order their ports are claimed (after every
# instance's and environment's route), with what names them in messages and the variables to change.
SERVICES = (METRICS, JOBS, CONTROL)
SERVICE_PORTS = {METRICS: METRICS_PORT, JOBS: JOBS_PORT, CONTROL: CONTROL_PORT}
SERVICE_LABELS = {METRICS: "the exporter's route", JOBS: "the job API's route", CONTROL: "the control API's route"}
SERVICE_SWITCHES = {METRICS: "comfyui_gateway_metrics", JOBS: "comfyui_jobs_enabled", CONTROL: "comfyui_jobs_enabled"}
SOCKET = re.compile(r"/[A-Za-z0-9_.@+=:,/-]+")


def _is_port(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and MIN_PORT <= value <= MAX_PORT


def check_name(name: Any) -> bool:
    """A host name or an IP address that may be given a certificate and allowed as Host."""
    if not isinstance(name, str):
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return bool(HOSTNAME.fullmatch(name)) and len(name) <= 253
    return True


def _url_host(name: str) -> str:
    return f"[{name}]" if ":" in name else name


def _url(host: str, port: int, path: str = "/") -> str:
    return f"https://{_url_host(host)}{'' if port == 443 else f':{port}'}{path}"


def _upstream(record: dict[str, Any]) -> str:
    """host:port to dial: where the instance answers (its `url`: loopback for a wildcard)."""
    parts = urlsplit(str(record.get("url", "")))
    if not parts.hostname or not parts.port:
        raise GatewayError(f"instance {record.get('name')!r}: its url {record.get('url')!r} has no host and port")
    return f"{_url_host(parts.hostname)}:{parts.port}"


def _dial(listen: Any) -> tuple[str, int] | None:
    """(host, port) to dial for an ADDRESS:PORT where a service listens: loopback for a wildcard
    address; None if it is not one."""
    host, _colon, port = str(listen).rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not port.isdigit() or not _is_port(int(port)):
        return None
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 - an address the exporter may listen on, not a bind
        host = "::1" if host == "::" else "127.0.0.1"
    if not check_name(host):
        return None
    return host, int(port)


def _check_metrics(metrics: Any, problems: list[str]) -> None:
    if metrics is None:
        return
    if not isinstance(metrics, dict) or set(metrics) - {"upstream", "port"}:
        problems.append(f"gateway setting metrics {metrics!r} must be an object with upstream (HOST:PORT) and port")
        return
    if _dial(metrics.get("upstream")) is None:
        problems.append(
            f"comfyui_exporter_listen {metrics.get('upstream')!r} (the metrics route's upstream) is not ADDRESS:PORT,"
            " such as 127.0.0.1:9721"
        )
    if not _is_port(metrics.get("port", METRICS_PORT)):
        problems.append(
            f"comfyui_gateway_metrics_port {metrics.get('port')!r} must be a port from {MIN_PORT} to {MAX_PORT}"
        )


def _check_socket_route(name: str, given: Any, problems: list[str]) -> None:
    """The job service's `jobs` or `control` setting: its unix socket and its port (ports mode)."""
    if given is None:
        return
    if not isinstance(given, dict) or set(given) - {"socket", "port"}:
        problems.append(f"gateway setting {name} {given!r} must be an object with socket (a path) and port")
        return
    if not isinstance(given.get("socket"), str) or not SOCKET.fullmatch(given["socket"]):
        problems.append(
            f"the {name} socket {given.get('socket')!r} (comfyui_jobs_socket_dir) must be an absolute path of plain"
            f" characters, such as /run/comfybake-jobs/{name}.sock"
        )
    if not _is_port(given.get("port", SERVICE_PORTS[name])):
        problems.append(
            f"comfyui_gateway_{name}_port {given.get('port')!r} must be a port from {MIN_PORT} to {MAX_PORT}"
        )


def settings_with_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    return {**DEFAULTS, **{key: value for key, value in settings.items() if value is not None}}


def _check_settings(settings: dict[str, Any], problems: list[str]) -> None:
    if settings["mode"] not in MODES:
        problems.append(f"comfyui_gateway_mode {settings['mode']!r} is not one of {', '.join(MODES)}")
    for key in ("port", "port_offset"):
        if not isinstance(settings[key], int) or isinstance(settings[key], bool) or settings[key] < 0:
            problems.append(f"comfyui_gateway_{key} {settings[key]!r} must be a whole number")
    if not _is_port(settings["port"]):
        problems.append(f"comfyui_gateway_port {settings['port']!r} must be a port from {MIN_PORT} to {MAX_PORT}")
    names = settings["names"]
    if not isinstance(names, list) or not names:
        problems.append("comfyui_gateway_names must list at least one host name or address the gateway answers to")
    else:
        problems += [
            f"comfyui_gateway_names: {name!r} is not a lower-case host name or an IP address"
            for name in names
            if not check_name(name)
        ]
    ports = settings["environment_ports"]
    if not isinstance(ports, dict) or not all(_is_port(port) for port in ports.values()):
        problems.append(
            f"comfyui_gateway_environment_ports {ports!r} must map environment names to ports "
            f"from {MIN_PORT} to {MAX_PORT}"
        )
    _check_metrics(settings["metrics"], problems)
    for name in (JOBS, CONTROL):
        _check_socket_route(name, settings[name], problems)
    if not isinstance(settings["fleet"], bool):
        problems.append(f"gateway setting fleet {settings['fleet']!r} must be true or false")
    if settings["mode"] == "hosts" and not (isinstance(settings["domain"], str) and check_name(settings["domain"])):
        problems.append(
            f"comfyui_gateway_domain {settings['domain']!r} must be a host name in hosts mode "
            "(each instance answers as <instance>.<domain>, each environment as <environment>.<domain>)"
        )


def _ports_mode(
    instances: list[dict[str, Any]],
    environments: dict[str, dict[str, Any]],
    services: list[dict[str, Any]],
    settings: dict[str, Any],
    problems: list[str],
    kept: dict[str, int] | None = None,
) -> None:
    host = settings["names"][0]
    taken: dict[int, str] = {}
    for record in instances:
        taken.setdefault(int(record["instance_port"]), f"instance {record['name']!r} itself")
    wanted = settings["environment_ports"]
    for name in sorted(set(wanted) - set(environments)):
        problems.append(f"comfyui_gateway_environment_ports: {name!r} is not the environment of any instance")

    def claim(port: int, what: str) -> None:
        if not _is_port(port):
            problems.append(
                f"{what}: public port {port} is outside {MIN_PORT}-{MAX_PORT}; lower comfyui_gateway_port_offset"
            )
        elif port in taken:
            also = "".join(f", comfyui_gateway_{route['name']}_port" for route in services)
            also += ", comfyui_exporter_listen" if any(route["name"] == METRICS for route in services) else ""
            problems.append(
                f"{what} and {taken[port]} both want port {port}; change comfyui_gateway_port_offset, "
                f"comfyui_gateway_environment_ports{also} or the instance's port"
            )
        taken[port] = what

    for record in instances:
        record["port"] = int(record["instance_port"]) + settings["port_offset"]
        claim(record["port"], f"the route of instance {record['name']!r}")
        record["public_url"] = _url(host, record["port"])
    for name in sorted(wanted):
        if name in environments:
            claim(wanted[name], f"the route of environment {name!r}")
    # A front's environments keep the ports they were given (gateway.json), whatever others come or go.
    given = {
        name: port
        for name, port in sorted((kept or {}).items())
        if name in environments and name not in wanted and _is_port(port) and port not in taken
    }
    for name, port in given.items():
        claim(port, f"the route of environment {name!r}")
    next_port = settings["port"]
    for name, route in sorted(environments.items()):
        port = wanted.get(name, given.get(name))
        if port is None:
            while next_port in taken and next_port < MAX_PORT:
                next_port += 1
            port = next_port
            claim(port, f"the route of environment {name!r}")
        route.update(port=port, public_url=_url(host, port))
    for route in services:  # last: they never move another route
        name = route["name"]
        if name == METRICS:
            claim(int(route["upstream"].rpartition(":")[2]), "the exporter itself (comfyui_exporter_listen)")
        claim(route["port"], f"the {name} route (comfyui_gateway_{name}_port)")
        route["public_url"] = _url(host, route["port"], METRICS_PATH if name == METRICS else "/")


def _hosts_mode(
    instances: list[dict[str, Any]],
    environments: dict[str, dict[str, Any]],
    services: list[dict[str, Any]],
    settings: dict[str, Any],
    problems: list[str],
) -> None:
    seen: dict[str, str] = {}
    routes = [("instance", record) for record in instances] + [("environment", env) for env in environments.values()]
    routes += [(SERVICE_LABELS[route["name"]], route) for route in services]
    fix = {SERVICE_LABELS[name]: f"rename the {{other}}, or set {SERVICE_SWITCHES[name]} false" for name in SERVICES}
    for kind, route in routes:
        label = route["name"].lower()
        if not LABEL.fullmatch(label):
            problems.append(
                f"{kind} {route['name']!r} cannot be a host name label (letters, digits and '-' only); "
                "rename it or use comfyui_gateway_mode ports"
            )
        host = f"{label}.{settings['domain']}"
        if host in seen:
            hint = fix.get(kind, "rename one").format(other=seen[host].split()[0])
            problems.append(f"{kind} {route['name']!r} and {seen[host]} would both answer as {host}; {hint}")
        seen[host] = f"{kind} {route['name']!r}"
        path = METRICS_PATH if kind == SERVICE_LABELS[METRICS] else "/"
        route.update(port=settings["port"], host=host, public_url=_url(host, settings["port"], path))


def _paths_mode(
    instances: list[dict[str, Any]],
    environments: dict[str, dict[str, Any]],
    services: list[dict[str, Any]],
    settings: dict[str, Any],
    problems: list[str],
) -> None:
    host = settings["names"][0]
    # Caddy matches paths without regard to case: Prod and prod would share a prefix.
    for kind, names in (("instance", [r["name"] for r in instances]), ("environment", list(environments))):
        seen: dict[str, str] = {}
        for name in names:
            if name.lower() in seen:
                problems.append(f"{kind}s {seen[name.lower()]!r} and {name!r} differ only in case; rename one")
            seen[name.lower()] = name
    for record in instances:
        record.update(port=settings["port"], path=f"/instances/{record['name']}/")
    for route in environments.values():
        route.update(port=settings["port"], path=f"/environments/{route['name']}/")
    for route in services:  # the exporter's own path (nothing stripped); /jobs/ and /control/ (stripped)
        route.update(port=settings["port"], path=METRICS_PATH if route["name"] == METRICS else f"/{route['name']}/")
    for route in [*instances, *environments.values(), *services]:
        route["public_url"] = _url(host, settings["port"], route["path"])


def fleet_records(members: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of a front: each member's (`name`, `address`, `instances`: the records of its
    instances.json) with `member` set and the `url` host replaced by the member's address.

    Another host's file is checked before anything of it is used: every problem, naming the
    member and the value, at once.
    """
    problems: list[str] = []
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for member in members:
        name, given = member.get("name"), member.get("address")
        address = given.lower() if isinstance(given, str) else given  # host names know no case
        if not isinstance(name, str) or not MEMBER.fullmatch(name):
            problems.append(
                f"fleet member {name!r} is not an inventory host name (letters, digits, '.', '_', ':', '-')"
            )
            continue
        if name in seen:
            problems.append(f"fleet member {name!r} is listed twice in comfyui_gateway_fleet_members")
        seen.add(name)
        if not check_name(address):
            problems.append(
                f"fleet member {name!r}: its address {given!r} (comfybake_fleet_address, else ansible_host) is not"
                " a host name or an IP address"
            )
            continue
        layout = member.get("instances")
        if not isinstance(layout, list) or not all(isinstance(record, dict) for record in layout):
            problems.append(f"fleet member {name!r}: its instances.json has no list of instances; converge it again")
            continue
        for record in layout:
            instance, environment, port = record.get("name"), record.get("environment"), record.get("port")
            what = f"fleet member {name!r}, instance {instance!r}"
            if not isinstance(instance, str) or not INSTANCE.fullmatch(instance):
                problems.append(f"{what}: the name is not an instance name ([a-z0-9][a-z0-9-]*, 23 at most)")
            if not isinstance(environment, str) or not ENVIRONMENT.fullmatch(environment):
                problems.append(f"{what}: environment {environment!r} is not an environment name")
            parts = urlsplit(str(record.get("url", "")))
            try:
                dial = parts.port
            except ValueError:
                dial = None
            if parts.scheme != "http" or not _is_port(dial) or not _is_port(port):
                problems.append(f"{what}: url {record.get('url')!r} is not http://ADDRESS:PORT")
                continue
            url = f"http://{_url_host(str(address))}:{dial}"
            records.append({**record, "member": name, "url": url})
    if problems:
        raise GatewayError("the fleet's instance layouts cannot be routed:\n- " + "\n- ".join(problems))
    return records


def kept_ports(routes: Any) -> dict[str, int]:
    """Environment -> port of the environment routes in `routes` (gateway.json's, a front's last
    render): the ports given out, which public_routes keeps."""
    if not isinstance(routes, dict) or not isinstance(routes.get("environments"), list):
        return {}
    return {
        str(route["name"]): route["port"]
        for route in routes["environments"]
        if isinstance(route, dict) and "name" in route and _is_port(route.get("port"))
    }


def public_routes(
    records: list[dict[str, Any]], settings: dict[str, Any], kept: dict[str, int] | None = None
) -> dict[str, Any]:
    """The gateway's routes for the instance layout `records`: one per instance, one per
    environment, `metrics` (the exporter's route, None without settings' `metrics`), and `jobs`
    and `control` (the job service's APIs, None without settings' `jobs` and `control`).

    `kept` (ports mode; a front passes the ports of its last render, `kept_ports`): each
    environment still routed keeps its port, so that an environment a member adds or removes
    moves no other one. Ports set in `environment_ports` come first.

    An environment's route balances over its enabled instances only; a disabled instance keeps
    its own route, which answers 502 while it is stopped. In fleet mode (settings' `fleet`, the
    records of `fleet_records`) there are environment routes only, and each has `members`, the
    member of each upstream.
    """
    settings = settings_with_defaults(settings)
    problems: list[str] = []
    _check_settings(settings, problems)
    if problems:
        raise GatewayError("the gateway settings are invalid:\n- " + "\n- ".join(problems))
    fleet = settings["fleet"] is True
    instances: list[dict[str, Any]] = []
    environments: dict[str, dict[str, Any]] = {}
    owners: dict[str, str] = {}  # upstream -> the instance (and member) that answers there
    for record in records:
        route = {
            "name": record["name"],
            "environment": record["environment"],
            "instance_port": record["port"],
            "upstream": _upstream(record),
            "enabled": record.get("enabled", True) is not False,
            "port": None,
            "host": "",
            "path": "/",
        }
        instances.append(route)
        env = environments.setdefault(
            record["environment"],
            {"name": record["environment"], "port": None, "host": "", "path": "/", "instances": [], "upstreams": []},
        )
        if fleet:
            member = record.get("member")
            if not isinstance(member, str):
                raise GatewayError(f"instance {record['name']!r} has no member: a front routes the records of members")
            env.setdefault("members", {})
            owner = f"instance {record['name']!r} of member {member!r}"
            if route["upstream"] in owners:
                problems.append(
                    f"{owner} and {owners[route['upstream']]} both answer at {route['upstream']}; give each member"
                    " its own address (comfybake_fleet_address)"
                )
            owners[route["upstream"]] = owner
        if route["enabled"]:
            env["instances"].append(f"{record['member']}/{route['name']}" if fleet else route["name"])
            env["upstreams"].append(route["upstream"])
            if fleet:
                env["members"][route["upstream"]] = record["member"]
    service = {METRICS: _metrics_route(settings[METRICS])}
    service.update({name: _socket_route(name, settings[name]) for name in (JOBS, CONTROL)})
    services = [route for route in service.values() if route is not None]
    routed = [] if fleet else instances  # a front has no route per instance
    if settings["mode"] == "ports":
        _ports_mode(routed, environments, services, settings, problems, kept)
    else:
        place = _hosts_mode if settings["mode"] == "hosts" else _paths_mode
        place(routed, environments, services, settings, problems)
    if problems:
        raise GatewayError("the gateway's routes collide:\n- " + "\n- ".join(problems))
    return {
        "instances": routed,
        "environments": [environments[name] for name in sorted(environments)],
        **service,
    }


def _metrics_route(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """The exporter's route, before a mode places it: its upstream (loopback for a wildcard)."""
    if metrics is None:
        return None
    dial = _dial(metrics["upstream"])
    if dial is None:  # _check_metrics reported it already
        raise GatewayError(f"comfyui_exporter_listen {metrics['upstream']!r} is not ADDRESS:PORT")
    return {
        "name": METRICS,
        "upstream": f"{_url_host(dial[0])}:{dial[1]}",
        "port": metrics.get("port", METRICS_PORT),
        "host": "",
        "path": "/",
        "public_url": "",
    }


def _socket_route(name: str, given: dict[str, Any] | None) -> dict[str, Any] | None:
    """The job API's or control API's route, before a mode places it: its unix socket upstream
    (Caddy's `unix/<path>` dial address)."""
    if given is None:
        return None
    return {
        "name": name,
        "upstream": f"unix/{given['socket']}",
        "port": given.get("port", SERVICE_PORTS[name]),
        "host": "",
        "path": "/",
        "public_url": "",
    }
