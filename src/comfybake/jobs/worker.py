"""The RunPod serverless worker (`comfybake jobs worker`): RunPod's official SDK takes jobs and
runs `handler` on each, which runs the shared job runner over the image's own instances.

A job's input is what the official worker-comfyui takes, so its clients work unchanged:

    {"input": {"workflow": {API-format graph}, "images": [{"name": "in.png", "image": "<base64>"}]}}

plus comfybake's own optional fields (`workflow_name` instead of `workflow`, `environment`,
`timeout`, `outputs`). The answer has worker-comfyui's shape too: `{"images": [{"filename",
"type": "base64", "data"}]}`, or `"type": "s3_url"` with the URL in `data` (and `url`) when the
outputs go to a bucket; a refusal or failure is `{"error": message, "details": {...}}`, the
details being the runner's structured error (the nodes ComfyUI refused, what each environment
lacks). Progress reaches RunPod through `progress_update`, in worker-comfyui's uniform shape.

The SDK is imported only when the worker runs: it is installed in the image's worker venv, not
on every host. It reads its own flags (`--test_input`, `--rp_serve_api`, ...) from sys.argv and
its platform settings (RUNPOD_WEBHOOK_GET_JOB, ...) from the environment at import time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import importlib
import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from comfybake import logs
from comfybake.engine import runtime
from comfybake.instances import HostError
from comfybake.jobs import placement
from comfybake.jobs.outputs import OutputError, OutputSink, sinks_from_environment
from comfybake.jobs.runner import DEFAULT_TIMEOUT, JobError, JobSpec, Runner
from comfybake.jobs.store import Job, JobStore
from comfybake.jobs.workflow import WorkflowError
from comfybake.jobs.workflow import check as check_workflow

DEFAULT_CONFIG_ROOT = "/etc/comfybake"
DEFAULT_STATE_ROOT = "/var/lib/comfybake-worker"
CONCURRENCY_ENVIRONMENT = "COMFYBAKE_WORKER_CONCURRENCY"
READY_TIMEOUT_ENVIRONMENT = "COMFYBAKE_WORKER_READY_TIMEOUT"
DEFAULT_READY_TIMEOUT = 600.0  # seconds the worker waits for its instances before taking jobs
OUTPUTS = ("inline", "s3")

# The SDK's own flags (runpod.serverless parses them from sys.argv): name -> argparse keywords.
SDK_FLAGS: dict[str, dict[str, Any]] = {
    "--test_input": {"metavar": "JSON", "help": 'run one job with this input ({"input": {...}}) and exit'},
    "--rp_serve_api": {"action": "store_true", "help": "serve RunPod's local test API (/run, /runsync, ...)"},
    "--rp_api_port": {"type": int, "metavar": "PORT", "help": "the local API's port (SDK default 8000)"},
    "--rp_api_host": {"metavar": "HOST", "help": "the local API's address (SDK default localhost)"},
    "--rp_api_concurrency": {"type": int, "metavar": "N", "help": "the local API's server processes"},
    "--rp_log_level": {"metavar": "LEVEL", "help": "the SDK's log level: ERROR, WARN, INFO or DEBUG"},
    "--rp_debugger": {"action": "store_true", "help": "add the SDK's timings to each answer"},
}


def _is_object(value: Any) -> bool:
    return value is None or isinstance(value, dict)


def _images_shape(value: Any) -> bool:
    return value is None or (
        isinstance(value, list)
        and all(isinstance(item, dict) and isinstance(item.get("name"), str) and "image" in item for item in value)
    )


# The input schema, in runpod.serverless.utils.rp_validator's format (every optional field needs
# a default; a default of None skips the type check, so a field may be left out).
SCHEMA: dict[str, dict[str, Any]] = {
    "workflow": {"type": dict, "required": False, "default": None, "constraints": _is_object},
    "workflow_name": {"type": str, "required": False, "default": None},
    "images": {"type": list, "required": False, "default": None, "constraints": _images_shape},
    "environment": {"type": str, "required": False, "default": None},
    "timeout": {
        "type": float,
        "required": False,
        "default": None,
        "constraints": lambda value: value is None or (isinstance(value, (int, float)) and value > 0),
    },
    "outputs": {"type": str, "required": False, "default": None, "constraints": lambda v: v in (None, *OUTPUTS)},
}
# What each constraint means, for the error the client reads (the validator only says "does not
# meet the constraints").
HINTS = {
    "workflow": "an API-format workflow object",
    "images": "a list of {'name', 'image': base64} objects",
    "timeout": "a number of seconds above 0",
    "outputs": "'inline' or 's3'",
}


class InputError(ValueError):
    """The job's input is refused: `errors` lists each problem, naming its field."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("the job's input is refused: " + "; ".join(errors))
        self.errors = errors

    def answer(self) -> dict[str, Any]:
        return {"error": str(self), "details": {"type": "input", "errors": self.errors}}


def decode_image(index: int, item: Mapping[str, Any]) -> tuple[str, bytes]:
    """One input image: its name and bytes from base64, with or without a data URI's prefix
    (`data:image/png;base64,...`), as worker-comfyui accepts it."""
    name, text = item["name"], item["image"]
    if not isinstance(text, str):
        raise InputError([f"images[{index}] ({name!r}): 'image' must be a base64 string"])
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return name, base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError([f"images[{index}] ({name!r}): 'image' is not valid base64"]) from None


def validate_input(raw: Any, rp_validate: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """The job's input checked by the SDK's validator against SCHEMA (its errors as they are,
    each constraint's meaning added), then what the schema cannot say: exactly one of workflow
    and workflow_name, the workflow's API format, each image's base64."""
    if isinstance(raw, str):  # worker-comfyui accepts the input as a JSON string too
        try:
            raw = json.loads(raw)
        except ValueError:
            raise InputError(["the input is a string that is not JSON"]) from None
    if not isinstance(raw, dict):
        raise InputError([f"the input must be an object with 'workflow', not {type(raw).__name__}"])
    checked = rp_validate(raw, {key: dict(rules) for key, rules in SCHEMA.items()})
    if "errors" in checked:
        raise InputError(
            [_hint(error) for error in checked["errors"]],
        )
    values: dict[str, Any] = checked["validated_input"]
    if (values["workflow"] is None) == (values["workflow_name"] is None):
        raise InputError(["give 'workflow' (an API-format graph) or 'workflow_name' (a named workflow), one of them"])
    if values["workflow"] is not None:
        try:
            values["workflow"] = check_workflow(values["workflow"], "the input's workflow")
        except WorkflowError as error:
            raise InputError([str(error)]) from None
    values["inputs"] = dict(decode_image(index, item) for index, item in enumerate(values["images"] or []))
    return values


def _hint(error: str) -> str:
    field = error.partition(" ")[0]
    if error.endswith("does not meet the constraints.") and field in HINTS:
        return f"{error[:-1]}: {field} must be {HINTS[field]}"
    return error


def answer(job: Job) -> dict[str, Any]:
    """A finished job as worker-comfyui answers: its images (an S3 URL in `data` as well as in
    `url`), and videos and files when the workflow made any; or the job's error."""
    if job.state != "succeeded":
        error = job.error if isinstance(job.error, dict) else {"type": job.state, "message": f"the job {job.state}"}
        return {"error": str(error.get("message") or f"the job {job.state}"), "details": error}
    result: dict[str, Any] = {}
    for key in ("images", "videos", "files"):
        items = [_item(item) for item in (job.result or {}).get(key) or []]
        if items or key == "images":
            result[key] = items
    return result


def _item(item: Mapping[str, Any]) -> dict[str, Any]:
    item = dict(item)
    if item.get("type") == "s3_url":
        item["data"] = item["url"]
    return item


def progress_payload(event: Mapping[str, Any]) -> dict[str, Any] | None:
    """ComfyUI's `progress` message (as the runner passes it on: `{"type", "data"}`) in
    worker-comfyui's uniform shape (`type`, `value`, `max`, `percent`, `node`), or None for the
    messages RunPod's status need not show."""
    data = event.get("data")
    if event.get("type") != "progress" or not isinstance(data, dict):
        return None
    value, maximum = data.get("value"), data.get("max")
    if not isinstance(value, (int, float)) or not isinstance(maximum, (int, float)) or maximum <= 0:
        return None
    return {
        "type": "progress",
        "value": value,
        "max": maximum,
        "percent": round(100.0 * value / maximum, 1),
        "node": data.get("node"),
    }


class Worker:
    """The handler's state: one runner, started in the SDK's event loop by the first job (the
    SDK owns the loop: asyncio.run for its job loop, uvicorn's for the local API)."""

    def __init__(
        self,
        config_root: Path,
        state_root: Path,
        sinks: Mapping[str, OutputSink],
        progress: Callable[[dict[str, Any], Any], None] | None = None,
        one_job: bool = False,
    ) -> None:
        self.config_root = config_root
        self.state_root = state_root
        self.sinks = dict(sinks)
        self.progress = progress
        self.one_job = one_job  # the SDK's local test: close the runner after the job
        self.runner: Runner | None = None
        self.lock: asyncio.Lock | None = None

    async def _runner(self) -> Runner:
        if self.lock is None:
            self.lock = asyncio.Lock()
        async with self.lock:
            if self.runner is None:  # named workflows: the runner reads workflows.yml when asked
                runner = Runner(self.config_root, JobStore(self.state_root), sinks=self.sinks)
                await runner.start()
                self.runner = runner
            return self.runner

    async def close(self) -> None:
        if self.runner is not None:
            runner, self.runner = self.runner, None
            await runner.close()

    def default_outputs(self) -> str:
        """S3 when a bucket is configured (worker-comfyui uploads whenever BUCKET_ENDPOINT_URL is
        set), else inline."""
        return "s3" if "s3" in self.sinks else "inline"

    async def handler(self, job: dict[str, Any]) -> dict[str, Any]:
        """RunPod's handler: one job's input in, its answer out (never raises for a job's own
        problems: they are answers)."""
        try:
            values = validate_input(job.get("input"), _sdk_validate)
        except InputError as error:
            logs.emit(f"RunPod job {job.get('id')}: {error}", "warning", runpod_job=job.get("id"))
            return error.answer()
        outputs = values["outputs"] or self.default_outputs()
        try:
            return await self._run(job, values, outputs)
        finally:
            if self.one_job:
                await self.close()

    async def _run(self, job: dict[str, Any], values: dict[str, Any], outputs: str) -> dict[str, Any]:
        runner = await self._runner()
        fields: dict[str, Any] = {
            "inputs": values["inputs"],
            "timeout": values["timeout"] or DEFAULT_TIMEOUT,
            "outputs": outputs,
        }
        progress = self._progress(job)
        try:
            if values["workflow_name"] is not None:
                submitted = await runner.submit_named(
                    values["workflow_name"], progress, environment=values["environment"], **fields
                )
            else:
                spec = JobSpec(workflow=values["workflow"], environment=values["environment"], **fields)
                submitted = await runner.submit(spec, progress)
        except JobError as error:
            return {"error": error.message, "details": error.as_dict()}
        logs.emit(
            f"RunPod job {job.get('id')} is job {submitted.id}", "info", runpod_job=job.get("id"), job=submitted.id
        )
        try:
            finished = await runner.wait(submitted.id)
        except asyncio.CancelledError:
            # RunPod stopped the request (cancelled, or past the endpoint's execution timeout):
            # interrupt the prompt so that the instance is free for the next job.
            await asyncio.shield(runner.cancel(submitted.id))
            raise
        return answer(finished)

    def _progress(self, job: dict[str, Any]) -> Callable[[str, dict[str, Any]], None] | None:
        """The runner's callback: ComfyUI's progress messages to RunPod (the runner logs a
        callback that fails; the job goes on)."""
        send = self.progress
        if send is None:
            return None

        def forward(_job_id: str, event: dict[str, Any]) -> None:
            payload = progress_payload(event)
            if payload is not None:
                send(job, payload)

        return forward


def _sdk_validate(raw: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    validator = importlib.import_module("runpod.serverless.utils.rp_validator")
    result: dict[str, Any] = validator.validate(raw, schema)
    return result


def concurrency(value: str | None, routes: list[placement.Route]) -> int:
    """How many jobs the worker takes at once: COMFYBAKE_WORKER_CONCURRENCY, else one per enabled
    instance (each instance runs one prompt at a time; more would only queue inside ComfyUI)."""
    if value is None or value == "":
        return max(1, sum(1 for route in routes if route.enabled))
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"{CONCURRENCY_ENVIRONMENT}={value!r} is not a whole number of jobs of at least 1")
    return number


def wait_for_instances(routes: list[placement.Route], timeout: float) -> bool:
    """Wait until the enabled instances are ready (RunPod hands a worker jobs as soon as the SDK
    starts); report those that are not. True when at least one is ready."""
    enabled = [route for route in routes if route.enabled]
    if not enabled:
        logs.emit("routing.json lists no enabled instance: no job can run here", "error")
        return False
    results = runtime.wait_all([route.instance() for route in enabled], timeout, use_systemd=False)
    for result in results:
        if not result["ready"]:
            logs.emit(f"comfybake worker: {result['message']}", "warning", instance=result["name"])
    return any(result["ready"] for result in results)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config-root",
        type=Path,
        default=Path(DEFAULT_CONFIG_ROOT),
        help=f"where routing.json and workflows.yml are (default {DEFAULT_CONFIG_ROOT})",
    )
    parser.add_argument(
        "--state-root",
        type=Path,
        default=Path(DEFAULT_STATE_ROOT),
        help=f"a writable folder for the job store (default {DEFAULT_STATE_ROOT})",
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"how long to wait for the instances before taking jobs (default ${READY_TIMEOUT_ENVIRONMENT}, "
        f"else {DEFAULT_READY_TIMEOUT:g})",
    )
    parser.add_argument(
        "--environment-file",
        type=Path,
        metavar="FILE",
        help="variables to add to the environment first, as NUL-separated NAME=VALUE records (env -0): "
        "the image's entrypoint hands RunPod's and the bucket's variables to the worker alone this way",
    )
    sdk = parser.add_argument_group("RunPod SDK", "passed to runpod.serverless as they are")
    for flag, options in SDK_FLAGS.items():
        sdk.add_argument(flag, dest=flag[2:], default=None, **options)


def sdk_argv(args: argparse.Namespace) -> list[str]:
    """The SDK's flags from our parsed arguments, as runpod.serverless reads them from sys.argv."""
    argv = []
    for flag, options in SDK_FLAGS.items():
        value = getattr(args, flag[2:], None)
        if value is None or value is False:
            continue
        argv.append(flag) if options.get("action") == "store_true" else argv.extend([flag, str(value)])
    return argv


def read_environment_file(path: Path) -> dict[str, str]:
    """NUL-separated NAME=VALUE records, as `env -0` writes them (a value may hold line breaks)."""
    try:
        records = path.read_bytes().decode("utf-8", "surrogateescape").split("\0")
    except OSError as error:
        raise ValueError(
            f"the environment file {path} cannot be read ({error.strerror}): start the container with "
            "COMFYBAKE_SERVE=runpod, whose entrypoint writes it"
        ) from None
    variables = {}
    for record in records:
        name, equals, value = record.partition("=")
        if record and not (equals and name.isidentifier()):
            raise ValueError(
                f"the environment file {path} holds a record that is not NAME=VALUE: give it as env -0 writes"
            )
        if record:
            variables[name] = value
    return variables


def run(args: argparse.Namespace) -> int:
    """Start the worker: wait for the instances, then hand over to the SDK (RunPod's job loop, or
    its local test of --test_input / test_input.json, or its local API with --rp_serve_api)."""
    try:
        if args.environment_file is not None:
            # Before anything reads them: the SDK reads RunPod's variables when it is imported.
            os.environ.update(read_environment_file(args.environment_file))
        sinks = sinks_from_environment(os.environ)
        routes = placement.load_routing(args.config_root)
        jobs_at_once = concurrency(os.environ.get(CONCURRENCY_ENVIRONMENT), routes)
        ready_timeout = args.ready_timeout
        if ready_timeout is None:
            ready_timeout = float(os.environ.get(READY_TIMEOUT_ENVIRONMENT) or DEFAULT_READY_TIMEOUT)
    except (HostError, ValueError, OutputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not wait_for_instances(routes, ready_timeout):
        print(f"error: no instance of {args.config_root / 'routing.json'} is ready: no job can run", file=sys.stderr)
        return 1
    # The SDK logs at DEBUG unless told: its debug lines print each job's whole input (images
    # included) and output. INFO unless the endpoint sets RUNPOD_LOG_LEVEL (or --rp_log_level).
    os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")
    serverless = importlib.import_module("runpod.serverless")
    local_test = "RUNPOD_WEBHOOK_GET_JOB" not in os.environ and not args.rp_serve_api
    worker = Worker(
        args.config_root,
        args.state_root,
        sinks,
        # progress_update posts to RunPod's job-done URL, which only the platform sets
        progress=serverless.progress_update if os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT") else None,
        one_job=local_test,
    )
    logs.emit(
        f"comfybake worker: {len(routes)} instance(s) in {args.config_root / 'routing.json'}, "
        f"{jobs_at_once} job(s) at once, outputs {worker.default_outputs()} by default",
        "info",
    )
    sys.argv = [sys.argv[0], *sdk_argv(args)]
    serverless.start({"handler": worker.handler, "concurrency_modifier": lambda _current: jobs_at_once})
    return 0
