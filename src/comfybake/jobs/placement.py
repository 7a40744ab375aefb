"""Which instance runs a workflow: one that can run it, is ready, and has the shortest queue.

Read from what the roles already write and what the instances answer:
  - `<config root>/routing.json` (comfyui_instances): each instance's environment, URL and the
    node classes it serves;
  - each environment's `GET /object_info`, from a ready instance of it (cached `ttl` seconds):
    the combo lists of its inputs, so a model file an environment lacks (`ckpt_name
    'x.safetensors'`) is found before anything is queued, as ComfyUI itself would refuse the
    prompt (`value_not_in_list`);
  - readiness (`runtime.probe`, the one definition of ready) and the queue
    (`GET /prompt` -> `exec_info.queue_remaining`) of each instance: its *look*, kept
    `LOOK_TTL` seconds by a runner's `Looks`, which also counts the jobs it placed on the
    instance since that look and that have not ended (a look of a second ago does not know them).

Among the enabled instances whose environment lacks nothing the workflow needs, the ready ones
with the fewest prompts queued (plus those counted) win, ties by name. When none can run it,
`PlacementError` says per environment what it lacks (node classes, combo values) or why none of
its instances is ready. Named workflows (a file mapping each name to its environment and graph) restrict
placement to their environment; `check_named` reports what each one's environment lacks.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.parse
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

from comfybake import yamlfile
from comfybake.engine import runtime
from comfybake.instances import HostError, load_json
from comfybake.jobs.workflow import StringInput, Workflow, WorkflowError
from comfybake.jobs.workflow import load as load_workflow

ROUTING_FORMAT = 1
OBJECT_INFO_TTL = 30.0  # seconds: a model added to an environment is seen within this
# seconds an instance's readiness and queue length are reused: a burst of jobs probes each instance
# about once a second, not once per job; an instance that stops is seen within this (or at once,
# when posting to it is refused: the runner marks it down and places the job again)
LOOK_TTL = 1.0
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
    """The chosen instance and its load when chosen: its queue length as last seen (`seen`, the
    clock's time of that look) plus the jobs placed there since. `claim` counts the job on the
    instance until it ends (`Looks.release`)."""

    route: Route
    queue_remaining: int
    seen: float = 0.0
    claim: Claim | None = None


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


V = TypeVar("V")


class Recent(Generic[V]):
    """Values fetched at most once per `ttl` seconds per key, safe with several threads: those that
    need the same key at once wait for one fetch. A fetch that raises is not kept."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self.lock = threading.Lock()  # guards `locks`, `entries` and `fetches`
        self.locks: dict[Hashable, threading.Lock] = {}  # one per key, held while it is fetched
        self.entries: dict[Hashable, tuple[float, V]] = {}  # key to (when fetched, value)
        self.fetches = 0  # how many times a value was fetched (the tests read it)

    def get(self, key: Hashable, fetch: Callable[[], V]) -> tuple[float, V]:
        """(when it was fetched, the value): the kept one while younger than `ttl`, else fetched."""
        with self.lock:
            fetching = self.locks.setdefault(key, threading.Lock())
        with fetching:
            with self.lock:
                kept = self.entries.get(key)
            if kept is not None and self.clock() - kept[0] < self.ttl:
                return kept
            when = self.clock()
            found = (when, fetch())
            self.put(key, found)
            with self.lock:
                self.fetches += 1
            return found

    def put(self, key: Hashable, found: tuple[float, V]) -> None:
        with self.lock:
            self.entries[key] = found


class ObjectInfoCache(Recent[dict[str, Any]]):
    """Each environment's /object_info, fetched once per `ttl` seconds from a ready instance
    (ComfyUI builds its answer from every node class, which takes a while)."""

    def __init__(self, ttl: float = OBJECT_INFO_TTL, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(ttl, clock)

    def get_info(self, environment: str, route: Route) -> dict[str, Any]:
        """The environment's /object_info, asked of `route` (a ready instance of it) when stale."""

        def fetch() -> dict[str, Any]:
            info = runtime.get_json(f"{route.url.rstrip('/')}/object_info", timeout=30)
            if not isinstance(info, dict):
                raise ValueError(f"/object_info of instance {route.name} is a {type(info).__name__}, not an object")
            return info

        return self.get(environment, fetch)[1]


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


@dataclass(frozen=True)
class Look:
    """What readiness misses ("" when ready), the queue length of a ready instance, and the
    clock's time just before that length was asked."""

    why: str
    queue_remaining: int | None
    seen: float


@dataclass(eq=False)
class Claim:
    """A job placed on an instance, counted on top of the instance's queue length until a look
    taken after the job was posted (which sees it queued) or until the job ends."""

    key: tuple[str, str]
    posted: float | None = None  # the clock's time the instance took the prompt; None before


class Looks:
    """Each instance's last look (readiness and queue length), reused for `ttl` seconds, and the
    jobs placed on it that the look cannot know yet. One per runner: placing a burst of jobs then
    costs about one probe per instance per `ttl`, and "fewest queued" stays right, since each job
    placed counts on its instance at once. `ttl=0` looks afresh every time (one-off placements,
    `comfybake jobs check`)."""

    def __init__(self, ttl: float = LOOK_TTL, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.recent: Recent[Look] = Recent(ttl, clock)
        self.lock = threading.Lock()  # guards `claims` and each claim's `posted`
        self.claims: dict[tuple[str, str], set[Claim]] = {}

    @staticmethod
    def key(route: Route) -> tuple[str, str]:
        return route.name, route.url

    def look(self, route: Route) -> Look:
        """`route`'s look, taken at most once per `ttl` seconds."""
        return self.recent.get(self.key(route), lambda: self._take(route))[1]

    def _take(self, route: Route) -> Look:
        stage, missing, _settled = runtime.probe(route.instance())
        if stage != "ready":
            return Look(missing or stage, None, self.clock())
        # a job posted from here on may be in the answer and counted by its claim too: one too
        # many until the next look, never one too few
        seen = self.clock()
        remaining = queue_remaining(route)
        return Look("" if remaining is not None else "GET /prompt does not answer with a queue length", remaining, seen)

    def down(self, route: Route, why: str) -> None:
        """Take `route` as not ready until its next look (its port refused a connection)."""
        now = self.clock()
        self.recent.put(self.key(route), (now, Look(why, None, now)))

    def choose(self, candidates: list[Placement]) -> Placement:
        """The least loaded candidate (queue length plus the jobs placed since its look; ties by
        name), with a claim that counts this job on it from now on."""
        with self.lock:
            loads = [replace(item, queue_remaining=item.queue_remaining + self._unseen(item)) for item in candidates]
            chosen = min(loads, key=lambda item: (item.queue_remaining, item.route.name))
            claim = Claim(self.key(chosen.route))
            self.claims.setdefault(claim.key, set()).add(claim)
        return replace(chosen, claim=claim)

    def _unseen(self, item: Placement) -> int:
        """The jobs placed on the instance that its look does not count (lock held)."""
        claims = self.claims.get(self.key(item.route), set())
        return sum(1 for claim in claims if claim.posted is None or claim.posted >= item.seen)

    def posted(self, claim: Claim | None) -> None:
        """The instance took the job's prompt: a look taken from now on counts it in the queue."""
        if claim is not None:
            with self.lock:
                claim.posted = self.clock()

    def release(self, claim: Claim | None) -> None:
        """The job ended (or never reached the instance): it loads the instance no more."""
        if claim is not None:
            with self.lock:
                self.claims.get(claim.key, set()).discard(claim)


def assess(
    workflow: Workflow, environment: str, routes: list[Route], cache: ObjectInfoCache, looks: Looks | None = None
) -> tuple[EnvironmentReport, list[Placement]]:
    """What `environment` lacks for `workflow`, and its ready instances with their queues (as
    `looks` last saw them; looked at afresh without)."""
    looks = looks or Looks(ttl=0.0)
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
        seen = list(pool.map(looks.look, members))
    ready = []
    for route, look in zip(members, seen, strict=True):
        if look.why or look.queue_remaining is None:
            report.not_ready[route.name] = look.why
        else:
            ready.append(Placement(route, look.queue_remaining, look.seen))
    if not ready:
        return report, []
    if workflow.string_inputs():
        try:
            info = cache.get_info(environment, min(ready, key=lambda item: item.route.name).route)
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
    looks: Looks | None = None,
) -> Placement:
    """The instance that runs `workflow` now (only of `environment` when given), or PlacementError.
    With a runner's `looks`, the placement is claimed there: release it when the job ends."""
    names = [environment] if environment else sorted({route.environment for route in routes})
    if not names:
        raise PlacementError("routing.json lists no instances: define some and converge the host")
    looks = looks or Looks(ttl=0.0)
    reports: dict[str, EnvironmentReport] = {}
    candidates: list[Placement] = []
    for name in names:
        reports[name], ready = assess(workflow, name, routes, cache, looks)
        candidates += ready
    if candidates:
        return looks.choose(candidates)
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
