"""Benchmark of `comfybake exporter`: scrape time and the exporter's CPU per scrape, 1 to 16 instances.

For each count, that many ComfyUI test doubles run as real processes on loopback (two stand-in
GPUs each), each with `--history` finished prompts in its /history (default 1000: queued with
`extra_data.test_double_seconds` 0 before timing), and a real `comfybake exporter serve` process
reads them. Every timed scrape must be complete (`comfybake_instance_up` 1 for every instance),
or the bench stops. Measured per count:

- exporter: `--scrapes` sequential GET /metrics; median and 95th percentile of the scrape time,
  and the exporter's CPU seconds per scrape (utime + stime of /proc/<pid>/stat over all scrapes);
- baseline: what an ad-hoc monitor script does, a plain serial client (urllib, one request after
  the other) reading /system_stats, /queue and /history of every instance; the same statistics,
  its CPU from this process's own clock.

The exporter does more per instance than the baseline (the readiness probe asks /system_stats
once more, and /object_info and /models where an instance requires nodes or models; the prompt
counters are read and saved under a lock); the ratio is what that and the exporter's parallel
asks cost or save.

    .venv/bin/python bench/exporter.py                  # 1, 4 and 16 instances, 50 scrapes each
    .venv/bin/python bench/exporter.py --counts 4 --scrapes 10 --history 0

Nothing here asserts a time: it measures, and prints ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from harness.double import DOUBLE, free_port  # noqa: E402
from harness.exporter import port_open, samples, value, write_host  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def start_double(tree: Path, work: Path, name: str) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """One double (as tests/exporter/conftest.py starts it) and its instances.json record."""
    port = free_port()
    state = work / "state" / name
    (state / "user").mkdir(parents=True)
    args = [
        "--listen", "127.0.0.1", "--port", str(port),
        "--user-directory", str(state / "user"), "--output-directory", str(state / "output"),
        "--database-url", f"sqlite:///{state}/comfyui.db",
    ]  # fmt: skip
    with (work / f"{name}.log").open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-s", str(tree / "main.py"), *args],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": "0,1"},
        )
    return process, {"name": name, "environment": "comm", "port": port, "args": args}


def wait_for(check: Callable[[], bool], what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {what} did not start within {seconds:g} s")
        time.sleep(0.05)


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - loopback http
        body: bytes = response.read()
        return body


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(  # noqa: S310 - loopback http
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback http
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def fill_history(record: dict[str, Any], prompts: int) -> None:
    """`prompts` prompts that finish at once, then wait until the double's queue is empty."""
    base = f"http://127.0.0.1:{record['port']}"
    prompt = {"1": {"class_type": "KSampler", "inputs": {}}}
    for _ in range(prompts):
        post(f"{base}/prompt", {"prompt": prompt, "extra_data": {"test_double_seconds": 0}})
    wait_for(
        lambda: json.loads(fetch(f"{base}/prompt"))["exec_info"]["queue_remaining"] == 0,
        f"the queue of the double on port {record['port']}",
    )


def complete(body: bytes, records: list[dict[str, Any]]) -> bool:
    """Whether a scrape reports every instance up."""
    found = samples(body.decode())
    return all(
        value(found, "comfybake_instance_up", instance=r["name"], environment=r["environment"]) == 1 for r in records
    )


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (fields 14 and 15 of /proc/<pid>/stat, after the command's parentheses)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def summary(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def measure(count: int, scrapes: int, history: int, tree: Path, work: Path) -> dict[str, float]:
    doubles, records = [], []
    exporter: subprocess.Popen[bytes] | None = None
    try:
        for index in range(count):
            process, record = start_double(tree, work, f"i{index:02d}")
            doubles.append(process)
            records.append(record)
        for record in records:
            wait_for(lambda r=record: port_open(r["port"]), f"the double on port {record['port']}")
        with ThreadPoolExecutor(len(records)) as pool:
            list(pool.map(lambda r: fill_history(r, history), records))
        config = write_host(work / "etc", records)
        port = free_port()
        exporter = subprocess.Popen(
            [
                *(sys.executable, "-m", "comfybake", "exporter", "serve", "--config-root", str(config)),
                *("--listen", f"127.0.0.1:{port}", "--state", str(work / "exporter.json")),
            ],
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )
        wait_for(lambda: port_open(port), "the exporter")
        metrics = f"http://127.0.0.1:{port}/metrics"
        fetch(metrics)  # the first scrape imports what the exporter needs: not what we time
        exporter_times, bodies = [], []
        cpu_before = cpu_seconds(exporter.pid)
        for _ in range(scrapes):
            started = time.perf_counter()
            bodies.append(fetch(metrics))
            exporter_times.append(time.perf_counter() - started)
        exporter_cpu = (cpu_seconds(exporter.pid) - cpu_before) / scrapes
        incomplete = sum(not complete(body, records) for body in bodies)
        if incomplete:
            raise SystemExit(f"bench: {incomplete} of {scrapes} scrapes of {count} instances missed an instance")

        routes = ("system_stats", "queue", "history")
        urls = [f"http://127.0.0.1:{r['port']}/{route}" for r in records for route in routes]
        for url in urls:
            fetch(url)
        baseline_times = []
        cpu_before = time.process_time()
        for _ in range(scrapes):
            started = time.perf_counter()
            for url in urls:
                fetch(url)
            baseline_times.append(time.perf_counter() - started)
        baseline_cpu = (time.process_time() - cpu_before) / scrapes
    finally:
        for process in [*doubles, *([exporter] if exporter else [])]:
            process.terminate()
        for process in [*doubles, *([exporter] if exporter else [])]:
            process.wait(timeout=10)
        shutil.rmtree(work / "state", ignore_errors=True)
    exporter_median, exporter_p95 = summary(exporter_times)
    baseline_median, baseline_p95 = summary(baseline_times)
    return {
        "exporter_median": exporter_median,
        "exporter_p95": exporter_p95,
        "exporter_cpu": exporter_cpu,
        "baseline_median": baseline_median,
        "baseline_p95": baseline_p95,
        "baseline_cpu": baseline_cpu,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 4, 16], help="instance counts (default 1 4 16)")
    parser.add_argument("--scrapes", type=int, default=50, help="scrapes per count (default 50)")
    parser.add_argument(
        "--history", type=int, default=1000, help="finished prompts in each double's /history (default 1000)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-exporter-") as folder:
        work = Path(folder)
        tree = work / "ComfyUI"
        shutil.copytree(DOUBLE, tree, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        rows = []
        for count in args.counts:
            found = measure(count, args.scrapes, args.history, tree, work / f"n{count}")
            rows.append((count, found))
            print(f"{count} instances: {found}", file=sys.stderr, flush=True)
    print(
        "| instances | exporter scrape median / p95 | baseline (serial client) median / p95 | ratio (medians) "
        "| exporter CPU per scrape | baseline CPU per round |"
    )
    print("|---|---|---|---|---|---|")
    for count, found in rows:
        print(
            f"| {count} | {found['exporter_median'] * 1000:.1f} / {found['exporter_p95'] * 1000:.1f} ms "
            f"| {found['baseline_median'] * 1000:.1f} / {found['baseline_p95'] * 1000:.1f} ms "
            f"| {found['exporter_median'] / found['baseline_median']:.2f}x "
            f"| {found['exporter_cpu'] * 1000:.1f} ms | {found['baseline_cpu'] * 1000:.1f} ms |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
