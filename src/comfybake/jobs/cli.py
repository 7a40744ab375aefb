"""`comfybake jobs serve|check|drain|resume|worker`: serve ComfyUI workflows as jobs on a host.

`serve` runs the job API and the control API (`comfybake.jobs.api`); `check` reports what each
named workflow's environment lacks (a converge runs it); `drain` and `resume` ask the control
API of the running `serve`; `worker` is the serverless worker of the container images
(`comfybake.jobs.worker`). Only `serve` and `worker` import aiohttp (and RunPod's SDK), so every
other comfybake command starts as fast as before.
"""

from __future__ import annotations

import argparse
import http.client
import importlib
import json
import shlex
from pathlib import Path
from typing import Any

from comfybake import logs
from comfybake.cli import SUBCOMMANDS
from comfybake.engine import runtime
from comfybake.instances import config_root_option, guarded

DEFAULT_STATE_ROOT = "/var/lib/comfybake-jobs"
DEFAULT_JOBS_LISTEN = "unix:/run/comfybake-jobs/jobs.sock"
DEFAULT_CONTROL_LISTEN = "unix:/run/comfybake-jobs/control.sock"
DEFAULT_STOP_TIMEOUT = 60.0
COMMAND = "comfybake jobs"


def workflows_path(args: argparse.Namespace) -> Path:
    from comfybake.jobs.placement import NAMED_WORKFLOWS_FILE  # imported by the commands that use it only

    return Path(args.workflows) if args.workflows else Path(args.config_root) / NAMED_WORKFLOWS_FILE


# --------------------------------------------------------------------------- serve


def serve(args: argparse.Namespace) -> int:
    import asyncio

    try:
        from comfybake.jobs import api  # aiohttp: only for the commands that serve
    except ModuleNotFoundError as error:
        logs.emit(f"{COMMAND} serve: {error.name} is not installed: install comfybake[serve]", "error")
        return 2
    settings = api.Settings(
        config_root=args.config_root,
        state_root=args.state_root,
        jobs_listen=args.jobs_listen,
        control_listen=args.control_listen,
        socket_group=args.socket_group,
        workflows=workflows_path(args),
        stop_timeout=args.stop_timeout,
        program=shlex.split(args.instances_command) if args.instances_command else api.own_program(),
    )
    from comfybake.jobs.outputs import OutputError  # a bad COMFYBAKE_JOBS_S3_* setting

    try:
        return asyncio.run(api.serve(settings))
    except (api.ListenError, OutputError) as error:
        logs.emit(f"{COMMAND} serve: {error}", "error")
        return 2


# --------------------------------------------------------------------------- check


def check(args: argparse.Namespace) -> int:
    """Each named workflow against what its environment offers now: 0 when every one can run,
    1 naming what lacks (or an environment none of whose instances is ready to be asked)."""
    from comfybake.jobs.placement import EnvironmentReport, ObjectInfoCache, check_named, load_named, load_routing

    path = workflows_path(args)
    if not path.is_file():
        if args.json:
            print(json.dumps({"workflows": {}, "file": str(path)}))
        else:
            print(f"no named workflows ({path} does not exist)")
        return 0
    named = load_named(path)
    routes = load_routing(args.config_root)
    reports = check_named(named, routes, ObjectInfoCache())
    # An environment none of whose enabled instances is ready was not asked: that is no pass.
    members = {
        name: sum(1 for route in routes if route.environment == entry.environment and route.enabled)
        for name, entry in named.items()
    }
    failing = {name for name, report in reports.items() if report.lacks() or len(report.not_ready) >= members[name]}
    if args.json:
        found = {
            name: {
                "environment": entry.environment,
                "ok": name not in failing,
                **reports.get(name, EnvironmentReport()).as_dict(),
            }
            for name, entry in sorted(named.items())
        }
        print(json.dumps({"file": str(path), "workflows": found}, indent=2))
    else:
        for name in sorted(named):
            report = reports.get(name)
            where = f"workflow {name} (environment {named[name].environment})"
            if report is None:
                print(f"{where}: ok")
            elif name in failing:
                print(f"{where}: {report.describe() or 'cannot be checked'}")
            else:
                waiting = "; ".join(f"{instance}: {why}" for instance, why in sorted(report.not_ready.items()))
                print(f"{where}: ok (not ready: {waiting})")
    if failing:
        logs.emit(f"{COMMAND} check: {len(failing)} named workflows cannot run: {', '.join(sorted(failing))}", "error")
        return 1
    return 0


# --------------------------------------------------------------------------- drain, resume


def ask_control(listen: str, route: str, body: dict[str, Any], timeout: float) -> tuple[int, Any]:
    """POST `body` to the control API at `listen` (unix:/path or HOST:PORT)."""
    if listen.startswith("unix:"):
        connection: http.client.HTTPConnection = runtime.UnixConnection(listen.removeprefix("unix:"), timeout)
    else:
        host, _, port = listen.rpartition(":")
        connection = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
    try:
        connection.request("POST", route, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def control_call(args: argparse.Namespace, route: str, body: dict[str, Any], timeout: float) -> int:
    try:
        status, answer = ask_control(args.control_listen, route, body, timeout)
    except (OSError, ValueError, http.client.HTTPException) as error:
        logs.emit(
            f"{COMMAND} {args.action}: cannot reach the control API at {args.control_listen} ({error}): "
            "is comfybake-jobs running? (systemctl status comfybake-jobs)",
            "error",
        )
        return 2
    if status != 200:
        message = (answer or {}).get("error", {}).get("message", answer) if isinstance(answer, dict) else answer
        logs.emit(f"{COMMAND} {args.action}: the control API answered {status}: {message}", "error")
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
    elif args.action == "drain":
        unfinished = answer.get("unfinished") or []
        print(
            f"draining: no new jobs; {len(unfinished)} still running"
            + (f" ({', '.join(job['id'] for job in unfinished)})" if unfinished else "")
        )
    else:
        print("taking jobs again")
    return 1 if args.action == "drain" and answer.get("unfinished") else 0


def drain(args: argparse.Namespace) -> int:
    return control_call(args, "/v1/drain", {"timeout": args.timeout}, args.timeout + 30)


def resume(args: argparse.Namespace) -> int:
    return control_call(args, "/v1/resume", {}, 30)


# --------------------------------------------------------------------------- worker


def worker(args: argparse.Namespace) -> int:
    """The worker's own parser reads the rest of the command line, so its module (and RunPod's
    SDK) is imported only when it runs."""
    try:
        module = importlib.import_module("comfybake.jobs.worker")
    except ModuleNotFoundError as error:
        if error.name == "comfybake.jobs.worker":
            logs.emit(
                f"{COMMAND} worker: this comfybake has no serverless worker (comfybake.jobs.worker): update comfybake",
                "error",
            )
        else:
            logs.emit(f"{COMMAND} worker: {error.name} is not installed: install comfybake[worker]", "error")
        return 2
    parser = argparse.ArgumentParser(prog=f"{COMMAND} worker", description="run as a RunPod serverless worker")
    module.add_arguments(parser)
    code: int = module.run(parser.parse_args(args.rest))
    return code


WORKER_HELP = "run as a RunPod serverless worker in a container image (its options: comfybake jobs worker --help)"


# --------------------------------------------------------------------------- parser


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    def listen_option(sub: argparse.ArgumentParser, name: str, default: str) -> None:
        sub.add_argument(
            f"--{name}-listen",
            default=default,
            metavar="ADDRESS",
            help=f"unix:/path or HOST:PORT (default {default})",
        )

    def workflows_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--workflows", help="the named workflows file (default CONFIG_ROOT/workflows.yml)")

    serve_parser = actions.add_parser("serve", help="run the job API and the control API until SIGTERM (then drain)")
    serve_parser.add_argument(
        "--state-root", default=DEFAULT_STATE_ROOT, help=f"where the job store lives (default {DEFAULT_STATE_ROOT})"
    )
    listen_option(serve_parser, "jobs", DEFAULT_JOBS_LISTEN)
    listen_option(serve_parser, "control", DEFAULT_CONTROL_LISTEN)
    serve_parser.add_argument("--socket-group", help="the unix sockets' group (the gateway's account); mode 0660")
    serve_parser.add_argument(
        "--stop-timeout",
        type=float,
        default=DEFAULT_STOP_TIMEOUT,
        help="seconds to follow running jobs after SIGTERM, below the unit's TimeoutStopSec "
        f"(default {DEFAULT_STOP_TIMEOUT:g})",
    )
    serve_parser.add_argument(
        "--instances-command",
        help="the command the control API runs for `instances ...` (default: this program with this Python)",
    )
    config_root_option(serve_parser)
    workflows_option(serve_parser)
    serve_parser.set_defaults(func=guarded(serve, COMMAND))

    check_parser = actions.add_parser(
        "check",
        help="check the named workflows against what their environments offer",
        epilog="exit status:\n  0  every named workflow can run\n  1  some cannot (each is named with what lacks)\n"
        "  2  the host's files are wrong",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config_root_option(check_parser)
    workflows_option(check_parser)
    check_parser.add_argument("--json", action="store_true", help="print the report as JSON")
    check_parser.set_defaults(func=guarded(check, COMMAND))

    drain_parser = actions.add_parser("drain", help="stop taking jobs and wait for the running ones")
    drain_parser.add_argument("--timeout", type=float, default=0, help="seconds to wait for running jobs (default 0)")
    resume_parser = actions.add_parser("resume", help="take jobs again after a drain")
    for sub, func in ((drain_parser, drain), (resume_parser, resume)):
        listen_option(sub, "control", DEFAULT_CONTROL_LISTEN)
        sub.add_argument("--json", action="store_true", help="print the control API's answer as JSON")
        sub.set_defaults(func=func)

    worker_parser = actions.add_parser("worker", help=WORKER_HELP, add_help=False, prefix_chars="+")
    worker_parser.add_argument("rest", nargs=argparse.REMAINDER)
    worker_parser.set_defaults(func=worker)


SUBCOMMANDS["jobs"] = (
    "serve ComfyUI workflows as jobs: the job API, the control API, the serverless worker",
    configure,
)
