"""The job API and the control API: two aiohttp applications that `comfybake jobs serve` runs.

Both listen on unix sockets by default (mode 0660, group `--socket-group`, the gateway's
account), so no local process, a custom node included, reaches them without the gateway, which
checks the keys and scopes: its route `jobs` leads to the job API, `control` to the control API.
`HOST:PORT` listens on TCP instead (tests, benchmarks).

Job API (JSON): `POST /v1/jobs` submits (answers 200 with the final job when it ends within
`wait` seconds, else 202 with the job as it is), `GET /v1/jobs`, `GET /v1/jobs/{id}`,
`GET /v1/jobs/{id}/result` (409 until the job ends), `POST /v1/jobs/{id}/cancel`,
`GET /v1/workflows`, `GET /v1/health`. Control API: `GET /v1/instances`,
`POST /v1/instances/{start|stop|restart}`, `POST /v1/drain`, `POST /v1/resume`.

Every refusal is `{"error": {"type", "message", ...}}`; a request's own mistake is 400 and
names the field and what to send. docs/serving.md is the user-facing description.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import grp
import ipaddress
import json
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from comfybake import logs
from comfybake.instances import HostError, load_host, select
from comfybake.jobs.outputs import OutputSink, sinks_from_environment
from comfybake.jobs.placement import NamedWorkflow, load_named
from comfybake.jobs.runner import DEFAULT_TIMEOUT, JobError, JobSpec, Runner
from comfybake.jobs.store import FINAL, STATES, IllegalTransitionError, Job, JobNotFoundError, JobStore
from comfybake.jobs.workflow import WorkflowError
from comfybake.jobs.workflow import check as check_workflow

MAX_WAIT = 300.0  # seconds a request may wait for its job (the gateway's proxy waits longer)
MAX_TIMEOUT = 86400.0  # a job's own limit, seconds
MAX_BODY = 256 << 20  # a submission with its inputs in base64
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
RETRY_AFTER = "30"  # seconds, on 503 while draining: the rolling change moves on meanwhile
MAX_NAME = 255
# Placement's probes and the store's SQLite calls run in threads: the default pool (cores + 4) made
# concurrent submissions queue for one (bench/jobs.py).
THREADS = 64
CONTROL_MARGIN = 60.0  # seconds the control API waits for `comfybake instances` beyond its own waits
# JobError types to HTTP status; any other is the server's fault.
STATUS_OF_ERROR = {"workflow": 400, "validation": 400, "output": 400, "placement": 422, "draining": 503}
ACTIONS = ("start", "stop", "restart")


# --------------------------------------------------------------------------- answers


class RequestError(Exception):
    """A request the API refuses (400 unless `status` says otherwise); names the field at fault."""

    def __init__(self, field: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.field, self.status = field, status

    def as_dict(self) -> dict[str, Any]:
        return {"type": "request", "field": self.field, "message": str(self)}


def answer(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers, dumps=lambda value: json.dumps(value, indent=1))


def refusal(error: Mapping[str, Any], status: int) -> web.Response:
    headers = {"Retry-After": RETRY_AFTER} if status == 503 else None
    return answer({"error": dict(error)}, status, headers)


@web.middleware
async def refusals(request: web.Request, handler: Any) -> web.StreamResponse:
    """RequestError, JobError and unknown jobs as JSON refusals; aiohttp's own (404, 405, 413) too."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except RequestError as error:
        return refusal(error.as_dict(), error.status)
    except JobError as error:
        found = error.as_dict()
        return refusal(found, STATUS_OF_ERROR.get(found.get("type", ""), 500))
    except JobNotFoundError:
        job_id = request.match_info.get("id", "")
        return refusal({"type": "not_found", "message": f"no job {job_id}: list the jobs with GET /v1/jobs"}, 404)
    except IllegalTransitionError as error:  # the job ended between the request's look and its change
        return refusal(
            {"type": "conflict", "state": error.state, "message": f"{error}: read it with GET /v1/jobs/{error.job_id}"},
            409,
        )
    except web.HTTPException as error:
        if error.status < 400:
            raise
        message = f"{request.method} {request.path}: {error.reason}"
        if error.status == 413:
            message += f" (a submission may be {MAX_BODY >> 20} MiB with its inputs in base64)"
        elif error.status in (404, 405):
            message += " (the routes are under /v1: see docs/serving.md)"
        return refusal({"type": "request", "message": message}, error.status)


async def json_body(request: web.Request, required: bool = True) -> dict[str, Any]:
    """The request's JSON object; {} for an empty body when not `required`."""
    raw = await request.read()
    if not raw.strip() and not required:
        return {}
    try:
        body = json.loads(raw)
    except ValueError as error:
        raise RequestError("body", f"the body is not JSON ({error}): send a JSON object") from None
    if not isinstance(body, dict):
        raise RequestError("body", f"the body is a JSON {type(body).__name__}: send a JSON object")
    return body


def number(body: Mapping[str, Any], field: str, default: float, high: float, low: float = 0.0) -> float:
    """`body[field]` as seconds in [low, high], or `default` when absent."""
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError(field, f"{field} {json.dumps(value)} is not a number of seconds from {low:g} to {high:g}")
    return float(value)


# --------------------------------------------------------------------------- jobs


def job_view(job: Job, with_result: bool = True) -> dict[str, Any]:
    """A job as the API shows it (never its inputs' data: only their names and sizes)."""
    view: dict[str, Any] = {
        "id": job.id,
        "state": job.state,
        "workflow": job.workflow,
        "environment": job.environment,
        "instance": job.instance,
        "prompt_id": job.prompt_id,
        "inputs": job.inputs,
        "created": job.created,
        "started": job.started,
        "finished": job.finished,
        "duration": job.duration(),
        "attempts": job.attempts,
        "error": job.error,
    }
    if with_result:
        view["result"] = job.result
    return view


def input_name(value: Any, field: str) -> str:
    """A file name for ComfyUI's input folder: a plain name, no folder."""
    bad = (
        not isinstance(value, str)
        or not value.strip()
        or len(value) > MAX_NAME
        or value in (".", "..")
        or any(char in value for char in "/\\\0")
    )
    if bad:
        raise RequestError(
            field, f"{field} {json.dumps(value)} is not a file name: send a plain name such as 'photo.png' (no folder)"
        )
    return str(value)


def decode(value: Any, field: str) -> bytes:
    """Base64 (standard alphabet), also as a data URL (`data:image/png;base64,...`)."""
    if not isinstance(value, str):
        raise RequestError(field, f"{field} is a JSON {type(value).__name__}: send the file's bytes as a base64 string")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(field, f"{field} is not valid base64: send the file's bytes base64-encoded") from None


def inputs_of(body: Mapping[str, Any]) -> dict[str, bytes]:
    """`inputs` [{"name", "data"}], or RunPod's worker's `images` [{"name", "image"}]."""
    if "inputs" in body and "images" in body:
        raise RequestError("images", "send either 'inputs' or its alias 'images', not both")
    key, data_key = ("images", "image") if "images" in body else ("inputs", "data")
    items = body.get(key) or []
    if not isinstance(items, list):
        raise RequestError(
            key, f"{key} is a JSON {type(items).__name__}: send a list of {{'name', '{data_key}'}} objects"
        )
    found: dict[str, bytes] = {}
    for index, item in enumerate(items):
        where = f"{key}[{index}]"
        if not isinstance(item, dict):
            raise RequestError(
                where, f"{where} is not an object: send {{'name': 'photo.png', '{data_key}': '<base64>'}}"
            )
        name = input_name(item.get("name"), f"{where}.name")
        if name in found:
            raise RequestError(f"{where}.name", f"{where}.name {name!r} is given twice: each input needs its own name")
        found[name] = decode(item.get(data_key), f"{where}.{data_key}")
    return found


def parse_submission(
    body: Mapping[str, Any], named: Mapping[str, NamedWorkflow], sinks: Mapping[str, OutputSink]
) -> tuple[JobSpec, float]:
    """A POST /v1/jobs body as the runner's JobSpec and the seconds to wait for the job."""
    known = {"workflow", "workflow_name", "inputs", "images", "environment", "timeout", "outputs", "wait", "extra_data"}
    extra = sorted(set(body) - known)
    if extra:
        raise RequestError(extra[0], f"{extra[0]!r} is not a field of a job: send {', '.join(sorted(known))}")
    environment = body.get("environment")
    if environment is not None and (not isinstance(environment, str) or not environment):
        raise RequestError("environment", f"environment {json.dumps(environment)} is not an environment's name")
    if ("workflow" in body) == ("workflow_name" in body):
        raise RequestError(
            "workflow", "send either 'workflow' (an API-format graph) or 'workflow_name' (a named workflow)"
        )
    name = ""
    if "workflow_name" in body:
        name = body["workflow_name"]
        if not isinstance(name, str) or name not in named:
            listed = ", ".join(sorted(named)) or "none on this host"
            raise RequestError("workflow_name", f"no workflow is named {json.dumps(name)} (named workflows: {listed})")
        entry = named[name]
        if environment is not None and environment != entry.environment:
            raise RequestError(
                "environment",
                f"the workflow {name} runs in environment {entry.environment}, not {environment}: "
                "leave out 'environment'",
            )
        workflow, environment = entry.workflow, entry.environment
    else:
        try:
            workflow = check_workflow(body["workflow"], "the workflow")
        except WorkflowError as error:
            raise JobError("workflow", str(error)) from None
    outputs = body.get("outputs", "inline")
    if outputs not in sinks:
        hint = " (set COMFYBAKE_JOBS_S3_BUCKET on the host for s3)" if outputs == "s3" else ""
        raise RequestError(
            "outputs",
            f"outputs {json.dumps(outputs)} is not offered here: send one of {', '.join(sorted(sinks))}{hint}",
        )
    extra_data = body.get("extra_data") or {}
    if not isinstance(extra_data, dict):
        raise RequestError(
            "extra_data", "extra_data is not an object: send ComfyUI's extra_data as an object, or leave it out"
        )
    spec = JobSpec(
        workflow=workflow,
        name=name,
        environment=environment,
        inputs=inputs_of(body),
        timeout=number(body, "timeout", DEFAULT_TIMEOUT, MAX_TIMEOUT, low=1.0),
        outputs=outputs,
        extra_data=extra_data,
    )
    return spec, number(body, "wait", 0.0, MAX_WAIT)


@dataclass
class Service:
    """What the handlers share: the runner, its store, the named workflows and output sinks."""

    runner: Runner
    store: JobStore
    named: Mapping[str, NamedWorkflow]
    sinks: Mapping[str, OutputSink]


SERVICE = web.AppKey("service", Service)


async def submit(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    if service.runner.draining:
        raise JobError(
            "draining", "this host is draining (a rolling change or a stop): submit to another host or retry later"
        )
    spec, wait = parse_submission(await json_body(request), service.named, service.sinks)
    job = await service.runner.submit(spec)
    if wait > 0:
        job = await service.runner.wait(job.id, timeout=wait)
    final = job.state in FINAL
    return answer({"job": job_view(job, with_result=final)}, 200 if final else 202, {"Location": f"/v1/jobs/{job.id}"})


def query_number(request: web.Request, field: str, default: int, high: int) -> int:
    text = request.query.get(field, "")
    if not text:
        return default
    if not text.isdigit() or not 0 <= int(text) <= high:
        raise RequestError(field, f"{field}={text!r} is not a whole number from 0 to {high}")
    return int(text)


async def list_jobs(request: web.Request) -> web.Response:
    states = tuple(item for item in request.query.get("state", "").split(",") if item)
    unknown = [item for item in states if item not in STATES]
    if unknown:
        raise RequestError(
            "state",
            f"state={unknown[0]!r} is not a job state: send one or more of {', '.join(STATES)}, comma-separated",
        )
    limit = query_number(request, "limit", DEFAULT_LIMIT, MAX_LIMIT)
    jobs = await asyncio.to_thread(request.app[SERVICE].store.recent, states, limit)
    return answer({"jobs": [job_view(job, with_result=False) for job in jobs]})


async def current(request: web.Request) -> Job:
    """The job the path names; after up to `?wait=` seconds for it to end."""
    service = request.app[SERVICE]
    job = await asyncio.to_thread(service.store.get, request.match_info["id"])
    wait = query_number(request, "wait", 0, int(MAX_WAIT))
    if wait and job.state not in FINAL:
        job = await service.runner.wait(job.id, timeout=wait)
    return job


async def get_job(request: web.Request) -> web.Response:
    return answer({"job": job_view(await current(request))})


async def get_result(request: web.Request) -> web.Response:
    job = await current(request)
    if job.state not in FINAL:
        message = (
            f"job {job.id} is {job.state}: its result comes when it ends (GET /v1/jobs/{job.id}/result?wait=60 waits)"
        )
        return refusal({"type": "not_final", "message": message, "state": job.state}, 409)
    return answer({"id": job.id, "state": job.state, "result": job.result, "error": job.error})


async def cancel_job(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    job = await asyncio.to_thread(service.store.get, request.match_info["id"])
    if job.state in FINAL:
        message = f"job {job.id} is already {job.state}: only a queued or running job can be cancelled"
        return refusal({"type": "final", "message": message, "state": job.state}, 409)
    return answer({"job": job_view(await service.runner.cancel(job.id))})


async def workflows(request: web.Request) -> web.Response:
    named = request.app[SERVICE].named
    return answer(
        {
            "workflows": [
                {"name": name, "environment": entry.environment, "node_classes": sorted(entry.workflow.classes())}
                for name, entry in sorted(named.items())
            ]
        }
    )


async def health(request: web.Request) -> web.Response:
    """200 while taking jobs, 503 while draining (a balancer then sends elsewhere)."""
    if request.app[SERVICE].runner.draining:
        return answer({"status": "draining"}, 503, {"Retry-After": RETRY_AFTER})
    return answer({"status": "ok"})


def jobs_app(service: Service) -> web.Application:
    app = web.Application(middlewares=[refusals], client_max_size=MAX_BODY)
    app[SERVICE] = service
    app.router.add_post("/v1/jobs", submit)
    app.router.add_get("/v1/jobs", list_jobs)
    app.router.add_get("/v1/jobs/{id}", get_job)
    app.router.add_get("/v1/jobs/{id}/result", get_result)
    app.router.add_post("/v1/jobs/{id}/cancel", cancel_job)
    app.router.add_get("/v1/workflows", workflows)
    app.router.add_get("/v1/health", health)
    return app


# --------------------------------------------------------------------------- control


def own_program() -> list[str]:
    """How to run this very program again: the zipapp (or the venv's script) with this Python."""
    program = os.path.abspath(sys.argv[0])
    if os.path.basename(program) == "__main__.py":  # python -m comfybake
        return [sys.executable, "-m", "comfybake"]
    return [sys.executable, program]


@dataclass
class Control:
    """Runs the host's own `comfybake instances ... --json` for each control call, so the report
    is the command's own; `program` is the command's prefix (this program by default)."""

    config_root: str
    program: Sequence[str]

    def selection(self, body: Mapping[str, Any]) -> list[str]:
        """`names`, `environment`, `ports` as the command's arguments, checked against instances.json
        first so that a selection matching nothing is the request's fault (400), not the host's."""
        names = body.get("names") or []
        if not isinstance(names, list) or not all(
            isinstance(item, str) and item and not item.startswith("-") for item in names
        ):
            raise RequestError("names", f"names {json.dumps(names)} is not a list of instance names")
        environment = body.get("environment")
        if environment is not None and (
            not isinstance(environment, str) or not environment or environment.startswith("-")
        ):
            raise RequestError("environment", f"environment {json.dumps(environment)} is not an environment's name")
        ports = body.get("ports")
        if isinstance(ports, int) and not isinstance(ports, bool):
            ports = str(ports)
        if ports is not None and (not isinstance(ports, str) or not ports.replace("-", "", 1).isdigit()):
            raise RequestError("ports", f'ports {json.dumps(ports)} is not a port or a range such as "8188-8190"')
        try:
            host = load_host(self.config_root)
        except HostError as error:
            raise RequestError("host", str(error), status=500) from None
        try:
            select(host, argparse.Namespace(names=names, environment=environment, ports=ports))
        except HostError as error:
            raise RequestError("names" if names else "environment" if environment else "ports", str(error)) from None
        return [
            *names,
            *(["--environment", environment] if environment else []),
            *(["--ports", ports] if ports else []),
        ]

    async def run(self, *argv: str, timeout: float) -> tuple[int, Any]:
        """The command's exit status and its JSON report; its stderr lines go to this process's log."""
        command = [*self.program, "instances", "--config-root", self.config_root, *argv, "--json"]
        environ = {**os.environ, logs.ENVIRONMENT: "text"}
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=environ
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), timeout)
        except asyncio.TimeoutError:  # noqa: UP041 - not the builtin TimeoutError on Python 3.10 hosts
            process.kill()
            await process.wait()
            raise RequestError(
                "timeout", f"comfybake instances {argv[0]} did not end within {timeout:g} s", status=504
            ) from None
        for line in err.decode(errors="replace").splitlines():
            logs.emit(line, instance=None)
        try:
            return process.returncode or 0, json.loads(out)
        except ValueError:
            said = err.decode(errors="replace").strip() or f"exit status {process.returncode}"
            raise RequestError("host", f"comfybake instances {argv[0]} gave no report: {said}", status=500) from None


CONTROL = web.AppKey("control", Control)


async def instances_status(request: web.Request) -> web.Response:
    """As `comfybake instances status --json`; `?names=a,b&environment=&ports=` narrow it."""
    query: dict[str, Any] = {key: request.query[key] for key in ("environment", "ports") if request.query.get(key)}
    if request.query.get("names"):
        query["names"] = request.query["names"].split(",")
    control = request.app[CONTROL]
    _code, report = await control.run("status", *control.selection(query), timeout=CONTROL_MARGIN)
    return answer(report)


async def instances_action(request: web.Request) -> web.Response:
    """start, stop or restart as `comfybake instances ACTION --json`: 200 when it did all, 500
    with the same report when the action failed or an instance is not ready in time."""
    action = request.match_info["action"]
    if action not in ACTIONS:
        raise RequestError("action", f"{action!r} is not an action: use {', '.join(ACTIONS)}", status=404)
    body = await json_body(request, required=False)
    known = {"names", "environment", "ports", "drain", "timeout", "wait"}
    extra = sorted(set(body) - known)
    if extra:
        raise RequestError(extra[0], f"{extra[0]!r} is not a field of {action}: send {', '.join(sorted(known))}")
    control = request.app[CONTROL]
    argv = [action, *control.selection(body)]
    drain = number(body, "drain", 0.0, MAX_TIMEOUT) if action != "start" else 0.0
    if "drain" in body and action == "start":
        raise RequestError("drain", "start does not drain: send drain with stop or restart")
    if drain:
        argv += ["--drain", f"{drain:g}"]
    ready = number(body, "timeout", 300.0, MAX_TIMEOUT)
    if action != "stop":
        argv += ["--timeout", f"{ready:g}"]
        if body.get("wait") is False:
            argv.append("--no-wait")
    code, report = await control.run(*argv, timeout=drain + ready + CONTROL_MARGIN)
    return answer(report, 200 if code == 0 else 500)


async def drain(request: web.Request) -> web.Response:
    """Stop taking jobs (503 to submissions) and wait up to `timeout` seconds for the running ones."""
    body = await json_body(request, required=False)
    timeout = number(body, "timeout", 0.0, MAX_TIMEOUT)
    unfinished = await request.app[SERVICE].runner.drain(timeout)
    return answer({"draining": True, "unfinished": [job_view(job, with_result=False) for job in unfinished]})


async def resume(request: web.Request) -> web.Response:
    request.app[SERVICE].runner.resume()
    return answer({"draining": False})


def control_app(service: Service, control: Control) -> web.Application:
    app = web.Application(middlewares=[refusals])
    app[SERVICE] = service
    app[CONTROL] = control
    app.router.add_get("/v1/instances", instances_status)
    app.router.add_post("/v1/instances/{action}", instances_action)
    app.router.add_post("/v1/drain", drain)
    app.router.add_post("/v1/resume", resume)
    return app


# --------------------------------------------------------------------------- serving


class ListenError(ValueError):
    """A --*-listen value that is neither unix:/path nor HOST:PORT."""


def parse_listen(text: str, option: str) -> tuple[str, int] | str:
    """`unix:/path` as the path, `HOST:PORT` (`[::1]:8080` for IPv6) as (host, port)."""
    if text.startswith("unix:"):
        path = text.removeprefix("unix:")
        if not os.path.isabs(path):
            raise ListenError(f"{option} {text!r} names a relative path: give unix:/absolute/path")
        return path
    host, _, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ListenError(f"{option} {text!r} is neither unix:/path nor HOST:PORT (such as 127.0.0.1:8290)")
    return host, int(port)


async def listen(runner: web.AppRunner, where: tuple[str, int] | str, group: int | None) -> web.BaseSite:
    """A site on `where`; a unix socket is created 0660 (never wider, even for an instant) with
    `group` as its group."""
    site: web.BaseSite
    if isinstance(where, str):
        Path(where).parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        site = web.UnixSite(runner, where)
        old = os.umask(0o117)
        try:
            await site.start()
        finally:
            os.umask(old)
        if group is not None:
            os.chown(where, -1, group)
        os.chmod(where, 0o660)
    else:
        if not loopback(where[0]):
            logs.emit(
                f"comfybake jobs: listening on {where[0]}:{where[1]}, which is not loopback, with no key checked: "
                "anyone who reaches it can run jobs; serve on the unix sockets behind the gateway instead",
                "warning",
            )
        site = web.TCPSite(runner, where[0], where[1])
        await site.start()
    return site


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def group_id(name: str | None) -> int | None:
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ListenError(f"--socket-group {name!r} is not a group on this host: name the gateway's group") from None


@dataclass(frozen=True)
class Settings:
    config_root: str
    state_root: str
    jobs_listen: str
    control_listen: str
    socket_group: str | None
    workflows: Path
    stop_timeout: float
    program: Sequence[str]


async def serve(settings: Settings) -> int:
    """Run both APIs until SIGTERM or SIGINT, then drain: no new jobs (503), the running ones
    followed for up to `stop_timeout` seconds; the rest stay in the store for the next start."""
    where = [
        parse_listen(settings.jobs_listen, "--jobs-listen"),
        parse_listen(settings.control_listen, "--control-listen"),
    ]
    group = group_id(settings.socket_group)
    named = load_named(settings.workflows) if settings.workflows.is_file() else {}
    store = JobStore(settings.state_root)
    sinks = sinks_from_environment(os.environ)
    runner = Runner(Path(settings.config_root), store, sinks=sinks, named=named)
    await runner.start()
    service = Service(runner, store, named, sinks)
    apps = [jobs_app(service), control_app(service, Control(settings.config_root, settings.program))]
    app_runners = [web.AppRunner(app, access_log=None, handle_signals=False) for app in apps]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(THREADS, thread_name_prefix="comfybake-jobs"))
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        for app_runner, place in zip(app_runners, where, strict=True):
            await app_runner.setup()
            await listen(app_runner, place, group)
        listening = ", ".join(
            f"unix:{place}" if isinstance(place, str) else f"{place[0]}:{place[1]}" for place in where
        )
        logs.emit(f"comfybake jobs: serving the job API and the control API on {listening}")
        await stop.wait()
        logs.emit(f"comfybake jobs: stopping: no new jobs; waiting up to {settings.stop_timeout:g} s for running ones")
        unfinished = await runner.drain(settings.stop_timeout)
        if unfinished:
            logs.emit(
                f"comfybake jobs: {len(unfinished)} jobs still running; the next start follows them again", "warning"
            )
    finally:
        # The runner first: requests waiting for a job (`wait`) then answer with it as it is,
        # instead of holding the apps' cleanup for its own 60 s past the drain.
        await runner.close()
        for app_runner in app_runners:
            await app_runner.cleanup()
    return 0
