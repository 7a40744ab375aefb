"""`comfybake gateway users|keys|pool|status`: the gateway's users and API keys, a front's pool
states, and its routes' health.

Runs on the host (or in a container image) as root: the users and keys live in
`<config root>/gateway/credentials.json` (root's, 0600, bcrypt hashes only). Each change
renders the gateway's configuration again from `gateway.json` (the routes and settings the
comfyui_gateway role wrote) and the new credentials, validates it with Caddy, swaps it in and
reloads the gateway if it runs; a configuration Caddy refuses changes nothing. A user or key the
inventory declares (comfyui_gateway_users, comfyui_gateway_keys) is changed there, not here.
On a front, `pool` shows and sets each member's pool state with the code of the module
comfybake.core.gateway_pool.
"""

from __future__ import annotations

import argparse
import getpass
import grp
import http.client
import json
import os
import secrets
import string
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from comfybake import instances
from comfybake.cli import SUBCOMMANDS
from comfybake.engine import runtime
from comfybake.engine.gateway import apply, caddy, credentials, front
from comfybake.engine.gateway.credentials import Principal
from comfybake.engine.gateway.errors import GatewayError
from comfybake.instances import HostError

INVENTORY = {"user": "comfyui_gateway_users", "key": "comfyui_gateway_keys"}
GENERATED_PASSWORD_LENGTH = 24
PROBE_TIMEOUT = 3.0


def gateway_dir(config_root: str) -> Path:
    return Path(config_root) / "gateway"


def load_gateway(config_root: str) -> dict[str, Any]:
    """gateway.json: the routes and settings the comfyui_gateway role wrote."""
    path = gateway_dir(config_root) / "gateway.json"
    data = instances.load_json(path, "comfyui_gateway")
    if not isinstance(data, dict) or not isinstance(data.get("routes"), dict):
        raise HostError(f"{path} has no routes: converge the host with the comfyui_gateway role again")
    return data


def paths(config_root: str) -> apply.Paths:
    """The gateway's files; caddy.json gets the group of its folder (the role makes it the gateway's)."""
    folder = gateway_dir(config_root)
    try:
        gid = folder.stat().st_gid
        group = grp.getgrgid(gid).gr_name if gid != 0 else ""
    except (OSError, KeyError):
        group = ""
    return apply.Paths(str(folder), group=group)


def need_root(action: str) -> None:
    if os.geteuid() != 0:
        raise HostError(
            f"{action} reads and changes root's files (credentials.json is root's, mode 0600): run it as root"
            f" (sudo comfybake gateway {action})"
        )


def change(config_root: str, edit: Callable[[list[Principal]], list[Principal]]) -> None:
    """Apply `edit` to the stored principals, write them and apply them, holding the gateway's lock
    (a converge or another command waits); on any failure put the old ones back."""
    load_gateway(config_root)  # the gateway is set up here: refresh has routes to render
    path = paths(config_root).credentials
    try:
        with credentials.locked(str(gateway_dir(config_root))):
            before = credentials.load(path)
            credentials.save(path, edit(before))
            try:
                apply.refresh(paths(config_root))
            except (GatewayError, OSError, LookupError, ValueError) as error:
                if not isinstance(error, GatewayError):  # gateway.json is not as the role writes it
                    error = GatewayError(
                        f"cannot render the gateway's configuration from {gateway_dir(config_root)}/gateway.json"
                        f" ({type(error).__name__}: {error}): converge the host with the comfyui_gateway role again"
                    )
                try:
                    credentials.save(path, before)
                except GatewayError as again:
                    raise GatewayError(
                        f"{error}; and the previous credentials could not be put back: {again}"
                    ) from None
                raise GatewayError(f"{error}; nothing was changed") from None
    except GatewayError as error:
        raise HostError(str(error)) from None


def loaded(config_root: str) -> list[Principal]:
    try:
        return credentials.load(paths(config_root).credentials)
    except GatewayError as error:
        raise HostError(str(error)) from None


def find(principals: list[Principal], name: str, kind: str) -> Principal:
    """The principal `name` of `kind`; HostError naming what there is otherwise."""
    for principal in principals:
        if principal.name == name:
            if principal.kind != kind:
                other = "users remove" if principal.kind == "user" else "keys revoke"
                raise HostError(f"{name} is a {principal.kind}, not a {kind}: use `comfybake gateway {other} {name}`")
            return principal
    known = ", ".join(item.name for item in principals if item.kind == kind) or "none"
    raise HostError(f"no {kind} named {name} ({kind}s: {known})")


def checked(name: str, scopes: Sequence[str], config_root: str) -> list[str]:
    """The scopes of a new user or key: valid ones, and none a front has no route for."""
    try:
        credentials.check_name(name)
        scope = credentials.check_scope(scopes)
    except GatewayError as error:
        raise HostError(str(error)) from None
    if load_gateway(config_root).get("settings", {}).get("fleet"):
        per_instance = [item for item in scope if item.startswith("instance:")]
        if per_instance:
            raise HostError(
                f"scope {', '.join(per_instance)} reaches nothing on this gateway: it is a front, which serves"
                " environment routes only (instance names repeat across its members); use environment:<name>"
            )
    return scope


def adding(new: Principal, replace: bool) -> Callable[[list[Principal]], list[Principal]]:
    """The edit that adds `new`; with `replace`, in place of the command line's own of its kind."""

    def edit(before: list[Principal]) -> list[Principal]:
        refuse_taken(before, new, replace)
        return [item for item in before if item.name != new.name] + [new]

    return edit


def refuse_taken(principals: list[Principal], new: Principal, replace: bool) -> None:
    for principal in principals:
        if principal.name != new.name:
            continue
        if principal.source == "inventory":
            raise HostError(
                f"the name {new.name} is taken by a {principal.kind} declared in the inventory"
                f" ({INVENTORY[principal.kind]}): change it there"
            )
        if principal.kind != new.kind:
            how = "users remove" if principal.kind == "user" else "keys revoke"
            raise HostError(
                f"the name {new.name} is taken by a {principal.kind} (users and keys share names):"
                f" choose another, or first `comfybake gateway {how} {new.name}`"
            )
        if not replace:
            raise HostError(f"the {new.kind} {new.name} exists: give --replace to replace it")


def described(principal: Principal) -> str:
    return f"{principal.kind} {principal.name} (scope {', '.join(principal.scope)})"


# --------------------------------------------------------------------------- users


def read_password(args: argparse.Namespace) -> tuple[str, bool]:
    """The new user's password, and whether it was generated (and so must be shown)."""
    if args.generate:
        alphabet = string.ascii_letters + string.digits
        return "".join(secrets.choice(alphabet) for _ in range(GENERATED_PASSWORD_LENGTH)), True
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif not sys.stdin.isatty():
        raise HostError("no terminal to ask for the password on: pass it with --password-stdin, or use --generate")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("the same password again: ") != password:
            raise HostError("the two passwords differ; nothing was changed")
    try:
        credentials.check_password(password)
    except GatewayError as error:
        raise HostError(f"{error} (or --generate one)") from None
    return password, False


def users_add(args: argparse.Namespace) -> int:
    need_root("users add")
    scope = checked(args.name, args.scope, args.config_root)
    user = Principal(args.name, "user", "", scope, "cli", credentials.now())
    refuse_taken(loaded(args.config_root), user, args.replace)  # before asking for a password
    password, generated = read_password(args)
    try:
        user.hash = credentials.hash_secret(password)
    except GatewayError as error:
        raise HostError(str(error)) from None
    change(args.config_root, adding(user, args.replace))
    print(f"{'replaced' if args.replace else 'added'} {described(user)}", file=sys.stderr)
    if generated:
        print("its password, shown only this once:", file=sys.stderr)
        print(password, flush=True)
    return 0


def remove(args: argparse.Namespace, kind: str, action: str) -> int:
    need_root(action)
    gone: list[Principal] = []

    def edit(before: list[Principal]) -> list[Principal]:
        principal = find(before, args.name, kind)
        if principal.source == "inventory":
            raise HostError(
                f"the {kind} {args.name} is declared in the inventory ({INVENTORY[kind]}): remove it there and"
                " converge the gateway again"
            )
        gone.append(principal)
        return [item for item in before if item.name != args.name]

    change(args.config_root, edit)
    print(f"{'removed' if kind == 'user' else 'revoked'} {described(gone[0])}", file=sys.stderr)
    return 0


def users_remove(args: argparse.Namespace) -> int:
    return remove(args, "user", "users remove")


def listing(args: argparse.Namespace, kind: str, action: str) -> int:
    need_root(action)
    rows: list[dict[str, Any]] = [
        {"name": item.name, "scope": item.scope, "source": item.source, "created": item.created}
        for item in loaded(args.config_root)
        if item.kind == kind
    ]
    if args.json:
        json.dump({f"{kind}s": rows}, sys.stdout, indent=2)
        print()
        return 0
    table = [("NAME", "SCOPE", "SOURCE", "CREATED")]
    table += [(item["name"], ",".join(item["scope"]), item["source"], item["created"] or "-") for item in rows]
    print_table(table)
    return 0


def users_list(args: argparse.Namespace) -> int:
    return listing(args, "user", "users list")


# --------------------------------------------------------------------------- keys


def keys_create(args: argparse.Namespace) -> int:
    need_root("keys create")
    scope = checked(args.name, args.scope, args.config_root)
    try:
        token, hashed = credentials.new_key(args.name)
    except GatewayError as error:
        raise HostError(str(error)) from None
    key = Principal(args.name, "key", hashed, scope, "cli", credentials.now())
    change(args.config_root, adding(key, args.replace))
    print(
        f"{'replaced' if args.replace else 'created'} {described(key)};"
        " the key is printed below, only this once: store it now.\n"
        "Send it as `Authorization: Bearer <key>`, or as ?token=<key> on a WebSocket connection.",
        file=sys.stderr,
    )
    print(token, flush=True)
    return 0


def keys_revoke(args: argparse.Namespace) -> int:
    return remove(args, "key", "keys revoke")


def keys_list(args: argparse.Namespace) -> int:
    return listing(args, "key", "keys list")


# --------------------------------------------------------------------------- status


def gateway_upstreams(admin_socket: str) -> tuple[dict[str, dict[str, Any]] | None, str]:
    """Caddy's view of every upstream (address -> num_requests, fails), or None and why not."""
    try:
        answer = apply.admin(admin_socket, "GET", "/reverse_proxy/upstreams")
    except GatewayError as error:
        reason = "run as root" if isinstance(error.__cause__, PermissionError) else str(error)
        return None, f"unknown: cannot ask its admin socket {admin_socket} ({reason})"
    if answer is None:
        return None, f"not running (nothing answers on its admin socket {admin_socket})"
    code, body = answer
    if code != 200:
        return None, f"unknown: its admin API answered HTTP {code}"
    try:
        listed = json.loads(body)
    except ValueError:
        return None, "unknown: its admin API answered something other than JSON"
    return {str(item.get("address")): item for item in listed or [] if isinstance(item, dict)}, "running"


# Upstreams are asked directly, never through the proxy that http_proxy names (as the engine's
# runtime does): a proxy cannot reach this host's loopback.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def probe(upstream: str, path: str = "/system_stats") -> str:
    """`ok`, or why the instance does not answer /system_stats (the exporter /metrics) directly."""
    try:
        with _DIRECT.open(f"http://{upstream}{path}", timeout=PROBE_TIMEOUT) as response:
            body = response.read()
            if path == "/system_stats":
                json.loads(body)
            return "ok"
    except urllib.error.HTTPError as error:
        return f"HTTP {error.code}"
    except urllib.error.URLError as error:
        reason = error.reason
        return f"down ({reason.strerror.lower() if isinstance(reason, OSError) and reason.strerror else reason})"
    except (OSError, ValueError) as error:
        return f"down ({error})"


def probe_socket(upstream: str, path: str | None) -> str:
    """`ok`, or why the job service does not answer on its unix socket (Caddy's `unix/<path>`): the
    job API's `path` must answer 200; the control API only has to accept the connection (each of
    its requests does work)."""
    connection = runtime.UnixConnection(upstream.removeprefix("unix/"), PROBE_TIMEOUT)
    try:
        connection.connect()
        if path is None:
            return "ok"
        connection.request("GET", path)
        code = connection.getresponse().status
        return "ok" if code == 200 else f"HTTP {code}"
    except OSError as error:
        return f"down ({(error.strerror or str(error)).lower()})"
    except http.client.HTTPException as error:
        return f"down ({type(error).__name__})"
    finally:
        connection.close()


# The job service's routes: what `status` asks each directly (None: the connection alone).
SOCKET_PROBES: dict[str, str | None] = {"jobs": "/v1/health", "control": None}


def status_rows(routes: dict[str, Any], upstreams: dict[str, dict[str, Any]] | None) -> list[dict[str, Any]]:
    health: dict[str, str] = {}
    for route in routes.get("instances", []):
        health[route["upstream"]] = probe(route["upstream"]) if route.get("enabled", True) else "disabled"

    def seen(upstream: str) -> dict[str, Any] | None:
        if upstreams is None:
            return None
        item = upstreams.get(upstream)
        return {"requests": item.get("num_requests", 0), "fails": item.get("fails", 0)} if item else {}

    rows = [
        {
            "kind": "instance",
            "name": route["name"],
            "environment": route.get("environment"),
            "public_url": route.get("public_url"),
            "upstreams": [
                {"address": route["upstream"], "direct": health[route["upstream"]], "gateway": seen(route["upstream"])}
            ],
        }
        for route in routes.get("instances", [])
    ]
    rows += [
        {
            "kind": "environment",
            "name": route["name"],
            "environment": route["name"],
            "public_url": route.get("public_url"),
            "upstreams": [
                {"address": upstream, "direct": health.get(upstream) or probe(upstream), "gateway": seen(upstream)}
                for upstream in route.get("upstreams", [])
            ],
        }
        for route in routes.get("environments", [])
    ]
    metrics = routes.get("metrics")
    if metrics:
        address = metrics["upstream"]
        rows.append(
            {
                "kind": "metrics",
                "name": "exporter",
                "environment": None,
                "public_url": metrics.get("public_url"),
                "upstreams": [{"address": address, "direct": probe(address, "/metrics"), "gateway": seen(address)}],
            }
        )
    for name, path in SOCKET_PROBES.items():
        route = routes.get(name)
        if route:
            address = route["upstream"]
            rows.append(
                {
                    "kind": name,
                    "name": "api",
                    "environment": None,
                    "public_url": route.get("public_url"),
                    "upstreams": [
                        {"address": address, "direct": probe_socket(address, path), "gateway": seen(address)}
                    ],
                }
            )
    return rows


def gateway_column(seen: dict[str, Any] | None) -> str:
    if seen is None:
        return "-"
    if not seen:
        return "not proxied"
    return f"{seen['requests']} active, {seen['fails']} fails"


def pool_states(config_root: str, data: dict[str, Any]) -> dict[str, str] | None:
    """A front's members and their pool states (pool.json); None for a host's own gateway."""
    if not data.get("settings", {}).get("fleet"):
        return None
    try:
        states: dict[str, str] = front.view(paths(config_root))["states"]
        return states
    except GatewayError as error:
        raise HostError(str(error)) from None


def with_members(rows: list[dict[str, Any]], routes: dict[str, Any], states: dict[str, str]) -> None:
    """On a front: the member of each environment route's upstream, and its pool state."""
    owners = {upstream: member for route in routes.get("environments", []) for upstream, member in
              route.get("members", {}).items()}  # fmt: skip
    for row in rows:
        for item in row["upstreams"]:
            member = owners.get(item["address"])
            if member is not None:
                item.update(member=member, pool=states.get(member, caddy.SERVING))


def status(args: argparse.Namespace) -> int:
    data = load_gateway(args.config_root)
    admin_socket = str(data.get("settings", {}).get("admin_socket") or caddy.SETTING_DEFAULTS["admin_socket"])
    upstreams, state = gateway_upstreams(admin_socket)
    rows = status_rows(data["routes"], upstreams)
    states = pool_states(args.config_root, data)
    if states is not None:
        with_members(rows, data["routes"], states)
    # A member taken out (maintenance) may be down: its instances do not count.
    healthy = upstreams is not None and all(
        item["direct"] in ("ok", "disabled") or item.get("pool") == caddy.OUT
        for row in rows
        for item in row["upstreams"]
    )
    if args.json:
        json.dump({"gateway": state, "routes": rows, **({} if states is None else {"members": states})},
                  sys.stdout, indent=2)  # fmt: skip
        print()
        return 0 if healthy else 1
    print(f"gateway: {state}")
    table = [("ROUTE", "PUBLIC URL", "UPSTREAM", "DIRECT", "THROUGH THE GATEWAY")]
    for row in rows:
        label = f"{row['kind']} {row['name']}"
        for index, item in enumerate(row["upstreams"] or [{"address": "-", "direct": "-", "gateway": None}]):
            first = index == 0
            member = f" ({item['member']}, {item['pool']})" if "member" in item else ""
            table.append(
                (
                    label if first else "",
                    (row["public_url"] or "-") if first else "",
                    item["address"] + member,
                    item["direct"],
                    gateway_column(item["gateway"]),
                )
            )
    print_table(table)
    if states is not None:
        print()
        print_table([("MEMBER", "POOL STATE"), *sorted(states.items())])
    return 0 if healthy else 1


def pool_command(args: argparse.Namespace) -> int:
    """List the members of a front and their states, or set MEMBER to --state."""
    if (args.member is None) != (args.state is None):
        raise HostError("give MEMBER and --state together to set a state, or neither to list the states")
    if args.state is not None:
        need_root("pool")
    load_gateway(args.config_root)
    where = paths(args.config_root)
    try:
        if args.state is None:
            found = front.change(where, [], None, check=True)
        else:
            with credentials.locked(str(gateway_dir(args.config_root))):
                found = front.change(where, [args.member], args.state)
        upstreams = front.view(where)["upstreams"]
    except GatewayError as error:
        raise HostError(str(error)) from None
    if args.state is not None:
        before = found["previous"][args.member]
        done = f"{before} -> {args.state}, applied" if found["changed"] else f"already {args.state}"
        print(f"{args.member}: {done}", file=sys.stderr)
    if args.json:
        members = [{"member": m, "state": s, "upstreams": upstreams.get(m, [])} for m, s in found["states"].items()]
        json.dump({"members": members}, sys.stdout, indent=2)
        print()
        return 0
    table = [("MEMBER", "STATE", "UPSTREAMS")]
    table += [(m, s, ", ".join(upstreams.get(m, [])) or "-") for m, s in sorted(found["states"].items())]
    print_table(table)
    return 0


def print_table(table: Sequence[Sequence[str]]) -> None:
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        print("  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip())


def refresh(args: argparse.Namespace) -> int:
    """Render the configuration again from gateway.json and credentials.json and apply it (the
    container's entrypoint runs it after installing the users and keys of a secret)."""
    need_root("refresh")
    load_gateway(args.config_root)
    try:
        with credentials.locked(str(gateway_dir(args.config_root))):
            changed = apply.refresh(paths(args.config_root))
    except GatewayError as error:
        raise HostError(str(error)) from None
    print("comfybake gateway: configuration " + ("applied" if changed else "unchanged"), file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- parser


def guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Exit 2 with one line naming the problem when the host's files, a name or a scope are wrong."""
    return instances.guarded(func, "comfybake gateway")


def configure(parser: argparse.ArgumentParser) -> None:
    instances.config_root_option(parser)
    groups = parser.add_subparsers(dest="group", metavar="GROUP", required=True)
    formatter = argparse.RawDescriptionHelpFormatter
    unchanged = (
        "  2  a name, a scope or the host's files are wrong, or Caddy refused the configuration; nothing was changed"
    )

    def action(
        actions: Any, name: str, help_text: str, exit_codes: str, func: Callable[[argparse.Namespace], int]
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = actions.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=f"exit status:\n{exit_codes}{unchanged}",
            formatter_class=formatter,
        )
        sub.set_defaults(func=guarded(func))
        return sub

    def scope(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--scope",
            action="append",
            required=True,
            metavar="SCOPE",
            help="what it may reach: '*', instance:NAME, environment:NAME (an environment's route and its"
            " instances'), metrics (the exporter's route, for Prometheus), jobs (the job API's route) or"
            " control (the control API's: instances started and stopped); repeat for several",
        )

    users = groups.add_parser("users", help="the users who sign in with a password (HTTP Basic, browsers)")
    user_actions = users.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = action(user_actions, "add", "add a user with a password, and apply it", "  0  added and applied\n", users_add)
    add.add_argument("name", help=f"the user name ({credentials.NAME_RULE})")
    scope(add)
    add.add_argument("--replace", action="store_true", help="replace the password and scope of a user added here")
    source = add.add_mutually_exclusive_group()
    source.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    source.add_argument(
        "--generate", action="store_true", help="generate a password and print it on stdout, only this once"
    )
    gone = action(
        user_actions, "remove", "remove a user added here, and apply it", "  0  removed and applied\n", users_remove
    )
    gone.add_argument("name")
    shown = action(user_actions, "list", "the users: names, scopes, where they come from", "  0  listed\n", users_list)
    shown.add_argument("--json", action="store_true", help="print JSON instead of a table")

    keys = groups.add_parser("keys", help="the API keys of programs (Bearer, or ?token= on a WebSocket)")
    key_actions = keys.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = action(
        key_actions,
        "create",
        "create an API key, apply it, and print the key on stdout, only this once",
        "  0  created and applied: stdout holds the key and nothing else\n",
        keys_create,
    )
    create.add_argument("name", help=f"the key's name ({credentials.NAME_RULE})")
    scope(create)
    create.add_argument(
        "--replace", action="store_true", help="replace a key made here by a new one (the old one stops working)"
    )
    revoke = action(
        key_actions, "revoke", "revoke an API key made here, and apply it", "  0  revoked and applied\n", keys_revoke
    )
    revoke.add_argument("name")
    listed = action(
        key_actions, "list", "the API keys: names, scopes, when made (never the keys)", "  0  listed\n", keys_list
    )
    listed.add_argument("--json", action="store_true", help="print JSON instead of a table")

    again = groups.add_parser(
        "refresh",
        help="render the configuration again from the host's routes, users and keys, validate and apply it",
        description="render caddy.json again from gateway.json and credentials.json, have Caddy validate it,"
        " swap it in and load it into the running gateway (a changed credentials.json put there by hand,"
        " or by a container's entrypoint)",
        epilog=f"exit status:\n  0  applied (or already serving)\n{unchanged}",
        formatter_class=formatter,
    )
    again.set_defaults(func=guarded(refresh))

    members = groups.add_parser(
        "pool",
        help="a front's members (fleet hosts) and their pool states; set one with MEMBER --state",
        description="a front's members and their pool states: serving (new and sticky sessions), draining"
        " (no new session; clients whose affinity cookie names its instances still reach them) or out (no"
        " traffic). Setting one writes pool.json, renders the configuration again, has Caddy validate it and"
        " loads it (a graceful reload: requests in flight finish); a refused one changes nothing.",
        epilog=f"exit status:\n  0  listed, or set and applied (or already so)\n{unchanged}"
        " (an unknown member, or this gateway is not a front)",
        formatter_class=formatter,
    )
    members.add_argument("member", nargs="?", metavar="MEMBER", help="a member's inventory name, to set its state")
    members.add_argument("--state", choices=caddy.STATES, help="the state to set MEMBER to")
    members.add_argument("--json", action="store_true", help="print JSON instead of a table")
    members.set_defaults(func=guarded(pool_command))

    health = groups.add_parser(
        "status",
        help="the routes with their public URLs, and each upstream's health, directly and through the gateway",
        description="the routes with their public URLs, and each upstream's health: /system_stats asked directly"
        " (the exporter's /metrics, the job API's /v1/health), and what the running gateway reports (its admin API)",
        epilog="exit status:\n  0  the gateway runs and every enabled upstream answers\n"
        "  1  the gateway does not run, or an upstream does not answer\n"
        "  2  the gateway is not set up on this host",
        formatter_class=formatter,
    )
    health.add_argument("--json", action="store_true", help="print JSON instead of a table")
    health.set_defaults(func=guarded(status))


SUBCOMMANDS["gateway"] = (
    "the gateway's users and API keys, a front's pool states, and the health of its routes",
    configure,
)
