"""Benchmark of the gateway: requests per second and latency through it against straight to an instance.

One ComfyUI test double on loopback and the real Caddy with the configuration comfybake renders
(ports mode, internal CA, one user; bcrypt's hash cache makes the password check cost one hash
per connection's credentials, not one per request). Each client keeps its connection open, as
browsers and API clients do: plain HTTP to the instance, TLS to the gateway. Measured:

- latency: one client, `--requests` sequential GET /system_stats; median and 95th percentile;
- throughput: `--clients` clients in threads for `--seconds`, requests per second;
- WebSocket: connect, upgrade and first status message, median of `--requests` / 10.

    .venv/bin/python bench/gateway.py                 # the defaults: 400 requests, 8 clients, 5 s
    .venv/bin/python bench/gateway.py --requests 50 --seconds 1

The test double answers in Python; a real ComfyUI answers /system_stats in about the same time,
so the added latency is what the gateway adds, and the ratio is an upper bound on its share.
Nothing here asserts a time: it measures, and prints ratios.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import bcrypt
import websocket

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "collections"))

from ansible_collections.comfybake.core.plugins.module_utils.gateway import apply, caddy, routes  # noqa: E402
from ansible_collections.comfybake.core.plugins.module_utils.gateway.credentials import Principal  # noqa: E402
from harness.gateway import basic, copy_double, free_offset, start_caddy, start_double  # noqa: E402

PASSWORD = "bench-password"  # noqa: S105 - a throwaway on loopback

Connect = Callable[[], http.client.HTTPConnection]


def fetch(connection: http.client.HTTPConnection, headers: dict[str, str]) -> None:
    connection.request("GET", "/system_stats", headers=headers)
    response = connection.getresponse()
    response.read()
    if response.status != 200:
        raise SystemExit(f"GET /system_stats answered {response.status}")


def latency(connect: Connect, headers: dict[str, str], count: int) -> list[float]:
    connection = connect()
    fetch(connection, headers)  # the handshake and the password check are not what we time
    times = []
    for _ in range(count):
        started = time.perf_counter()
        fetch(connection, headers)
        times.append(time.perf_counter() - started)
    connection.close()
    return times


def throughput(connect: Connect, headers: dict[str, str], clients: int, seconds: float) -> float:
    done = [0] * clients
    stop = threading.Event()

    def client(index: int) -> None:
        connection = connect()
        while not stop.is_set():
            fetch(connection, headers)
            done[index] += 1
        connection.close()

    threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return sum(done) / seconds


def websocket_open(url: str, options: dict[str, object], count: int) -> float:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        client = websocket.create_connection(url, timeout=10, **options)  # type: ignore[arg-type]
        json.loads(client.recv())
        times.append(time.perf_counter() - started)
        client.close()
    return statistics.median(times)


def p95(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.95) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="sequential requests for the latency")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients for the throughput")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of the throughput run")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="comfybake-bench-") as tmp:
        scratch = Path(tmp)
        double = start_double(copy_double(scratch), scratch / "state", "bench")
        record = {"name": "bench", "environment": "e", "port": double.port, "url": f"http://127.0.0.1:{double.port}"}
        config_dir, storage, admin = scratch / "config", scratch / "storage", scratch / "run" / "admin.sock"
        for folder in (config_dir, storage, admin.parent):
            folder.mkdir(mode=0o750)
        settings = {
            "port_offset": free_offset([double.port]),
            "names": ["localhost"],
            "listen": ["127.0.0.1"],
            "storage": str(storage),
            "admin_socket": str(admin),
        }
        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt()).decode()  # the CLI's cost, not a test's
        principals = [Principal(name="bench", kind="user", hash=hashed, scope=["*"])]
        public = routes.public_routes([record], settings)
        paths = apply.Paths(config_dir=str(config_dir), group="")
        apply.apply(paths, caddy.render(public, settings, principals))
        port = public["instances"][0]["port"]
        gateway = start_caddy(Path(paths.config), storage, admin, scratch / "logs", [port])
        try:
            context = ssl.create_default_context(cafile=str(gateway.ca))
            auth = basic("bench", PASSWORD)
            sides: dict[str, tuple[Connect, dict[str, str], str, dict[str, object]]] = {
                "direct": (
                    lambda: http.client.HTTPConnection("127.0.0.1", double.port, timeout=10),
                    {},
                    f"ws://127.0.0.1:{double.port}/ws",
                    {},
                ),
                "gateway": (
                    lambda: http.client.HTTPSConnection("localhost", port, timeout=10, context=context),
                    auth,
                    f"wss://localhost:{port}/ws",
                    {"header": [f"Authorization: {auth['Authorization']}"], "sslopt": {"ca_certs": str(gateway.ca)}},
                ),
            }
            results: dict[str, dict[str, float]] = {}
            for side, (connect, headers, ws_url, ws_options) in sides.items():
                times = latency(connect, headers, args.requests)
                results[side] = {
                    "median": statistics.median(times) * 1000,
                    "p95": p95(times) * 1000,
                    "rps": throughput(connect, headers, args.clients, args.seconds),
                    "ws": websocket_open(ws_url, ws_options, max(args.requests // 10, 3)) * 1000,
                }
        finally:
            gateway.stop()
            double.stop()

    direct, through = results["direct"], results["gateway"]
    print(f"GET /system_stats on one test double, keep-alive connections; {os.cpu_count()} cores; "
          f"latency of {args.requests} sequential requests, throughput of {args.clients} clients "
          f"for {args.seconds:g} s")  # fmt: skip
    print(f"{'':32}{'direct':>10}  {'gateway':>10}  {'ratio':>6}")
    rows = [
        ("latency median (ms)", "median", "{:>10.2f}"),
        ("latency p95 (ms)", "p95", "{:>10.2f}"),
        ("requests per second", "rps", "{:>10.0f}"),
        ("WebSocket open + status (ms)", "ws", "{:>10.2f}"),
    ]
    for label, key, shape in rows:
        ratio = through[key] / direct[key]
        print(f"{label:32}{shape.format(direct[key])}  {shape.format(through[key])}  {ratio:>5.2f}x")
    print(f"added latency (median): {through['median'] - direct['median']:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
