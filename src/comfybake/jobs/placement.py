"""Which instance runs a workflow: one that can run it, is ready, and has the shortest queue.

Read from what the roles already write and what the instances answer:
  - `<config root>/routing.json` (comfyui_instances): each instance's environment, URL and the
    node classes it serves;
  - each environment's `GET /object_info`, from a ready instance of it (cached `ttl` seconds):
    the combo lists of its inputs, so a model file an environment lacks (`ckpt_name
    'x.safetensors'`) is found before anything is queued, as ComfyUI itself would refuse the
    prompt (`value_not_in_list`);
  - readiness (`runtime.probe`, the one definition of ready) and the queue
    (`GET /prompt` -> `exec_info.queue_remaining`) of each instance.

Among the enabled instances whose environment lacks nothing the workflow needs, the ready ones
with the fewest prompts queued win, ties by name. When none can run it, `PlacementError` says
per environment what it lacks (node classes, combo values) or why none of its instances is
ready. Named workflows (a file mapping each name to its environment and graph) restrict
placement to their environment; `check_named` reports what each one's environment lacks.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.parse
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comfybake import yamlfile
from comfybake.engine import runtime
from comfybake.instances import HostError, load_json
from comfybake.jobs.workflow import StringInput, Workflow, WorkflowError
from comfybake.jobs.workflow import load as load_workflow

ROUTING_FORMAT = 1
OBJECT_INFO_TTL = 30.0  # seconds: a model added to an environment is seen within this
NAMED_WORKFLOWS_FILE = "workflows.yml"


class PlacementError(Exception):
    """No instance can run the workflow now; `environments` says why, per environment."""

    def __init__(self, message: str, environments: Mapping[str, EnvironmentReport] | None = None) -> None:
        super().__init__(message)
        self.environments: dict[str, EnvironmentReport] = dict(environments or {})

    def as_dict(self) -> dict[str, Any]:
        return {
            "error": str(self),
            "environments": {name: report.as_dict() for name, report in sorted(self.environments.items())},
        }


@dataclass(frozen=True)
class Route:
    """An instance as routing.json lists it."""

    name: str
    environment: str
    url: str
    port: int
    enabled: bool
    node_classes: frozenset[str]
    record: dict[str, Any]

    def instance(self) -> runtime.Instance:
        """The instance as readiness reads it: reached at routing.json's URL, required classes checked."""
        host = urllib.parse.urlsplit(self.url).hostname or "127.0.0.1"
        return runtime.Instance(
            {
                "name": self.name,
                "port": self.port,
                "listen": host,
                "required_node_classes": self.record.get("required_node_classes") or [],
            }
        )


@dataclass
class EnvironmentReport:
    """What an environment lacks to run a workflow, and why its instances cannot take it now."""

    missing_classes: list[str] = field(default_factory=list)
    missing_values: list[StringInput] = field(default_factory=list)
    not_ready: dict[str, str] = field(default_factory=dict)  # instance name to what readiness misses
    note: str = ""  # the environment is unknown, or has no enabled instance

    def lacks(self) -> bool:
        return bool(self.missing_classes or self.missing_values or self.note)

    def describe(self) -> str:
        parts = []
        if self.note:
            parts.append(self.note)
        if self.missing_classes:
            parts.append("lacks node classes " + ", ".join(self.missing_classes))
        if self.missing_values:
            parts.append("lacks values " + "; ".join(item.describe() for item in self.missing_values))
        if not parts and self.not_ready:
            parts.append(
                "no instance is ready: " + "; ".join(f"{name}: {why}" for name, why in sorted(self.not_ready.items()))
            )
        return ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "missing_classes": self.missing_classes,
            "missing_values": [
                {"node": item.node, "class_type": item.class_type, "input": item.name, "value": item.value}
                for item in self.missing_values
            ],
            "not_ready": self.not_ready,
            "note": self.note,
        }


@dataclass(frozen=True)
class Placement:
    """The chosen instance, and the queue length it had when chosen."""

    route: Route
    queue_remaining: int


# --------------------------------------------------------------------------- routing.json


def load_routing(config_root: str | Path) -> list[Route]:
    """The instances routing.json lists, as the comfyui_instances role wrote it."""
    path = Path(config_root) / "routing.json"
    data = load_json(path, "comfyui_instances")
    if data.get("format") != ROUTING_FORMAT or not isinstance(data.get("instances"), list):
        raise HostError(
            f"{path} is not a routing file of format {ROUTING_FORMAT} (format {data.get('format')!r}): "
            "converge the host with this version's comfyui_instances role"
        )
    routes = []
    for index, item in enumerate(data["instances"]):
        try:
            routes.append(
                Route(
                    name=str(item["name"]),
                    environment=str(item["environment"]),
                    url=str(item["url"]),
                    port=int(item["port"]),
                    enabled=bool(item.get("enabled", True)),
                    node_classes=frozenset(str(name) for name in item.get("node_classes") or []),
                    record=dict(item),
                )
            )
        except (KeyError, TypeError, ValueError) as error:
            raise HostError(f"{path}: instance {index} lacks a valid {error}: converge the host again") from None
    return routes


# --------------------------------------------------------------------------- /object_info


class ObjectInfoCache:
    """Each environment's /object_info, fetched once per `ttl` seconds from a ready instance.

    Safe with several threads: those that need the same environment at once wait for one fetch
    (ComfyUI builds its answer from every node class, which takes a while). A fetch that fails is
    not cached."""

    def __init__(self, ttl: float = OBJECT_INFO_TTL, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self.lock = threading.Lock()  # guards `locks` and `fetches`
        self.locks: dict[str, threading.Lock] = {}  # one per environment, held while it is fetched
        self.entries: dict[str, tuple[float, dict[str, Any]]] = {}
        self.fetches = 0  # how many times an instance was asked (the tests read it)

    def get(self, environment: str, route: Route) -> dict[str, Any]:
        """The environment's /object_info, asked of `route` (a ready instance of it) when stale."""
        with self.lock:
            fetching = self.locks.setdefault(environment, threading.Lock())
        with fetching:
            cached = self.entries.get(environment)
            if cached and self.clock() - cached[0] < self.ttl:
                return cached[1]
            info = runtime.get_json(f"{route.url.rstrip('/')}/object_info", timeout=30)
            if not isinstance(info, dict):
                raise ValueError(f"/object_info of instance {route.name} is a {type(info).__name__}, not an object")
            self.entries[environment] = (self.clock(), info)
            with self.lock:
                self.fetches += 1
            return info


def combo_options(spec: Any) -> list[Any] | None:
    """The values a combo input accepts, from its /object_info spec; None for another input type.

    ComfyUI writes a combo as `[[value, ...], {options}]`, and nodes of its newer schema as
    `["COMBO", {"options": [value, ...], ...}]`."""
    if not isinstance(spec, list) or not spec:
        return None
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict) and isinstance(spec[1].get("options"), list):
        options: list[Any] = spec[1]["options"]
        return options
    return None


def missing_values(workflow: Workflow, object_info: Mapping[str, Any]) -> list[StringInput]:
    """The plain string values the environment's combo lists refuse (an input that is not a combo,
    or that the class does not declare, is left to ComfyUI)."""
    missing = []
    for item in workflow.string_inputs():
        declared = (object_info.get(item.class_type) or {}).get("input") or {}
        spec = (declared.get("required") or {}).get(item.name, (declared.get("optional") or {}).get(item.name))
        options = combo_options(spec)
        if options is not None and item.value not in options:
            missing.append(item)
    return missing


# --------------------------------------------------------------------------- placement


def queue_remaining(route: Route) -> int | None:
    """Prompts queued or running on the instance (GET /prompt), None when it does not answer."""
    try:
        answer = runtime.get_json(f"{route.url.rstrip('/')}/prompt")
        return int(answer["exec_info"]["queue_remaining"])
    except (OSError, ValueError, KeyError, TypeError, urllib.error.URLError):
        return None


def _look(route: Route) -> tuple[str, int | None]:
    """(what readiness misses, "" when ready; the queue length of a ready instance)."""
    stage, missing, _settled = runtime.probe(route.instance())
    if stage != "ready":
        return missing or stage, None
    remaining = queue_remaining(route)
    return ("" if remaining is not None else "GET /prompt does not answer with a queue length"), remaining


def assess(
    workflow: Workflow, environment: str, routes: list[Route], cache: ObjectInfoCache
) -> tuple[EnvironmentReport, list[Placement]]:
    """What `environment` lacks for `workflow`, and its ready instances with their queues."""
    members = [route for route in routes if route.environment == environment and route.enabled]
    report = EnvironmentReport()
    if not members:
        known = any(route.environment == environment for route in routes)
        report.note = "has no enabled instance" if known else "is not an environment of this host (routing.json)"
        return report, []
    served = frozenset().union(*(route.node_classes for route in members))
    report.missing_classes = sorted(workflow.classes() - served)
    if report.missing_classes:
        return report, []
    with ThreadPoolExecutor(max_workers=min(16, len(members))) as pool:
        looks = list(pool.map(_look, members))
    ready = []
    for route, (why, remaining) in zip(members, looks, strict=True):
        if why or remaining is None:
            report.not_ready[route.name] = why
        else:
            ready.append(Placement(route, remaining))
    if not ready:
        return report, []
    if workflow.string_inputs():
        try:
            info = cache.get(environment, min(ready, key=lambda item: item.route.name).route)
        except (OSError, ValueError, urllib.error.URLError) as error:
            report.note = f"its /object_info does not answer: {error}"
            return report, []
        report.missing_values = missing_values(workflow, info)
    return report, ([] if report.lacks() else ready)


def place(
    workflow: Workflow,
    routes: list[Route],
    cache: ObjectInfoCache,
    environment: str | None = None,
) -> Placement:
    """The instance that runs `workflow` now (only of `environment` when given), or PlacementError."""
    names = [environment] if environment else sorted({route.environment for route in routes})
    if not names:
        raise PlacementError("routing.json lists no instances: define some and converge the host")
    reports: dict[str, EnvironmentReport] = {}
    candidates: list[Placement] = []
    for name in names:
        reports[name], ready = assess(workflow, name, routes, cache)
        candidates += ready
    if candidates:
        return min(candidates, key=lambda item: (item.queue_remaining, item.route.name))
    lines = [f"environment {name}: {report.describe()}" for name, report in sorted(reports.items())]
    where = f"environment {environment}" if environment else "no environment"
    raise PlacementError(
        f"{where} can run the workflow now; nothing was queued:\n  " + "\n  ".join(lines),
        reports,
    )


# --------------------------------------------------------------------------- named workflows


@dataclass(frozen=True)
class NamedWorkflow:
    name: str
    environment: str
    workflow: Workflow


def load_named(path: Path) -> dict[str, NamedWorkflow]:
    """Named workflows from their file (YAML; docs/serving.md):

        workflows:
          portrait:
            environment: prod
            file: portrait.json   # API format; relative to this file's folder

    Every problem is reported at once, each naming the workflow."""
    try:
        data = yamlfile.load(path, "named workflows file")
    except yamlfile.YAMLFileError as error:
        raise HostError(str(error)) from None
    entries = data.get("workflows") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise HostError(f"{path} has no 'workflows' mapping (name: {{environment: ..., file: ...}})")
    named: dict[str, NamedWorkflow] = {}
    problems = []
    for name, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("environment"), str) or not entry.get("file"):
            problems.append(f"workflow {name}: needs 'environment' (a name) and 'file' (its API-format JSON)")
            continue
        try:
            graph = load_workflow(path.parent / str(entry["file"]))
        except WorkflowError as error:
            problems.append(f"workflow {name}: {error}")
            continue
        named[str(name)] = NamedWorkflow(str(name), entry["environment"], graph)
    if problems:
        raise HostError(f"{path} is refused:\n  " + "\n  ".join(problems))
    return named


def place_named(
    name: str, named: Mapping[str, NamedWorkflow], routes: list[Route], cache: ObjectInfoCache
) -> Placement:
    """The instance that runs the named workflow, in its environment only."""
    if name not in named:
        known = ", ".join(sorted(named)) or "none"
        raise PlacementError(f"no workflow is named {name!r} (named workflows: {known})")
    entry = named[name]
    return place(entry.workflow, routes, cache, environment=entry.environment)


def check_named(
    named: Mapping[str, NamedWorkflow], routes: list[Route], cache: ObjectInfoCache
) -> dict[str, EnvironmentReport]:
    """What each named workflow's environment lacks; empty where it lacks nothing (the instances
    that are not ready are listed in `not_ready` too, since a converge waits for them)."""
    return {
        name: report
        for name, entry in sorted(named.items())
        for report in [assess(entry.workflow, entry.environment, routes, cache)[0]]
        if report.lacks() or report.not_ready
    }
