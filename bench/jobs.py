"""Benchmark of the job API: jobs per second and the latency it adds per job, against posting the
same workflow straight to ComfyUI, with 1 and 4 instances.

ComfyUI test doubles on loopback (`--seconds-per-job` of run time each, spent in the sampler)
and a real `comfybake jobs serve` (TCP on loopback) in front of them. Both sides do what a
client needs to get a job's image:

- direct: keep a WebSocket open (`/ws?clientId=`), `POST /prompt`, read messages until the
  prompt's `executing` with node null (ComfyUI's own websockets_api_example.py), `GET
  /history/<id>`, `GET /view` of each image;
- job API: `POST /v1/jobs` with `wait` (one call; the image comes back inline in base64), on a
  kept-alive connection. The API checks the workflow, places it (readiness, queue lengths),
  stores the job, uploads nothing here, follows it over its own WebSocket and encodes the image.

Measured, per number of instances: latency (`--jobs` sequential jobs; median, 95th percentile)
and throughput (`--clients` clients for `--seconds`, each job-after-job; direct clients spread
over the instances, client i on instance i mod N, as a client that did its own placement would).

    .venv/bin/python bench/jobs.py                 # 1 and 4 instances; 60 jobs, 8 clients, 10 s
    .venv/bin/python bench/jobs.py --jobs 20 --seconds 3

Nothing here asserts a time: it measures, and prints ratios.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import websocket

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "jobs"))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))

from harness.jobs import JobsHost, start_host, txt2img  # noqa: E402
from jobs_serve import serve  # noqa: E402


def graph(prefix: str) -> dict[str, Any]:
    return txt2img(prefix=prefix, steps=2)


def ask(connection: http.client.HTTPConnection, method: str, route: str, body: Any = None) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    connection.request(method, route, data, {"Content-Type": "application/json"} if data else {})
    response = connection.getresponse()
    return response.status, response.read()


class Direct:
    """A client of one instance, as a script that posts to ComfyUI itself."""

    def __init__(self, port: int, seconds: float) -> None:
        self.port, self.seconds = port, seconds
        self.client_id = str(uuid.uuid4())
        self.http = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.socket = websocket.create_connection(f"ws://127.0.0.1:{port}/ws?clientId={self.client_id}", timeout=120)

    def job(self) -> None:
        prompt_id = str(uuid.uuid4())
        body = {"prompt": graph("direct"), "client_id": self.client_id, "prompt_id": prompt_id,
                "extra_data": {"test_double_seconds": self.seconds}}  # fmt: skip
        status, _ = ask(self.http, "POST", "/prompt", body)
        if status != 200:
            raise SystemExit(f"POST /prompt answered {status}")
        while True:
            message = self.socket.recv()
            if isinstance(message, bytes):
                continue  # a preview frame
            data = json.loads(message)
            # ComfyUI's own example waits for this: sent after the prompt's history is written
            ended = data["type"] == "executing" and data["data"].get("node") is None
            if ended and data["data"].get("prompt_id") == prompt_id:
                break
        _status, raw = ask(self.http, "GET", f"/history/{prompt_id}")
        for output in json.loads(raw)[prompt_id]["outputs"].values():
            for image in output.get("images", []):
                route = f"/view?filename={image['filename']}&subfolder={image['subfolder']}&type={image['type']}"
                status, data = ask(self.http, "GET", route)
                if status != 200 or not data:
                    raise SystemExit(f"GET {route} answered {status}")

    def close(self) -> None:
        self.socket.close()
        self.http.close()


class Api:
    """A client of the job API: one synchronous call per job."""

    def __init__(self, listen: str, seconds: float) -> None:
        host, _, port = listen.rpartition(":")
        self.http = http.client.HTTPConnection(host, int(port), timeout=360)
        self.seconds = seconds

    def job(self) -> None:
        body = {"workflow": graph("api"), "wait": 300, "extra_data": {"test_double_seconds": self.seconds}}
        status, raw = ask(self.http, "POST", "/v1/jobs", body)
        job = json.loads(raw).get("job") or {}
        if status != 200 or job.get("state") != "succeeded" or not job["result"]["images"][0]["data"]:
            raise SystemExit(f"POST /v1/jobs answered {status}: {raw[:500]!r}")

    def close(self) -> None:
        self.http.close()


Client = Direct | Api


def latency(client: Client, count: int) -> list[float]:
    client.job()  # connections, placement's first /object_info: not what we time
    times = []
    for _ in range(count):
        started = time.perf_counter()
        client.job()
        times.append(time.perf_counter() - started)
    return times


def throughput(make: Callable[[int], Client], clients: int, seconds: float) -> float:
    done = [0] * clients
    stop = threading.Event()
    made = [make(index) for index in range(clients)]

    def work(index: int) -> None:
        while not stop.is_set():
            made[index].job()
            done[index] += 1

    threads = [threading.Thread(target=work, args=(index,)) for index in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started  # the jobs that were running at the stop count too
    for client in made:
        client.close()
    return sum(done) / elapsed


def p95(values: list[float]) -> float:
    return sorted(values)[max(int(len(values) * 0.95) - 1, 0)]


def measure(scratch: Path, count: int, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    host: JobsHost = start_host(scratch, {f"i{index}": "prod" for index in range(count)})
    served = serve(host.config_root, host.state_root, scratch / "serve.log")
    ports = [item.double.port for item in host.instances.values()]
    sides: dict[str, Callable[[int], Client]] = {
        "direct": lambda index: Direct(ports[index % count], args.seconds_per_job),
        "api": lambda _index: Api(served.jobs, args.seconds_per_job),
    }
    results: dict[str, dict[str, float]] = {}
    try:
        for side, make in sides.items():
            client = make(0)
            times = latency(client, args.jobs)
            client.close()
            results[side] = {
                "median": statistics.median(times) * 1000,
                "p95": p95(times) * 1000,
                "jobs/s": throughput(make, args.clients, args.seconds),
            }
    finally:
        served.stop()
        host.stop()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=60, help="sequential jobs for the latency")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients for the throughput")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each throughput run")
    parser.add_argument("--seconds-per-job", type=float, default=0.05, help="the double's run time per job")
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 4], help="instance counts to run")
    args = parser.parse_args()

    table: dict[int, dict[str, dict[str, float]]] = {}
    for count in args.instances:
        with tempfile.TemporaryDirectory(prefix="comfybake-bench-jobs-") as tmp:
            table[count] = measure(Path(tmp), count, args)

    print(f"the job tests' txt2img ({args.seconds_per_job * 1000:g} ms of run time per job) "
          f"on test doubles; {os.cpu_count()} cores; latency of {args.jobs} sequential jobs, throughput of "
          f"{args.clients} clients for {args.seconds:g} s")  # fmt: skip
    print(f"{'instances':>9}  {'':22}{'direct':>10}  {'job API':>10}  {'ratio':>6}")
    rows = [("latency median (ms)", "median", "{:>10.1f}"), ("latency p95 (ms)", "p95", "{:>10.1f}"),
            ("jobs per second", "jobs/s", "{:>10.1f}")]  # fmt: skip
    for count, results in table.items():
        direct, api = results["direct"], results["api"]
        for label, key, shape in rows:
            ratio = api[key] / direct[key]
            print(f"{count:>9}  {label:22}{shape.format(direct[key])}  {shape.format(api[key])}  {ratio:>5.2f}x")
        print(f"{count:>9}  added latency per job (median): {api['median'] - direct['median']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
