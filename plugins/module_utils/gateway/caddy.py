"""The gateway's Caddy configuration (JSON), rendered from its routes, settings and principals.

Every route, whichever mode places it (routes.py), runs the same chain:

1. The Host allowlist: a request for a name the gateway does not serve gets 421 (DNS rebinding).
2. A `token` query value is taken only on a WebSocket upgrade that carries no Authorization: it
   becomes `Authorization: Basic <token>` and the URI keeps only ComfyUI's `clientId`, so the
   token never reaches ComfyUI. On any other request it is refused (400).
3. `Authorization: Bearer <key>` becomes `Basic <key>` (an API key is the base64 of
   `<name>:<secret>`), so users and keys are checked alike, by bcrypt, against the principals
   whose scope covers this route only (hash_cache: one bcrypt per credential, not per request).
4. Authorization is removed before the request reaches ComfyUI (custom nodes read headers);
   security headers are added and Caddy's `Server` header removed; the body is capped.
5. The proxy: an instance's route to its one upstream; an environment's route balances new
   sessions (`least_conn`, active health checks on ComfyUI's /system_stats) and sets a cookie
   naming the instance, which keeps the session there (its /ws, /prompt, /history and /view
   belong to one server) while that instance is healthy. The exporter's route (`metrics`) goes
   to its one upstream, the host's `comfybake exporter`, with the path as Prometheus sent it;
   the job API's (`jobs`) and the control API's (`control`) to the unix sockets of the host's
   `comfybake jobs serve` (their `/jobs/` and `/control/` prefixes stripped in paths mode).
   On a front (fleet mode) the pool state of each upstream's member decides: `serving` takes new
   and sticky sessions; `draining` no new session, but a cookie naming one of its instances still
   reaches it (then the serving ones); `out` nothing, its cookies land on a serving instance.

Access and error logs are JSON, through a filter that drops Authorization, Cookie,
Proxy-Authorization and Set-Cookie, and the `token` query value.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from typing import Any

from . import routes
from .credentials import Principal, covers
from .errors import GatewayError
from .routes import SERVICES

TOKEN = "token"  # noqa: S105 - the name of the query parameter, not a secret
ACCESS_LOGGER = "comfybake_access"
# HSTS binds every port of a name to HTTPS for a year; it is sent only for the public names of
# ACME certificates, never for localhost or a host whose other ports may serve plain HTTP.
HSTS = {"Strict-Transport-Security": ["max-age=31536000"]}
SECURITY_HEADERS = {
    "X-Content-Type-Options": ["nosniff"],
    "X-Frame-Options": ["SAMEORIGIN"],
    "Referrer-Policy": ["same-origin"],
}
SECRET_FIELDS = (
    "request>headers>Authorization",
    "request>headers>Proxy-Authorization",
    "request>headers>Cookie",
    "resp_headers>Set-Cookie",
)
TLS_MODES = ("internal", "acme", "files")
SIZE = re.compile(r"(\d+)\s*([KMGT]?)i?B?", re.IGNORECASE)
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
DURATION = re.compile(r"\d+(ms|s|m|h)")
SETTING_DEFAULTS: dict[str, Any] = {
    "listen": [""],  # every address
    "tls": {"mode": "internal"},
    "max_request_body": "1G",
    "health_uri": "/system_stats",
    "health_interval": "10s",
    "storage": "/var/lib/comfybake-gateway",
    "admin_socket": "/run/comfybake-gateway/admin.sock",
    "access_log": "",  # stdout: the journal, or supervisord's log
}


def size(value: Any) -> int:
    """Bytes of a size such as 1073741824, 512M or 1GiB (powers of 1024)."""
    match = SIZE.fullmatch(str(value).strip())
    if not match:
        raise GatewayError(f"comfyui_gateway_max_request_body {value!r} is not a size such as 512M or 2G")
    return int(match[1]) * UNITS[match[2].upper()]


def _check(settings: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    listen = settings["listen"]
    if not isinstance(listen, list) or not listen:
        problems.append(f"comfyui_gateway_listen {listen!r} must list addresses ('' for every address)")
    else:
        for address in listen:
            try:
                if address != "":
                    ipaddress.ip_address(address)
            except (ValueError, TypeError):
                problems.append(f"comfyui_gateway_listen: {address!r} is not an IP address ('' for every address)")
    tls = settings["tls"]
    mode = tls.get("mode") if isinstance(tls, dict) else None
    if mode not in TLS_MODES:
        problems.append(f"comfyui_gateway_tls.mode {mode!r} is not one of {', '.join(TLS_MODES)}")
    elif mode == "files" and not (
        str(tls.get("cert_file") or "").startswith("/") and str(tls.get("key_file") or "").startswith("/")
    ):
        problems.append("comfyui_gateway_tls mode files needs cert_file and key_file, absolute paths on the host")
    for key in ("health_interval",):
        if not DURATION.fullmatch(str(settings[key])):
            problems.append(f"comfyui_gateway_{key} {settings[key]!r} is not a duration such as 10s or 1m")
    for key in ("health_uri",):
        if not re.fullmatch(r"/[A-Za-z0-9_./-]*", str(settings[key])):
            problems.append(f"comfyui_gateway_{key} {settings[key]!r} is not a path such as /system_stats")
    for key in ("storage", "admin_socket"):
        if not re.fullmatch(r"/[A-Za-z0-9_.@+=:,/-]+", str(settings[key])):
            problems.append(f"gateway {key} {settings[key]!r} must be an absolute path of plain characters")
    if settings["access_log"] and not re.fullmatch(r"/[A-Za-z0-9_.@+=:,/-]+", str(settings["access_log"])):
        problems.append(
            f"comfyui_gateway_access_log {settings['access_log']!r} must be empty (stdout) or an absolute path"
        )
    return problems


def normalize(given: dict[str, Any]) -> dict[str, Any]:
    """The gateway's settings with their defaults, checked in full; sizes in bytes."""
    merged = {
        **routes.DEFAULTS,
        **SETTING_DEFAULTS,
        **{key: value for key, value in given.items() if value is not None},
    }
    unknown = sorted(set(merged) - set(routes.DEFAULTS) - set(SETTING_DEFAULTS))
    problems = [f"unknown gateway setting {key!r}" for key in unknown]
    problems += _check(merged)
    try:
        merged["max_request_body"] = size(merged["max_request_body"])
    except GatewayError as error:
        problems.append(str(error))
    if problems:
        raise GatewayError("the gateway settings are invalid:\n- " + "\n- ".join(problems))
    return merged


def _static(status: int, body: str) -> dict[str, Any]:
    return {"handler": "static_response", "status_code": status, "body": body + "\n", "close": True}


def _accounts(principals: list[Principal], kind: str, name: str, environment: str) -> list[dict[str, str]]:
    return [
        {"username": principal.name, "password": base64.b64encode(principal.hash.encode()).decode()}
        for principal in sorted(principals, key=lambda p: p.name)
        if covers(principal, kind, name, environment)
    ]


def _credentials(accounts: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Steps 2-4: the query token, Bearer keys, the bcrypt check, and removing the credentials."""
    upgrade = {
        "Upgrade": {"pattern": "(?i)^websocket$"},
        "Connection": {"pattern": "(?i)(^|,)\\s*upgrade\\s*(,|$)"},
    }
    return [
        {
            "match": [
                {
                    "method": ["GET"],
                    "query": {TOKEN: ["*"]},
                    "header_regexp": upgrade,
                    "header": {"Authorization": None},
                }
            ],
            "handle": [
                {
                    "handler": "headers",
                    "request": {"set": {"Authorization": [f"Basic {{http.request.uri.query.{TOKEN}}}"]}},
                },
                {"handler": "rewrite", "uri": "{http.request.uri.path}?clientId={http.request.uri.query.clientId}"},
            ],
        },
        {
            "match": [{"query": {TOKEN: ["*"]}}],
            "handle": [
                _static(
                    400,
                    f"the {TOKEN} query parameter is accepted only on a WebSocket upgrade without an Authorization "
                    "header; send Authorization: Bearer <key> instead",
                )
            ],
            "terminal": True,
        },
        {
            "match": [{"header_regexp": {"Authorization": {"pattern": "(?i)^bearer\\s+\\S"}}}],
            "handle": [
                {
                    "handler": "headers",
                    "request": {
                        "replace": {"Authorization": [{"search_regexp": "(?i)^bearer\\s+", "replace": "Basic "}]}
                    },
                }
            ],
        },
        {
            "handle": [
                {
                    "handler": "authentication",
                    "providers": {
                        "http_basic": {
                            "hash": {"algorithm": "bcrypt"},
                            "accounts": accounts,
                            "realm": "comfybake",
                            "hash_cache": {},
                        }
                    },
                },
                {"handler": "headers", "request": {"delete": ["Authorization"]}},
            ]
        },
    ]


def _headers(settings: dict[str, Any]) -> dict[str, list[str]]:
    return {**SECURITY_HEADERS, **(HSTS if settings["tls"]["mode"] == "acme" else {})}


def _response_headers(settings: dict[str, Any]) -> dict[str, Any]:
    return {"handler": "headers", "response": {"set": _headers(settings), "delete": ["Server"], "deferred": True}}


def _body_limit(settings: dict[str, Any]) -> list[dict[str, Any]]:
    """A body over the limit is refused before it is proxied: Caddy's own limit trips mid-stream,
    which answers 502 and would count as the instance failing. `request_body` still caps a body
    sent without Content-Length."""
    limit = settings["max_request_body"]
    length = "{http.request.header.Content-Length}"
    return [
        {
            "match": [{"expression": f'{length} != "" && int({length}) > {limit}'}],
            "handle": [_static(413, f"the request body is larger than the gateway's limit of {limit} bytes")],
            "terminal": True,
        },
        {"handle": [{"handler": "request_body", "max_size": limit}]},
    ]


def _errors(settings: dict[str, Any]) -> dict[str, Any]:
    """What answers an error (401, 502, 503, ...): the same headers as every other answer."""
    return {
        "routes": [
            {
                "handle": [
                    {"handler": "headers", "response": {"set": _headers(settings), "delete": ["Server"]}},
                    {
                        "handler": "static_response",
                        "status_code": "{http.error.status_code}",
                        "body": "{http.error.status_code} {http.error.status_text}\n",
                    },
                ]
            }
        ]
    }


def _proxy(upstreams: list[str], policy: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    handler: dict[str, Any] = {
        "handler": "reverse_proxy",
        "upstreams": [{"dial": upstream} for upstream in upstreams],
        "transport": {"protocol": "http", "dial_timeout": "3s"},
        # No flush_interval -1: Caddy 2.6 then ties each proxied request to the handler's life, and
        # a reload (a key added, a member drained) cut the requests in flight. Responses of unknown
        # length (previews, streams) are flushed as they come anyway; others in 4 KiB writes.
    }
    # Another instance to try: one that failed three times in 10 s (a stopped instance refuses
    # each retry) is skipped for 10 s; a client that aborts an upload counts once, which alone
    # moves no session.
    if len(upstreams) > 1:
        handler["load_balancing"] = {
            "selection_policy": {"policy": policy},
            "try_duration": "5s",
            "try_interval": "250ms",
        }
        handler["health_checks"] = {"passive": {"fail_duration": "10s", "max_fails": 3}}
    handler.update(extra or {})
    return handler


SERVING, DRAINING, OUT = "serving", "draining", "out"
STATES = (SERVING, DRAINING, OUT)  # a member's pool state on a front (pool.py keeps them)


def _environment_proxy(route: dict[str, Any], settings: dict[str, Any], pool: dict[str, str]) -> list[dict[str, Any]]:
    """Sticky routes first (the cookie names an instance: try it first, then the serving ones),
    then new sessions (serving instances only)."""
    cookie = f"comfybake_{route['name']}"
    set_cookie = {
        "response": {
            "add": {
                "Set-Cookie": [
                    f"{cookie}={{http.reverse_proxy.upstream.hostport}}; Path={route['path']}; "
                    "HttpOnly; Secure; SameSite=Lax"
                ]
            }
        }
    }
    if not route["upstreams"]:
        return [{"handle": [_static(503, f"environment {route['name']} has no enabled instance")]}]
    members = route.get("members", {})  # fleet mode; a host's own gateway: every upstream serves

    def state(upstream: str) -> str:
        return pool.get(members[upstream], SERVING) if upstream in members else SERVING

    upstreams = [upstream for upstream in route["upstreams"] if state(upstream) == SERVING]
    draining = [upstream for upstream in route["upstreams"] if state(upstream) == DRAINING]
    sticky = [
        {
            "match": [{"vars": {f"{{http.request.cookie.{cookie}}}": [upstream]}}],
            "handle": [_proxy([upstream, *[u for u in upstreams if u != upstream]], "first", {"headers": set_cookie})],
            "terminal": True,
        }
        for upstream in upstreams + draining
    ]
    if not upstreams:
        return [
            *sticky,
            {
                "handle": [
                    _static(
                        503,
                        f"environment {route['name']} has no serving instance: every member that has one is"
                        " draining or out (comfybake gateway pool)",
                    )
                ]
            },
        ]
    active = {
        "uri": settings["health_uri"],
        "interval": settings["health_interval"],
        "timeout": "5s",
        "expect_status": 200,
    }
    fresh = _proxy(upstreams, "least_conn", {"headers": set_cookie})
    fresh.setdefault("health_checks", {})["active"] = active
    return [*sticky, {"handle": [fresh]}]


def _route_chain(
    kind: str,
    route: dict[str, Any],
    environment: str,
    settings: dict[str, Any],
    principals: list[Principal],
    pool: dict[str, str],
) -> list[dict[str, Any]]:
    """Steps 2-5 for one route, as the routes of a subroute."""
    accounts = _accounts(principals, kind, route["name"], environment)
    if kind == "environment":
        proxy = _environment_proxy(route, settings, pool)
    else:
        proxy = [{"handle": [_proxy([route["upstream"]], "first")]}]
    # An instance's, environment's or job service's prefix is stripped; the exporter's /metrics is its own path.
    strip = route["path"] != "/" and kind != routes.METRICS
    prefix = [{"handle": [{"handler": "rewrite", "strip_path_prefix": route["path"].rstrip("/")}]}]
    return [
        {"handle": [_response_headers(settings)]},
        *_credentials(accounts),
        *_body_limit(settings),
        *(prefix if strip else []),
        *proxy,
    ]


def _allowed(names: list[str], route: dict[str, Any]) -> list[str]:
    return [route["host"]] if route["host"] else list(names)


def _match(names: list[str], route: dict[str, Any]) -> dict[str, Any]:
    match: dict[str, Any] = {"host": _allowed(names, route)}
    if route["path"] != "/":  # a prefix (/instances/a/), or the exporter's one path (/metrics)
        match["path"] = [route["path"] + "*" if route["path"].endswith("/") else route["path"]]
    return match


def _tls(settings: dict[str, Any], subjects: list[str]) -> dict[str, Any]:
    tls = settings["tls"]
    if tls["mode"] == "files":
        return {"certificates": {"load_files": [{"certificate": tls["cert_file"], "key": tls["key_file"]}]}}
    issuer: dict[str, Any] = {"module": "internal"}
    if tls["mode"] == "acme":
        issuer = {"module": "acme", **({"email": tls["email"]} if tls.get("email") else {})}
    return {"automation": {"policies": [{"subjects": subjects, "issuers": [issuer]}]}}


def _logging(settings: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {field: {"filter": "delete"} for field in SECRET_FIELDS}
    fields["request>uri"] = {"filter": "query", "actions": [{"type": "delete", "parameter": TOKEN}]}
    encoder = {"format": "filter", "wrap": {"format": "json"}, "fields": fields}
    writer = {"output": "file", "filename": settings["access_log"]} if settings["access_log"] else {"output": "stdout"}
    return {
        "logs": {
            "default": {
                "writer": {"output": "stderr"},
                "encoder": encoder,
                "exclude": [f"http.log.access.{ACCESS_LOGGER}"],
            },
            ACCESS_LOGGER: {"writer": writer, "encoder": encoder, "include": [f"http.log.access.{ACCESS_LOGGER}"]},
        }
    }


def route_logger(kind: str, name: str, environment: str) -> str:
    """The access logger of one route, so that its lines name it (Caddy 2.6 logs the request as it
    arrived, before any handler could add a field): `comfybake_access.instance.<environment>.<name>`
    or `comfybake_access.environment.<name>`; the access log's `include` takes them all."""
    return f"{ACCESS_LOGGER}.instance.{environment}.{name}" if kind == "instance" else f"{ACCESS_LOGGER}.{kind}.{name}"


def _route_loggers(servers: dict[str, dict[str, Any]], entries: list[tuple[str, dict[str, Any], str]]) -> None:
    """Name each route's access logger where the server can tell the routes apart: by port (a
    server of one route: ports mode), else by host name (hosts mode). Paths mode shares one host:
    its lines keep `comfybake_access`, and their `request.uri` names the route."""
    ports = [route["port"] for _kind, route, _environment in entries]
    for kind, route, environment in entries:
        server = servers[f"port{route['port']}"]
        logger = route_logger(kind, route["name"], environment)
        if ports.count(route["port"]) == 1:
            server["logs"]["default_logger_name"] = logger
        elif route["host"]:
            server["logs"].setdefault("logger_names", {})[route["host"]] = logger


def render(
    routes: dict[str, Any],
    settings: dict[str, Any],
    principals: list[Principal],
    pool: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Caddy's configuration for `routes` (routes.public_routes), `settings`, `principals` and,
    on a front, `pool`: each member's pool state (a member not in it serves)."""
    settings = normalize(settings)
    pool = pool or {}
    wrong = sorted(f"{member!r}: {state!r}" for member, state in pool.items() if state not in STATES)
    if wrong:
        raise GatewayError(f"pool states must be one of {', '.join(STATES)}; found {', '.join(wrong)}")
    names = list(settings["names"])
    entries = [("instance", route, route["environment"]) for route in routes["instances"]]
    entries += [("environment", route, route["name"]) for route in routes["environments"]]
    # gateway.json of an earlier version has no metrics, jobs or control key: no such route.
    entries += [(name, routes[name], "") for name in SERVICES if routes.get(name)]
    servers: dict[str, dict[str, Any]] = {}
    for kind, route, environment in entries:
        name = f"port{route['port']}"
        servers.setdefault(
            name,
            {
                "listen": [
                    f"{address}:{route['port']}" if ":" not in address else f"[{address}]:{route['port']}"
                    for address in settings["listen"]
                ],
                "routes": [],
                "tls_connection_policies": [{"default_sni": names[0]}],
                "automatic_https": {"disable_redirects": True},
                "protocols": ["h1", "h2"],
                "read_header_timeout": "30s",
                "idle_timeout": "5m",
                "logs": {"default_logger_name": ACCESS_LOGGER},
                "errors": _errors(settings),
            },
        )
        servers[name]["routes"].append(
            {
                "match": [_match(names, route)],
                "handle": [
                    {
                        "handler": "subroute",
                        "routes": _route_chain(kind, route, environment, settings, principals, pool),
                    }
                ],
                "terminal": True,
            }
        )
    for each in servers.values():
        if settings["mode"] == "paths":  # a served name, but no route's prefix
            each["routes"].append(
                {
                    "match": [{"host": names}],
                    "handle": [
                        _static(
                            404,
                            "no route here: the routes are "
                            + ("" if settings["fleet"] else "/instances/<name>/ and ")
                            + "/environments/<name>/"
                            + "".join(f" and {routes[name]['path']}" for name in SERVICES if routes.get(name)),
                        )
                    ],
                }
            )
        each["routes"].append(
            {"handle": [_static(421, "this gateway does not serve that host name; use one of its names or routes")]}
        )
    _route_loggers(servers, entries)
    subjects = sorted(set(names) | {entry[1]["host"] for entry in entries if entry[1]["host"]})
    return {
        "admin": {"listen": f"unix/{settings['admin_socket']}", "config": {"persist": False}},
        "storage": {"module": "file_system", "root": settings["storage"]},
        "logging": _logging(settings),
        "apps": {
            "http": {"servers": servers},
            "tls": _tls(settings, subjects),
            "pki": {"certificate_authorities": {"local": {"name": "comfybake gateway CA", "install_trust": False}}},
        },
    }
