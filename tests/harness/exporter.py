"""Run `comfybake exporter` as its own process and read what it exposes (tests/exporter)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def write_host(config_root: Path, records: list[dict[str, Any]], **host: Any) -> Path:
    """`<config root>/instances.json` as the comfyui_instances role writes it."""
    config_root.mkdir(parents=True, exist_ok=True)
    plain = [{key: value for key, value in record.items() if key != "double"} for record in records]
    (config_root / "instances.json").write_text(json.dumps({"format": 1, "instances": plain, **host}))
    return config_root


def exporter(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`comfybake exporter ...` as its own process (a generous limit: a hang fails, not hangs, the test)."""
    return subprocess.run(
        [sys.executable, "-m", "comfybake", "exporter", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def samples(text: str) -> Samples:
    """Every sample of a scrape: (name, sorted labels) to value; a series given twice fails."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in found, f"the series {key} is in the scrape twice:\n{text}"
            found[key] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


# What a stand-in instance answers by default: an instance that is up and ready (no argv to compare).
STATS = {"system": {"argv": []}, "devices": [{"name": "cuda:0 Stand-in", "vram_total": 24.0, "vram_free": 20.0}]}
TRICKLE = "trickle"  # a route that sends its headers, then one byte every half second for a minute


@contextmanager
def stand_in(name: str = "odd", **routes: Any) -> Iterator[dict[str, Any]]:
    """An HTTP server on loopback answering ComfyUI's routes as told, as an instances.json record
    named `name`. `routes` maps a route without its query (system_stats, queue, history) to a
    JSON answer (None: 404), to (seconds to wait, JSON answer), or to TRICKLE: an instance that answers so
    slowly that no socket timeout ever fires, only a deadline bounds it."""
    answers: dict[str, Any] = {"system_stats": STATS, "queue": {"queue_running": [], "queue_pending": []}}
    answers.update({"history": {}, **routes})
    stop = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_args: Any) -> None:
            return

        def do_GET(self) -> None:
            answer = answers.get(urlsplit(self.path).path.lstrip("/"))
            try:
                if answer == TRICKLE:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    for _ in range(120):
                        if stop.wait(0.5):
                            return
                        self.wfile.write(b" ")
                        self.wfile.flush()
                    return
                if isinstance(answer, tuple):
                    stop.wait(answer[0])
                    answer = answer[1]
                body = json.dumps(answer).encode() if answer is not None else b"404: Not Found"
                self.send_response(200 if answer is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # the exporter stopped waiting
                return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"name": name, "environment": "comm", "port": server.server_address[1]}
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
