"""`comfybake exporter serve|scrape`: Prometheus metrics of a host's instances, environments and model store.

Reads what the roles wrote (`<config root>/instances.json`, `<config root>/models.yml`, each
environment's live `comfybake.lock.json` and `last-build.json`, the store's
`.comfybake/last-run.json`) and asks every instance for `/system_stats`, `/queue` and `/history`,
all at once, per scrape: one hung instance costs at most `--timeout` seconds. Readiness is
comfyui_wait's (module_utils/runtime.py `probe`). Prompt counters come from `/history` read
incrementally: the prompt ids already counted and the totals live in a state file, so a restart
of the exporter neither loses nor re-counts a prompt. No label or value holds a token: labels are
names, ports are not even shown, and what a record or a lock says beyond names and commits is
never read into a metric. Metric names and their meaning: docs/observability.md.

prometheus_client is imported only by these commands, so the rest of the CLI works without it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from comfybake import logs
from comfybake.cli import SUBCOMMANDS
from comfybake.engine import runtime
from comfybake.engine.environment import builder, releases
from comfybake.instances import HostError, config_root_option, load_host, load_json, supervised

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

DEFAULT_LISTEN = "127.0.0.1:9721"
DEFAULT_TIMEOUT = 2.0
STATE_FORMAT = 1
# Seconds a prompt ran (execution_start to its end): from a quick image to a long video.
DURATION_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
# --timeout's bound: a scrape must end well within Prometheus' own scrape timeout.
MAX_TIMEOUT = 60.0
# The newest prompts asked of /history per scrape (GET /history?max_items=N, ComfyUI's query); more
# prompts than this finishing between two scrapes are not counted (docs/observability.md).
HISTORY_WINDOW = 256
HISTORY_ROUTE = f"/history?max_items={HISTORY_WINDOW}"
PROMETHEUS_CLIENT = "prometheus_client==0.26.0"
# nvidia-ml-py (module pynvml), imported only where NVML is asked for; the zipapp carries both pins.
NVML_VERSION = "13.615.71"


class ExporterError(Exception):
    """The exporter cannot start: a missing library, a wrong option."""


# --------------------------------------------------------------------------- state


def default_state(config_root: str) -> Path:
    return Path(config_root) / "state" / "exporter.json"


def empty_state() -> dict[str, Any]:
    return {"format": STATE_FORMAT, "instances": {}, "errors": {}}


def counts(record: Any) -> bool:
    """Whether `record` has the shape of one instance's counters in the state file."""
    if not isinstance(record, dict):
        return False
    histogram = record.get("duration")
    return (
        isinstance(record.get("seen"), list)
        and all(isinstance(prompt_id, str) for prompt_id in record["seen"])
        and all(isinstance(record.get(key), int) for key in ("completed", "failed"))
        and isinstance(histogram, dict)
        and isinstance(histogram.get("buckets"), list)
        and len(histogram["buckets"]) == len(DURATION_BUCKETS) + 1
        and all(isinstance(count, int) for count in histogram["buckets"])
        and isinstance(histogram.get("sum"), (int, float))
        and isinstance(histogram.get("count"), int)
    )


def empty_histogram() -> dict[str, Any]:
    return {"buckets": [0] * (len(DURATION_BUCKETS) + 1), "sum": 0.0, "count": 0}


class State:
    """Counters that survive restarts: per instance the prompt ids seen, the totals, the histogram;
    per (instance, what) the errors. Loaded and saved under an flock, so two exporters (a serving
    one and a textfile run) never count one prompt twice."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = empty_state()
        self.on_disk = False  # the data was loaded from or saved to the file

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the state's lock file (beside it) while reading, counting and saving; without a
        writable folder, count in memory (the `state` error says why)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path.with_name(self.path.name + ".lock"), "a")  # noqa: SIM115 - held below
        except OSError:
            yield
            return
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def load(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            if self.on_disk:  # moved away by the operator: the counters start again
                self.data, self.on_disk = empty_state(), False
            return
        except (OSError, ValueError) as error:
            raise OSError(f"cannot read the exporter's state {self.path}: {error}") from None
        if not (
            isinstance(data, dict)
            and data.get("format") == STATE_FORMAT
            and isinstance(data.get("instances"), dict)
            and all(counts(record) for record in data["instances"].values())
            and isinstance(data.get("errors"), dict)
            and all(isinstance(count, int) for count in data["errors"].values())
        ):
            raise OSError(f"{self.path} is not the exporter's state (format {STATE_FORMAT})")
        self.data, self.on_disk = data, True

    def save(self) -> None:
        """Write atomically: a temporary file in the same folder, then a rename."""
        fd, temporary = tempfile.mkstemp(prefix=".exporter-", suffix=".json", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(self.data, handle, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(temporary, 0o640)
            os.replace(temporary, self.path)
            self.on_disk = True
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def instance(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self.data["instances"].setdefault(
            name, {"seen": [], "completed": 0, "failed": 0, "duration": empty_histogram()}
        )
        return found

    def error(self, instance: str, what: str) -> None:
        key = f"{instance}\t{what}"
        self.data["errors"][key] = int(self.data["errors"].get(key, 0)) + 1

    def forget(self, names: set[str]) -> None:
        """Drop the counters and error series of instances no longer in instances.json."""
        self.data["instances"] = {name: record for name, record in self.data["instances"].items() if name in names}
        self.data["errors"] = {
            key: count
            for key, count in self.data["errors"].items()
            if key.partition("\t")[0] in names or not key.partition("\t")[0]
        }

    def count_history(self, name: str, history: dict[str, Any]) -> bool:
        """Count every prompt of the /history window not counted before; keep the ids of the window
        only (an id that left it never comes back). False when an item is not ComfyUI's shape (it
        is skipped, and not looked at again)."""
        record = self.instance(name)
        seen = set(record["seen"])
        wellformed = True
        for prompt_id, item in history.items():
            if prompt_id in seen:
                continue
            seen.add(prompt_id)
            status = item.get("status") if isinstance(item, dict) else None
            if not isinstance(status, dict):  # ComfyUI adds an item, with its status, when its prompt has finished
                wellformed = False
                continue
            if status.get("status_str") == "success":
                record["completed"] += 1
            else:
                record["failed"] += 1
            messages = status.get("messages")
            seconds = duration(messages if isinstance(messages, list) else [])
            if seconds is not None:
                observe(record["duration"], seconds)
        record["seen"] = sorted(seen & set(history))
        return wellformed


def duration(messages: list[Any]) -> float | None:
    """Seconds from execution_start to execution_success (or the error/interruption), from ms timestamps."""
    stamps: dict[str, float] = {}
    for message in messages:
        if isinstance(message, list) and len(message) == 2 and isinstance(message[1], dict):
            stamp = message[1].get("timestamp")
            if isinstance(stamp, (int, float)) and not isinstance(stamp, bool) and math.isfinite(stamp):
                stamps[str(message[0])] = float(stamp)
    end = next(
        (stamps[k] for k in ("execution_success", "execution_error", "execution_interrupted") if k in stamps), None
    )
    if "execution_start" not in stamps or end is None:
        return None
    return max(0.0, (end - stamps["execution_start"]) / 1000)


def observe(histogram: dict[str, Any], seconds: float) -> None:
    index = next((i for i, bound in enumerate(DURATION_BUCKETS) if seconds <= bound), len(DURATION_BUCKETS))
    histogram["buckets"][index] += 1
    histogram["sum"] += seconds
    histogram["count"] += 1


# --------------------------------------------------------------------------- instances


def ask_instance(record: dict[str, Any], deadline: float, found: dict[str, Any]) -> None:
    """Fill `found` with one instance's answers, route by route (run in its own thread; the caller
    takes what is there at the deadline). `asking` names the route under way; /system_stats and
    /queue come first, the readiness probe next, /history (the largest answer) last. Each request
    waits at most what is left until `deadline` (time.monotonic)."""

    def left() -> float:
        return max(0.05, deadline - time.monotonic())

    found["asking"] = "instances_json"
    instance = runtime.Instance(record)
    for route, path in (("system_stats", "/system_stats"), ("queue", "/queue"), ("history", HISTORY_ROUTE)):
        if route == "history":
            found["asking"] = "probe"
            found["ready"] = runtime.probe(instance, left())[0] == "ready"
        found["asking"] = route
        try:
            found[route] = runtime.get_json(instance.url(path), timeout=left())
        except (OSError, ValueError, urllib.error.URLError) as error:
            # A request cut by its share of the deadline is the instance being late, as when the
            # deadline passes first: one `timeout`, never a route error that only timing decides.
            timed_out = isinstance(error, TimeoutError) or isinstance(getattr(error, "reason", None), TimeoutError)
            found["errors"].append("timeout" if timed_out else route)
            if route == "system_stats":
                break  # the port does not answer: nothing else will
    found.pop("asking")


def ask_all(records: list[dict[str, Any]], deadline: float) -> list[dict[str, Any]]:
    """Every instance at once (daemon threads: a hung one never holds the exporter). At `deadline`
    (time.monotonic), a copy of what each has answered so far, `late` for one still asking. An
    unexpected exception in a thread is counted under the route it was asking (and logged)."""
    results: list[dict[str, Any]] = [{"errors": []} for _record in records]

    def run(index: int, record: dict[str, Any]) -> None:
        found = results[index]
        try:
            ask_instance(record, deadline, found)
        except Exception as error:  # noqa: BLE001 - one odd answer must not hide the instance's others
            route = found.pop("asking", "instances_json")
            found["errors"].append(route)
            logs.emit(
                f"warning: comfybake exporter: asking instance {record['name']} ({route}) failed: "
                f"{type(error).__name__}: {error}",
                "warning",
                instance=str(record["name"]),
            )

    threads = [
        threading.Thread(target=run, args=(index, record), daemon=True, name=f"exporter-{record['name']}")
        for index, record in enumerate(records)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    answers = []
    for found, thread in zip(results, threads, strict=True):
        copy = dict(found)  # the thread may still add to its own
        copy["errors"] = list(copy["errors"])
        copy["late"] = thread.is_alive()
        answers.append(copy)
    return answers


def queue_lengths(queue: Any) -> tuple[int, int] | None:
    """(running, pending) from a /queue answer; None when it is not ComfyUI's shape."""
    if not isinstance(queue, dict):
        return None
    running, pending = queue.get("queue_running", []), queue.get("queue_pending", [])
    if not (isinstance(running, list) and isinstance(pending, list)):
        return None
    return len(running), len(pending)


def memory(stats: dict[str, Any]) -> list[tuple[str, float, float]] | None:
    """(device, VRAM bytes, free bytes) of every device of a /system_stats answer; None when it is
    not ComfyUI's shape."""
    devices = stats.get("devices") or []
    if not isinstance(devices, list):
        return None
    found = []
    for device in devices:
        if not isinstance(device, dict):
            return None
        try:
            found.append(
                (str(device.get("name", "")), float(device.get("vram_total") or 0), float(device.get("vram_free") or 0))
            )
        except (TypeError, ValueError):
            return None
    return found


def systemd_running() -> bool:
    return os.path.isdir("/run/systemd/system") and shutil.which("systemctl") is not None


# --------------------------------------------------------------------------- reads that may hang


class Run:
    """What one completed background read found: `value`, the errors it met (counted once, by the
    first scrape that reports the run) and when it finished (time.monotonic)."""

    def __init__(self, value: Any, errors: list[str]) -> None:
        self.value = value
        self.errors = errors
        self.finished = time.monotonic()
        self.reported = False


class Background:
    """A read that may hang (the store's walk on a stuck disk, `systemctl show` while systemd is
    busy, NVML on a wedged GPU), run off the scrape's thread and never twice at once. A scrape
    starts it unless the previous one is still running, waits for it until the scrape's deadline,
    and reports the last completed run: this one when it was in time, else the one before (`late`
    is then true). A late read keeps running, and its result serves the next scrape. A read that
    fails in a way it does not handle itself finds `empty` and the error `failed`."""

    def __init__(self, name: str, read: Callable[..., tuple[Any, list[str]]], empty: Any, failed: str) -> None:
        self.name = name
        self.read = read
        self.empty = empty
        self.failed = failed
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.latest: Run | None = None

    def start(self, *args: Any) -> None:
        """Start the read with `args`, unless the previous one is still running."""
        with self.lock:
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, args=args, daemon=True, name=f"exporter-{self.name}")
                self.thread.start()

    def result(self, deadline: float) -> tuple[Run | None, bool]:
        """Wait for the running read until `deadline` (time.monotonic); the last completed run, and
        whether this one is late."""
        with self.lock:
            thread = self.thread
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
        return self.latest, thread is not None and thread.is_alive()

    def _run(self, *args: Any) -> None:
        try:
            value, errors = self.read(*args)
        except Exception:  # noqa: BLE001 - a collector that stops reading is worse: counted, shown on stderr
            traceback.print_exc()
            value, errors = self.empty, [self.failed]
        self.latest = Run(value, errors)


def read_restarts(units: list[str]) -> tuple[dict[str, int], list[str]]:
    """systemd's NRestarts of every unit, from one `systemctl show` (a block per unit, in order)."""
    if not units:
        return {}, []
    done = runtime.systemctl("show", *units, "--property=NRestarts")
    blocks = done.stdout.split("\n\n")
    if done.returncode != 0 or len(blocks) < len(units):
        return {}, ["systemd"]
    found: dict[str, int] = {}
    for unit, block in zip(units, blocks, strict=False):
        restarts = block.strip().partition("=")[2]
        if restarts.isdigit():
            found[unit] = int(restarts)
    return found, []


def read_store(config_root: str) -> tuple[tuple[str, list[tuple[str, str, float]]] | None, list[str]]:
    """The store and its (metric, help, value) from the models file, one walk and the last-run
    record; None without a models file."""
    from comfybake.engine import fetch as engine

    try:
        found = model_store(config_root)
    except (engine.FetchError, OSError):
        return None, ["model_store"]
    if found is None:
        return None, []
    store, used, free, budget, record = found
    metrics = [
        ("model_store_used_bytes", "Bytes the model store's files take", used),
        ("model_store_free_bytes", "Bytes free on the model store's file system", free),
        ("model_store_budget_bytes", "The model store's budget (models files' `budget`)", budget),
    ]
    prefix = "models_fetch_last_"
    metrics += [
        (f"{prefix}run_timestamp_seconds", "When the last fetch finished", record.get("finished")),
        (
            f"{prefix}success_timestamp_seconds",
            "When the last fetch without a failure finished",
            record.get("last_success"),
        ),
        (f"{prefix}duration_seconds", "Seconds the last fetch took", record.get("duration")),
        (f"{prefix}bytes", "Bytes the last fetch transferred", record.get("bytes")),
        (f"{prefix}failures", "Entries the last fetch failed", record.get("failed")),
    ]
    values = [
        (name, text, float(value))
        for name, text, value in metrics
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    ]
    return (store, values), []


# --------------------------------------------------------------------------- GPUs (NVML)

NVML_MODES = ("off", "auto")  # --nvml: `off` never imports pynvml
GPU_LABELS = ["gpu", "uuid", "name"]


class Nvml:
    """NVML through nvidia-ml-py (`pynvml`), imported on the first read only (never with
    `--nvml off`). nvmlInit succeeds once per process; until it has (no library, no driver, no
    GPU yet) each read tries again and reports the `nvml` error."""

    def __init__(self) -> None:
        self.ready = False

    def read(self) -> tuple[list[dict[str, Any]], list[str]]:
        try:  # only here: with --nvml off this module is never imported
            pynvml: Any = importlib.import_module("pynvml")
        except ImportError:
            return [], ["nvml"]
        try:
            if not self.ready:
                pynvml.nvmlInit()
                self.ready = True
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError:
            return [], ["nvml"]
        devices, errors = [], []
        for index in range(count):
            try:
                device = self.device(pynvml, index)
            except pynvml.NVMLError:
                errors = ["nvml"]
                continue
            if device.pop("failed"):
                errors = ["nvml"]  # once per read, however many values failed
            devices.append(device)
        return devices, errors

    @staticmethod
    def device(pynvml: Any, index: int) -> dict[str, Any]:
        """One device's labels and values; what the device does not support (ECC on most
        consumer GPUs, power on some) is left out, and so is a value NVML fails to read otherwise
        (no permission, a function the driver lacks), which sets `failed`."""
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(handle)
        uuid = pynvml.nvmlDeviceGetUUID(handle)
        found: dict[str, Any] = {
            "labels": [str(index), uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                       name.decode() if isinstance(name, bytes) else str(name)],
        }  # fmt: skip
        found["failed"] = False
        reads: dict[str, Callable[[], Any]] = {
            "utilization": lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100,
            "memory": lambda: pynvml.nvmlDeviceGetMemoryInfo(handle),
            "temperature": lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
            "power": lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000,
            "ecc": lambda: pynvml.nvmlDeviceGetTotalEccErrors(
                handle, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_AGGREGATE_ECC
            ),
        }
        for key, read in reads.items():
            try:
                found[key] = read()
            except pynvml.NVMLError_NotSupported:
                continue
            except pynvml.NVMLError:
                found["failed"] = True
        return found


def gpu_families(devices: list[dict[str, Any]]) -> list[Metric]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    utilization = GaugeMetricFamily(
        "comfybake_gpu_utilization_ratio", "Share of the last sample period a kernel ran (NVML)", labels=GPU_LABELS
    )
    used = GaugeMetricFamily("comfybake_gpu_memory_used_bytes", "Device memory in use (NVML)", labels=GPU_LABELS)
    total = GaugeMetricFamily("comfybake_gpu_memory_total_bytes", "Device memory (NVML)", labels=GPU_LABELS)
    temperature = GaugeMetricFamily(
        "comfybake_gpu_temperature_celsius", "The GPU's core temperature (NVML)", labels=GPU_LABELS
    )
    power = GaugeMetricFamily("comfybake_gpu_power_watts", "The device's power draw (NVML)", labels=GPU_LABELS)
    ecc = CounterMetricFamily(
        "comfybake_gpu_ecc_uncorrected_errors",
        "Uncorrected ECC errors over the device's life (NVML aggregate counter)",
        labels=GPU_LABELS,
    )
    for device in devices:
        labels = device["labels"]
        if "utilization" in device:
            utilization.add_metric(labels, float(device["utilization"]))
        if "memory" in device:
            used.add_metric(labels, float(device["memory"].used))
            total.add_metric(labels, float(device["memory"].total))
        if "temperature" in device:
            temperature.add_metric(labels, float(device["temperature"]))
        if "power" in device:
            power.add_metric(labels, float(device["power"]))
        if "ecc" in device:
            ecc.add_metric(labels, float(device["ecc"]))
    return [family for family in (utilization, used, total, temperature, power, ecc) if family.samples]


# --------------------------------------------------------------------------- host files


def read_json(path: Path, role: str) -> dict[str, Any] | None:
    """A record a role or an engine wrote (instances.load_json), or None when missing or unreadable."""
    try:
        data = load_json(path, role)
    except HostError:
        return None
    return data if isinstance(data, dict) else None


def model_store(config_root: str) -> tuple[str, int, int, int | None, dict[str, Any]] | None:
    """(store, bytes used, bytes free, budget or None, the last fetch's record) from the models
    file, or None without one."""
    from comfybake import models
    from comfybake.engine import fetch as engine

    if not (Path(config_root) / "models.yml").is_file():
        return None
    args = argparse.Namespace(manifests=[], config_root=config_root, action="du")
    options, entries, environments = models.store_context(args)
    usage = engine.scan(options, entries, environments)
    free = shutil.disk_usage(options.store).free
    return options.store, usage.total, free, options.budget, engine.Store(options).last_run()


# --------------------------------------------------------------------------- the collector


class Flight:
    """One collection: its metrics, once `done` is set."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.families: list[Metric] = []


class Collector:
    """Reads everything per scrape (prometheus_client calls `collect` for each), within `timeout`
    seconds: the instances, the store's walk, systemd and NVML all share the scrape's deadline."""

    def __init__(self, config_root: str, state_path: Path, timeout: float, nvml: str = "off") -> None:
        self.config_root = config_root
        self.state = State(state_path)
        self.timeout = timeout
        self.lock = threading.Lock()  # guards `flight`
        self.flight: Flight | None = None  # the collection under way, shared by the scrapes that arrive during it
        self.last: list[Metric] = []  # what the last collection found
        self.warned: set[str] = set()  # environments whose missing lock was logged
        self.store = Background("store", read_store, None, "model_store")
        self.restarts = Background("systemd", read_restarts, {}, "systemd")
        self.gpus = Background("nvml", Nvml().read, [], "nvml") if nvml == "auto" else None
        # What the store's walk imports, imported now: a first scrape's deadline is the walk's own.
        importlib.import_module("comfybake.models")
        importlib.import_module("comfybake.engine.fetch")

    def collect(self) -> Iterator[Metric]:
        """One collection at a time (single flight): a scrape that arrives while one is under way
        waits for it and shares its result. That collection began earlier, so it ends before a
        collection of the latecomer's own would: concurrent scrapes each take at most one
        scrape's time, not one after the other. The wait is bounded all the same (a collection
        waits for the state file's lock, which another exporter process may hold): one more
        `timeout` past the latecomer's own deadline, after which it gets the last collection's result."""
        deadline = time.monotonic() + 2 * self.timeout
        with self.lock:
            flight, leading = self.flight, self.flight is None
            if flight is None:
                flight = self.flight = Flight()
        if leading:
            try:
                flight.families = list(self._collect())
                self.last = flight.families
            finally:
                with self.lock:
                    self.flight = None
                flight.done.set()
        elif not flight.done.wait(max(0.0, deadline - time.monotonic())):
            yield from self.last
            return
        yield from flight.families

    def _collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        started = time.monotonic()
        labels = ["instance", "environment"]
        up = GaugeMetricFamily("comfybake_instance_up", "The instance's HTTP port answers /system_stats", labels=labels)
        ready = GaugeMetricFamily(
            "comfybake_instance_ready", "The instance is ready (comfyui_wait's definition)", labels=labels
        )
        running = GaugeMetricFamily("comfybake_queue_running", "Prompts running (GET /queue)", labels=labels)
        pending = GaugeMetricFamily("comfybake_queue_pending", "Prompts waiting (GET /queue)", labels=labels)
        completed = CounterMetricFamily(
            "comfybake_prompts_completed", "Prompts that finished with success (from /history)", labels=labels
        )
        failed = CounterMetricFamily(
            "comfybake_prompts_failed", "Prompts that finished with an error or were interrupted", labels=labels
        )
        durations = HistogramMetricFamily(
            "comfybake_prompt_duration_seconds", "Seconds a prompt ran (execution_start to its end)", labels=labels
        )
        device_labels = [*labels, "device"]
        vram_total = GaugeMetricFamily("comfybake_vram_total_bytes", "A device's memory", labels=device_labels)
        vram_free = GaugeMetricFamily("comfybake_vram_free_bytes", "A device's free memory", labels=device_labels)
        restarts = GaugeMetricFamily(
            "comfybake_instance_restarts", "systemd's NRestarts of the instance's unit", labels=labels
        )
        errors = CounterMetricFamily(
            "comfybake_exporter_errors", "What the exporter could not read", labels=["instance", "what"]
        )
        families: list[Metric] = [up, ready, running, pending, completed, failed, durations, vram_total, vram_free]

        try:
            host, unreadable = load_host(self.config_root), False
        except HostError:
            host, unreadable = {"instances": []}, True
        records: list[dict[str, Any]] = [r for r in host.get("instances") or [] if isinstance(r, dict) and "name" in r]
        use_systemd = not supervised(host) and systemd_running()
        deadline = started + self.timeout
        # The slow reads start first and run while the instances are asked; each is waited for
        # until the same deadline (a late one reports its previous run, see Background).
        units = [str(r["unit"]) for r in records if r.get("unit")] if use_systemd else []
        self.store.start(self.config_root)
        if units:
            self.restarts.start(units)
        if self.gpus is not None:
            self.gpus.start()
        answers = ask_all(records, deadline)
        slow = {"store": self.store.result(deadline)}
        if units:
            slow["systemd"] = self.restarts.result(deadline)
        if self.gpus is not None:
            slow["nvml"] = self.gpus.result(deadline)
        restart_counts = slow["systemd"][0].value if "systemd" in slow and slow["systemd"][0] else {}

        with self.state.locked():
            try:
                self.state.load()
                loaded = True
            except OSError:  # unreadable or not JSON: kept for the operator, counting goes on in memory
                self.state.error("", "state")
                loaded = False
            if unreadable:
                self.state.error("", "instances_json")
            if not unreadable:
                self.state.forget({str(record["name"]) for record in records})
            for record, answer in zip(records, answers, strict=True):
                name, environment = str(record["name"]), str(record.get("environment", ""))
                values = [name, environment]
                if answer["late"] and "timeout" not in answer["errors"]:
                    self.state.error(name, "timeout")
                for what in dict.fromkeys(answer["errors"]):  # one `timeout` per scrape, however many requests ran late
                    self.state.error(name, what)
                stats = answer.get("system_stats")
                up.add_metric(values, 1 if isinstance(stats, dict) else 0)
                ready.add_metric(values, 1 if isinstance(stats, dict) and answer.get("ready") else 0)
                lengths = queue_lengths(answer.get("queue"))
                if lengths is not None:
                    running.add_metric(values, lengths[0])
                    pending.add_metric(values, lengths[1])
                elif "queue" in answer:
                    self.state.error(name, "queue")
                history = answer.get("history")
                if "history" in answer and not (isinstance(history, dict) and self.state.count_history(name, history)):
                    self.state.error(name, "history")
                counted = self.state.instance(name)
                completed.add_metric(values, counted["completed"])
                failed.add_metric(values, counted["failed"])
                histogram = counted["duration"]
                cumulative, buckets = 0, []
                for bound, count in zip([*DURATION_BUCKETS, float("inf")], histogram["buckets"], strict=True):
                    cumulative += count
                    buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
                durations.add_metric(values, buckets, histogram["sum"])
                devices = memory(stats) if isinstance(stats, dict) else []
                if devices is None:
                    self.state.error(name, "system_stats")
                for device, total, free in devices or []:
                    vram_total.add_metric([*values, device], total)
                    vram_free.add_metric([*values, device], free)
                unit = str(record.get("unit") or "")
                if unit in restart_counts:
                    restarts.add_metric(values, restart_counts[unit])
            if restarts.samples:
                families.append(restarts)
            families += self._environments(host, records)
            for what, (run, late) in slow.items():
                if late:
                    self.state.error("", what)
                if run is not None and not run.reported:
                    run.reported = True
                    for error in run.errors:
                        self.state.error("", error)
            families += self._models(slow["store"][0])
            if "nvml" in slow and slow["nvml"][0] is not None:
                families += gpu_families(slow["nvml"][0].value)
            try:
                if loaded:
                    self.state.save()
            except OSError:
                self.state.error("", "state")  # counted in memory; saved with the next scrape that can
            for key, count in sorted(self.state.data["errors"].items()):
                instance, _tab, what = key.partition("\t")
                errors.add_metric([instance, what], count)
        families.append(errors)
        scrape = GaugeMetricFamily("comfybake_exporter_scrape_duration_seconds", "Seconds this scrape took")
        scrape.add_metric([], time.monotonic() - started)
        families.append(scrape)
        yield from families

    def _environments(self, host: dict[str, Any], records: list[dict[str, Any]]) -> list[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        info = GaugeMetricFamily(
            "comfybake_environment_info",
            "1, labelled with the environment's live release and ComfyUI commit",
            labels=["environment", "release", "comfyui_commit"],
        )
        nodes = GaugeMetricFamily(
            "comfybake_node_info", "1, labelled with a custom node's commit", labels=["environment", "node", "commit"]
        )
        build_time = GaugeMetricFamily(
            "comfybake_environment_build_last_timestamp_seconds",
            "When the last build of the environment finished",
            labels=["environment"],
        )
        build_duration = GaugeMetricFamily(
            "comfybake_environment_build_last_duration_seconds", "Seconds the last build took", labels=["environment"]
        )
        build_success = GaugeMetricFamily(
            "comfybake_environment_build_last_success", "1 when the last build succeeded", labels=["environment"]
        )
        code_root = host.get("code_root")
        names = sorted({str(r.get("environment")) for r in records if r.get("environment")})
        for name in names if code_root else []:
            root = Path(str(code_root)) / "envs" / name
            lock = read_json(root / "current" / releases.LOCK_NAME, "comfyui_environments")
            if lock is not None:
                release = os.path.basename(os.path.realpath(root / "current"))
                comfyui = lock.get("comfyui")
                commit = comfyui.get("commit", "") if isinstance(comfyui, dict) else ""
                info.add_metric([name, release, str(commit)], 1)
                custom_nodes = lock.get("custom_nodes")
                for node in custom_nodes if isinstance(custom_nodes, list) else []:
                    if isinstance(node, dict):
                        nodes.add_metric([name, str(node.get("name", "")), str(node.get("commit", ""))], 1)
            else:
                self.state.error("", "lock")
                if name not in self.warned:  # once per environment and process: the counter says the rest
                    self.warned.add(name)
                    logs.emit(
                        f"warning: environment {name} has no readable live lock "
                        f"{root / 'current' / releases.LOCK_NAME}: converge it with the comfyui_environments role",
                        "warning",
                        environment=name,
                    )
            build = read_json(root / builder.BUILD_RECORD, "comfyui_environments")
            if build is not None:
                if isinstance(build.get("finished"), (int, float)):
                    build_time.add_metric([name], float(build["finished"]))
                if isinstance(build.get("duration"), (int, float)):
                    build_duration.add_metric([name], float(build["duration"]))
                if isinstance(build.get("success"), bool):
                    build_success.add_metric([name], 1 if build["success"] else 0)
        return [family for family in (info, nodes, build_time, build_duration, build_success) if family.samples]

    @staticmethod
    def _models(run: Run | None) -> list[Metric]:
        """The last completed walk's values (this scrape's when it was in time), with its age."""
        from prometheus_client.core import GaugeMetricFamily

        if run is None or run.value is None:
            return []
        store, values = run.value
        families: list[Metric] = []
        for name, text, value in values:
            family = GaugeMetricFamily(f"comfybake_{name}", text, labels=["store"])
            family.add_metric([store], value)
            families.append(family)
        age = GaugeMetricFamily(
            "comfybake_model_store_scan_age_seconds",
            "Seconds since the walk that gave the store's values finished",
            labels=["store"],
        )
        age.add_metric([store], time.monotonic() - run.finished)
        families.append(age)
        return families


# --------------------------------------------------------------------------- commands


def registry(args: argparse.Namespace) -> CollectorRegistry:
    try:
        from prometheus_client import CollectorRegistry
    except ImportError:
        raise ExporterError(
            f"the exporter needs {PROMETHEUS_CLIENT}: install it (pip install {PROMETHEUS_CLIENT})"
        ) from None
    if not (math.isfinite(args.timeout) and 0 < args.timeout <= MAX_TIMEOUT):
        raise ExporterError(
            f"--timeout {args.timeout:g} must be a number of seconds more than 0 and at most {MAX_TIMEOUT:g}"
        )
    state = Path(args.state) if args.state else default_state(args.config_root)
    found = CollectorRegistry(auto_describe=False)
    found.register(Collector(args.config_root, state, args.timeout, args.nvml))
    return found


def parse_listen(text: str) -> tuple[str, int]:
    address, _colon, port = text.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not address or not 0 < number < 65536:
        raise ExporterError(f"--listen {text!r} is not ADDRESS:PORT, such as {DEFAULT_LISTEN}")
    return address.strip("[]"), number


def serve(args: argparse.Namespace) -> int:
    try:
        address, port = parse_listen(args.listen)
        found = registry(args)
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=address, registry=found)
    except (ExporterError, OSError) as error:
        logs.emit(f"error: {error}", "error", listen=args.listen)
        return 2
    # One warning object for a request that failed (a client that reset, garbage), not socketserver's
    # banner and traceback, a line each; one error object for an exception that ends a thread.
    server.handle_error = _request_failed  # type: ignore[method-assign,assignment]  # an instance attribute wins
    threading.excepthook = _thread_failed
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    logs.emit(f"comfybake exporter: serving /metrics on {args.listen}", listen=args.listen)
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    server.shutdown()
    logs.emit(f"comfybake exporter: stopped serving /metrics on {args.listen}", listen=args.listen)
    return 0


def _request_failed(_request: Any, address: Any) -> None:
    client = address[0] if isinstance(address, tuple) and address else str(address)
    error = sys.exc_info()[1]
    logs.emit(
        f"comfybake exporter: request from {client} failed: {type(error).__name__}: {error}", "warning", client=client
    )


def _thread_failed(hook: threading.ExceptHookArgs) -> None:
    if hook.exc_type is SystemExit:
        return
    name = hook.thread.name if hook.thread else "?"
    trace = "".join(traceback.format_exception(hook.exc_type, hook.exc_value, hook.exc_traceback))
    logs.emit(
        f"comfybake exporter: thread {name} failed: {hook.exc_type.__name__}: {hook.exc_value}",
        "error",
        traceback=trace,
    )


def scrape(args: argparse.Namespace) -> int:
    try:
        found = registry(args)
        from prometheus_client import generate_latest, write_to_textfile

        if args.output:
            write_to_textfile(str(args.output), found)  # a temporary file, then a rename
        else:
            sys.stdout.write(generate_latest(found).decode("utf-8"))
    except (ExporterError, OSError) as error:
        logs.emit(f"error: {error}", "error")
        return 2
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    serve_parser = actions.add_parser("serve", help="serve /metrics over HTTP until stopped")
    serve_parser.add_argument(
        "--listen", default=DEFAULT_LISTEN, help=f"ADDRESS:PORT to serve on (default {DEFAULT_LISTEN}, loopback)"
    )
    serve_parser.set_defaults(func=serve)
    scrape_parser = actions.add_parser(
        "scrape", help="print the metrics once (text format), or write them for node_exporter's textfile collector"
    )
    scrape_parser.add_argument("--output", type=Path, help="write to FILE atomically instead of printing")
    scrape_parser.set_defaults(func=scrape)
    for sub in (serve_parser, scrape_parser):
        config_root_option(sub)
        sub.add_argument(
            "--timeout",
            type=float,
            default=DEFAULT_TIMEOUT,
            help=f"seconds a scrape waits for the instances, all at once (default {DEFAULT_TIMEOUT:g}, "
            f"at most {MAX_TIMEOUT:g})",
        )
        sub.add_argument(
            "--nvml",
            choices=NVML_MODES,
            default="off",
            help="auto: GPU metrics from NVML (nvidia-ml-py) where a GPU and its driver exist; "
            "off (default): NVML is never loaded",
        )
        sub.add_argument(
            "--state",
            help="the file that keeps the prompt counters across restarts (default <config-root>/state/exporter.json); "
            "the exporter's user must be able to write its folder",
        )


SUBCOMMANDS["exporter"] = ("Prometheus metrics of this host's instances, environments and model store", configure)
