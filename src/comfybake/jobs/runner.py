"""The job runner every front end shares: place a workflow, post it, follow it, store its outputs.

A job (docs/serving.md#how-a-job-runs):

1. `submit` checks the request, places the workflow in a thread (`placement.place`, with the
   runner's `Looks`: each instance's readiness and queue length of the last second, plus the jobs
   placed there since) and only then creates the job: a workflow no environment can run raises
   `JobError` (type `placement`, naming what each environment lacks) with no job row and nothing
   queued anywhere. The job moves to `submitting` on the chosen instance.
2. Its input files are uploaded (`overwrite`) into `input/comfybake-<job id>/`, and every plain
   string input of the workflow that names one of them is rewritten to the uploaded name.
3. The WebSocket (`clientId` = the job id) is opened, then the prompt is posted with the job's
   prompt id; the job is `running`. ComfyUI's 400 becomes a `validation` error, node by node. An
   instance that refuses the connection (it stopped since its last look) was sent nothing: it is
   taken as not ready and the job placed once more (steps 1 to 3, same job and prompt id).
4. The prompt is followed to its end (client.Follower: reconnects, /history polling). Its output
   files are fetched (/view) and stored by the job's sink (inline base64, or S3 URLs).
5. A job past its timeout (seconds from submission), or cancelled, has its prompt dropped from
   the queue or interrupted, and ends `timed_out` or `cancelled`.

What a restarted runner needs that the store does not keep (the rewritten graph to post again,
the sink, the timeout) is in `<state root>/specs/<job id>.json` (0600) until the job ends; the
data of input files never is. `start()` resumes the store's unfinished jobs by prompt id: a
prompt its instance knows (/history, /queue) is adopted, one it does not is posted again only
if the job never got past `submitting`, so no job is lost or run twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import json
import os
import traceback
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from comfybake import logs
from comfybake.engine.redaction import secret_name
from comfybake.instances import HostError
from comfybake.jobs import client as comfy
from comfybake.jobs import outputs as sinks_module
from comfybake.jobs.outputs import OutputError, OutputSink
from comfybake.jobs.placement import (
    NAMED_WORKFLOWS_FILE,
    Claim,
    Looks,
    NamedWorkflow,
    ObjectInfoCache,
    Placement,
    PlacementError,
    Route,
    load_named,
    load_routing,
    place,
)
from comfybake.jobs.store import FINAL, Job, JobStore, StoreError
from comfybake.jobs.workflow import Workflow

DEFAULT_TIMEOUT = 600.0
STOP_GRACE = 10.0  # seconds to wait for a stopped prompt to leave its instance's queue
SPECS = "specs"
INPUT_FOLDER = "comfybake-{job}"
ERROR_TYPES = (
    "workflow",
    "placement",
    "validation",
    "execution",
    "timeout",
    "cancelled",
    "instance",
    "output",
    "draining",
)

Progress = Callable[[str, dict[str, Any]], None]
T = TypeVar("T")


@dataclass(frozen=True)
class JobSpec:
    """What a front end asks to run. `inputs` are file name to bytes, uploaded to ComfyUI's
    input/ first; `extra_data` goes to ComfyUI's `extra_data` (an API node's
    `api_key_comfy_org`); `timeout` counts seconds from submission."""

    workflow: Workflow
    name: str = ""
    environment: str | None = None
    inputs: Mapping[str, bytes] = field(default_factory=dict)
    timeout: float = DEFAULT_TIMEOUT
    outputs: str = "inline"
    extra_data: Mapping[str, Any] = field(default_factory=dict)


class JobError(Exception):
    """Why a job cannot run or did not succeed, as data (`as_dict()`, stored as the job's error)."""

    def __init__(
        self,
        type: str,  # noqa: A002 - the field's name in every front end's JSON
        message: str,
        nodes: list[dict[str, Any]] | None = None,
        environments: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.type = type
        self.message = message
        self.nodes = nodes or []
        self.environments = environments

    def as_dict(self) -> dict[str, Any]:
        found: dict[str, Any] = {"type": self.type, "message": self.message, "nodes": self.nodes}
        if self.environments is not None:
            found["environments"] = self.environments
        return found


# --------------------------------------------------------------------------- ComfyUI's errors


def refused(body: Mapping[str, Any], instance: str) -> JobError:
    """A `validation` error from ComfyUI's 400 answer to POST /prompt (`error`, `node_errors`)."""
    given = body.get("error")
    error: dict[str, Any] = given if isinstance(given, dict) else {"message": str(given or "the prompt was refused")}
    nodes: list[dict[str, Any]] = []
    node_errors = body.get("node_errors")
    for node_id, entry in (node_errors if isinstance(node_errors, dict) else {}).items():
        errors = [
            {
                "type": str(item.get("type", "")),
                "message": str(item.get("message", "")),
                "details": str(item.get("details", "")),
                "input": (item.get("extra_info") or {}).get("input_name"),
            }
            for item in entry.get("errors") or []
            if isinstance(item, dict)
        ]
        nodes.append({"node": str(node_id), "class_type": str(entry.get("class_type", "")), "errors": errors})
    extra: dict[str, Any] = error["extra_info"] if isinstance(error.get("extra_info"), dict) else {}
    if not nodes and extra.get("node_id") is not None:  # missing_node_type names its node here
        nodes.append(
            {
                "node": str(extra["node_id"]),
                "class_type": str(extra.get("class_type", "")),
                "errors": [
                    {
                        "type": str(error.get("type", "")),
                        "message": str(error.get("message", "")),
                        "details": str(error.get("details", "")),
                        "input": None,
                    }
                ],
            }
        )
    lines = [
        f"node {node['node']} ({node['class_type']}): {item['message']}"
        + (f" ({item['details']})" if item["details"] else "")
        for node in nodes
        for item in node["errors"]
    ]
    head = f"instance {instance} refused the workflow: {error.get('message') or error.get('type') or 'no reason given'}"
    return JobError("validation", "\n  ".join([head, *lines]), nodes)


def failed(data: Mapping[str, Any], instance: str) -> JobError:
    """An `execution` error from ComfyUI's execution_error message (or its /history record)."""
    node, class_type = str(data.get("node_id", "")), str(data.get("node_type", ""))
    kind, text = str(data.get("exception_type", "")), str(data.get("exception_message", "")).strip()
    trace = data.get("traceback")
    details = "".join(trace[-20:]) if isinstance(trace, list) else str(trace or "")
    where = f"node {node} ({class_type})" if node else "the prompt"
    return JobError(
        "execution",
        f"{where} failed on instance {instance}: {kind + ': ' if kind else ''}{text}",
        [
            {
                "node": node,
                "class_type": class_type,
                "errors": [{"type": kind, "message": text, "details": details, "input": None}],
            }
        ],
    )


# --------------------------------------------------------------------------- inputs


def check_input_name(name: str) -> None:
    """An input's name is a plain file name: it becomes a file in input/comfybake-<job id>/."""
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or any(ord(char) < 32 for char in name)
        or len(name.encode()) > 255
    ):
        raise JobError(
            "workflow",
            f"input name {name!r} is not a plain file name: give a name such as 'input.png' "
            "(no folders, at most 255 bytes), as the workflow's LoadImage names it",
        )


def without_inputs(workflow: Workflow, names: set[str]) -> Workflow:
    """The workflow as placement checks it: inputs that name an uploaded file left out, since
    they are not in any instance's input/ yet (ComfyUI's LoadImage checks them itself)."""
    if not names:
        return workflow
    nodes = {
        node_id: {
            **node,
            "inputs": {
                key: value for key, value in node["inputs"].items() if not (isinstance(value, str) and value in names)
            },
        }
        for node_id, node in workflow.nodes.items()
    }
    return Workflow(nodes)


def rewrite(nodes: Mapping[str, Any], uploaded: Mapping[str, str]) -> dict[str, Any]:
    """A copy of the graph where every plain string input equal to an input's name names its
    uploaded file instead (`input.png` -> `comfybake-<job id>/input.png`)."""
    graph = copy.deepcopy(dict(nodes))
    for node in graph.values():
        for key, value in node["inputs"].items():
            if isinstance(value, str) and value in uploaded:
                node["inputs"][key] = uploaded[value]
    return graph


# --------------------------------------------------------------------------- the runner


class Runner:
    """Runs jobs on the instances routing.json lists under `config_root`, keeping them in `store`."""

    def __init__(
        self,
        config_root: Path,
        store: JobStore,
        *,
        sinks: Mapping[str, OutputSink] | None = None,
        named: Mapping[str, NamedWorkflow] | None = None,
        cache: ObjectInfoCache | None = None,
        looks: Looks | None = None,
    ) -> None:
        self.config_root = Path(config_root)
        self.store = store
        self.sinks = dict(sinks) if sinks is not None else sinks_module.sinks_from_environment(os.environ)
        self.named = named
        self.cache = cache or ObjectInfoCache()
        self.looks = looks or Looks()
        self.claims: dict[str, Claim | None] = {}  # job id to its placement's claim, until it ends
        self.specs = store.path.parent / SPECS
        self.draining = False
        self.http: aiohttp.ClientSession | None = None
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.stops: dict[str, asyncio.Future[str]] = {}
        self.ended: dict[str, asyncio.Event] = {}
        # Held from a job's creation to its launch, and by cancel() while it looks for the job's
        # follower: a job that exists but is not yet followed is never cancelled as another
        # process's and then posted anyway.
        self.admission = asyncio.Lock()

    # ----------------------------------------------------------------------- life

    async def start(self) -> None:
        """Open the HTTP session and resume the jobs a previous runner left unfinished."""
        if self.http is None:
            self.http = comfy.session()
        self.specs.mkdir(mode=0o700, exist_ok=True)
        for job in await asyncio.to_thread(self.store.jobs, "queued"):
            # created, never placed: the runner stopped inside submit(); nothing was posted
            await self._end(
                job.id, "fail", JobError("instance", "the runner stopped before it posted the job: submit it again")
            )
        left = await asyncio.to_thread(self.store.recover)
        if left:  # routing.json is read only then: a host without one yet starts with no jobs
            try:
                routes = {route.name: route for route in await asyncio.to_thread(self._routes)}
            except JobError as error:
                # Serve anyway (a submission is refused with the same error) and keep the jobs for
                # the next start, rather than fail jobs whose instances may still be running them.
                logs.emit(
                    f"{len(left)} unfinished jobs are kept for the next start, since {error}: fix it, "
                    "then restart the job service",
                    "error",
                )
                return
            for job in left:
                await self._resume(job, routes.get(job.instance))

    async def close(self) -> None:
        """Stop following jobs; the unfinished ones stay in the store for the next start()."""
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.http is not None:
            await self.http.close()
            self.http = None

    async def drain(self, timeout: float) -> list[Job]:
        """Refuse new jobs (JobError `draining`) and wait up to `timeout` seconds for the running
        ones; returns the jobs still unfinished (empty when all ended)."""
        self.draining = True
        tasks = list(self.tasks.values())
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.0, timeout))
        return [await asyncio.to_thread(self.store.get, job_id) for job_id in list(self.tasks)]

    def resume(self) -> None:
        """Take new jobs again after a drain."""
        self.draining = False

    # ----------------------------------------------------------------------- front ends' calls

    async def submit(self, spec: JobSpec, on_progress: Progress | None = None) -> Job:
        """Place and start a job; JobError (workflow, placement, draining) before anything exists."""
        self._refuse_when_draining()
        if spec.outputs not in self.sinks:
            configured = ", ".join(sorted(self.sinks))
            hint = " (set COMFYBAKE_JOBS_S3_BUCKET and its credentials for s3)" if spec.outputs == "s3" else ""
            raise JobError("workflow", f"outputs {spec.outputs!r} is not available here: use {configured}{hint}")
        if not 0 < spec.timeout <= 7 * 86400:
            raise JobError("workflow", f"timeout {spec.timeout!r} is not a number of seconds above 0 (at most 7 days)")
        for name in spec.inputs:
            check_input_name(name)
        deadline = asyncio.get_running_loop().time() + spec.timeout
        chosen = await asyncio.to_thread(self._place, without_inputs(spec.workflow, set(spec.inputs)), spec.environment)
        async with self.admission:
            try:
                self._refuse_when_draining()  # a drain that began while placing
                job = await asyncio.to_thread(self.store.create, spec.name, dict(spec.inputs))
                job = await asyncio.to_thread(self.store.submit, job.id, chosen.route.environment, chosen.route.name)
            except BaseException:
                self.looks.release(chosen.claim)
                raise
            self.claims[job.id] = chosen.claim
            self._launch(job, self._run(job, chosen.route, spec, deadline, on_progress, place_again=True))
        return job

    async def submit_named(self, name: str, on_progress: Progress | None = None, **kwargs: Any) -> Job:
        """A named workflow (workflows.yml), in its environment only (an `environment` given must be it)."""
        named = self.named if self.named is not None else await asyncio.to_thread(self._named)
        if name not in named:
            known = ", ".join(sorted(named)) or "none"
            raise JobError("workflow", f"no workflow is named {name!r} (named workflows: {known})")
        entry = named[name]
        asked = kwargs.pop("environment", None)
        if asked is not None and asked != entry.environment:
            raise JobError(
                "workflow",
                f"the workflow {name} runs in environment {entry.environment}, not {asked}: "
                f"leave the environment out, or name {entry.environment}",
            )
        spec = JobSpec(workflow=entry.workflow, name=name, environment=entry.environment, **kwargs)
        return await self.submit(spec, on_progress)

    async def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """The job once it ended, or as it is after `timeout` seconds."""
        ended = self.ended.get(job_id)
        if ended is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(ended.wait(), timeout)
        return await asyncio.to_thread(self.store.get, job_id)

    async def cancel(self, job_id: str) -> Job:
        """Cancel a job: its prompt dropped from the queue or interrupted; a final job stays as it is."""
        async with self.admission:  # a job being created is launched first, then found here
            job = await asyncio.to_thread(self.store.get, job_id)
            stop = self.stops.get(job_id)
        if job.state in FINAL:
            return job
        if stop is not None:
            if not stop.done():
                stop.set_result("cancelled")
            return await self.wait(job_id)
        if self.http is None:
            # closed (a stop): the job stays for the next start, and its prompt cannot be stopped now
            raise JobError("draining", f"this runner is stopping: cancel job {job_id} again once it is back")
        # not followed by this runner (another process's): stop it where it was posted
        route = {route.name: route for route in await asyncio.to_thread(self._routes)}.get(job.instance)
        if route is not None:
            with contextlib.suppress(comfy.InstanceError):
                await comfy.Client(self.http, route.url, route.name).stop(job.prompt_id)
        return await self._end(job_id, "cancel")

    # ----------------------------------------------------------------------- placement

    def _routes(self) -> list[Route]:
        try:
            return load_routing(self.config_root)
        except HostError as error:
            raise JobError("placement", str(error)) from None

    def _named(self) -> dict[str, NamedWorkflow]:
        path = self.config_root / NAMED_WORKFLOWS_FILE
        if not path.exists():
            return {}
        try:
            return load_named(path)
        except HostError as error:
            raise JobError("workflow", str(error)) from None

    def _place(self, workflow: Workflow, environment: str | None) -> Placement:
        try:
            return place(workflow, self._routes(), self.cache, environment, self.looks)
        except PlacementError as error:
            raise JobError("placement", str(error), environments=error.as_dict()["environments"]) from None

    def _refuse_when_draining(self) -> None:
        if self.draining:
            raise JobError("draining", "this runner is draining (a rolling change): submit the job again shortly")

    # ----------------------------------------------------------------------- one job

    def _launch(self, job: Job, work: Awaitable[None]) -> None:
        self.stops[job.id] = asyncio.get_running_loop().create_future()
        self.ended[job.id] = asyncio.Event()
        self.tasks[job.id] = asyncio.ensure_future(self._guard(job, work))

    async def _guard(self, job: Job, work: Awaitable[None]) -> None:
        """Run one job's work; an error nobody expected fails the job and is logged with its traceback."""
        try:
            await work
        except asyncio.CancelledError:
            raise  # close(): the job stays unfinished in the store
        except Exception as error:  # noqa: BLE001 - one job's bug must not stop the runner
            logs.emit(
                f"error: job {job.id}: {type(error).__name__}: {error}\n{traceback.format_exc()}",
                "error",
                instance=job.instance,
            )
            with contextlib.suppress(StoreError):
                await self._end(
                    job.id, "fail", JobError("instance", f"the runner failed: {type(error).__name__}: {error}")
                )
        finally:
            self.looks.release(self.claims.pop(job.id, None))
            self.tasks.pop(job.id, None)
            self.stops.pop(job.id, None)
            ended = self.ended.pop(job.id, None)
            if ended is not None:
                ended.set()

    def _client(self, route: Route) -> comfy.Client:
        if self.http is None:
            raise RuntimeError("Runner.start() opens the HTTP session: call it first")
        return comfy.Client(self.http, route.url, route.name)

    async def _run(
        self,
        job: Job,
        route: Route,
        spec: JobSpec,
        deadline: float,
        on_progress: Progress | None,
        adopt: bool = False,
        place_again: bool = False,
    ) -> None:
        """Upload, post and follow one job to its end (`adopt`: its prompt is queued already;
        `place_again`: placed by submit(), so it may go to another instance when its own refuses)."""
        stop = self.stops[job.id]
        events = None if on_progress is None else (lambda event: self._progress(on_progress, job.id, event))
        if adopt:
            client = self._client(route)
            follower = client.follow(job.prompt_id, job.id, events)
            await follower.connect()
        else:
            posted = await self._post(job, route, spec, deadline, events, place_again)
            if posted is None:
                return
            route, client, follower = posted
        if adopt is False or job.state == "submitting":
            await asyncio.to_thread(self.store.start, job.id)
        ended, outcome = await self._race(follower.outcome(look_first=adopt), stop, deadline)
        if ended or outcome is None:
            await follower.close()
            await self._stopped(job, ended, client, spec.timeout, posted=True)
            return
        await self._finish(job, route, client, outcome, spec.outputs)

    async def _post(
        self, job: Job, route: Route, spec: JobSpec, deadline: float, events: comfy.Event | None, place_again: bool
    ) -> tuple[Route, comfy.Client, comfy.Follower] | None:
        """Upload the inputs and post the prompt on `route`, its socket opened first (no message of
        the prompt is missed); None when the job ended instead. An instance that refuses the
        connection was sent nothing: the job is placed once more, when `place_again`."""
        client = self._client(route)
        follower = client.follow(job.prompt_id, job.id, events)
        try:
            ended, graph = await self._race(self._upload(client, job, spec), self.stops[job.id], deadline)
            if ended or graph is None:
                await self._stopped(job, ended, client, spec.timeout, posted=False)
                return None
            await follower.connect()
            await client.queue_prompt(graph, job.prompt_id, job.id, spec.extra_data)
        except comfy.PromptRefusedError as error:
            await follower.close()
            await self._end(job.id, "fail", refused(error.body, route.name))
            return None
        except comfy.UnreachableError as error:
            await follower.close()
            if not place_again:
                await self._end(job.id, "fail", JobError("instance", f"{error}; the job was not run"))
                return None
            moved = await self._place_again(job, route, spec, error)
            return None if moved is None else await self._post(job, moved, spec, deadline, events, place_again=False)
        except comfy.InstanceError as error:
            await follower.close()
            await self._end(job.id, "fail", JobError("instance", f"{error}; the job was not run"))
            return None
        self.looks.posted(self.claims.get(job.id))
        return route, client, follower

    async def _place_again(self, job: Job, route: Route, spec: JobSpec, error: comfy.InstanceError) -> Route | None:
        """Another instance for a job whose own refused the connection: that one is taken as not
        ready until its next look; None (the job failed, saying why) when none can run it now."""
        self.looks.down(route, "it refused a connection when a job was posted")
        self.looks.release(self.claims.pop(job.id, None))
        try:
            chosen = await asyncio.to_thread(
                self._place, without_inputs(spec.workflow, set(spec.inputs)), spec.environment
            )
        except JobError as again:
            message = f"{error}; the job was not run, and no other instance can run it now: {again.message}"
            await self._end(job.id, "fail", JobError("instance", message))
            return None
        self.claims[job.id] = chosen.claim
        await asyncio.to_thread(self.store.submit, job.id, chosen.route.environment, chosen.route.name)
        logs.emit(
            f"warning: job {job.id}: {error}; placed again on instance {chosen.route.name}",
            "warning",
            instance=route.name,
        )
        return chosen.route

    async def _upload(self, client: comfy.Client, job: Job, spec: JobSpec) -> dict[str, Any]:
        """Upload the inputs; the graph to post (rewritten to their names), kept for a restart."""
        folder = INPUT_FOLDER.format(job=job.id)
        uploaded = {name: await client.upload(name, data, folder) for name, data in spec.inputs.items()}
        graph = rewrite(spec.workflow.nodes, uploaded)
        await asyncio.to_thread(self._keep, job.id, graph, spec)
        return graph

    async def _race(self, work: Awaitable[T], stop: asyncio.Future[str], deadline: float) -> tuple[str, T | None]:
        """`("", result)` when `work` ends first; `("cancelled" | "timed_out", None)` when the job is
        cancelled or reaches its deadline first (then `work` is cancelled)."""
        task: asyncio.Future[Any] = asyncio.ensure_future(work)
        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        try:
            await asyncio.wait([task, stop], timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        if task.done():
            return "", task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, *comfy.FAILURES, comfy.InstanceError):
            await task
        return ("cancelled" if stop.done() else "timed_out"), None

    async def _stopped(self, job: Job, why: str, client: comfy.Client, timeout: float, *, posted: bool) -> None:
        """End a cancelled or timed-out job: its prompt dropped or interrupted (waiting up to
        STOP_GRACE seconds for its instance to let it go)."""
        if posted:
            with contextlib.suppress(comfy.InstanceError):
                await client.stop(job.prompt_id)
                loop = asyncio.get_running_loop()
                until = loop.time() + STOP_GRACE
                while loop.time() < until and (await client.queue()).holds(job.prompt_id):
                    await asyncio.sleep(0.1)
        if why == "cancelled":
            await self._end(job.id, "cancel")
            return
        what = "its prompt was interrupted" if posted else "it was not posted"
        await self._end(
            job.id,
            "time_out",
            JobError("timeout", f"the job ran past its timeout of {timeout:g} s on instance {client.name}: {what}"),
        )

    async def _finish(self, job: Job, route: Route, client: comfy.Client, outcome: comfy.Outcome, outputs: str) -> None:
        """End a job from its prompt's outcome: its outputs stored, or the error ComfyUI gave."""
        if outcome.status == "error":
            await self._end(job.id, "fail", failed(outcome.error, route.name))
        elif outcome.status == "interrupted":
            message = f"the prompt was interrupted on instance {route.name}, not by this runner (its /interrupt)"
            await self._end(job.id, "fail", JobError("execution", message))
        elif outcome.status == "lost":
            message = (
                f"instance {route.name} no longer knows prompt {job.prompt_id} (it restarted while the job ran): "
                "submit the job again"
            )
            await self._end(job.id, "fail", JobError("instance", message))
        else:
            try:
                result = await self._store_outputs(job.id, client, outcome.outputs, outputs)
            except (comfy.InstanceError, OutputError) as error:
                await self._end(job.id, "fail", JobError("output", str(error)))
                return
            await self._end(job.id, "succeed", result)

    async def _store_outputs(
        self, job_id: str, client: comfy.Client, found: Mapping[str, Any], outputs: str
    ) -> dict[str, list[dict[str, Any]]]:
        sink = self.sinks.get(outputs)
        if sink is None:
            raise OutputError(f"outputs {outputs!r} is not configured in this runner any more: configure it again")
        result = sinks_module.empty_result()
        for item in sinks_module.collect(found):
            data = await client.view(item.filename, item.subfolder, item.type)
            result[item.kind].append(await sink.store(job_id, item, data))
        return result

    async def _end(self, job_id: str, how: str, detail: Any = None) -> Job:
        """A final transition (succeed, fail, cancel, time_out); the job's kept spec goes."""
        if isinstance(detail, JobError):
            detail = detail.as_dict()
        move = getattr(self.store, how)
        job: Job = await asyncio.to_thread(*((move, job_id) if how == "cancel" else (move, job_id, detail)))
        with contextlib.suppress(FileNotFoundError):
            (self.specs / f"{job_id}.json").unlink()
        return job

    @staticmethod
    def _progress(callback: Progress, job_id: str, event: dict[str, Any]) -> None:
        try:
            callback(job_id, event)
        except Exception as error:  # noqa: BLE001 - a front end's callback must not stop the job
            logs.emit(
                f"warning: job {job_id}: the progress callback failed: {type(error).__name__}: {error}", "warning"
            )

    # ----------------------------------------------------------------------- restarts

    def _keep(self, job_id: str, graph: dict[str, Any], spec: JobSpec) -> None:
        """What a restarted runner needs to post the job again (never input data; extra_data
        values whose names say they hold a secret are left out)."""
        kept = {
            "graph": graph,
            "outputs": spec.outputs,
            "timeout": spec.timeout,
            "extra_data": {key: value for key, value in spec.extra_data.items() if not secret_name(key)},
        }
        path = self.specs / f"{job_id}.json"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(kept, handle)

    def _kept(self, job_id: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self.specs / f"{job_id}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and isinstance(data.get("graph"), dict) else None

    async def _resume(self, job: Job, route: Route | None) -> None:
        """Adopt a job a previous runner left submitting or running, or post it again if it never
        reached its instance; fail it when neither can be done, saying why."""
        if route is None:
            message = f"instance {job.instance!r} is no longer in routing.json: submit the job again"
            await self._end(job.id, "fail", JobError("instance", message))
            return
        kept = self._kept(job.id) or {}
        timeout = float(kept.get("timeout") or DEFAULT_TIMEOUT)
        created = datetime.datetime.fromisoformat(job.created)
        elapsed = (datetime.datetime.now(datetime.timezone.utc) - created).total_seconds()  # noqa: UP017 - Python 3.10
        deadline = asyncio.get_running_loop().time() + timeout - elapsed
        spec = JobSpec(
            workflow=Workflow(kept.get("graph") or {}),
            name=job.workflow,
            timeout=timeout,
            outputs=str(kept.get("outputs") or "inline"),
            extra_data=dict(kept.get("extra_data") or {}),
        )
        client = self._client(route)
        try:
            known = await client.history(job.prompt_id) is not None or (await client.queue()).holds(job.prompt_id)
        except comfy.InstanceError:
            known = True  # the instance does not answer now: follow it (polling) until it does, or the timeout
        if known:
            self._launch(job, self._run(job, route, spec, deadline, None, adopt=True))
        elif job.state == "submitting" and kept:
            # posted again: its inputs were uploaded before the graph was kept, so none is needed
            job = await asyncio.to_thread(self.store.submit, job.id, job.environment, job.instance)
            self._launch(job, self._run(job, route, spec, deadline, None))
        elif job.state == "submitting":
            message = "the runner stopped before it posted the job and its inputs were uploaded: submit it again"
            await self._end(job.id, "fail", JobError("instance", message))
        else:
            message = (
                f"instance {route.name} no longer knows prompt {job.prompt_id} (it restarted while the runner "
                "was down): submit the job again"
            )
            await self._end(job.id, "fail", JobError("instance", message))
